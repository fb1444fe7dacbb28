"""The inference CLI (`python -m unimedvl_jax.infer`, see __main__.py): visual question answering, reports, text-to-image, image editing.

    python -m unimedvl_jax.infer vqa      --checkpoint runs/tiny --image x.png --question "Is there a lesion?"
    python -m unimedvl_jax.infer report   --checkpoint runs/tiny --image x.dcm [--prompt "..."] --out r.txt
    python -m unimedvl_jax.infer generate --checkpoint runs/tiny --prompt "Generate a brain MRI ..." \
        --out img.png [--size 64x64] [--think] [--num-steps 50] [--seed 0]
    python -m unimedvl_jax.infer edit     --checkpoint runs/tiny --image x.png --task segmentation \
        --out mask.png [--prompt "Please segment the lesion."]

Images: PNG / JPEG / DICOM / NIfTI (unimedvl_jax.data.images.load_image; --frame, --slice,
--window for multi-frame DICOM, volumes and CT windows). --int8 runs the decoder's projections and
MLPs on int8 weights (per-output-channel scales, model/quant.py). --mesh data=D,tensor=T runs sharded
on D*T devices (weights by the sharding rules, the KV caches over data and tensor). Outputs: PNG for images (with a JSON
sidecar `OUT.json` holding the settings and any generated text), text or JSON (by --out's
extension) for answers and reports; without --out the text is printed. Errors (unreadable input,
an image too large, a checkpoint whose config does not match --config) exit with status 2 and a
one-line message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import app, flags

MODES = ('vqa', 'report', 'generate', 'edit')

def define_flags():
  """Defines the CLI's absl flags (only when run as a program)."""
  flags.DEFINE_string('checkpoint', None, 'training workdir or its checkpoints/ folder')
  flags.DEFINE_string('config', None, 'configs/*.py the checkpoint must match (optional)')
  flags.DEFINE_string('tokenizer', None, 'tokenizer file (default: config / data root)')
  flags.DEFINE_bool('ema', True, 'use the EMA weights')
  flags.DEFINE_bool('int8', False, 'int8 weight-only inference: the decoder projections and MLPs '
                    'as int8 with per-output-channel scales (model/quant.py)')
  flags.DEFINE_string('image', None, 'input image path(s), comma separated')
  flags.DEFINE_string('question', None, 'vqa: the question')
  flags.DEFINE_string('prompt', None, 'report prompt / generation prompt / edit instruction')
  flags.DEFINE_string('task', 'editing', 'edit: segmentation | super_resolution | '
                      'modality_translation | virtual_staining | counterfactual | editing')
  flags.DEFINE_string('size', None, 'output size HxW in pixels (generate / edit)')
  flags.DEFINE_string('out', None, 'output file (.png for images; .txt or .json for text)')
  flags.DEFINE_integer('seed', 0, 'seed')
  flags.DEFINE_integer('num-steps', None, 'sampler timesteps (default 50)')
  flags.DEFINE_float('cfg-text', None, 'text guidance scale')
  flags.DEFINE_float('cfg-img', None, 'image guidance scale')
  flags.DEFINE_string('cfg-interval', None, 'guidance interval "lo,hi"')
  flags.DEFINE_string('renorm', None, 'global | channel | text_channel')
  flags.DEFINE_float('renorm-min', None, 'renorm lower clamp')
  flags.DEFINE_float('timestep-shift', None, 'timestep shift s')
  flags.DEFINE_bool('think', False, 'generate: write a plan in <think></think> first')
  flags.DEFINE_integer('max-new-tokens', None, 'text budget')
  flags.DEFINE_float('temperature', 0.0, 'text sampling temperature (0 = greedy)')
  flags.DEFINE_float('top-p', 1.0, 'nucleus sampling mass')
  flags.DEFINE_integer('frame', None, 'frame of a multi-frame DICOM')
  flags.DEFINE_integer('slice', None, 'axial slice of a NIfTI volume')
  flags.DEFINE_string('window', None, 'CT window: a preset name or "center,width"')
  flags.DEFINE_integer('max-input-pixels', 64 * 1024 * 1024, 'refuse larger input images')
  flags.DEFINE_string('mesh', None, 'run sharded on a device mesh, e.g. "data=2,tensor=4" '
                      '(axes data, fsdp, tensor; one may be -1); default one device')
  for name in ('num-steps', 'cfg-text', 'cfg-img', 'cfg-interval', 'renorm-min', 'timestep-shift',
               'max-new-tokens', 'top-p', 'max-input-pixels'):
    flags.DEFINE_alias(name.replace('-', '_'), name)


