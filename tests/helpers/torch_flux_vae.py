"""A PyTorch transcription of black-forest-labs/flux `src/flux/modules/autoencoder.py` (encoder
and decoder; same module names, so its state dict has the keys of FLUX's `ae.safetensors`;
GroupNorm groups made a parameter for tiny widths). The reference of the VAE parity tests
(tests/model/test_vae.py) and of the BAGEL reference's autoencoder (bagel_torch_ref.FluxAE)."""

import torch.nn.functional as F
from torch import nn


def _gn(groups, ch):
  return nn.GroupNorm(groups, ch, eps=1e-6, affine=True)


class TResnet(nn.Module):

  def __init__(self, cin, cout, g):
    super().__init__()
    self.norm1, self.conv1 = _gn(g, cin), nn.Conv2d(cin, cout, 3, 1, 1)
    self.norm2, self.conv2 = _gn(g, cout), nn.Conv2d(cout, cout, 3, 1, 1)
    if cin != cout:
      self.nin_shortcut = nn.Conv2d(cin, cout, 1)

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return (self.nin_shortcut(x) if hasattr(self, 'nin_shortcut') else x) + h


class TAttn(nn.Module):

  def __init__(self, ch, g):
    super().__init__()
    self.norm = _gn(g, ch)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

  def forward(self, x):
    b, c, h, w = x.shape
    n = self.norm(x)
    q, k, v = (f(n).reshape(b, 1, c, h * w).transpose(2, 3) for f in (self.q, self.k, self.v))
    o = F.scaled_dot_product_attention(q, k, v)
    return x + self.proj_out(o.transpose(2, 3).reshape(b, c, h, w))


class TMid(nn.Module):

  def __init__(self, ch, g):
    super().__init__()
    self.block_1, self.attn_1, self.block_2 = TResnet(ch, ch, g), TAttn(ch, g), TResnet(ch, ch, g)

  def forward(self, x):
    return self.block_2(self.attn_1(self.block_1(x)))


class TEncoder(nn.Module):

  def __init__(self, ch, mult, nrb, z, g):
    super().__init__()
    self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
    in_mult = (1,) + tuple(mult)
    self.down = nn.ModuleList()
    for i in range(len(mult)):
      lvl = nn.Module()
      lvl.block = nn.ModuleList()
      bi = ch * in_mult[i]
      for _ in range(nrb):
        lvl.block.append(TResnet(bi, ch * mult[i], g))
        bi = ch * mult[i]
      if i != len(mult) - 1:
        lvl.downsample = nn.Module()
        lvl.downsample.conv = nn.Conv2d(bi, bi, 3, 2, 0)
      self.down.append(lvl)
    self.mid = TMid(bi, g)
    self.norm_out, self.conv_out = _gn(g, bi), nn.Conv2d(bi, 2 * z, 3, 1, 1)

  def forward(self, x):
    h = self.conv_in(x)
    for i, lvl in enumerate(self.down):
      for blk in lvl.block:
        h = blk(h)
      if i != len(self.down) - 1:
        h = lvl.downsample.conv(F.pad(h, (0, 1, 0, 1)))
    h = self.mid(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class TDecoder(nn.Module):

  def __init__(self, ch, mult, nrb, z, g):
    super().__init__()
    bi = ch * mult[-1]
    self.conv_in = nn.Conv2d(z, bi, 3, 1, 1)
    self.mid = TMid(bi, g)
    self.up = nn.ModuleList()
    for i in reversed(range(len(mult))):
      lvl = nn.Module()
      lvl.block = nn.ModuleList()
      for _ in range(nrb + 1):
        lvl.block.append(TResnet(bi, ch * mult[i], g))
        bi = ch * mult[i]
      if i != 0:
        lvl.upsample = nn.Module()
        lvl.upsample.conv = nn.Conv2d(bi, bi, 3, 1, 1)
      self.up.insert(0, lvl)
    self.norm_out, self.conv_out = _gn(g, bi), nn.Conv2d(bi, 3, 3, 1, 1)

  def forward(self, z):
    h = self.mid(self.conv_in(z))
    for i in reversed(range(len(self.up))):
      for blk in self.up[i].block:
        h = blk(h)
      if i != 0:
        h = self.up[i].upsample.conv(F.interpolate(h, scale_factor=2.0, mode='nearest'))
    return self.conv_out(F.silu(self.norm_out(h)))
