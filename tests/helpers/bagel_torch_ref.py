"""Small PyTorch references written for the interop parity tests (torch only, no JAX).

- `BagelRef`: BAGEL-7B-MoT's module tree (attribute names as in BAGEL's `Bagel` /
  `Qwen2ForCausalLM` with `Qwen2MoTDecoderLayer`), so `state_dict()` IS the reference checkpoint
  layout (SPEC section 8). Its ViT is transformers' `SiglipVisionModel` with the conv patch
  embedding replaced by a Linear (BAGEL's `convert_conv2d_to_linear`). The packed training
  forward is a literal transcription: every token through exactly one expert (index routing),
  one shared attention over the pack with the SPEC section 3 mask, per-expert final norms, the
  lm_head CE and the llm2vae flow-matching MSE.

The FLUX autoencoder reference is the one of tests/model/test_vae.py (`FluxAE` below wraps the
TEncoder / TDecoder of tests/helpers/torch_flux_vae.py for any VAE config).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from unimedvl_jax.batch import MODE_CAUSAL as CAUSAL
from unimedvl_jax.batch import MODE_FULL as FULL  # noqa: F401
from unimedvl_jax.batch import MODE_NOISE as NOISE


# ------------------------------------------------------------------------------------ decoder

class RMSNorm(nn.Module):
  """Qwen2RMSNorm."""

  def __init__(self, dim, eps):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.eps = eps

  def forward(self, x):
    dt = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * xf.to(dt)


class MLP(nn.Module):

  def __init__(self, H, I):
    super().__init__()
    self.gate_proj = nn.Linear(H, I, bias=False)
    self.up_proj = nn.Linear(H, I, bias=False)
    self.down_proj = nn.Linear(I, H, bias=False)

  def forward(self, x):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x):
  h = x.shape[-1] // 2
  return torch.cat([-x[..., h:], x[..., :h]], -1)


def rope(positions, D, theta):
  inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
  f = positions.float()[:, None] * inv[None]
  emb = torch.cat([f, f], -1)
  return emb.cos(), emb.sin()


class MoTAttention(nn.Module):

  def __init__(self, llm):
    super().__init__()
    H, D, nh, nkv = llm.hidden_size, llm.head_dim, llm.num_heads, llm.num_kv_heads
    self.nh, self.nkv, self.D = nh, nkv, D
    for E in ('', '_moe_gen'):
      setattr(self, f'q_proj{E}', nn.Linear(H, nh * D, bias=True))
      setattr(self, f'k_proj{E}', nn.Linear(H, nkv * D, bias=True))
      setattr(self, f'v_proj{E}', nn.Linear(H, nkv * D, bias=True))
      setattr(self, f'o_proj{E}', nn.Linear(nh * D, H, bias=False))
      setattr(self, f'q_norm{E}', RMSNorm(D, llm.rms_norm_eps))
      setattr(self, f'k_norm{E}', RMSNorm(D, llm.rms_norm_eps))

  def forward(self, h, und, gen, cos, sin, mask):
    T = h.shape[0]
    q = h.new_zeros(T, self.nh, self.D)
    k = h.new_zeros(T, self.nkv, self.D)
    v = h.new_zeros(T, self.nkv, self.D)
    for idx, E in ((und, ''), (gen, '_moe_gen')):
      x = h[idx]
      q[idx] = getattr(self, f'q_norm{E}')(getattr(self, f'q_proj{E}')(x).view(-1, self.nh, self.D))
      k[idx] = getattr(self, f'k_norm{E}')(getattr(self, f'k_proj{E}')(x).view(-1, self.nkv, self.D))
      v[idx] = getattr(self, f'v_proj{E}')(x).view(-1, self.nkv, self.D)
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    G = self.nh // self.nkv
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    logits = torch.einsum('qhd,khd->hqk', q, k) / math.sqrt(self.D)
    logits = logits.masked_fill(~mask[None], float('-inf'))
    p = torch.softmax(logits.float(), -1)
    p = torch.nan_to_num(p, nan=0.0)             # rows that see nothing (padding)
    o = torch.einsum('hqk,khd->qhd', p, v).reshape(T, self.nh * self.D)
    out = h.new_zeros(T, h.shape[1])
    out[und] = self.o_proj(o[und])
    out[gen] = self.o_proj_moe_gen(o[gen])
    return out


class MoTLayer(nn.Module):
  """Qwen2MoTDecoderLayer (packed training forward)."""

  def __init__(self, llm):
    super().__init__()
    H = llm.hidden_size
    self.self_attn = MoTAttention(llm)
    self.mlp = MLP(H, llm.intermediate_size)
    self.mlp_moe_gen = MLP(H, llm.intermediate_size)
    for E in ('', '_moe_gen'):
      setattr(self, f'input_layernorm{E}', RMSNorm(H, llm.rms_norm_eps))
      setattr(self, f'post_attention_layernorm{E}', RMSNorm(H, llm.rms_norm_eps))

  def forward(self, x, und, gen, cos, sin, mask):
    h = torch.zeros_like(x)
    h[und] = self.input_layernorm(x[und])
    h[gen] = self.input_layernorm_moe_gen(x[gen])
    x = x + self.self_attn(h, und, gen, cos, sin, mask)
    out = torch.zeros_like(x)
    out[und] = self.mlp(self.post_attention_layernorm(x[und]))
    out[gen] = self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(x[gen]))
    return x + out


class Qwen2MoTModel(nn.Module):

  def __init__(self, llm):
    super().__init__()
    self.embed_tokens = nn.Embedding(llm.vocab_size, llm.hidden_size)
    self.layers = nn.ModuleList([MoTLayer(llm) for _ in range(llm.num_layers)])
    self.norm = RMSNorm(llm.hidden_size, llm.rms_norm_eps)
    self.norm_moe_gen = RMSNorm(llm.hidden_size, llm.rms_norm_eps)


class LanguageModel(nn.Module):

  def __init__(self, llm):
    super().__init__()
    self.model = Qwen2MoTModel(llm)
    self.lm_head = nn.Linear(llm.hidden_size, llm.vocab_size, bias=False)


# ----------------------------------------------------------------------------- other modules

def sincos_2d(dim, grid):
  def one(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], 1)
  gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
  return np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], 1)   # MAE: (w first) then h


class PositionEmbedding(nn.Module):

  def __init__(self, grid, dim):
    super().__init__()
    self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(dim, grid)).float(), requires_grad=False)


class TimestepEmbedder(nn.Module):

  def __init__(self, H, freq=256):
    super().__init__()
    self.freq = freq
    self.mlp = nn.Sequential(nn.Linear(freq, H, bias=True), nn.SiLU(), nn.Linear(H, H, bias=True))

  def forward(self, t):
    half = self.freq // 2
    f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    a = t[:, None].float() * f[None]
    return self.mlp(torch.cat([torch.cos(a), torch.sin(a)], -1))


class MLPConnector(nn.Module):

  def __init__(self, d_in, d_out):
    super().__init__()
    self.fc1 = nn.Linear(d_in, d_out)
    self.fc2 = nn.Linear(d_out, d_out)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate='tanh'))


class VitWrapper(nn.Module):
  """transformers 5 SiglipVisionModel is the tower itself; BAGEL's keys nest it as .vision_model."""

  def __init__(self, vcfg):
    super().__init__()
    self.vision_model = SiglipVisionModel(vcfg)


