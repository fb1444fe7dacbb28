"""Can the lesion quadrants be read from a checkpoint's image tokens, and how much supervision
does reading them take? Order-free readout probes on the LLM-input ViT tokens.

    JAX_PLATFORMS=cpu python -m benchmarks.lesion_readout_probe WORKDIR [--root DATA_ROOT]

For every distinct image of the dataset's train / test VQA records: the checkpoint's (EMA)
`embed_vit` tokens (ViT, connector, + the 2-D sin-cos table), RMS-normalised like the decoder's
input norm, and the 4 labels "a lesion in quadrant k" from the record's findings. Small readouts
that see the 16 tokens as a set (no slot order: the image's tokens share one RoPE position) are
trained on the train images and scored per bit on the test images:

  mean    mean pool (uniform attention), then a SwiGLU MLP;
  tokmlp  a SwiGLU MLP on each token, then mean pool (one decoder MLP, then uniform attention).

with `dense` supervision (all 4 bits of 256 images per step) or `sparse` (one random bit of 40
images per step, the rate at which an answer token learns from closed quadrant questions when
they are the whole batch; the question's quadrant handed to the readout, so it is an upper
bound); and the mean-pool readout of the tokens less the 2-D sin-cos table (the ViT content
alone). Prints loss after 100 / 400 / 1000 steps and per-bit accuracy against the majority.
Results: benchmarks/RESULTS.md section 1.
"""

from __future__ import annotations

import argparse
import json
import os

def images_and_labels(root: str, split: str):
  import numpy as np
  from unimedvl_jax.data.images import load_image
  from unimedvl_jax.data.truth import LOCATIONS
  labels = {}
  with open(os.path.join(root, split, 'vqa.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      y = np.zeros(4, np.float32)
      for finding in r['meta']['findings']:
        y[LOCATIONS.index(finding['location'])] = 1.0
      labels[r['input_img'][0]['path']] = y
  paths = sorted(labels)
  imgs = np.stack([load_image(os.path.join(root, p)) for p in paths])
  return imgs, np.stack([labels[p] for p in paths])


def image_tokens(cfg, model, imgs):
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from unimedvl_jax.data.images import to_unit_range, vit_patchify
  embed = nnx.jit(lambda m, pa, seg, pos: m.embed_vit(pa, seg, pos))
  out = []
  for i in range(0, len(imgs), 64):
    pa = to_unit_range(np.stack([vit_patchify(im, cfg.model.vit.patch_size)[0]
                                 for im in imgs[i:i + 64]]))   # the model's own pixel rule
    B, P, _ = pa.shape
    pos = jnp.tile(jnp.arange(P, dtype=jnp.int32), (B, 1))
    out.append(np.asarray(embed(model, jnp.asarray(pa), jnp.ones((B, P), jnp.int32), pos),
                          np.float32))
  return np.concatenate(out)


def rms_normalise(T):
  import numpy as np
  return T / np.sqrt((T ** 2).mean(-1, keepdims=True) + 1e-6)


def train_readout(kind, sparse, steps, batch, Ttr, Ytr, Tte, Yte, lr=3e-3, hidden=256):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  H = Ttr.shape[-1]
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  p = dict(w1=jax.random.normal(k[0], (H, hidden)) / np.sqrt(H),
           w3=jax.random.normal(k[1], (H, hidden)) / np.sqrt(H),
           w2=jax.random.normal(k[2], (hidden, 4)) / np.sqrt(hidden), b=jnp.zeros(4))

  def f(p, T):
    if kind == 'mean':
      z = T.mean(1)
      return (jax.nn.silu(z @ p['w1']) * (z @ p['w3'])) @ p['w2'] + p['b']
    return (jax.nn.silu(T @ p['w1']) * (T @ p['w3'])).mean(1) @ p['w2'] + p['b']

  def loss(p, T, Y, M):
    return (optax.sigmoid_binary_cross_entropy(f(p, T), Y) * M).sum() / M.sum()

  opt = optax.adam(lr)
  st = opt.init(p)

  @jax.jit
  def step(p, st, T, Y, M):
    l, g = jax.value_and_grad(loss)(p, T, Y, M)
    u, st = opt.update(g, st)
    return optax.apply_updates(p, u), st, l

  rng = np.random.default_rng(0)
  curve = {}
  for i in range(steps):
    idx = rng.choice(len(Ttr), batch, replace=False)
    M = (np.eye(4, dtype=np.float32)[rng.integers(0, 4, batch)] if sparse
         else np.ones((batch, 4), np.float32))
    p, st, l = step(p, st, jnp.asarray(Ttr[idx]), jnp.asarray(Ytr[idx]), jnp.asarray(M))
    if i + 1 in (100, 400, 1000):
      curve[i + 1] = round(float(l), 3)
  acc = lambda T, Y: round(float(((np.asarray(f(p, jnp.asarray(T))) > 0) == (Y > 0.5)).mean()), 3)
  return curve, acc(Ttr, Ytr), acc(Tte, Yte)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('workdir')
  ap.add_argument('--root', default='', help='data root (default: WORKDIR/data)')
  a = ap.parse_args()
  import numpy as np
  from unimedvl_jax.train.model_checkpoint import load_model
  root = a.root or os.path.join(a.workdir, 'data')
  cfg, model = load_model(a.workdir)
  Xtr, Ytr = images_and_labels(root, 'train')
  Xte, Yte = images_and_labels(root, 'test')
  from unimedvl_jax.model.embeddings import sincos_2d_table
  Rtr, Rte = image_tokens(cfg, model, Xtr), image_tokens(cfg, model, Xte)
  Ttr, Tte = rms_normalise(Rtr), rms_normalise(Rte)
  table = sincos_2d_table(cfg.model.llm.hidden_size, cfg.model.vit.grid_size).astype(np.float32)
  maj = float(np.maximum(Yte.mean(0), 1 - Yte.mean(0)).mean())
  print(f'{len(Ttr)} train / {len(Tte)} test images, {Ttr.shape[1]} tokens each; '
        f'test majority per bit {maj:.3f}', flush=True)
  for kind, sparse, steps, batch in (('mean', False, 1000, 256), ('tokmlp', False, 1000, 256),
                                     ('mean', True, 1000, 40), ('tokmlp', True, 1000, 40)):
    curve, tr, te = train_readout(kind, sparse, steps, batch, Ttr, Ytr, Tte, Yte)
    sup = f'sparse (1 bit x {batch})' if sparse else f'dense (4 bits x {batch})'
    print(f'{kind:7s} {sup:22s} loss after {curve}  per-bit accuracy train {tr} test {te}',
          flush=True)
  # the ViT content alone: the tokens less the 2-D sin-cos table the model adds
  curve, tr, te = train_readout('mean', False, 1000, 256, rms_normalise(Rtr - table), Ytr,
                                rms_normalise(Rte - table), Yte)
  print(f'mean    dense, sin-cos table removed loss after {curve}  per-bit accuracy train {tr} '
        f'test {te}', flush=True)


if __name__ == '__main__':
  main()
