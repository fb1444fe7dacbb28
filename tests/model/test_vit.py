"""SiglipViT: parity with transformers' SiglipVisionModel (fp32, tiny random config), NaViT
packing, weight conversion, scan/remat equivalence, gradients and parameter metadata."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import SiglipVisionConfig, SiglipVisionModel

from unimedvl_jax.config import model_defaults
from unimedvl_jax.data.images import patchify_image
from unimedvl_jax.interop.hf_loaders import (conv_patch_weight_to_linear, from_hf_siglip_state_dict,
                                             linear_to_conv_patch_weight, load_pure_dict)
from unimedvl_jax.model.vit import SiglipViT

HIDDEN, HEADS, LAYERS, PATCH, GRID, INTER = 64, 2, 3, 4, 6, 96


def tiny_cfg(dtype='float32', **over):
  m = model_defaults()
  m.vit.update(hidden_size=HIDDEN, intermediate_size=INTER, num_layers=LAYERS, num_heads=HEADS,
               patch_size=PATCH, grid_size=GRID, layer_norm_eps=1e-6)
  m.dtype = dtype
  m.param_dtype = 'float32'
  m.attention_impl = 'xla'
  m.update(over)
  return m


@pytest.fixture(scope='module')
def hf_model():
  torch.manual_seed(0)
  cfg = SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS + 1,
                           num_attention_heads=HEADS, image_size=GRID * PATCH, patch_size=PATCH,
                           hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6,
                           vision_use_head=False, attn_implementation='eager')
  model = SiglipVisionModel(cfg).eval()
  # Non-trivial norms/biases so that every parameter matters for the comparison.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  full_sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  # BAGEL builds num_hidden_layers - 1 layers: keep the first LAYERS in the HF reference too
  # (the converter is given the full state dict and must ignore the extra layer).
  vm = vision_tower(model)
  vm.encoder.layers = vm.encoder.layers[:LAYERS]
  model.full_sd = full_sd
  return model


@pytest.fixture(scope='module')
def jax_model(hf_model):
  assert f'{hf_prefix(hf_model)}encoder.layers.{LAYERS}.mlp.fc1.weight' in hf_model.full_sd
  return loaded_model(hf_model, tiny_cfg())


def loaded_model(hf_model, cfg):
  """A SiglipViT built abstractly (no random init: cheap) and filled with the HF weights."""
  model = nnx.eval_shape(lambda: SiglipViT(cfg, rngs=nnx.Rngs(1)))
  load_pure_dict(model, from_hf_siglip_state_dict(hf_model.full_sd, num_layers=LAYERS))
  return model


@nnx.jit
def fwd(model, patches, seg, pos):
  return model(patches, seg, pos)


def vision_tower(hf_model):
  # transformers < 5 nests the tower under `.vision_model` (keys 'vision_model.*'); 5.x does not.
  return getattr(hf_model, 'vision_model', hf_model)


def hf_prefix(hf_model):
  return 'vision_model.' if hasattr(hf_model, 'vision_model') else ''


def hf_forward(hf_model, img_hwc):
  """Runs the HF model on one image [h*p, w*p, 3] laid on the top-left of the GRID x GRID table:
  the position table is replaced by its rows r*GRID + c (what the NaViT encoder indexes)."""
  H, W, _ = img_hwc.shape
  h, w = H // PATCH, W // PATCH
  m = hf_model
  if (h, w) != (GRID, GRID):
    m = copy.deepcopy(hf_model)
    emb = vision_tower(m).embeddings
    rows = (np.arange(h)[:, None] * GRID + np.arange(w)[None, :]).reshape(-1)
    table = emb.position_embedding.weight.detach()[torch.from_numpy(rows)]
    emb.position_embedding = torch.nn.Embedding.from_pretrained(table, freeze=True)
    emb.position_ids = torch.arange(h * w)[None]
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(img_hwc.transpose(2, 0, 1)[None]))
    return m(pixel_values=x).last_hidden_state[0].numpy()


def pack(images, P):
  """Packs images into one row of P patches: (patches [P, 3p^2], seg [P], pos [P])."""
  patches = np.zeros((P, 3 * PATCH * PATCH), np.float32)
  seg = np.zeros((P,), np.int32)
  pos = np.zeros((P,), np.int32)
  o = 0
  spans = []
  for i, img in enumerate(images):
    x, r, c = patchify_image(img, PATCH)
    n = len(x)
    patches[o:o + n], seg[o:o + n], pos[o:o + n] = x, i + 1, r * GRID + c
    spans.append((o, o + n))
    o += n
  assert o <= P
  return patches, seg, pos, spans


def rand_img(rng, h, w):
  return rng.uniform(-1, 1, size=(h * PATCH, w * PATCH, 3)).astype(np.float32)


def test_conv_patch_weight_to_linear():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((5, 3, PATCH, PATCH)).astype(np.float32)
  img = rng.standard_normal((PATCH, PATCH, 3)).astype(np.float32)   # one patch, HWC
  conv = torch.nn.functional.conv2d(torch.from_numpy(img.transpose(2, 0, 1)[None]),
                                    torch.from_numpy(w), stride=PATCH)[0, :, 0, 0].numpy()
  lin = conv_patch_weight_to_linear(w) @ img.reshape(-1)
  np.testing.assert_allclose(lin, conv, rtol=1e-5, atol=1e-5)
  lin_t = conv_patch_weight_to_linear(torch.from_numpy(w)).numpy()
  np.testing.assert_array_equal(lin_t, conv_patch_weight_to_linear(w))
  np.testing.assert_array_equal(linear_to_conv_patch_weight(conv_patch_weight_to_linear(w), PATCH), w)


def test_full_grid_parity(hf_model, jax_model):
  """Two full-grid images, one per row and both packed in one row: equal to HF within 1e-4."""
  rng = np.random.default_rng(1)
  imgs = [rand_img(rng, GRID, GRID) for _ in range(2)]
  ref = [hf_forward(hf_model, im) for im in imgs]
  # batch of 2 rows, one image each
  rows = [pack([im], GRID * GRID) for im in imgs]
  out = fwd(jax_model, jnp.asarray(np.stack([r[0] for r in rows])), jnp.asarray(np.stack([r[1] for r in rows])),
                  jnp.asarray(np.stack([r[2] for r in rows])))
  for i in range(2):
    np.testing.assert_allclose(np.asarray(out[i]), ref[i], rtol=1e-4, atol=1e-4)
  # both images in ONE row (+ padding): no attention across images
  patches, seg, pos, spans = pack(imgs, 2 * GRID * GRID + 5)
  out = np.asarray(fwd(jax_model, jnp.asarray(patches[None]), jnp.asarray(seg[None]), jnp.asarray(pos[None])))
  for (a, b), r in zip(spans, ref):
    np.testing.assert_allclose(out[0, a:b], r, rtol=1e-4, atol=1e-4)


def test_navit_variable_sizes(hf_model, jax_model):
  """Images of different shapes packed NaViT-style, vs HF per image on the top-left sub-grid."""
  rng = np.random.default_rng(2)
  shapes = [[(3, 5), (2, 6), (4, 2)], [(5, 3), (1, 1)]]
  P = 40
  batch, refs = [], []
  for row in shapes:
    imgs = [rand_img(rng, h, w) for h, w in row]
    batch.append(pack(imgs, P))
    refs.append([hf_forward(hf_model, im) for im in imgs])
  patches, seg, pos = (jnp.asarray(np.stack([b[i] for b in batch])) for i in range(3))
  out = np.asarray(fwd(jax_model, patches, seg, pos))
  assert out.shape == (2, P, HIDDEN)
  assert np.isfinite(out).all()
  for bi, b in enumerate(batch):
    for (a, e), r in zip(b[3], refs[bi]):
      np.testing.assert_allclose(out[bi, a:e], r, rtol=1e-4, atol=1e-4)
  # Padding content and other images do not change an image's outputs.
  seg_np, patches_np = np.asarray(seg), np.asarray(patches).copy()
  patches_np[seg_np == 0] = 7.0
  patches_np[0][seg_np[0] == 2] *= -1
  out2 = np.asarray(fwd(jax_model, jnp.asarray(patches_np), seg, pos))
  keep = (seg_np != 0) & ~((np.arange(2)[:, None] == 0) & (seg_np == 2))
  np.testing.assert_allclose(out2[keep], out[keep], rtol=1e-5, atol=1e-5)


def _loss_and_grad(model, args):
  """jit(value_and_grad) of a masked sum of squares of the outputs."""
  graphdef, state = nnx.split(model)

  def loss(state):
    y = nnx.merge(graphdef, state)(*args)
    return jnp.sum(jnp.where(args[1][..., None] > 0, y, 0.0) ** 2)

  return jax.jit(jax.value_and_grad(loss))(state)


def test_grads_and_scan_remat_equivalence(hf_model):
  """Gradients are finite, reach every parameter (and only the used position rows); the python
  loop with full remat gives the same loss and gradients as the plain scan. (Every remat policy
  is checked on a small stack in test_scan.py; each ViT compile costs seconds here.)"""
  rng = np.random.default_rng(4)
  patches, seg, pos, _ = pack([rand_img(rng, 3, 4), rand_img(rng, 2, 2)], 20)
  args = tuple(jnp.asarray(a[None]) for a in (patches, seg, pos))
  l1, g1 = _loss_and_grad(loaded_model(hf_model, tiny_cfg()), args)
  flat = dict(nnx.to_flat_state(g1))
  for path, v in flat.items():
    a = np.asarray(v[...])
    assert np.isfinite(a).all(), path
    assert np.abs(a).max() > 0, path
  pg = np.asarray(flat[('embeddings', 'position_embedding')][...])
  used = np.unique(pos[seg > 0])
  assert np.abs(pg[used]).sum(axis=-1).min() > 0
  assert np.abs(np.delete(pg, used, axis=0)).max() == 0

  l2, g2 = _loss_and_grad(loaded_model(hf_model, tiny_cfg(remat='full', scan_layers=False)), args)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               nnx.to_pure_dict(g1), nnx.to_pure_dict(g2))


def test_bf16_close_to_fp32(hf_model, jax_model):
  m32 = jax_model
  m16 = loaded_model(hf_model, tiny_cfg('bfloat16'))
  rng = np.random.default_rng(8)
  patches, seg, pos, _ = pack([rand_img(rng, 3, 3)], 9)
  args = tuple(jnp.asarray(a[None]) for a in (patches, seg, pos))
  y32, y16 = fwd(m32, *args), fwd(m16, *args)
  assert y16.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(y32 - y16.astype(jnp.float32)))) < 0.15


def test_random_init_param_metadata_and_paths():
  model = SiglipViT(tiny_cfg(), rngs=nnx.Rngs(0))
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, v in flat.items():
    names = v.get_metadata()['sharding_names'] if 'sharding_names' in v.get_metadata() \
        else v.get_metadata()['out_sharding']
    assert len(names) == v[...].ndim, (path, names)
    if path[:2] == ('encoder', 'layers'):
      assert names[0] == 'layers' and v.shape[0] == LAYERS, path
  assert flat[('encoder', 'layers', 'self_attn', 'q_proj', 'kernel')].shape == (LAYERS, HIDDEN, HIDDEN)
  assert flat[('encoder', 'layers', 'mlp', 'fc1', 'kernel')].shape == (LAYERS, HIDDEN, INTER)
  assert flat[('embeddings', 'position_embedding')].shape == (GRID * GRID, HIDDEN)
  assert flat[('embeddings', 'patch_embedding', 'kernel')].shape == (3 * PATCH * PATCH, HIDDEN)
  # layers are initialised differently
  q = np.asarray(flat[('encoder', 'layers', 'self_attn', 'q_proj', 'kernel')][...])
  assert not np.allclose(q[0], q[1])


def test_converter_prefixes_and_errors(hf_model):
  base = from_hf_siglip_state_dict(hf_model.full_sd, num_layers=LAYERS)
  strip = len(hf_prefix(hf_model))
  bagel = {'vit_model.vision_model.' + k[strip:]: v for k, v in hf_model.full_sd.items()}
  bagel['connector.fc1.weight'] = np.zeros((2, 2), np.float32)     # other towers: ignored
  w = bagel['vit_model.vision_model.embeddings.patch_embedding.weight']
  bagel['vit_model.vision_model.embeddings.patch_embedding.weight'] = conv_patch_weight_to_linear(w)
  jax.tree.map(np.testing.assert_array_equal, from_hf_siglip_state_dict(bagel, LAYERS), base)
  with pytest.raises(KeyError, match=f'encoder.layers.{LAYERS + 1}'):
    from_hf_siglip_state_dict(hf_model.full_sd, num_layers=LAYERS + 2)
  model = nnx.eval_shape(lambda: SiglipViT(tiny_cfg(), rngs=nnx.Rngs(1)))
  bad = from_hf_siglip_state_dict(hf_model.full_sd, num_layers=LAYERS)
  bad['encoder']['layers']['extra'] = np.zeros(3)
  with pytest.raises(KeyError, match='unexpected'):
    load_pure_dict(model, bad)
  bad = from_hf_siglip_state_dict(hf_model.full_sd, num_layers=LAYERS - 1)
  with pytest.raises(ValueError, match='shape'):
    load_pure_dict(model, bad)


def test_missing_key_is_an_error(hf_model):
  sd = dict(hf_model.full_sd)
  del sd[hf_prefix(hf_model) + 'encoder.layers.1.mlp.fc2.bias']
  with pytest.raises(KeyError, match='layers.1.mlp.fc2.bias'):
    from_hf_siglip_state_dict(sd, num_layers=LAYERS)
