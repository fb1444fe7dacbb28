"""Run by test_sharded.py in a subprocess with 8 fake CPU devices (XLA_FLAGS set before jax is
imported): the same requests on one device and on a ('data' 4, 'tensor' 2) mesh."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from tests.helpers.infer_ref import SPECIALS, tiny_model  # noqa: E402
from unimedvl_jax import sharding  # noqa: E402
from unimedvl_jax.infer import context as C  # noqa: E402
from unimedvl_jax.infer import image as I  # noqa: E402
from unimedvl_jax.infer import text as T  # noqa: E402


def run(p):
  """4 ragged requests: decode a text item, then an image with text CFG (and the contexts)."""
  prompts = [[10, 11, 12], [20, 21, 22, 23, 24, 25], [30], [40, 41, 42, 43]]
  e = C.new_context(p, 4, 64)
  ctx = C.add_text(p, e, prompts, SPECIALS)
  res = T.generate_text(p, ctx, SPECIALS, T.TextSettings(max_new_tokens=4), return_logits=True)
  s = I.FlowSettings(num_steps=3, s_text=4.0, s_img=1.0, interval=(0.0, 1.0), renorm='global')
  lat = I.generate_latents(p, res.ctx, SPECIALS, [(2, 2), (1, 3), (2, 1), (1, 1)],
                           cfg_text_ctx=e, settings=s, seeds=[1, 2, 3, 4])
  return dict(tokens=res.tokens, logits=res.logits, latents=lat, ctx_in=ctx, ctx_out=res.ctx)


def main():
  assert jax.device_count() == 8, jax.devices()
  model = tiny_model()[1]
  mesh = sharding.make_mesh(ConfigDict(dict(data=4, fsdp=1, tensor=2)))
  one = run(C.prepare(model))
  sp = C.prepare(model, mesh)
  many = run(sp)
  out = dict(
      mesh=dict(mesh.shape),
      tokens_one=one['tokens'], tokens_mesh=many['tokens'],
      logits_max_diff=float(np.max(np.abs(one['logits'] - many['logits']))),
      logits_max=float(np.max(np.abs(one['logits']))),
      latents_max_diff=max(float(np.max(np.abs(a - b)))
                           for a, b in zip(one['latents'], many['latents'])),
      latents_max=max(float(np.max(np.abs(a))) for a in one['latents']),
      cache_spec_in=str(many['ctx_in'].k[0].sharding.spec),
      cache_spec_out=str(many['ctx_out'].k[0].sharding.spec),
      cache_devices=len(many['ctx_out'].k[0].sharding.device_set),
      q_kernel_spec=str(sp.module.decoder.layers[0].und.q_proj.kernel[...].sharding.spec),
      cache_one_device=len(one['ctx_out'].k[0].sharding.device_set),
  )
  print('SHARDED_RESULT ' + json.dumps(out))


if __name__ == '__main__':
  main()
