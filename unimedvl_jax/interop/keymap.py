"""The exact bijection between our parameter tree and the PyTorch (BAGEL / UniMedVL) checkpoint.

Two files, as released (SPEC section 8):
  `ema.safetensors` (file 'model'): 1223 tensors for the 7B-MoT config, torch Linear layout
      [out, in], keys `language_model.*`, `vit_model.vision_model.*`, `connector.*`,
      `vit_pos_embed.pos_embed`, `latent_pos_embed.pos_embed`, `time_embedder.mlp.{0,2}.*`,
      `vae2llm.*`, `llm2vae.*`;
  `ae.safetensors` (file 'vae'): the FLUX autoencoder, conv weights OIHW, keys `encoder.*`,
      `decoder.*` (our subtree `vae`).

One `Entry` per leaf of `nnx.state(UniMedVL)`: its path, the torch key(s) (one per layer for
params stacked on a leading layer axis), and the transform between the two layouts:

  'identity'   same array (norms, biases, embeddings, position tables)
  'linear'     ours [in, out]  <->  torch [out, in]                      (Linear weights)
  'conv'       ours HWIO [kh, kw, in, out]  <->  torch OIHW [out, in, kh, kw]
  'conv1x1'    ours [in, out]  <->  torch [out, in, 1, 1]                (FLUX attention q/k/v/proj_out
                                                                          when our module is a Linear)

Conversion is renames and transposes only (no constants folded into weights; RoPE stays in the
HF rotate_half layout). Every leaf of the model must have a rule: an unknown path is an error
(`KeyMapError`), so a new parameter can never be silently left out of an export.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping

import numpy as np

MODEL_FILE = 'model'
VAE_FILE = 'vae'

LLM_PREFIX = 'language_model.model.'
VIT_PREFIX = 'vit_model.vision_model.'
GEN_SUFFIX = '_moe_gen'


class KeyMapError(KeyError):
  """A parameter path has no torch name, or a torch key has no parameter."""

  def __str__(self):   # KeyError quotes its message; show it plainly
    return str(self.args[0]) if self.args else ''


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple            # path in nnx.to_flat_state(nnx.state(model))
  file: str              # MODEL_FILE or VAE_FILE
  keys: tuple            # torch key per layer (stacked) or a single key
  stacked: bool          # True: our array has a leading layer axis of len(keys)
  transform: str         # 'identity' | 'linear' | 'conv' | 'conv1x1'
  shape: tuple           # our full shape (with the layer axis when stacked)
  dtype: object          # our dtype (numpy/jax dtype)

  @property
  def torch_shape(self) -> tuple:
    """Shape of ONE torch tensor (one layer)."""
    s = self.shape[1:] if self.stacked else self.shape
    return torch_shape(s, self.transform)


# ------------------------------------------------------------------------------------ transforms

def torch_shape(our_shape, transform: str) -> tuple:
  s = tuple(int(d) for d in our_shape)
  if transform == 'identity':
    return s
  if transform == 'linear':
    return (s[1], s[0])
  if transform == 'conv':
    return (s[3], s[2], s[0], s[1])
  if transform == 'conv1x1':
    return (s[1], s[0], 1, 1)
  raise ValueError(f'unknown transform {transform!r}')


def to_torch_layout(a, transform: str):
  """Our layout -> torch layout (numpy in, numpy out; a view when possible)."""
  if transform == 'identity':
    return a
  if transform == 'linear':
    return a.T
  if transform == 'conv':
    return a.transpose(3, 2, 0, 1)
  if transform == 'conv1x1':
    return a.T[:, :, None, None]
  raise ValueError(f'unknown transform {transform!r}')


def from_torch_layout(a, transform: str):
  """Torch layout -> our layout (numpy in, numpy out; a view when possible)."""
  if transform == 'identity':
    return a
  if transform == 'linear':
    return a.T
  if transform == 'conv':
    return a.transpose(2, 3, 1, 0)
  if transform == 'conv1x1':
    return a[:, :, 0, 0].T
  raise ValueError(f'unknown transform {transform!r}')


# ---------------------------------------------------------------------------------- name rules

# MoT expert leaf (path inside decoder.layers.{und,gen}) -> torch name after 'layers.{i}.';
# '{E}' is '' for the understanding expert and '_moe_gen' for the generation expert.
_EXPERT_RULES = {
    ('q_proj', 'kernel'): 'self_attn.q_proj{E}.weight',
    ('q_proj', 'bias'): 'self_attn.q_proj{E}.bias',
    ('k_proj', 'kernel'): 'self_attn.k_proj{E}.weight',
    ('k_proj', 'bias'): 'self_attn.k_proj{E}.bias',
    ('v_proj', 'kernel'): 'self_attn.v_proj{E}.weight',
    ('v_proj', 'bias'): 'self_attn.v_proj{E}.bias',
    ('o_proj', 'kernel'): 'self_attn.o_proj{E}.weight',
    ('q_norm', 'weight'): 'self_attn.q_norm{E}.weight',
    ('k_norm', 'weight'): 'self_attn.k_norm{E}.weight',
    ('input_layernorm', 'weight'): 'input_layernorm{E}.weight',
    ('post_attention_layernorm', 'weight'): 'post_attention_layernorm{E}.weight',
    ('mlp', 'gate_proj', 'kernel'): 'mlp{E}.gate_proj.weight',
    ('mlp', 'up_proj', 'kernel'): 'mlp{E}.up_proj.weight',
    ('mlp', 'down_proj', 'kernel'): 'mlp{E}.down_proj.weight',
}
_EXPERT_SUFFIX = {'und': '', 'gen': GEN_SUFFIX}

# Non-stacked top-level leaves of the model file.
_TOP_RULES = {
    ('embed_tokens',): LLM_PREFIX + 'embed_tokens.weight',
    ('lm_head', 'kernel'): 'language_model.lm_head.weight',
    ('decoder', 'norm', 'weight'): LLM_PREFIX + 'norm.weight',
    ('decoder', 'norm_moe_gen', 'weight'): LLM_PREFIX + 'norm_moe_gen.weight',
    ('connector', 'fc1', 'kernel'): 'connector.fc1.weight',
    ('connector', 'fc1', 'bias'): 'connector.fc1.bias',
    ('connector', 'fc2', 'kernel'): 'connector.fc2.weight',
    ('connector', 'fc2', 'bias'): 'connector.fc2.bias',
    ('vit_pos_embed', 'pos_embed'): 'vit_pos_embed.pos_embed',
    ('latent_pos_embed', 'pos_embed'): 'latent_pos_embed.pos_embed',
    ('time_embedder', 'fc1', 'kernel'): 'time_embedder.mlp.0.weight',
    ('time_embedder', 'fc1', 'bias'): 'time_embedder.mlp.0.bias',
    ('time_embedder', 'fc2', 'kernel'): 'time_embedder.mlp.2.weight',
    ('time_embedder', 'fc2', 'bias'): 'time_embedder.mlp.2.bias',
    ('vae2llm', 'kernel'): 'vae2llm.weight',
    ('vae2llm', 'bias'): 'vae2llm.bias',
    ('llm2vae', 'kernel'): 'llm2vae.weight',
    ('llm2vae', 'bias'): 'llm2vae.bias',
    ('vit', 'embeddings', 'patch_embedding', 'kernel'):
        VIT_PREFIX + 'embeddings.patch_embedding.weight',
    ('vit', 'embeddings', 'patch_embedding', 'bias'): VIT_PREFIX + 'embeddings.patch_embedding.bias',
    ('vit', 'embeddings', 'position_embedding'): VIT_PREFIX + 'embeddings.position_embedding.weight',
    ('vit', 'post_layernorm', 'weight'): VIT_PREFIX + 'post_layernorm.weight',
    ('vit', 'post_layernorm', 'bias'): VIT_PREFIX + 'post_layernorm.bias',
}

# SigLIP encoder layer leaf (path inside vit.encoder.layers) -> torch name after 'layers.{j}.'.
_VIT_LAYER_RULES = {}
for _p in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
  _VIT_LAYER_RULES[('self_attn', _p, 'kernel')] = f'self_attn.{_p}.weight'
  _VIT_LAYER_RULES[('self_attn', _p, 'bias')] = f'self_attn.{_p}.bias'
for _p in ('layer_norm1', 'layer_norm2'):
  _VIT_LAYER_RULES[(_p, 'weight')] = f'{_p}.weight'
  _VIT_LAYER_RULES[(_p, 'bias')] = f'{_p}.bias'
for _p in ('fc1', 'fc2'):
  _VIT_LAYER_RULES[('mlp', _p, 'kernel')] = f'mlp.{_p}.weight'
  _VIT_LAYER_RULES[('mlp', _p, 'bias')] = f'mlp.{_p}.bias'

# Leaf names of our VAE -> FLUX names (GroupNorm scale / conv and dense kernels).
_VAE_LEAF = {'kernel': 'weight', 'scale': 'weight', 'weight': 'weight', 'bias': 'bias'}


def _fmt(path) -> str:
  return '/'.join(str(p) for p in path)


def torch_name(path: tuple, ndim: int) -> tuple[str, str, str | None]:
  """Our leaf path -> (file, torch key template, transform). A stacked leaf's template holds
  '{i}' for the layer index. ndim: the rank of ONE layer's array (used to spot conv kernels).
  Raises KeyMapError for a path without a rule."""
  path = tuple(path)
  is_kernel = path[-1] == 'kernel'
  if path in _TOP_RULES:
    return MODEL_FILE, _TOP_RULES[path], 'linear' if is_kernel else 'identity'
  if path[:2] == ('decoder', 'layers') and len(path) > 3 and path[2] in _EXPERT_SUFFIX:
    rule = _EXPERT_RULES.get(path[3:])
    if rule is not None:
      key = LLM_PREFIX + 'layers.{i}.' + rule.replace('{E}', _EXPERT_SUFFIX[path[2]])
      return MODEL_FILE, key, 'linear' if is_kernel else 'identity'
  if path[:3] == ('vit', 'encoder', 'layers'):
    rule = _VIT_LAYER_RULES.get(path[3:])
    if rule is not None:
      return MODEL_FILE, VIT_PREFIX + 'encoder.layers.{i}.' + rule, 'linear' if is_kernel else 'identity'
  if path[:1] == ('vae',) and len(path) > 2 and path[-1] in _VAE_LEAF:
    body = '.'.join(str(p) for p in path[1:-1])
    key = f'{body}.{_VAE_LEAF[path[-1]]}'
    if is_kernel:
      transform = 'conv' if ndim == 4 else 'conv1x1' if ndim == 2 else None
      if transform is None:
        raise KeyMapError(f'VAE kernel {_fmt(path)} has rank {ndim}; expected 4 (HWIO) or 2')
    else:
      transform = 'identity'
    return VAE_FILE, key, transform
  raise KeyMapError(f'parameter {_fmt(path)} has no PyTorch checkpoint name (interop/keymap.py)')


def _is_stacked(path: tuple) -> bool:
  return tuple(path[:2]) == ('decoder', 'layers') or tuple(path[:3]) == ('vit', 'encoder', 'layers')


def entries_from_state(state, prefix: tuple = ()) -> list[Entry]:
  """All entries for an nnx state (concrete or abstract from nnx.eval_shape), in state order.

  prefix: where `state` sits in UniMedVL's tree (('vae',) for a lone AutoEncoder's state); the
  entries' paths stay relative to `state`."""
  from flax import nnx
  out = []
  prefix = tuple(prefix)
  for path, var in nnx.to_flat_state(state):
    value = var.get_value() if hasattr(var, 'get_value') else var.value
    shape = tuple(int(d) for d in value.shape)
    stacked = _is_stacked(prefix + tuple(path))
    ndim = len(shape) - 1 if stacked else len(shape)
    file, tmpl, transform = torch_name(prefix + tuple(path), ndim)
    keys = tuple(tmpl.format(i=i) for i in range(shape[0])) if stacked else (tmpl,)
    out.append(Entry(tuple(path), file, keys, stacked, transform, shape, value.dtype))
  seen: dict[str, tuple] = {}
  for e in out:
    for k in e.keys:
      if k in seen:
        raise KeyMapError(f'torch key {k!r} is produced by both {_fmt(seen[k])} and {_fmt(e.path)}')
      seen[k] = e.path
  return out


