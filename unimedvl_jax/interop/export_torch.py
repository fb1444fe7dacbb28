"""Export our model to the PyTorch BAGEL / UniMedVL layout and to a Hugging Face causal LM.

    python -m unimedvl_jax.convert export --checkpoint CKPT --out DIR [--dtype bf16|fp32] [--no-ema]
        [--hf-llm-out DIR2]

Writes DIR/ema.safetensors (exactly the key set of SPEC section 8: 1223 tensors for the 7B
config, torch Linear layout [out, in], metadata {"format": "pt"}) -- or, with `--shard-size 5GB`,
the same tensors as DIR/model-0000k-of-0000n.safetensors + DIR/model.safetensors.index.json (the
transformers / vLLM layout) --, DIR/ae.safetensors (FLUX names, OIHW; its metadata records the
VAE's norm groups / eps and scale / shift factors), DIR/llm_config.json (Qwen2 fields + qk_norm),
DIR/vit_config.json (SigLIP fields, num_hidden_layers = built layers + 1, BAGEL's loaders
subtract 1), DIR/unimedvl_config.json (our full config: `convert import` of DIR needs no flags and
gives back the same config) and the tokenizer files when the checkpoint carries them
(CKPT/tokenizer/). A VAE-less import's generation adapters (CKPT/generation_adapters.safetensors)
go back into the model file; a VAE checkpoint exports to DIR/ae.safetensors.

Memory: the files are written by a streaming safetensors writer (`st_io.StreamingWriter`), one
tensor at a time (a stacked parameter one layer at a time). Peak host memory = the restored
model (one copy) + about two copies of the largest single torch tensor (the layout transpose and
the dtype cast); no dict of all converted tensors is ever built (measured on configs/small.py,
a 233 MiB fp32 model: peak RSS +16 MiB while writing, `python -m
unimedvl_jax.interop.measure_memory`). The sharded layout uses the same writer, shard by shard.

`export_hf_causal_lm` writes the understanding expert alone as a transformers directory:
Qwen3ForCausalLM when the model has QK-norm (Qwen3 has q_norm/k_norm; `attention_bias=True` adds
biases to q, k, v AND o_proj, so o_proj.bias is exported as zeros), else Qwen2ForCausalLM.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from unimedvl_jax.data.locate import checkpoint_tokenizer_dir
from unimedvl_jax.interop import keymap as km
from unimedvl_jax.interop.import_common import (ADAPTERS_FILE, SIDECAR_CONFIG, TOKENIZER_FILES,
                                                VAE_FILE_NAME, VAE_META_PREFIX, VAE_SETTINGS,
                                                dtype_name)
from unimedvl_jax.interop.st_io import (SafetensorsSource, StreamingWriter, np_dtype, parse_size,
                                        plan_shards, write_file_atomic)
from unimedvl_jax.interop.vae_checkpoint import is_vae_checkpoint, load_vae_checkpoint, vae_entries

INDEX_NAME = "model.safetensors.index.json"

# (key, shape, dtype, fetch) -- fetch() returns the torch-layout numpy tensor
Plan = list


def _np_dtype(name_or_dtype):
  """None (keep) | 'bf16' / 'fp32' / 'bfloat16' / ... | a dtype -> numpy dtype or None."""
  if name_or_dtype is None:
    return None
  if isinstance(name_or_dtype, str):
    return np_dtype(dtype_name(name_or_dtype))
  return np.dtype(name_or_dtype)


def _state_of(model_or_state):
  from flax import nnx
  if isinstance(model_or_state, nnx.Module):
    return nnx.state(model_or_state)
  return model_or_state


def _flat_values(state) -> dict:
  from flax import nnx
  out = {}
  for path, var in nnx.to_flat_state(state):
    out[tuple(path)] = var.get_value() if hasattr(var, 'get_value') else var.value
  return out


def _host(a) -> np.ndarray:
  """jax/numpy array -> numpy (zero-copy for CPU jax arrays)."""
  return np.asarray(a)


def _on_host(a) -> bool:
  """True for numpy arrays and single-device CPU jax arrays (np.asarray is then a free view)."""
  if isinstance(a, np.ndarray):
    return True
  try:
    devs = a.sharding.device_set
  except AttributeError:
    return False
  return len(devs) == 1 and next(iter(devs)).platform == 'cpu'


def _layer(a, i) -> np.ndarray:
  """Layer i of a stacked array as numpy: a numpy view on host arrays, else a device-side slice
  transferred alone (never the whole stack)."""
  return np.asarray(a)[i] if _on_host(a) else np.asarray(a[i])


def torch_plan(state, file: str = km.MODEL_FILE, dtype=None) -> Plan:
  """The tensors of one torch file for an nnx state, in a streaming-friendly order (parameter by
  parameter, layer by layer). dtype: None keeps each tensor's dtype."""
  dt = _np_dtype(dtype)
  entries = km.entries_from_state(state)
  values = _flat_values(state)
  plan = []
  for e in entries:
    if e.file != file:
      continue
    v = values[e.path]
    out_dt = dt if dt is not None else np.dtype(v.dtype)
    for i, key in enumerate(e.keys):
      def fetch(v=v, i=i, e=e, out_dt=out_dt):
        a = _layer(v, i) if e.stacked else _host(v)
        return np.ascontiguousarray(km.to_torch_layout(a, e.transform)).astype(out_dt, copy=False)
      plan.append((key, e.torch_shape, out_dt, fetch))
  return plan


