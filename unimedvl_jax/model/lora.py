"""LoRA: low-rank adapters on the projections of the MoT decoder's experts.

A targeted `Linear` (W [in, out], our layout) becomes a `LoRALinear` with two more parameters,
A [in, r] and B [r, out], and computes

    y = x @ W + b + (alpha / r) * (x @ A) @ B

(both products in the compute dtype with float32 accumulation, `layers.dense`). B starts at zero,
so a freshly adapted model computes exactly the base model. The adapters live in the model's
parameter tree next to the kernel ('decoder/layers/und/q_proj/lora_a', stacked like every layer
parameter: [layers, in, r]), so checkpoints, sharding and the layer scan handle them unchanged.

Config (`model.lora`, validated in config_validate.py): rank (0 = off), alpha, targets (a regex
searched in each expert Linear's module path, e.g. 'decoder/layers/gen/mlp/down_proj'), experts
('und', 'gen', 'both'). Training only the adapters is `train.lora=True` (train/step.py: the
optimizer state then holds the adapters alone); a curriculum stage switches it on with
`curriculum.<stage>.lora=True` (or `curriculum.<stage>.train.lora=True`).

    save_adapters(path, model)  -> a small safetensors file of the adapters alone (+ settings)
    load_adapters(path, model)  -> the adapters put back (shapes and settings checked)
    merge(model)                -> W <- W + (alpha / r) * A @ B, the adapters removed (in place)
    merged_config(cfg)          -> cfg with model.lora.rank = 0 (the merged model's config)
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.model.layers import Linear, dense

# the Linear layers of one decoder expert (paths relative to decoder/layers/<expert>/)
EXPERT_LINEARS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'mlp/gate_proj', 'mlp/up_proj',
                  'mlp/down_proj')
ADAPTER_NAMES = ('lora_a', 'lora_b')


class LoRAError(ValueError):
  """An adapter file that does not fit the model."""


def is_adapter_path(path) -> bool:
  return str(tuple(path)[-1]) in ADAPTER_NAMES


class LoRALinear(Linear):
  """A Linear (same kernel / bias objects, same parameter paths) + a low-rank adapter."""

  def __init__(self, base: Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
    self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
    axes = tuple(base.kernel.get_metadata().get('out_sharding') or (None,) * base.kernel.ndim)
    shape = tuple(base.kernel.shape)
    lead, (n_in, n_out) = shape[:-2], shape[-2:]
    pdt = base.kernel.dtype
    bound = 1.0 / np.sqrt(n_in)   # PEFT's default A init (kaiming-uniform, a = sqrt(5))
    a = jax.random.uniform(rngs.params(), lead + (n_in, rank), pdt, -bound, bound)
    hd = base.kernel.get_metadata().get('head_dim')     # heads stay whole (sharding.py)
    meta = {} if hd is None else {'head_dim': hd}
    self.lora_a = nnx.Param(a, out_sharding=axes[:-1] + (None,), **meta)
    self.lora_b = nnx.Param(jnp.zeros(lead + (rank, n_out), pdt),
                            out_sharding=axes[:-2] + (None, axes[-1]), **meta)
    self.lora_scale = float(alpha) / int(rank)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = super().__call__(x)
    dt = self.dtype
    xa = dense(x.astype(dt), self.lora_a[...].astype(dt)).astype(dt)
    d = dense(xa, self.lora_b[...].astype(dt))
    return y + (self.lora_scale * d).astype(dt)

  def merged_kernel(self) -> jax.Array:
    """W + (alpha / r) * A @ B in float32, cast to the kernel's dtype (stacked: per layer)."""
    w = self.kernel[...]
    ab = jnp.einsum('...ir,...ro->...io', self.lora_a[...].astype(jnp.float32),
                    self.lora_b[...].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + self.lora_scale * ab).astype(w.dtype)


def lora_config(cfg_model):
  """model.lora, or None when absent / rank 0."""
  lc = cfg_model.get('lora') if hasattr(cfg_model, 'get') else None
  if lc is None or int(lc.get('rank', 0)) <= 0:
    return None
  return lc


def target_paths(model, lc) -> list[tuple]:
  """Module paths of the expert Linear layers that `lc` (model.lora) selects."""
  experts = ('und', 'gen') if lc.experts == 'both' else (lc.experts,)
  rx = re.compile(lc.targets)
  out = []
  for path, mod in nnx.iter_modules(model):
    path = tuple(str(p) for p in path)
    if (type(mod) is Linear and path[:2] == ('decoder', 'layers') and len(path) > 3
        and path[2] in experts and rx.search('/'.join(path))):
      out.append(path)
  return out