def abstract_model(cfg_model):
  """UniMedVL built abstractly (nnx.eval_shape: shapes and dtypes, nothing allocated)."""
  from flax import nnx
  graphdef, state = abstract_split(cfg_model)
  return nnx.merge(graphdef, state)


_ABSTRACT_CACHE: dict = {}


def abstract_split(cfg_model):
  """(graphdef, abstract nnx.State) of UniMedVL(cfg_model); cached per model config (building
  the abstract model costs seconds). Callers must not mutate the returned state's Variables."""
  from flax import nnx
  from unimedvl_jax.model.unimedvl import abstract_model
  key = cfg_model.to_json(sort_keys=True) if hasattr(cfg_model, 'to_json') else None
  if key is not None and key in _ABSTRACT_CACHE:
    return _ABSTRACT_CACHE[key]
  out = nnx.split(abstract_model(cfg_model))
  if key is not None:
    if len(_ABSTRACT_CACHE) > 8:
      _ABSTRACT_CACHE.clear()
    _ABSTRACT_CACHE[key] = out
  return out


def model_entries(cfg) -> list[Entry]:
  """Entries of the model described by `cfg` (a full config or its `model` section)."""
  cfg_model = cfg.model if 'model' in cfg else cfg
  return entries_from_state(abstract_split(cfg_model)[1])