def write_plan(path: str, plan: Plan, metadata=None) -> None:
  specs = {k: (s, d) for k, s, d, _ in plan}
  if len(specs) != len(plan):
    raise ValueError(f'{path}: duplicate keys in the export plan')
  with StreamingWriter(path, specs, metadata=metadata) as w:
    for k, _, _, fetch in plan:
      w.write(k, fetch())


def plan_to_dict(plan: Plan) -> dict:
  return {k: fetch() for k, _, _, fetch in plan}


def export_state_dict(model_or_state, *, dtype=None) -> tuple[dict, dict]:
  """In memory (tests): -> (model state dict, ae state dict) of numpy arrays in torch layout."""
  state = _state_of(model_or_state)
  return (plan_to_dict(torch_plan(state, km.MODEL_FILE, dtype)),
          plan_to_dict(torch_plan(state, km.VAE_FILE, dtype)))


# ------------------------------------------------------------------------------ config JSONs

def _torch_dtype_name(dt) -> str:
  return {'bfloat16': 'bfloat16', 'float32': 'float32', 'float16': 'float16'}.get(
      np_dtype(dt).name, 'float32')


def llm_config_json(cfg, dtype=None) -> dict:
  """BAGEL's llm_config.json (a Qwen2 config) + qk_norm / MoT fields its code sets."""
  llm = cfg.model.llm
  d = {
      'architectures': ['Qwen2ForCausalLM'],
      'model_type': 'qwen2',
      'attention_dropout': 0.0,
      'hidden_act': 'silu',
      'hidden_size': llm.hidden_size,
      'initializer_range': cfg.model.init_std,
      'intermediate_size': llm.intermediate_size,
      'max_position_embeddings': 32768,
      'max_window_layers': llm.num_layers,
      'num_attention_heads': llm.num_heads,
      'num_hidden_layers': llm.num_layers,
      'num_key_value_heads': llm.num_kv_heads,
      'head_dim': llm.head_dim,
      'rms_norm_eps': llm.rms_norm_eps,
      'rope_theta': float(llm.rope_theta),
      'sliding_window': None,
      'use_sliding_window': False,
      'tie_word_embeddings': False,
      'torch_dtype': _torch_dtype_name(dtype or cfg.model.param_dtype),
      'use_cache': True,
      'vocab_size': llm.vocab_size,
      'qk_norm': bool(llm.qk_norm),
      'layer_module': 'Qwen2MoTDecoderLayer',
  }
  if llm.vocab_size > 151645:
    d.update(bos_token_id=151643, eos_token_id=151645)
  return d