FLAGS = flags.FLAGS


class InputError(ValueError):
  pass


def read_images(paths, *, frame=None, slice_index=None, window=None,
                max_pixels=64 * 1024 * 1024):
  from unimedvl_jax.data import images as imlib
  if isinstance(window, str) and ',' in window:
    window = tuple(float(x) for x in window.split(','))
  out = []
  for p in paths:
    try:
      img = imlib.load_image(p, frame=frame, slice_index=slice_index, window=window)
    except imlib.ImageError as e:
      raise InputError(f'cannot read image {p}: {e}') from None
    except (OSError, ValueError, MemoryError) as e:   # e.g. PIL's decompression-bomb guard
      raise InputError(f'cannot read image {p}: {type(e).__name__}: {e}') from None
    if img.shape[0] * img.shape[1] > max_pixels:
      raise InputError(f'image too large: {p} is {img.shape[1]}x{img.shape[0]} pixels, over '
                       f'--max-input-pixels={max_pixels}')
    out.append(img)
  return out


def _size(s):
  if not s:
    return None
  try:
    h, w = (int(x) for x in s.lower().split('x'))
  except ValueError:
    raise InputError(f'--size must be HxW (e.g. 512x512), got {s!r}') from None
  return h, w


def parse_mesh(s):
  """'data=2,tensor=4' -> the ('data', 'fsdp', 'tensor') mesh over this process's devices."""
  from ml_collections import ConfigDict
  from unimedvl_jax import sharding
  axes = {'data': 1, 'fsdp': 1, 'tensor': 1}
  for part in s.split(','):
    k, _, v = part.partition('=')
    k = k.strip()
    if k not in axes or not v.strip().lstrip('-').isdigit():
      raise InputError(f'--mesh must be like data=2,tensor=4 (axes data, fsdp, tensor), got {s!r}')
    axes[k] = int(v)
  return sharding.make_mesh(ConfigDict(axes))


def flow_settings(mode, *, num_steps=None, cfg_text=None, cfg_img=None, cfg_interval=None,
                  renorm=None, renorm_min=None, shift=None):
  from unimedvl_jax.infer import image as I
  base = I.TEXT_TO_IMAGE if mode == 'generate' else I.EDITING
  kw = {}
  for k, v in (('num_steps', num_steps), ('s_text', cfg_text), ('s_img', cfg_img),
               ('renorm', renorm), ('renorm_min', renorm_min), ('shift', shift)):
    if v is not None:
      kw[k] = v
  if cfg_interval:
    lo, hi = (float(x) for x in cfg_interval.split(','))
    kw['interval'] = (lo, hi)
  return dataclasses.replace(base, **kw)


