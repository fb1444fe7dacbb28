"""Parameter counts, analytic model FLOPs, the measured matmul peak, MFU, traces and HLO dumps.

FLOPs convention (documented once, used by every benchmark and by `inspect`):
- a matmul of [m, k] x [k, n] is 2*m*k*n FLOPs; elementwise ops, norms, softmax are not counted;
- every token slot of the static pack budget is counted in the decoder layers (padding included:
  it is computed), but only useful work elsewhere: lm_head at the CE rows (label tokens), the VAE
  encoder at the real images (their own sizes; nothing with a latent cache);
- attention counts 4*D FLOPs per (query head, key) pair that the mask ALLOWS (QK^T and PV), so
  causal text is counted about halved and invisible noised images not at all; when the pairs are
  unknown (planning) a causal sequence is assumed (T*(T+1)/2 pairs);
- training = forward + backward = 3x forward for trainable parts; frozen towers (VAE always, ViT
  when train.freeze freezes every one of its parameters, `vit_frozen`) count their forward only;
  rematerialisation is NOT counted (MFU, not HFU).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.model.embeddings import Buffer


# ------------------------------------------------------------------------------ parameter counts

def abstract_model(cfg_model):
  """model.unimedvl.abstract_model (kept here for the callers of profiling.abstract_model)."""
  from unimedvl_jax.model.unimedvl import abstract_model as build
  return build(cfg_model)


def _component(path: tuple) -> str:
  p = [str(x) for x in path]
  if p[0] == 'decoder':
    if p[1] == 'layers':
      return 'llm_und' if p[2] == 'und' else 'llm_gen'
    return 'llm_gen' if p[1] == 'norm_moe_gen' else 'llm_und'
  if p[0] in ('embed_tokens', 'lm_head'):
    return 'llm_und'
  return p[0]


def param_counts(cfg_model) -> dict[str, int]:
  """Parameter counts per component, `total` (without the VAE, counting the frozen sin-cos tables
  as the reference checkpoint does) and `vae`."""
  model = abstract_model(cfg_model)
  counts: dict[str, int] = {}
  flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param))) + list(
      nnx.to_flat_state(nnx.state(model, Buffer)))
  for path, v in flat:
    c = _component(path)
    counts[c] = counts.get(c, 0) + int(np.prod(v.shape))
  vae = counts.pop('vae', 0)
  out = dict(sorted(counts.items()))
  out['llm'] = out.get('llm_und', 0) + out.get('llm_gen', 0)
  out['total'] = sum(v for k, v in counts.items())
  out['vae'] = vae
  return out


# ------------------------------------------------------------------------------ analytic FLOPs

def _vae_encoder_flops(vae, size, width: int | None = None) -> float:
  """Forward FLOPs of the FLUX encoder on one size x size (or size x width) image (convs + mid
  attention)."""
  ch, mult, nres, z = vae.base_channels, tuple(vae.channel_mult), vae.num_res_blocks, vae.z_channels
  conv = lambda h, w, ci, co, k: 2.0 * h * w * ci * co * k * k
  f = 0.0
  h, w = size, size if width is None else width
  f += conv(h, w, vae.in_channels, ch, 3)
  cin = ch
  for i, m in enumerate(mult):
    cout = ch * m
    for _ in range(nres):
      f += conv(h, w, cin, cout, 3) + conv(h, w, cout, cout, 3)
      if cin != cout:
        f += conv(h, w, cin, cout, 1)
      cin = cout
    if i != len(mult) - 1:
      h, w = h // 2, w // 2
      f += conv(h, w, cin, cin, 3)
  c = cin
  res = 2 * (conv(h, w, c, c, 3) * 2)
  attn = 4 * conv(h, w, c, c, 1) + 2 * 2.0 * (h * w) ** 2 * c
  f += res + attn + conv(h, w, c, 2 * z, 3)
  return f


def _vae_decoder_flops(vae, size, width: int | None = None) -> float:
  """Forward FLOPs of the FLUX decoder producing one size x size (or size x width) image."""
  ch, mult, nres, z = vae.base_channels, tuple(vae.channel_mult), vae.num_res_blocks, vae.z_channels
  conv = lambda h, w, ci, co, k: 2.0 * h * w * ci * co * k * k
  h = size // 2 ** (len(mult) - 1)
  w = (size if width is None else width) // 2 ** (len(mult) - 1)
  c = ch * mult[-1]
  f = conv(h, w, z, c, 3)
  f += 2 * (conv(h, w, c, c, 3) * 2) + 4 * conv(h, w, c, c, 1) + 2 * 2.0 * (h * w) ** 2 * c
  cin = c
  for i in reversed(range(len(mult))):
    cout = ch * mult[i]
    for _ in range(nres + 1):
      f += conv(h, w, cin, cout, 3) + conv(h, w, cout, cout, 3)
      if cin != cout:
        f += conv(h, w, cin, cout, 1)
      cin = cout
    if i != 0:
      h, w = 2 * h, 2 * w
      f += conv(h, w, cin, cin, 3)
  return f + conv(h, w, cin, vae.in_channels, 3)


def vae_stage_flops_per_step(cfg, slots: int, batch=None) -> float:
  """Analytic FLOPs of one step of the 'vae' objective (train/step.py vae_objective): encoder and
  decoder forward + backward (3x forward) on the first `slots` slots of every size bucket of
  every pack (with `batch`: only the slots that hold an image)."""
  from unimedvl_jax.batch import Geometry, bucket_key
  v, B = cfg.model.vae, cfg.data.batch_size
  total = 0.0
  for h, w, n in Geometry.from_config(cfg).vae_buckets:
    k = min(n, slots)
    used = B * k if batch is None else int(np.sum(np.asarray(batch[bucket_key(h, w) + '_image'])
                                                  [:, :k] >= 0))
    total += used * (_vae_encoder_flops(v, h, w) + _vae_decoder_flops(v, h, w))
  return 3.0 * total


def batch_work(cfg, batch) -> dict:
  """The useful work of one packed batch: allowed attention pairs, ViT pairs, CE rows and the
  (h, w) of every VAE image the step encodes (none with a latent cache)."""
  vit = np.asarray(batch['vit_segment_ids'])
  vit_pairs = 0.0
  for row in vit:
    _, counts = np.unique(row[row != 0], return_counts=True)
    vit_pairs += float(np.sum(counts.astype(np.float64) ** 2))
  sizes = []
  for k in batch:
    if k.startswith('vae_') and k.endswith('_image') and k != 'vae_image_noised':
      h, w = (int(x) for x in k[4:-6].split('x'))
      sizes += [(h, w)] * int(np.sum(np.asarray(batch[k]) >= 0))
  return dict(attn_pairs=allowed_pairs(batch), vit_pairs=vit_pairs,
              label_tokens=float(np.sum(np.asarray(batch['loss_mask']))), vae_images=sizes)


def model_flops_per_step(cfg, *, attn_pairs: float | None = None, vit_pairs: float | None = None,
                         frozen: tuple[str, ...] | None = None, label_tokens: float | None = None,
                         vae_images=None, batch=None) -> dict[str, float]:
  """Analytic training FLOPs of one step: the USEFUL work only (see module doc).

  frozen: train.freeze entries (regexes over parameter paths / config.FREEZE_ALIASES names;
    None -> cfg.train.freeze); the ViT counts as frozen when they freeze all of it (`vit_frozen`).
  batch: a packed (numpy) batch; its exact work (`batch_work`) fills the arguments below.
  attn_pairs: allowed (query, key) pairs summed over the batch (None -> causal over T).
  vit_pairs: allowed ViT pairs summed over the batch (None -> P^2 / 4, i.e. ~4 images per pack).
  label_tokens: CE rows of the batch (lm_head runs there only; None -> the label budget C).
  vae_images: [(h, w), ...] images the frozen VAE encodes in the step (None -> every slot of
    every size bucket; [] with a latent cache).
  """
  if batch is not None:
    w = batch_work(cfg, batch)
    attn_pairs = w['attn_pairs'] if attn_pairs is None else attn_pairs
    vit_pairs = w['vit_pairs'] if vit_pairs is None else vit_pairs
    label_tokens = w['label_tokens'] if label_tokens is None else label_tokens
    vae_images = w['vae_images'] if vae_images is None else vae_images
  from unimedvl_jax.batch import Geometry
  geom = Geometry.from_config(cfg)
  m, d = cfg.model, cfg.data
  llm = m.llm
  frozen = tuple(cfg.train.freeze) if frozen is None else frozen
  B, T, L = d.batch_size, d.seq_len, d.max_latent_tokens
  H, D, Hq, Hkv, I, V = (llm.hidden_size, llm.head_dim, llm.num_heads, llm.num_kv_heads,
                         llm.intermediate_size, llm.vocab_size)
  layer_params = H * Hq * D + 2 * H * Hkv * D + Hq * D * H + 3 * H * I
  fwd = {}
  fwd['llm_layers'] = 2.0 * layer_params * llm.num_layers * B * T
  if attn_pairs is None:
    attn_pairs = B * T * (T + 1) / 2
  fwd['llm_attention'] = 4.0 * D * Hq * attn_pairs * llm.num_layers
  if label_tokens is None:
    label_tokens = B * geom.labels
  fwd['lm_head'] = 2.0 * H * V * label_tokens
  out = {}
  if m.vit.enabled and d.max_vit_patches > 0:
    v = m.vit
    P = d.max_vit_patches
    K = 3 * v.patch_size ** 2
    vp = vit_pairs if vit_pairs is not None else B * P * P / 4
    vit = 2.0 * B * P * (K * v.hidden_size + v.num_layers * (4 * v.hidden_size ** 2 +
                                                             2 * v.hidden_size * v.intermediate_size))
    vit += 4.0 * v.hidden_size * vp * v.num_layers
    conn = 2.0 * B * P * (v.hidden_size * H + H * H)
    if vit_frozen(m, frozen):
      out['vit_frozen_fwd'] = vit
    else:
      fwd['vit'] = vit
    fwd['connector'] = conn
  if m.vae.enabled and L > 0:
    D_lat = geom.latent_dim                    # latent_patch_size**2 * z_channels
    fwd['gen_adapters'] = 2.0 * B * L * (D_lat * H + m.timestep_freq_dim * H + H * H + H * D_lat)
    if vae_images is None:
      vae_images = ([] if geom.latent_cache else
                    [(h, w) for h, w, n in geom.vae_buckets for _ in range(n * B)])
    out['vae_frozen_fwd'] = float(sum(_vae_encoder_flops(m.vae, h, w) for h, w in vae_images))
  out['forward'] = sum(fwd.values()) + out.get('vit_frozen_fwd', 0.0) + out.get('vae_frozen_fwd', 0.0)
  out['train'] = 3.0 * sum(fwd.values()) + out.get('vit_frozen_fwd', 0.0) + out.get('vae_frozen_fwd', 0.0)
  out.update({f'fwd_{k}': val for k, val in fwd.items()})
  return out


def vit_frozen(cfg_model, freeze) -> bool:
  """Whether `freeze` (train.freeze: regexes over parameter paths or config.FREEZE_ALIASES names,
  resolved by train/step.py `is_frozen`) freezes the whole ViT, i.e. matches every one of its
  parameter paths (the ViT is built abstractly, alone: ~0.1 s). False without a ViT."""
  from unimedvl_jax.model.vit import SiglipViT
  from unimedvl_jax.train.step import is_frozen
  freeze = tuple(freeze)
  if not cfg_model.vit.enabled or not freeze:
    return False
  vit = nnx.eval_shape(lambda: SiglipViT(cfg_model, rngs=nnx.Rngs(0)))
  paths = [('vit',) + tuple(p) for p, _ in nnx.to_flat_state(nnx.state(vit, nnx.Param))]
  return all(is_frozen(p, freeze) for p in paths)   # 'vit': UniMedVL's attribute of the tower


def expert_layer_flops(cfg, tokens: int) -> float:
  """Forward FLOPs of ONE expert's layer (projections + MLP) for `tokens` tokens."""
  llm = cfg.model.llm
  H, D, Hq, Hkv, I = llm.hidden_size, llm.head_dim, llm.num_heads, llm.num_kv_heads, llm.intermediate_size
  return 2.0 * tokens * (H * Hq * D + 2 * H * Hkv * D + Hq * D * H + 3 * H * I)