def vit_config_json(cfg) -> dict:
  """SigLIP vision config as BAGEL reads it: num_hidden_layers = built layers + 1."""
  v = cfg.model.vit
  return {
      'model_type': 'siglip_vision_model',
      'hidden_size': v.hidden_size,
      'intermediate_size': v.intermediate_size,
      'num_hidden_layers': v.num_layers + 1,
      'num_attention_heads': v.num_heads,
      'num_channels': 3,
      'image_size': v.grid_size * v.patch_size,
      'patch_size': v.patch_size,
      'hidden_act': 'gelu_pytorch_tanh',
      'layer_norm_eps': v.layer_norm_eps,
      'attention_dropout': 0.0,
  }


def _write_json(path, d):
  with open(path, 'w') as fh:
    json.dump(d, fh, indent=2)
    fh.write('\n')


def copy_tokenizer(tokenizer_dir: str | None, out_dir: str) -> list[str]:
  if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
    return []
  copied = []
  for f in TOKENIZER_FILES:
    p = os.path.join(tokenizer_dir, f)
    if os.path.exists(p):
      shutil.copy2(p, os.path.join(out_dir, f))
      copied.append(f)
  return copied


def vae_metadata(vae_cfg) -> dict:
  """ae.safetensors header metadata: the VAE values no tensor shape gives (re-import needs no
  flags; the reference loaders ignore metadata)."""
  out = {'format': 'pt'}
  for k, (typ, _) in VAE_SETTINGS.items():
    out[VAE_META_PREFIX + k] = repr(typ(vae_cfg[k]))
  return out


def _other_layout_files(out_dir: str, sharded: bool) -> list[str]:
  if not os.path.isdir(out_dir):
    return []
  names = os.listdir(out_dir)
  if sharded:
    return [n for n in names if n in ('ema.safetensors', 'model.safetensors')]
  return [n for n in names if n == INDEX_NAME or (n.startswith('model-') and n.endswith('.safetensors'))]


def check_out_dir(out_dir: str, shard_size=None) -> None:
  """Refuses (before anything is read or written) a bad shard size and a folder that already
  holds the other layout's model files (a re-import would not know which to read)."""
  if shard_size is not None:
    parse_size(shard_size)
  clash = _other_layout_files(out_dir, shard_size is not None)
  if clash:
    raise ValueError(f'{out_dir} already holds {", ".join(sorted(clash))} of the other layout; '
                     'export into an empty folder')


def write_model_files(out_dir: str, plan: Plan, *, shard_size=None, metadata=None) -> dict:
  """ema.safetensors, or with shard_size (bytes or '5GB') the transformers / vLLM layout:
  model-0000k-of-0000n.safetensors + model.safetensors.index.json. Streams tensor by tensor."""
  if shard_size is None:
    write_plan(os.path.join(out_dir, 'ema.safetensors'), plan, metadata)
    return {'ema.safetensors': len(plan)}
  max_bytes = parse_size(shard_size)
  specs = {k: (s, d) for k, s, d, _ in plan}
  if len(specs) != len(plan):
    raise ValueError(f'{out_dir}: duplicate keys in the export plan')
  by_key = {k: (s, d, f) for k, s, d, f in plan}
  shards = plan_shards(specs, max_bytes)
  weight_map, total = {}, 0
  for name, keys in shards:
    write_plan(os.path.join(out_dir, name), [(k,) + by_key[k] for k in keys], metadata)
    for k in keys:
      weight_map[k] = name
      s, d, _ = by_key[k]
      total += int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize
  index = {'metadata': {'total_size': total}, 'weight_map': dict(sorted(weight_map.items()))}
  write_file_atomic(os.path.join(out_dir, INDEX_NAME), json.dumps(index, indent=2))
  return {INDEX_NAME: len(plan), 'shards': [n for n, _ in shards]}


