"""FLUX-style autoencoder (frozen in training), NHWC, conv kernels HWIO (SPEC section 2).

The network is black-forest-labs/flux `src/flux/modules/autoencoder.py` (`AutoEncoder`), which
BAGEL / UniMedVL load from `ae.safetensors`. Module attribute names mirror FLUX so that a FLUX key
maps to our state path by renames only (`interop.hf_loaders.from_flux_state_dict`):

    encoder.conv_in.{kernel, bias}                       <- encoder.conv_in.{weight OIHW, bias}
    encoder.down.{i}.block.{j}.{norm1,norm2}.{weight,bias}
    encoder.down.{i}.block.{j}.{conv1,conv2,nin_shortcut}.{kernel,bias}   (nin_shortcut iff cin != cout)
    encoder.down.{i}.downsample.conv.{kernel,bias}       (i < levels - 1)
    encoder.mid.{block_1,block_2}.*  encoder.mid.attn_1.{norm,q,k,v,proj_out}.*
    encoder.norm_out.*  encoder.conv_out.*               (conv_out -> 2 * z_channels: mean, logvar)
    decoder.conv_in.*  decoder.mid.*  decoder.up.{i}.block.{j}.*  (num_res_blocks + 1 blocks)
    decoder.up.{i}.upsample.conv.*  (i > 0)  decoder.norm_out.*  decoder.conv_out.*

Conv kernels are [kh, kw, in, out] (torch OIHW transposed by (2, 3, 1, 0)). `decoder.up` is indexed
by resolution level like FLUX (`up[0]` is the full-resolution level, run last).

Numerics: GroupNorm statistics in float32; convs in the compute dtype; the middle attention
(single head, head dim = channels) in float32, queries chunked to bound memory. Latent outputs
and decoded images are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unimedvl_jax.model.layers import make_param, to_dtype

# Queries per chunk of the mid-block attention: softmax memory is chunk x tokens per image
# (a 1024x1024 image has 128*128 = 16384 tokens at the middle).
ATTN_QUERY_CHUNK = 4096


def swish(x):
  return x * jax.nn.sigmoid(x)


class Conv2d(nnx.Module):
  """torch.nn.Conv2d on NHWC with an HWIO kernel. padding: int (symmetric) or ((t, b), (l, r))."""

  def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, rngs: nnx.Rngs, stride: int = 1,
               padding=None, dtype='float32', param_dtype='float32'):
    pdt = to_dtype(param_dtype)
    # torch's default Conv2d init (kaiming_uniform(a=sqrt(5)) == variance_scaling(1/3, fan_in, uniform)).
    init = jax.nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
    self.kernel = make_param(rngs, init, (kernel_size, kernel_size, in_ch, out_ch),
                             (None, None, None, None), pdt)
    self.bias = make_param(rngs, jax.nn.initializers.zeros, (out_ch,), (None,), pdt)
    if padding is None:
      padding = kernel_size // 2
    if isinstance(padding, int):
      padding = ((padding, padding), (padding, padding))
    self.padding = tuple(tuple(p) for p in padding)
    self.stride = stride
    self.dtype = to_dtype(dtype)

  def __call__(self, x):
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride, self.stride),
        self.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm (affine) on NHWC: statistics in float32, output in the compute dtype."""

  def __init__(self, groups: int, channels: int, *, eps: float, dtype='float32',
               param_dtype='float32'):
    if channels % groups:
      raise ValueError(f'GroupNorm: channels ({channels}) must be divisible by groups ({groups})')
    pdt = to_dtype(param_dtype)
    self.weight = nnx.Param(jnp.ones((channels,), pdt), sharding_names=(None,))
    self.bias = nnx.Param(jnp.zeros((channels,), pdt), sharding_names=(None,))
    self.groups = groups
    self.eps = eps
    self.dtype = to_dtype(dtype)

  def __call__(self, x):
    B, H, W, C = x.shape
    g = x.astype(jnp.float32).reshape(B, H, W, self.groups, C // self.groups)
    mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(B, H, W, C)
    y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class _Ctx:
  """Shared constructor arguments."""

  def __init__(self, vae_cfg, dtype, param_dtype, rngs, unroll=False):
    self.groups, self.eps = vae_cfg.norm_groups, vae_cfg.norm_eps
    self.unroll = bool(unroll)
    self.dtype, self.param_dtype, self.rngs = dtype, param_dtype, rngs

  def conv(self, cin, cout, k, **kw):
    return Conv2d(cin, cout, k, rngs=self.rngs, dtype=self.dtype, param_dtype=self.param_dtype, **kw)

  def norm(self, ch):
    return GroupNorm(self.groups, ch, eps=self.eps, dtype=self.dtype, param_dtype=self.param_dtype)


class ResnetBlock(nnx.Module):

  def __init__(self, ctx: _Ctx, in_ch: int, out_ch: int):
    self.norm1 = ctx.norm(in_ch)
    self.conv1 = ctx.conv(in_ch, out_ch, 3)
    self.norm2 = ctx.norm(out_ch)
    self.conv2 = ctx.conv(out_ch, out_ch, 3)
    self.nin_shortcut = ctx.conv(in_ch, out_ch, 1) if in_ch != out_ch else None

  def __call__(self, x):
    h = self.conv1(swish(self.norm1(x)))
    h = self.conv2(swish(self.norm2(h)))
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x.astype(h.dtype) + h


def _sdpa_single_head(q, k, v, chunk: int, unroll: bool = False):
  """softmax(q k^T / sqrt(C)) v over [B, T, C], float32, queries in chunks of `chunk` (a scan
  over the chunks; `unroll`: unrolled, so XLA's cost_analysis counts every chunk)."""
  B, T, C = q.shape
  scale = C ** -0.5
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)

  def one(qc):
    logits = jnp.einsum('bqc,bkc->bqk', qc.astype(jnp.float32), kf) * scale
    return jnp.einsum('bqk,bkc->bqc', jax.nn.softmax(logits, axis=-1), vf)

  if T <= chunk or T % chunk:
    return one(q)
  qs = q.reshape(B, T // chunk, chunk, C).swapaxes(0, 1)
  _, out = jax.lax.scan(lambda c, qc: (c, one(qc)), None, qs, unroll=bool(unroll))
  return out.swapaxes(0, 1).reshape(B, T, C)


class AttnBlock(nnx.Module):
  """x + proj_out(attention(norm(x))) with one head over all H*W positions; 1x1 conv q/k/v."""

  def __init__(self, ctx: _Ctx, ch: int):
    self.norm = ctx.norm(ch)
    self.q = ctx.conv(ch, ch, 1)
    self.k = ctx.conv(ch, ch, 1)
    self.v = ctx.conv(ch, ch, 1)
    self.proj_out = ctx.conv(ch, ch, 1)
    self.unroll = ctx.unroll

  def __call__(self, x):
    B, H, W, C = x.shape
    h = self.norm(x)
    q, k, v = (f(h).reshape(B, H * W, C) for f in (self.q, self.k, self.v))
    o = _sdpa_single_head(q, k, v, ATTN_QUERY_CHUNK, self.unroll).reshape(B, H, W, C)
    h = self.proj_out(o.astype(h.dtype))
    return x.astype(h.dtype) + h


class Downsample(nnx.Module):
  """Zero-pad bottom/right by one, then conv 3x3 stride 2 (FLUX's asymmetric padding)."""

  def __init__(self, ctx: _Ctx, ch: int):
    self.conv = ctx.conv(ch, ch, 3, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2, then conv 3x3."""

  def __init__(self, ctx: _Ctx, ch: int):
    self.conv = ctx.conv(ch, ch, 3)

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class Level(nnx.Module):
  """One resolution level: `block` (ResnetBlocks) and an optional `downsample` / `upsample`."""

  def __init__(self, blocks, *, downsample=None, upsample=None):
    self.block = nnx.List(blocks)
    if downsample is not None:
      self.downsample = downsample
    if upsample is not None:
      self.upsample = upsample

  def __call__(self, x):
    for b in self.block:
      x = b(x)
    if hasattr(self, 'downsample'):
      x = self.downsample(x)
    if hasattr(self, 'upsample'):
      x = self.upsample(x)
    return x


class Mid(nnx.Module):

  def __init__(self, ctx: _Ctx, ch: int):
    self.block_1 = ResnetBlock(ctx, ch, ch)
    self.attn_1 = AttnBlock(ctx, ch)
    self.block_2 = ResnetBlock(ctx, ch, ch)

  def __call__(self, x):
    return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):

  def __init__(self, ctx: _Ctx, v):
    ch, mult, L = v.base_channels, tuple(v.channel_mult), len(v.channel_mult)
    self.conv_in = ctx.conv(v.in_channels, ch, 3)
    in_mult = (1,) + mult
    down = []
    block_in = ch
    for i in range(L):
      block_in, block_out = ch * in_mult[i], ch * mult[i]
      blocks = []
      for _ in range(v.num_res_blocks):
        blocks.append(ResnetBlock(ctx, block_in, block_out))
        block_in = block_out
      down.append(Level(blocks, downsample=Downsample(ctx, block_in) if i != L - 1 else None))
    self.down = nnx.List(down)
    self.mid = Mid(ctx, block_in)
    self.norm_out = ctx.norm(block_in)
    self.conv_out = ctx.conv(block_in, 2 * v.z_channels, 3)

  def __call__(self, x):
    h = self.conv_in(x)
    for level in self.down:
      h = level(h)
    h = self.mid(h)
    return self.conv_out(swish(self.norm_out(h)))


class Decoder(nnx.Module):

  def __init__(self, ctx: _Ctx, v):
    ch, mult, L = v.base_channels, tuple(v.channel_mult), len(v.channel_mult)
    block_in = ch * mult[-1]
    self.conv_in = ctx.conv(v.z_channels, block_in, 3)
    self.mid = Mid(ctx, block_in)
    up = [None] * L
    for i in reversed(range(L)):
      block_out = ch * mult[i]
      blocks = []
      for _ in range(v.num_res_blocks + 1):
        blocks.append(ResnetBlock(ctx, block_in, block_out))
        block_in = block_out
      up[i] = Level(blocks, upsample=Upsample(ctx, block_in) if i != 0 else None)
    self.up = nnx.List(up)
    self.norm_out = ctx.norm(block_in)
    self.conv_out = ctx.conv(block_in, v.in_channels, 3)

  def __call__(self, z):
    h = self.mid(self.conv_in(z))
    for i in reversed(range(len(self.up))):
      h = self.up[i](h)
    return self.conv_out(swish(self.norm_out(h)))


class AutoEncoder(nnx.Module):
  """FLUX autoencoder: images [B, H, W, 3] in [-1, 1] <-> scaled latents [B, H/8, W/8, z].

  (8 = 2 ** (len(channel_mult) - 1); H, W must be multiples of it.)
  """

  def __init__(self, cfg_model, *, rngs: nnx.Rngs):
    v = cfg_model.vae
    ctx = _Ctx(v, cfg_model.dtype, cfg_model.param_dtype, rngs,
               unroll=cfg_model.get('unroll_loops', False))
    self.encoder = Encoder(ctx, v)
    self.decoder = Decoder(ctx, v)
    self.scale_factor = float(v.scale_factor)
    self.shift_factor = float(v.shift_factor)
    self.z_channels = int(v.z_channels)
    self.downsample_factor = 2 ** (len(v.channel_mult) - 1)

  def _check(self, x):
    f = self.downsample_factor
    if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f'AutoEncoder: expected images [B, H, W, C] with H, W multiples of {f}, '
                       f'got shape {x.shape}')

  def encode_moments(self, x):
    """-> (mean, logvar) float32 [B, H/f, W/f, z], unscaled (the DiagonalGaussian's inputs)."""
    self._check(x)
    moments = self.encoder(x).astype(jnp.float32)
    return moments[..., :self.z_channels], moments[..., self.z_channels:]

  def encode(self, x, rng=None, *, noise=None):
    """Samples z = mean + exp(logvar / 2) * noise, then returns scale * (z - shift), float32.

    noise: the standard-normal draw to use, shaped like the latent [B, H/f, W/f, z] (e.g. the
    reference's own draw, for reproducibility); without it, it is drawn from `rng`."""
    mean, logvar = self.encode_moments(x)
    if noise is None:
      if rng is None:
        raise ValueError('AutoEncoder.encode: pass rng or noise')
      noise = jax.random.normal(rng, mean.shape, jnp.float32)
    elif tuple(noise.shape) != tuple(mean.shape):
      raise ValueError(f'AutoEncoder.encode: noise has shape {tuple(noise.shape)}, the latent '
                       f'{tuple(mean.shape)}')
    z = mean + jnp.exp(0.5 * logvar) * jnp.asarray(noise, jnp.float32)
    return self.scale_factor * (z - self.shift_factor)

  def encode_mean(self, x):
    """The distribution's mean, scaled: scale * (mean - shift), float32."""
    mean, _ = self.encode_moments(x)
    return self.scale_factor * (mean - self.shift_factor)

  def encode_token_moments(self, x, latent_patch: int):
    """Images [B, H, W, 3] in [-1, 1] -> the posterior's (mean, logvar) in token layout,
    float32 [B, (H/f/p)*(W/f/p), p*p*z] each (`patchify` of the moments; unscaled)."""
    mean, logvar = self.encode_moments(x)
    return patchify(mean, latent_patch), patchify(logvar, latent_patch)

  def sample_tokens(self, mean, logvar, noise):
    """Token-layout moments + standard-normal noise (same shape) -> scaled latent tokens:
    scale * (mean + exp(logvar / 2) * noise - shift), float32. Elementwise, so it equals
    `patchify(encode(x))` for the patchified noise; training (from pixels or from the latent
    cache) and inference sample through this one function."""
    z = mean + jnp.exp(0.5 * logvar) * noise
    return self.scale_factor * (z - self.shift_factor)

  def decode(self, z):
    """Scaled latents [B, h, w, z] -> images [B, h*f, w*f, 3] float32 (not clipped)."""
    z = z.astype(jnp.float32) / self.scale_factor + self.shift_factor
    return self.decoder(z).astype(jnp.float32)


# ---------------------------------------------------------------------------- latent patches

def patchify(z, p: int = 2):
  """[..., H, W, C] -> [..., (H/p)*(W/p), p*p*C]: tokens row-major over the patch grid, each
  token flattened in (patch row, patch col, channel) order, channel fastest (BAGEL's
  `einsum('chpwq->hwpqc')` of a [C, H, W] latent). An odd-size latent (H or W not a multiple of
  p, e.g. an image whose side is a multiple of 8 but not of 16) loses its last row / column, like
  BAGEL's `latent[:, :h * p, :w * p]` with h = H // p."""
  *lead, H, W, C = z.shape
  h, w = H // p, W // p
  if h < 1 or w < 1:
    raise ValueError(f'patchify: spatial shape {(H, W)} is smaller than one {p}x{p} patch')
  if H % p or W % p:
    z = z[..., :h * p, :w * p, :]
  n = len(lead)
  x = z.reshape(*lead, h, p, w, p, C)
  x = jnp.moveaxis(x, n + 2, n + 1)          # [..., h, w, p(row), p(col), C]
  return x.reshape(*lead, h * w, p * p * C)


def unpatchify(tokens, h: int, w: int, p: int = 2, c: int = 16):
  """Inverse of `patchify`: [..., h*w, p*p*c] (h, w = token grid) -> [..., h*p, w*p, c]."""
  *lead, T, D = tokens.shape
  if T != h * w or D != p * p * c:
    raise ValueError(f'unpatchify: tokens {tokens.shape[-2:]} do not match h*w={h * w}, '
                     f'p*p*c={p * p * c}')
  n = len(lead)
  x = tokens.reshape(*lead, h, w, p, p, c)
  x = jnp.moveaxis(x, n + 2, n + 1)          # [..., h, p(row), w, p(col), c]
  return x.reshape(*lead, h * p, w * p, c)
