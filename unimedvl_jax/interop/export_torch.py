"""Export our model to the PyTorch BAGEL / UniMedVL layout and to a Hugging Face causal LM.

    python -m unimedvl_jax.convert export --checkpoint CKPT --out DIR [--dtype bf16|fp32] [--no-ema]
        [--hf-llm-out DIR2]

Writes DIR/ema.safetensors (exactly the key set of SPEC section 8: 1223 tensors for the 7B
config, torch Linear layout [out, in], metadata {"format": "pt"}), DIR/ae.safetensors (FLUX
names, OIHW), DIR/llm_config.json (Qwen2 fields + qk_norm), DIR/vit_config.json (SigLIP fields,
num_hidden_layers = built layers + 1, BAGEL's loaders subtract 1) and the tokenizer files when
the checkpoint carries them (CKPT/tokenizer/).

Memory: the files are written by a streaming safetensors writer (`st_io.StreamingWriter`), one
tensor at a time (a stacked parameter one layer at a time). Peak host memory = the restored
model (one copy) + about two copies of the largest single torch tensor (the layout transpose and
the dtype cast); no dict of all converted tensors is ever built (measured on configs/small.py,
a 233 MiB fp32 model: peak RSS +12 MiB during the export).

`export_hf_causal_lm` writes the understanding expert alone as a transformers directory:
Qwen3ForCausalLM when the model has QK-norm (Qwen3 has q_norm/k_norm; `attention_bias=True` adds
biases to q, k, v AND o_proj, so o_proj.bias is exported as zeros), else Qwen2ForCausalLM.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from unimedvl_jax.interop import keymap as km
from unimedvl_jax.interop.import_torch import TOKENIZER_FILES, dtype_name
from unimedvl_jax.interop.st_io import StreamingWriter, np_dtype

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


def write_torch_dir(cfg, model_or_state, out_dir: str, *, dtype=None,
                    tokenizer_dir: str | None = None) -> dict:
  """Writes the BAGEL-layout directory; returns {file: number of tensors, 'tokenizer': [...]}."""
  os.makedirs(out_dir, exist_ok=True)
  state = _state_of(model_or_state)
  meta = {'format': 'pt'}
  model_plan = torch_plan(state, km.MODEL_FILE, dtype)
  write_plan(os.path.join(out_dir, 'ema.safetensors'), model_plan, meta)
  out = {'ema.safetensors': len(model_plan)}
  vae_plan = torch_plan(state, km.VAE_FILE, dtype)
  if vae_plan:
    write_plan(os.path.join(out_dir, 'ae.safetensors'), vae_plan, meta)
    out['ae.safetensors'] = len(vae_plan)
  _write_json(os.path.join(out_dir, 'llm_config.json'), llm_config_json(cfg, _np_dtype(dtype)))
  if cfg.model.vit.enabled:
    _write_json(os.path.join(out_dir, 'vit_config.json'), vit_config_json(cfg))
  out['tokenizer'] = copy_tokenizer(tokenizer_dir, out_dir)
  return out


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

def find_tokenizer_dir(checkpoint: str) -> str | None:
  cands = [os.path.join(checkpoint, 'tokenizer')]
  if os.path.basename(os.path.normpath(checkpoint)) == 'checkpoints':
    cands.append(os.path.join(os.path.dirname(os.path.normpath(checkpoint)), 'tokenizer'))
  for c in cands:
    if os.path.isdir(c):
      return c
  return None


def export_checkpoint(checkpoint: str, out: str, *, dtype=None, use_ema: bool = True,
                      hf_llm_out: str | None = None, tokenizer_dir: str | None = None,
                      step: int | None = None) -> dict:
  """The CLI's `export`: Orbax checkpoint -> BAGEL-layout dir (+ optional HF causal LM dir)."""
  from unimedvl_jax.train.checkpoint import load_model
  cfg, model = load_model(checkpoint, use_ema=use_ema, step=step)
  tok = tokenizer_dir or find_tokenizer_dir(checkpoint)
  info = write_torch_dir(cfg, model, out, dtype=dtype, tokenizer_dir=tok)
  if hf_llm_out:
    info['hf_llm'] = export_hf_causal_lm(cfg, model, hf_llm_out, dtype=dtype, tokenizer_dir=tok)
  return info