def allowed_pairs(batch) -> float:
  """Exact allowed (q, k) pairs of a packed numpy batch (the attention FLOPs), by the one rule
  `batch.allowed` evaluated per pack in numpy."""
  from unimedvl_jax.batch import allowed
  seg, spl, mode = (np.asarray(batch[k]) for k in ('segment_ids', 'split_ids', 'split_modes'))
  total = 0.0
  for b in range(seg.shape[0]):
    q = lambda a: a[b][:, None]
    k = lambda a: a[b][None, :]
    idx = np.arange(seg.shape[1])
    total += float(np.sum(allowed(q(seg), q(spl), q(mode), idx[:, None],
                                  k(seg), k(spl), k(mode), idx[None, :])))
  return total


# ------------------------------------------------------------------------------ peak and MFU

def measure_matmul_peak(dtype=jnp.bfloat16, n: int = 2048, iters: int = 5) -> float:
  """Achieved FLOP/s of a large square matmul on the default device (the MFU denominator)."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(iters):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def peak_memory_bytes() -> int | None:
  """Peak device memory if the backend reports it (TPU/GPU), else the process peak RSS."""
  try:
    stats = jax.devices()[0].memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
      return int(stats['peak_bytes_in_use'])
  except Exception:  # noqa: BLE001 - not all backends implement memory_stats
    pass
  try:
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
  except Exception:  # noqa: BLE001
    return None


COST_KEYS = {'flops': 'flops', 'bytes accessed': 'bytes_accessed',
             'transcendentals': 'transcendentals'}


def cost_analysis(executable) -> dict[str, float]:
  """The COST_KEYS of `executable.cost_analysis()` (a jax Compiled or Lowered; a dict, or a
  one-element list on older jax); a scanned layer body counts once (aot.cost scales unrolled
  variants)."""
  ca = executable.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  ca = ca or {}
  return {name: float(ca.get(key, 0.0)) for key, name in COST_KEYS.items()}


def compiled_memory(compiled) -> dict[str, int]:
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  keys = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
          'generated_code_size_in_bytes', 'alias_size_in_bytes', 'peak_memory_in_bytes')
  return {k: int(getattr(ma, k)) for k in keys if hasattr(ma, k)}


def dump_hlo(compiled, path: str) -> None:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    f.write(compiled.as_text())


def print_json(obj) -> None:
  print(json.dumps(obj, indent=2, sort_keys=False))