def expected_keys_from_entries(entries: Iterable[Entry], file: str = MODEL_FILE) -> dict[str, tuple]:
  out = {}
  for e in entries:
    if e.file == file:
      for k in e.keys:
        out[k] = e.torch_shape
  return out


def expected_torch_keys(cfg, file: str = MODEL_FILE) -> dict[str, tuple]:
  """torch key -> shape of the checkpoint file ('model' = ema.safetensors, 'vae' =
  ae.safetensors) for `cfg`. The released 7B config gives exactly 1223 model keys."""
  return expected_keys_from_entries(model_entries(cfg), file)


# ------------------------------------------------------------------ generation adapters

# The tensors of the generation path outside the decoder: UniMedVL builds them together with the
# VAE (`model.vae.enabled`), but a checkpoint may hold them without its ae.safetensors.
GEN_ADAPTER_PREFIXES = ('vae2llm.', 'llm2vae.', 'time_embedder.', 'latent_pos_embed.')


def is_gen_adapter_key(key: str) -> bool:
  return key.startswith(GEN_ADAPTER_PREFIXES)


def gen_adapter_keys(cfg_model) -> dict[str, tuple]:
  """torch key -> shape of the generation adapters for a model config (whether or not its VAE
  is enabled), written from SPEC section 8."""
  H = cfg_model.llm.hidden_size
  d = cfg_model.latent_patch_size ** 2 * cfg_model.vae.z_channels
  F = cfg_model.timestep_freq_dim
  G = cfg_model.max_latent_size
  return {'latent_pos_embed.pos_embed': (G * G, H),
          'time_embedder.mlp.0.weight': (H, F), 'time_embedder.mlp.0.bias': (H,),
          'time_embedder.mlp.2.weight': (H, H), 'time_embedder.mlp.2.bias': (H,),
          'vae2llm.weight': (H, d), 'vae2llm.bias': (H,),
          'llm2vae.weight': (d, H), 'llm2vae.bias': (d,)}