def adapters_plan(src, dtype=None) -> Plan:
  """Torch-layout tensors kept beside a VAE-less model (generation_adapters.safetensors)."""
  dt = _np_dtype(dtype)
  plan = []
  for k in src.keys():
    out_dt = dt if dt is not None else np.dtype(src.dtype(k))
    plan.append((k, src.shape(k), out_dt,
                 lambda k=k, out_dt=out_dt: np.ascontiguousarray(src.get(k)).astype(out_dt, copy=False)))
  return plan


def write_torch_dir(cfg, model_or_state, out_dir: str, *, dtype=None,
                    tokenizer_dir: str | None = None, shard_size=None, adapters=None) -> dict:
  """Writes the BAGEL-layout directory; returns {file: number of tensors, 'tokenizer': [...]}.

  shard_size: write the model tensors as transformers-style shards (`write_model_files`) instead
  of one ema.safetensors. adapters: a tensor source of generation adapters to add to the model
  file (a VAE-less import keeps them in generation_adapters.safetensors). Beside the tensors:
  llm_config.json, vit_config.json, unimedvl_config.json (the full config: a re-import needs no
  flags) and, in ae.safetensors' metadata, the VAE's norm groups / eps and scale / shift."""
  check_out_dir(out_dir, shard_size)
  os.makedirs(out_dir, exist_ok=True)
  state = _state_of(model_or_state)
  meta = {'format': 'pt'}
  model_plan = torch_plan(state, km.MODEL_FILE, dtype)
  if adapters is not None:
    have = {k for k, *_ in model_plan}
    extra = adapters_plan(adapters, dtype)
    dup = sorted(have & {k for k, *_ in extra})
    if dup:
      raise ValueError(f'{adapters.name}: {dup[:5]} are also parameters of the model')
    model_plan = model_plan + extra
  out = write_model_files(out_dir, model_plan, shard_size=shard_size, metadata=meta)
  vae_plan = torch_plan(state, km.VAE_FILE, dtype)
  if vae_plan:
    write_plan(os.path.join(out_dir, VAE_FILE_NAME), vae_plan, vae_metadata(cfg.model.vae))
    out[VAE_FILE_NAME] = len(vae_plan)
  _write_json(os.path.join(out_dir, 'llm_config.json'), llm_config_json(cfg, _np_dtype(dtype)))
  if cfg.model.vit.enabled:
    _write_json(os.path.join(out_dir, 'vit_config.json'), vit_config_json(cfg))
  from unimedvl_jax.train.checkpoint_format import config_to_json
  full = config_to_json(cfg)
  if dtype is not None:
    full['model']['param_dtype'] = _np_dtype(dtype).name
  _write_json(os.path.join(out_dir, SIDECAR_CONFIG), {'format': 'unimedvl_jax', 'config': full})
  out['tokenizer'] = copy_tokenizer(tokenizer_dir, out_dir)
  return out


def export_vae_checkpoint(path: str, out_dir: str, *, dtype=None) -> dict:
  """A VAE checkpoint (a lone ae.safetensors import) -> out_dir/ae.safetensors (with metadata)."""
  from flax import nnx
  cfg_model, ae = load_vae_checkpoint(path)
  state = nnx.state(ae)
  dt = _np_dtype(dtype)
  values = _flat_values(state)
  plan = []
  for e in vae_entries(state):
    v = values[e.path]
    out_dt = dt if dt is not None else np.dtype(v.dtype)
    plan.append((e.keys[0], e.torch_shape, out_dt,
                 lambda v=v, e=e, out_dt=out_dt: np.ascontiguousarray(
                     km.to_torch_layout(_host(v), e.transform)).astype(out_dt, copy=False)))
  os.makedirs(out_dir, exist_ok=True)
  write_plan(os.path.join(out_dir, VAE_FILE_NAME), plan, vae_metadata(cfg_model.vae))
  return {VAE_FILE_NAME: len(plan)}


# --------------------------------------------------------------- Hugging Face causal LM export