def run(mode, checkpoint, *, image=None, question=None, prompt=None, task='editing', size=None,
        out=None, seed=0, think=False, max_new_tokens=None, temperature=0.0, top_p=1.0,
        config=None, tokenizer=None, use_ema=True, frame=None, slice_index=None, window=None,
        max_input_pixels=64 * 1024 * 1024, mesh=None, int8=False, **flow_kw) -> dict:
  """The CLI as a function. Returns the result dict (also written to `out`)."""
  from unimedvl_jax.infer import tasks
  from unimedvl_jax.infer import text as T
  from unimedvl_jax.infer.loading import load_checkpoint, load_tokenizer
  if mode not in MODES:
    raise InputError(f'mode must be one of {MODES}, got {mode!r}')
  paths = [p.strip() for p in (image or '').split(',') if p.strip()]
  if mode in ('vqa', 'report', 'edit') and not paths:
    raise InputError(f'{mode} needs --image')
  if mode == 'vqa' and not question:
    raise InputError('vqa needs --question')
  if mode == 'generate' and not prompt:
    raise InputError('generate needs --prompt')
  imgs = read_images(paths, frame=frame, slice_index=slice_index, window=window,
                     max_pixels=max_input_pixels)
  hw = _size(size)
  cfg, model = load_checkpoint(checkpoint, config_path=config, use_ema=use_ema, int8=int8)
  from unimedvl_jax.infer.context import prepare
  model = prepare(model, parse_mesh(mesh) if mesh else None)   # split once, for every request
  tok = load_tokenizer(cfg, tokenizer)
  budget = {'vqa': 32, 'report': 256}.get(mode, 256)
  ts = T.TextSettings(max_new_tokens=max_new_tokens or budget, temperature=temperature,
                      top_p=top_p)
  res = dict(mode=mode, checkpoint=os.path.abspath(checkpoint), seed=seed, inputs=paths,
             decoding=ts.describe(), weights='int8' if int8 else cfg.model.param_dtype)
  if mode == 'vqa':
    res['question'] = question
    res['answer'] = tasks.vqa(cfg=cfg, model=model, tokenizer=tok, images=[imgs],
                              questions=[question], text_settings=ts, seeds=[seed])[0]
    text = res['answer']
  elif mode == 'report':
    res['prompt'] = prompt or tasks.REPORT_PROMPT
    res['report'] = tasks.report(model, tok, cfg, [imgs], [res['prompt']], text_settings=ts,
                                 seeds=[seed])[0]
    text = res['report']
  else:
    fs = flow_settings(mode, **flow_kw)
    res['sampler'] = fs.describe()
    if mode == 'generate':
      r = tasks.text_to_image(model, tok, cfg, [prompt], sizes=[hw] if hw else None, think=think,
                              flow_settings=fs, text_settings=ts, seeds=[seed])[0]
      res.update(prompt=prompt, plan=r['plan'])
    else:
      r = tasks.edit(model, tok, cfg, [imgs], [prompt] if prompt else None, task=task,
                     sizes=[hw] if hw else None, flow_settings=fs, text_settings=ts,
                     seeds=[seed])[0]
      res.update(task=task, instruction=prompt or tasks.EDIT_PROMPTS.get(task),
                 explanation=r['explanation'])
    res['image_shape'] = list(r['image'].shape)
    text = None
    if out:
      from unimedvl_jax.data import images as imlib
      os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
      imlib.save_png(r['image'], out)
      with open(out + '.json', 'w', encoding='utf-8') as f:
        json.dump(res, f, indent=2)
    res['image'] = r['image']
    return res
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w', encoding='utf-8') as f:
      if out.endswith('.json'):
        json.dump(res, f, indent=2)
      else:
        f.write(text + '\n')
  return res


def main(argv):
  from unimedvl_jax.infer.context import ContextError
  from unimedvl_jax.infer.loading import LoadError
  if len(argv) != 2 or argv[1] not in MODES:
    raise app.UsageError(f'usage: python -m unimedvl_jax.infer {"|".join(MODES)} --checkpoint DIR ...')
  try:
    res = run(argv[1], FLAGS.checkpoint, image=FLAGS.image, question=FLAGS.question,
              prompt=FLAGS.prompt, task=FLAGS.task, size=FLAGS.size, out=FLAGS.out,
              seed=FLAGS.seed, think=FLAGS.think, max_new_tokens=FLAGS['max-new-tokens'].value,
              temperature=FLAGS.temperature, top_p=FLAGS['top-p'].value, config=FLAGS.config,
              tokenizer=FLAGS.tokenizer, use_ema=FLAGS.ema, frame=FLAGS.frame,
              slice_index=FLAGS.slice, window=FLAGS.window,
              max_input_pixels=FLAGS['max-input-pixels'].value, mesh=FLAGS.mesh, int8=FLAGS.int8,
              num_steps=FLAGS['num-steps'].value, cfg_text=FLAGS['cfg-text'].value,
              cfg_img=FLAGS['cfg-img'].value, cfg_interval=FLAGS['cfg-interval'].value,
              renorm=FLAGS.renorm, renorm_min=FLAGS['renorm-min'].value,
              shift=FLAGS['timestep-shift'].value)
  except (InputError, LoadError, ContextError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for k in ('answer', 'report', 'plan', 'explanation'):
    if res.get(k):
      print(f'{k}: {res[k]}')
  if FLAGS.out:
    print(f'wrote {FLAGS.out}')
  return 0