def make_vit(v):
  vcfg = SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                            num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                            image_size=v.grid_size * v.patch_size, patch_size=v.patch_size,
                            hidden_act='gelu_pytorch_tanh', layer_norm_eps=v.layer_norm_eps,
                            vision_use_head=False, attn_implementation='eager')
  w = VitWrapper(vcfg)
  emb = w.vision_model.embeddings
  conv = emb.patch_embedding
  lin = nn.Linear(3 * v.patch_size ** 2, v.hidden_size, bias=True)
  with torch.no_grad():   # BAGEL's convert_conv2d_to_linear: (row, col, channel) input order
    lin.weight.copy_(conv.weight.permute(0, 2, 3, 1).reshape(v.hidden_size, -1))
    lin.bias.copy_(conv.bias)
  emb.patch_embedding = lin
  return w


class BagelRef(nn.Module):

  def __init__(self, m):
    super().__init__()
    self.cfg = m
    H = m.llm.hidden_size
    self.language_model = LanguageModel(m.llm)
    self.vit_model = make_vit(m.vit)
    self.connector = MLPConnector(m.vit.hidden_size, H)
    self.vit_pos_embed = PositionEmbedding(m.vit.grid_size, H)
    latent_dim = m.latent_patch_size ** 2 * m.vae.z_channels
    self.time_embedder = TimestepEmbedder(H, m.timestep_freq_dim)
    self.vae2llm = nn.Linear(latent_dim, H)
    self.llm2vae = nn.Linear(H, latent_dim)
    self.latent_pos_embed = PositionEmbedding(m.max_latent_size, H)

  def randomize(self, seed=0):
    """Random non-trivial values for every trainable tensor (norms and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
      for name, p in self.named_parameters():
        if name.endswith('pos_embed.pos_embed'):
          continue
        if 'norm' in name and name.endswith('weight'):
          p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        else:
          p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return self

  # ViT on ONE image's patches [n, 3p^2] with table rows pos [n]
  def vit_image(self, patches, pos):
    vm = self.vit_model.vision_model
    x = vm.embeddings.patch_embedding(patches) + vm.embeddings.position_embedding.weight[pos]
    x = vm.encoder(inputs_embeds=x[None]).last_hidden_state
    return vm.post_layernorm(x)[0]

  def forward_row(self, b, r, x0, t_tok, eps):
    """One pack row -> (final hidden states [T, H] in sequence order, gen positions, target)."""
    m = self.cfg
    T = b['input_ids'].shape[1]
    tt = lambda k: torch.from_numpy(np.asarray(b[k][r]))
    ids = tt('input_ids').long()
    x = self.language_model.model.embed_tokens(ids).clone()
    # ViT images
    vseg, vpos, vidx = tt('vit_segment_ids'), tt('vit_pos_ids').long(), tt('vit_token_idx').long()
    patches = tt('vit_patches').float() / 255.0 * 2.0 - 1.0    # uint8 pixels -> [-1, 1]
    for s in sorted(set(vseg.tolist()) - {0}):
      sel = vseg == s
      feats = self.connector(self.vit_image(patches[sel], vpos[sel]))
      x[vidx[sel]] = feats + self.vit_pos_embed.pos_embed[vpos[sel]]
    # latent tokens (all generation slots, padding slots included, like the JAX packer)
    gen = tt('gen_idx').long()
    und = tt('und_idx').long()
    x0 = torch.from_numpy(np.asarray(x0[r])).float()
    eps = torch.from_numpy(np.asarray(eps[r])).float()
    t = torch.from_numpy(np.asarray(t_tok[r])).float()
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    lpos = tt('latent_pos_ids').long()
    x[gen] = self.vae2llm(x_t) + self.time_embedder(t) + self.latent_pos_embed.pos_embed[lpos]
    # mask (SPEC section 3)
    seg, split, mode = tt('segment_ids'), tt('split_ids'), tt('split_modes')
    qi, ki = torch.arange(T)[:, None], torch.arange(T)[None]
    same = (seg[:, None] == seg[None]) & (seg[:, None] != 0)
    earlier = split[None] < split[:, None]
    same_split = split[None] == split[:, None]
    inside = same_split & ((mode[:, None] != CAUSAL) | (ki <= qi))
    hidden_noise = (mode[None] == NOISE) & ~same_split
    mask = same & (earlier | inside) & ~hidden_noise
    cos, sin = rope(tt('positions'), m.llm.head_dim, m.llm.rope_theta)
    for layer in self.language_model.model.layers:
      x = layer(x, und, gen, cos, sin, mask)
    h = torch.zeros_like(x)
    h[und] = self.language_model.model.norm(x[und])
    h[gen] = self.language_model.model.norm_moe_gen(x[gen])
    return h, gen, eps - x0

  def loss(self, b, x0, t_tok, eps, ce_weight=1.0, mse_weight=1.0):
    """Packed training loss of SPEC section 4 over all rows: (loss, ce, mse, hidden, pred)."""
    B = b['input_ids'].shape[0]
    ce_sum, ce_n, mse_sum, mse_n = 0.0, 0.0, 0.0, 0.0
    hs, preds = [], []
    for r in range(B):
      h, gen, target = self.forward_row(b, r, x0, t_tok, eps)
      hs.append(h)
      lm = torch.from_numpy(np.asarray(b['loss_mask'][r])).float()
      lab = torch.from_numpy(np.asarray(b['label_ids'][r])).long()
      sel = lm > 0
      logits = self.language_model.lm_head(h[sel]).float()
      ce_sum = ce_sum + F.cross_entropy(logits, lab[sel], reduction='sum')
      ce_n += float(sel.sum())
      pred = self.llm2vae(h[gen])
      preds.append(pred)
      msk = torch.from_numpy(np.asarray(b['latent_noised'][r] * b['latent_mask'][r])).float()
      mse_sum = mse_sum + ((pred - target) ** 2).mean(-1).mul(msk).sum()
      mse_n += float(msk.sum())
    ce = ce_sum / max(ce_n, 1.0)
    mse = mse_sum / max(mse_n, 1.0)
    return ce_weight * ce + mse_weight * mse, ce, mse, hs, preds


class FluxAE(nn.Module):
  """FLUX AutoEncoder (encoder / decoder of tests/helpers/torch_flux_vae.py, the transcription of
  black-forest-labs/flux modules/autoencoder.py) for a `model.vae` config."""

  def __init__(self, v):
    super().__init__()
    from tests.helpers.torch_flux_vae import TDecoder, TEncoder
    assert v.in_channels == 3
    args = (v.base_channels, tuple(v.channel_mult), v.num_res_blocks, v.z_channels, v.norm_groups)
    self.encoder = TEncoder(*args)
    self.decoder = TDecoder(*args)
    self.scale_factor, self.shift_factor, self.z = v.scale_factor, v.shift_factor, v.z_channels

  def randomize(self, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
      for name, p in self.named_parameters():
        if 'norm' in name and name.endswith('weight'):
          p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith('bias'):
          p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return self

  def moments(self, x):
    m = self.encoder(x)
    return m[:, :self.z], m[:, self.z:]

  def decode(self, z):
    return self.decoder(z / self.scale_factor + self.shift_factor)
