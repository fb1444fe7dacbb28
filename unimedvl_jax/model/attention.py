"""The attention rule of packed multimodal sequences (SPEC section 3) and the reference attention.

A query in split a may see a key in split b iff they are in the same (non-padding) sample, and
b < a, or b == a and (the split is full/noise, or the key is not after the query), and the key's
split is not a noised image other than the query's own. `allowed` is written once, elementwise, so
that the dense mask, the reference attention, the KV-cache decode and the Pallas kernels (per
block) share it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unimedvl_jax.batch import MODE_CAUSAL, MODE_FULL, MODE_NOISE, allowed  # noqa: F401 (re-exported)
from unimedvl_jax.kernels.mask import attention_mask  # noqa: F401 (re-exported)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     scale: float | None = None) -> jax.Array:
  """Grouped-query softmax attention with an explicit mask, computed in float32.

  q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D]; mask bool [B, Tq, Tk]. KV heads are not repeated in
  memory: queries are grouped [B, Tq, Hkv, G, D]. Rows with no allowed key return zeros.
  Returns [B, Tq, Hq, D] in q's dtype.
  """
  B, Tq, Hq, D = q.shape
  Hkv = k.shape[2]
  if Hq % Hkv:
    raise ValueError(f'query heads ({Hq}) must be a multiple of key/value heads ({Hkv})')
  G = Hq // Hkv
  scale = D ** -0.5 if scale is None else scale
  qg = q.reshape(B, Tq, Hkv, G, D).astype(jnp.float32)
  logits = jnp.einsum('bqhgd,bkhd->bhgqk', qg, k.astype(jnp.float32)) * scale
  m = mask[:, None, None, :, :]
  logits = jnp.where(m, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(m, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum('bhgqk,bkhd->bqhgd', p, v.astype(jnp.float32))
  return out.reshape(B, Tq, Hq, D).astype(q.dtype)


def reference_attention(q, k, v, segment_ids, split_ids, split_modes, token_idx=None, *,
                        scale=None):
  """The reference (XLA) attention of a packed sequence; the kernels are checked against it.

  q [B, T, Hq, D]; k, v [B, T, Hkv, D]; metadata int32 [B, T]. Returns [B, T, Hq, D].
  """
  return masked_attention(q, k, v, attention_mask(segment_ids, split_ids, split_modes, token_idx),
                          scale)


IMPLS = ('xla', 'blocked', 'pallas', 'splash', 'cudnn', 'auto')
KERNEL_IMPLS = ('pallas', 'splash', 'cudnn')   # what runs under shard_map, one shard per device
# backends that take the tokens in any order (with their sequence indices); the others need
# sequence order (the decoder then gathers q/k/v into it and the output back, per layer)
ANY_ORDER_IMPLS = ('xla', 'blocked')


PLATFORMS = ('cpu', 'gpu', 'tpu')


def resolve_platform(platform: str | None = None) -> str:
  """The platform the attention is compiled for: `platform` when given (config
  `model.attention_platform`; AOT planning sets 'tpu' while this process's backend is the CPU),
  else this process's default backend."""
  if not platform:
    return jax.default_backend()
  if platform not in PLATFORMS:
    raise ValueError(f'unknown attention platform {platform!r}; choose from {PLATFORMS}')
  return platform


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """'auto' -> 'pallas' on TPU and GPU, 'blocked' elsewhere; any other name is returned checked.
  platform: see `resolve_platform`."""
  if impl == 'auto':
    return 'pallas' if resolve_platform(platform) in ('tpu', 'gpu') else 'blocked'
  if impl not in IMPLS:
    raise ValueError(f'unknown attention_impl {impl!r}; choose from {IMPLS}')
  return impl


def preferred_layout(impl: str, platform: str | None = None) -> str:
  """The q/k/v layout an implementation consumes without transposing: 'bhtd' (head-major) for
  the TPU kernels (Pallas 'tpu' backend, splash), 'bthd' (token-major) otherwise."""
  platform = resolve_platform(platform)
  impl = resolve_impl(impl, platform)
  if impl == 'splash' or (impl == 'pallas' and platform == 'tpu'):
    return 'bhtd'
  return 'bthd'


def attention_plan(segment_ids, split_ids, split_modes, token_idx=None, *, impl: str,
                   block: int = 64, platform: str | None = None):
  """The backend's per-step precomputation for this metadata (the blocked attention's work
  list), or None. Compute it once outside a layer scan and pass it to every layer's call."""
  if resolve_impl(impl, platform) != 'blocked':
    return None
  from unimedvl_jax.kernels.blocked_xla import plan_for
  return plan_for(segment_ids, split_ids, split_modes, token_idx, block_q=block, block_k=block)


def attention(q, k, v, segment_ids, split_ids, split_modes, token_idx=None, *,
              impl: str = 'blocked', scale=None, layout: str = 'bthd', block: int = 64,
              plan=None, platform: str | None = None):
  """Dispatch over the attention implementations (config `model.attention_impl`):

    'blocked' block-sparse XLA (kernels/blocked_xla.py): the default where Pallas does not run
    'xla'     reference_attention (dense mask, f32 softmax)
    'pallas'  our fused kernel (kernels/flash_attention.py): Mosaic on TPU, Triton on GPU,
              interpret mode on CPU
    'splash'  JAX's TPU splash attention with a per-pack dynamic mask (kernels/splash.py);
              interpret mode on CPU
    'cudnn'   jax.nn.dot_product_attention with the explicit mask (kernels/cudnn_attention.py):
              implementation='cudnn' on GPU, 'xla' elsewhere
    'auto'    'pallas' on TPU / GPU, 'blocked' on CPU

  layout: 'bthd' q [B, T, Hq, D] (k, v with Hkv heads) or 'bhtd' [B, Hq, T, D]; the output has
  q's layout. token_idx [B, T]: sequence index of each entry when the tokens are not in sequence
  order ('blocked' and 'xla' only, token-major). plan: from `attention_plan` for the same
  metadata (shared by the layers of a stack). platform: the target platform ('cpu' | 'gpu' |
  'tpu'; None = this process's default backend), which picks 'auto', the Pallas backend,
  interpret mode and cuDNN; the caller passes it (config `model.attention_platform`), nothing
  here patches or reads a global. A multi-device mesh comes from jax's mesh context
  (`jax.set_mesh` / `sharding.use_mesh`). Every implementation is differentiable in q, k, v.
  """
  platform = resolve_platform(platform)
  impl = resolve_impl(impl, platform)
  if layout not in ('bthd', 'bhtd'):
    raise ValueError(f"layout must be 'bthd' or 'bhtd', got {layout!r}")
  if impl in ANY_ORDER_IMPLS and layout == 'bhtd':
    t = lambda x: x.transpose(0, 2, 1, 3)
    return t(attention(t(q), t(k), t(v), segment_ids, split_ids, split_modes, token_idx,
                       impl=impl, scale=scale, block=block, plan=plan, platform=platform))
  if impl == 'xla':
    return reference_attention(q, k, v, segment_ids, split_ids, split_modes, token_idx,
                               scale=scale)
  if impl == 'blocked':
    from unimedvl_jax.kernels.blocked_xla import blocked_attention
    return blocked_attention(q, k, v, segment_ids, split_ids, split_modes, token_idx,
                             block_q=block, block_k=block, scale=scale, plan=plan)
  if token_idx is not None:
    raise ValueError(f'attention_impl {impl!r} needs the tokens in sequence order')
  from unimedvl_jax import sharding
  on_cpu = platform == 'cpu'
  if impl == 'pallas':
    from unimedvl_jax.kernels.flash_attention import flash_attention
    backend = 'tpu' if platform == 'tpu' else 'generic'

    def kernel(q, k, v, seg, split, mode):
      return flash_attention(q, k, v, seg, split, mode, scale=scale, interpret=on_cpu,
                             layout=layout, backend=backend)
  elif impl == 'splash':
    from unimedvl_jax.kernels.splash import splash_attention

    def kernel(q, k, v, seg, split, mode):
      return splash_attention(q, k, v, seg, split, mode, scale=scale, interpret=on_cpu,
                              layout=layout)
  else:
    from unimedvl_jax.kernels.cudnn_attention import cudnn_attention
    implementation = 'cudnn' if platform == 'gpu' else 'xla'

    def kernel(q, k, v, seg, split, mode):
      return cudnn_attention(q, k, v, seg, split, mode, scale=scale, layout=layout,
                             implementation=implementation)
  # XLA cannot partition a Pallas (Mosaic/Triton) or cuDNN call: on a multi-device mesh each
  # device runs the kernel on its own packs (and heads under 'tensor') through jax.shard_map
  return sharding.shard_map_attention(kernel, q, k, v, segment_ids, split_ids, split_modes,
                                      head_axis=2 if layout == 'bthd' else 1)