_HF_EXPERT = {
    ('q_proj', 'kernel'): 'self_attn.q_proj.weight', ('q_proj', 'bias'): 'self_attn.q_proj.bias',
    ('k_proj', 'kernel'): 'self_attn.k_proj.weight', ('k_proj', 'bias'): 'self_attn.k_proj.bias',
    ('v_proj', 'kernel'): 'self_attn.v_proj.weight', ('v_proj', 'bias'): 'self_attn.v_proj.bias',
    ('o_proj', 'kernel'): 'self_attn.o_proj.weight',
    ('q_norm', 'weight'): 'self_attn.q_norm.weight', ('k_norm', 'weight'): 'self_attn.k_norm.weight',
    ('input_layernorm', 'weight'): 'input_layernorm.weight',
    ('post_attention_layernorm', 'weight'): 'post_attention_layernorm.weight',
    ('mlp', 'gate_proj', 'kernel'): 'mlp.gate_proj.weight',
    ('mlp', 'up_proj', 'kernel'): 'mlp.up_proj.weight',
    ('mlp', 'down_proj', 'kernel'): 'mlp.down_proj.weight',
}


def hf_config_json(cfg, dtype=None) -> dict:
  llm = cfg.model.llm
  qwen3 = bool(llm.qk_norm)
  d = {
      'architectures': ['Qwen3ForCausalLM' if qwen3 else 'Qwen2ForCausalLM'],
      'model_type': 'qwen3' if qwen3 else 'qwen2',
      'vocab_size': llm.vocab_size,
      'hidden_size': llm.hidden_size,
      'intermediate_size': llm.intermediate_size,
      'num_hidden_layers': llm.num_layers,
      'num_attention_heads': llm.num_heads,
      'num_key_value_heads': llm.num_kv_heads,
      'head_dim': llm.head_dim,
      'hidden_act': 'silu',
      'max_position_embeddings': 32768,
      'rms_norm_eps': llm.rms_norm_eps,
      'rope_theta': float(llm.rope_theta),
      'rope_parameters': {'rope_type': 'default', 'rope_theta': float(llm.rope_theta)},
      'tie_word_embeddings': False,
      'use_sliding_window': False,
      'sliding_window': None,
      'max_window_layers': llm.num_layers,
      'attention_dropout': 0.0,
      'use_cache': True,
      'torch_dtype': _torch_dtype_name(dtype or cfg.model.param_dtype),
  }
  if qwen3:
    d['attention_bias'] = True     # q/k/v biases; o_proj.bias is written as zeros
  if llm.vocab_size > 151645:
    d.update(bos_token_id=151643, eos_token_id=151645)
  return d


def hf_plan(cfg, state, dtype=None) -> Plan:
  """The understanding expert as HF Qwen3/Qwen2 keys (model.*, lm_head.weight)."""
  dt = _np_dtype(dtype)
  values = _flat_values(state)
  qwen3 = bool(cfg.model.llm.qk_norm)
  plan = []

  def add(key, v, transform, layer=None):
    out_dt = dt if dt is not None else np.dtype(v.dtype)
    shape = v.shape[1:] if layer is not None else v.shape
    def fetch(v=v, layer=layer, transform=transform, out_dt=out_dt):
      a = _layer(v, layer) if layer is not None else _host(v)
      return np.ascontiguousarray(km.to_torch_layout(a, transform)).astype(out_dt, copy=False)
    plan.append((key, km.torch_shape(shape, transform), out_dt, fetch))

  add('model.embed_tokens.weight', values[('embed_tokens',)], 'identity')
  L = cfg.model.llm.num_layers
  H = cfg.model.llm.hidden_size
  for i in range(L):
    for sub, name in _HF_EXPERT.items():
      path = ('decoder', 'layers', 'und') + sub
      if path not in values:
        continue
      add(f'model.layers.{i}.{name}', values[path], 'linear' if sub[-1] == 'kernel' else 'identity',
          layer=i)
      if qwen3 and sub == ('o_proj', 'kernel'):
        out_dt = dt if dt is not None else np.dtype(values[path].dtype)
        plan.append((f'model.layers.{i}.self_attn.o_proj.bias', (H,), out_dt,
                     lambda out_dt=out_dt: np.zeros((H,), out_dt)))
  add('model.norm.weight', values[('decoder', 'norm', 'weight')], 'identity')
  add('lm_head.weight', values[('lm_head', 'kernel')], 'linear')
  return plan