def _parent(model, path):
  node = model
  for p in path[:-1]:
    node = getattr(node, p)
  return node


def add_adapters(model, lc, rngs: nnx.Rngs) -> list[tuple]:
  """Replaces every targeted Linear by a LoRALinear (in place); returns the module paths.
  Called at the end of UniMedVL.__init__ when model.lora.rank > 0."""
  paths = target_paths(model, lc)
  if not paths:
    raise LoRAError(f'model.lora.targets {lc.targets!r} (experts={lc.experts!r}) selects no '
                    'decoder projection')
  for path in paths:
    parent = _parent(model, path)
    setattr(parent, path[-1], LoRALinear(getattr(parent, path[-1]), int(lc.rank),
                                         float(lc.alpha), rngs=rngs))
  return paths


def lora_modules(model) -> list[tuple[tuple, LoRALinear]]:
  return [(tuple(str(p) for p in path), m) for path, m in nnx.iter_modules(model)
          if isinstance(m, LoRALinear)]


def merge(model):
  """Folds every adapter into its kernel and puts a plain Linear back (in place); returns the
  model, whose parameter tree is then the base model's (exportable, quantisable)."""
  for path, m in lora_modules(model):
    m.kernel[...] = m.merged_kernel()
    setattr(_parent(model, path), path[-1], plain_linear(m.kernel, m.bias, m.dtype))
  return model


def plain_linear(kernel: nnx.Param, bias, dtype) -> Linear:
  """A Linear holding the given Variables (built abstractly: nothing is allocated)."""
  lin = nnx.eval_shape(lambda: Linear(1, 1, rngs=nnx.Rngs(0), use_bias=bias is not None))
  lin.kernel, lin.bias, lin.dtype = kernel, bias, dtype
  return lin


def merged_config(cfg):
  """A copy of cfg describing the merged model (no adapters)."""
  out = cfg.copy_and_resolve_references()
  out.model.lora.rank = 0
  return out


# ------------------------------------------------------------------------ adapter files

def adapter_arrays(model_or_state) -> dict[str, np.ndarray]:
  """{'decoder.layers.und.q_proj.lora_a': array, ...} of the adapters (our layout)."""
  state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
  return {'.'.join(str(p) for p in path): np.asarray(v[...])
          for path, v in nnx.to_flat_state(state) if is_adapter_path(path)}


def _settings(lc) -> dict:
  return {'rank': int(lc.rank), 'alpha': float(lc.alpha), 'targets': str(lc.targets),
          'experts': str(lc.experts)}


def save_adapters(path: str, model, lc) -> dict:
  """Writes the adapters alone (safetensors, our [layers, in, r] / [layers, r, out] layout; the
  settings in the metadata). Returns {key: shape}."""
  from unimedvl_jax.interop.st_io import StreamingWriter
  arrays = adapter_arrays(model)
  if not arrays:
    raise LoRAError('the model has no LoRA adapters to save (model.lora.rank is 0)')
  specs = {k: (a.shape, a.dtype) for k, a in arrays.items()}
  meta = {'format': 'unimedvl_jax.lora', 'lora': json.dumps(_settings(lc))}
  with StreamingWriter(path, specs, metadata=meta) as w:
    for k, a in arrays.items():
      w.write(k, a)
  return {k: tuple(a.shape) for k, a in arrays.items()}


def load_adapters(path: str, model, lc) -> None:
  """Loads an adapter file into a model built with the same model.lora settings (strict)."""
  from unimedvl_jax.interop.st_io import SafetensorsSource
  src = SafetensorsSource(path)
  try:
    raw = src.metadata().get('lora')
    got = json.loads(raw) if raw else None
    if got != _settings(lc):
      raise LoRAError(f'{path}: adapters were saved with LoRA settings {got}, the model has '
                      f'{_settings(lc)} (model.lora)')
    flat = {}
    for pth, m in lora_modules(model):
      flat['.'.join(pth + ('lora_a',))] = m.lora_a
      flat['.'.join(pth + ('lora_b',))] = m.lora_b
    missing, extra = sorted(set(flat) - set(src.keys())), sorted(set(src.keys()) - set(flat))
    if missing or extra:
      raise LoRAError(f'{path}: adapter keys differ from the model: missing {missing[:5]}, '
                      f'unexpected {extra[:5]}')
    for k, v in flat.items():
      if tuple(src.shape(k)) != tuple(v.shape):
        raise LoRAError(f'{path}: {k} has shape {src.shape(k)}, the model needs {tuple(v.shape)}')
      v[...] = jnp.asarray(np.array(src.get(k)), v.dtype)
  finally:
    src.close()