# ------------------------------------------------------------------- FLUX autoencoder key set

def flux_ae_keys(vae_cfg) -> dict[str, tuple]:
  """The key set of a FLUX `AutoEncoder` state dict (ae.safetensors) for our VAE config, written
  from the reference module structure (flux/modules/autoencoder.py), independent of our VAE's
  own names: the keymap must land exactly on it."""
  ch, mult, nrb = vae_cfg.base_channels, tuple(vae_cfg.channel_mult), vae_cfg.num_res_blocks
  zc, cin = vae_cfg.z_channels, vae_cfg.in_channels
  keys: dict[str, tuple] = {}

  def conv(name, o, i, k):
    keys[f'{name}.weight'] = (o, i, k, k)
    keys[f'{name}.bias'] = (o,)

  def norm(name, c):
    keys[f'{name}.weight'] = (c,)
    keys[f'{name}.bias'] = (c,)

  def resblock(name, i, o):
    norm(f'{name}.norm1', i)
    conv(f'{name}.conv1', o, i, 3)
    norm(f'{name}.norm2', o)
    conv(f'{name}.conv2', o, o, 3)
    if i != o:
      conv(f'{name}.nin_shortcut', o, i, 1)

  def attn(name, c):
    norm(f'{name}.norm', c)
    for p in ('q', 'k', 'v', 'proj_out'):
      conv(f'{name}.{p}', c, c, 1)

  def mid(name, c):
    resblock(f'{name}.mid.block_1', c, c)
    attn(f'{name}.mid.attn_1', c)
    resblock(f'{name}.mid.block_2', c, c)

  n = len(mult)
  conv('encoder.conv_in', ch, cin, 3)
  in_mult = (1,) + mult
  block_in = ch
  for lvl in range(n):
    block_in, block_out = ch * in_mult[lvl], ch * mult[lvl]
    for b in range(nrb):
      resblock(f'encoder.down.{lvl}.block.{b}', block_in, block_out)
      block_in = block_out
    if lvl != n - 1:
      conv(f'encoder.down.{lvl}.downsample.conv', block_in, block_in, 3)
  mid('encoder', block_in)
  norm('encoder.norm_out', block_in)
  conv('encoder.conv_out', 2 * zc, block_in, 3)

  block_in = ch * mult[-1]
  conv('decoder.conv_in', block_in, zc, 3)
  mid('decoder', block_in)
  for lvl in reversed(range(n)):
    block_out = ch * mult[lvl]
    for b in range(nrb + 1):
      resblock(f'decoder.up.{lvl}.block.{b}', block_in, block_out)
      block_in = block_out
    if lvl != 0:
      conv(f'decoder.up.{lvl}.upsample.conv', block_in, block_in, 3)
  norm('decoder.norm_out', block_in)
  conv('decoder.conv_out', cin, block_in, 3)
  return keys