def export_hf_causal_lm(cfg, model_or_state, out_dir: str, *, dtype=None,
                        tokenizer_dir: str | None = None) -> int:
  """Writes `out_dir` loadable by `transformers.AutoModelForCausalLM.from_pretrained`."""
  os.makedirs(out_dir, exist_ok=True)
  state = _state_of(model_or_state)
  plan = hf_plan(cfg, state, dtype)
  write_plan(os.path.join(out_dir, 'model.safetensors'), plan, {'format': 'pt'})
  _write_json(os.path.join(out_dir, 'config.json'), hf_config_json(cfg, _np_dtype(dtype)))
  copy_tokenizer(tokenizer_dir, out_dir)
  return len(plan)


# ------------------------------------------------------------------------------------ the CLI

def find_adapters_file(checkpoint: str) -> str | None:
  """generation_adapters.safetensors of a VAE-less import (beside its checkpoints/ folder)."""
  c = os.path.normpath(checkpoint)
  for d in (c, os.path.dirname(c) if os.path.basename(c) == 'checkpoints' else None):
    if d and os.path.isfile(os.path.join(d, ADAPTERS_FILE)):
      return os.path.join(d, ADAPTERS_FILE)
  return None


def export_checkpoint(checkpoint: str, out: str, *, dtype=None, use_ema: bool = True,
                      hf_llm_out: str | None = None, tokenizer_dir: str | None = None,
                      step: int | None = None, shard_size=None, merge_lora: bool = False) -> dict:
  """The CLI's `export`: Orbax checkpoint -> BAGEL-layout dir (+ optional HF causal LM dir).
  A VAE checkpoint (a lone ae.safetensors import) exports to out/ae.safetensors. A checkpoint
  with LoRA adapters (model.lora) exports only with merge_lora: W + alpha/r * A @ B per adapted
  projection (model/lora.py), written as the plain model (its config with model.lora.rank 0)."""
  if is_vae_checkpoint(checkpoint):
    return export_vae_checkpoint(checkpoint, out, dtype=dtype)
  check_out_dir(out, shard_size)
  from unimedvl_jax.model import lora
  from unimedvl_jax.train.model_checkpoint import load_config, load_model
  rank = load_config(checkpoint, step).model.lora.rank
  if rank > 0 and not merge_lora:
    raise ValueError(f'checkpoint {checkpoint} has LoRA adapters (model.lora.rank={rank}): pass '
                     '--merge-lora to fold them into the base weights (the PyTorch layout has no '
                     'adapter keys)')
  cfg, model = load_model(checkpoint, use_ema=use_ema, step=step)
  merged = len(lora.lora_modules(model))
  if merged:
    lora.merge(model)
    cfg = lora.merged_config(cfg)
  tok = tokenizer_dir or checkpoint_tokenizer_dir(checkpoint)
  adapters = None
  path = find_adapters_file(checkpoint) if not cfg.model.vae.enabled else None
  if path is not None:
    adapters = SafetensorsSource(path)
  try:
    info = write_torch_dir(cfg, model, out, dtype=dtype, tokenizer_dir=tok, shard_size=shard_size,
                           adapters=adapters)
  finally:
    if adapters is not None:
      adapters.close()
  if path is not None:
    info['generation_adapters'] = path
  if hf_llm_out:
    info['hf_llm'] = export_hf_causal_lm(cfg, model, hf_llm_out, dtype=dtype, tokenizer_dir=tok)
  if merged:
    info['lora_merged'] = merged
  return info