# ------------------------------------------------------------------------------- key checking

class KeySetError(ValueError):
  """A checkpoint's key set or shapes differ from what the model needs."""


def check_key_set(found: Mapping[str, tuple], expected: Mapping[str, tuple], what: str,
                  ignore: Iterable[str] = ()) -> None:
  """Strict comparison: raises KeySetError listing every missing, unexpected and mis-shaped key.

  `ignore`: keys present in `found` that are deliberately not used (reported by the caller)."""
  ignore = set(ignore)
  missing = sorted(k for k in expected if k not in found)
  unexpected = sorted(k for k in found if k not in expected and k not in ignore)
  misshaped = sorted(k for k in expected if k in found
                     and tuple(int(d) for d in found[k]) != tuple(expected[k]))
  if not (missing or unexpected or misshaped):
    return
  lines = [f'{what}: the key set does not match the model '
           f'({len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped)']
  if missing:
    lines.append('missing keys:')
    lines += [f'  {k}  expected {list(expected[k])}' for k in missing]
  if unexpected:
    lines.append('unexpected keys:')
    lines += [f'  {k}  {list(found[k])}' for k in unexpected]
  if misshaped:
    lines.append('mis-shaped keys:')
    lines += [f'  {k}  found {list(found[k])}, expected {list(expected[k])}' for k in misshaped]
  raise KeySetError('\n'.join(lines))


def layer_indices(keys: Iterable[str], prefix: str) -> list[int]:
  """Sorted distinct integers i of keys 'prefix{i}.…'."""
  out = set()
  for k in keys:
    if k.startswith(prefix):
      head = k[len(prefix):].split('.', 1)[0]
      if head.isdigit():
        out.add(int(head))
  return sorted(out)


def isqrt_exact(n: int, what: str) -> int:
  r = math.isqrt(int(n))
  if r * r != n:
    raise KeySetError(f'{what}: {n} rows is not a square grid')
  return r


def np_dtype_name(dtype) -> str:
  return np.dtype(dtype).name
