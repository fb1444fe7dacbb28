"""Inference tasks, mirroring the training plans (SPEC 6) -- model + tokenizer + cfg + inputs.

- `vqa`, `report` (and any image-to-text prompt, `describe`): the human text split at `<image>`
  with the ViT image at each placeholder (images first when the text has none), then a text
  item is generated.
- `text_to_image`: the prompt text, then the image (think mode: a system text asks for a plan in
  `<think> </think>`; the plan is generated, added to the context, then the image is drawn).
- `edit` (segmentation, super-resolution, modality translation, virtual staining,
  counterfactual, free-form editing): each input image as a clean VAE item followed by a ViT
  item, the instruction, then the target image; counterfactual also generates the explanation
  text afterwards (it does not see the generated image, like in training). `reply_first`
  generates the training plan's optional gpt reply before the image.

Every function takes lists (one entry per request) and runs them in batches of `batch_size`
(ragged rows; see context.py). Per-request seeds make results independent of the batching.
Images are uint8 [H, W, 3] numpy arrays (load files with `unimedvl_jax.data.images.load_image`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from unimedvl_jax.infer import image as I
from unimedvl_jax.infer import text as T
from unimedvl_jax.infer.runner import Program, Runner, run_programs

IMAGE_PLACEHOLDER = '<image>'
VQA_SUFFIX = 'Answer the question using a single word or phrase.'
REPORT_PROMPT = ('Generate a concise radiology report with findings and impression for this '
                 'chest X-ray.')
# BAGEL's think-mode system prompts (VLM_THINK_SYSTEM_PROMPT / GEN_THINK_SYSTEM_PROMPT)
THINK_GEN_SYSTEM = ('You should first think about the planning process in the mind and then '
                    'generate the image. \nThe planning process is enclosed within <think> '
                    '</think> tags, i.e. <think> planning process here </think> image here')
THINK_VLM_SYSTEM = ('You should first think about the reasoning process in the mind and then '
                    'provide the user with the answer. \nThe reasoning process is enclosed within '
                    '<think> </think> tags, i.e. <think> reasoning process here </think> here '
                    'answer')
EDIT_PROMPTS = {
    'segmentation': 'Please segment the lesion.',
    'super_resolution': 'Generate a 2x super-resolved version of this image.',
    'modality_translation': 'Translate this T1-weighted brain MRI into a T2-weighted image.',
    'virtual_staining': 'Convert this H&E-stained histology image into an IHC-stained image.',
    'counterfactual': 'What would this image look like without the lesion?',
}


def human_items(runner: Runner, text: str, images: Sequence[np.ndarray], image_items) -> list:
  """A human turn split at `<image>` (the next image's items at each placeholder); without
  placeholders the images go first. Empty text pieces are dropped (like data/plans.py)."""
  n_ph = text.count(IMAGE_PLACEHOLDER)
  images = list(images)
  if n_ph and n_ph != len(images):
    raise ValueError(f'the text has {n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but '
                     f'{len(images)} image(s) were given')
  out = []
  if not n_ph:
    for img in images:
      out += image_items(img)
  pending = images if n_ph else []
  for j, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
    if j:
      out += image_items(pending.pop(0))
    piece = piece.strip()
    if piece:
      out.append(runner.text(piece))
  return out


def _images_list(x):
  if isinstance(x, np.ndarray) and x.ndim == 3:
    return [x]
  return list(x)


def _run(runner, programs, seeds, batch_size, **settings):
  if isinstance(seeds, (int, np.integer)):
    seeds = [int(seeds) + i for i in range(len(programs))]
  seeds = list(seeds)
  if len(seeds) != len(programs):
    raise ValueError(f'{len(seeds)} seeds for {len(programs)} requests')
  out = []
  for i in range(0, len(programs), batch_size):
    out += run_programs(runner, programs[i:i + batch_size], seeds=seeds[i:i + batch_size],
                        **settings)
  return out


def image_to_text(model, tokenizer, cfg, images, prompts: Sequence[str], *,
                  text_settings: T.TextSettings = T.TextSettings(), seeds=0, batch_size: int = 8,
                  think: bool = False) -> list[str]:
  """Generic understanding: per request one image (or a list) and a prompt -> generated text."""
  runner = Runner(model, tokenizer, cfg)
  progs = []
  for imgs, prompt in zip(images, prompts, strict=True):
    items = [runner.text(THINK_VLM_SYSTEM)] if think else []
    items += human_items(runner, prompt, _images_list(imgs), lambda im: [runner.vit(im)])
    progs.append(Program(items, ['text']))
  outs = _run(runner, progs, seeds, batch_size, text_settings=text_settings)
  return [o[0].text for o in outs]


def vqa(model, tokenizer, cfg, images, questions: Sequence[str], *, suffix: str = VQA_SUFFIX,
        text_settings: T.TextSettings = T.TextSettings(max_new_tokens=32), seeds=0,
        batch_size: int = 8) -> list[str]:
  """Visual question answering: `<image>\\n{question}\\n{suffix}` (the image first when the
  question has no placeholder) -> the answer."""
  prompts = []
  for q in questions:
    p = q if IMAGE_PLACEHOLDER in q else f'{IMAGE_PLACEHOLDER}\n{q}'
    prompts.append(f'{p}\n{suffix}' if suffix and suffix not in p else p)
  return image_to_text(model, tokenizer, cfg, images, prompts, text_settings=text_settings,
                       seeds=seeds, batch_size=batch_size)


def report(model, tokenizer, cfg, images, prompts: Sequence[str] | str = REPORT_PROMPT, *,
           text_settings: T.TextSettings = T.TextSettings(max_new_tokens=256), seeds=0,
           batch_size: int = 8) -> list[str]:
  """Report generation: the image then the report prompt -> the report."""
  images = list(images)
  if isinstance(prompts, str):
    prompts = [prompts] * len(images)
  prompts = [p if IMAGE_PLACEHOLDER in p else f'{IMAGE_PLACEHOLDER}\n{p}' for p in prompts]
  return image_to_text(model, tokenizer, cfg, images, prompts, text_settings=text_settings,
                       seeds=seeds, batch_size=batch_size)


def text_to_image(model, tokenizer, cfg, prompts: Sequence[str], *, sizes=None,
                  think: bool = False, flow_settings: I.FlowSettings = I.TEXT_TO_IMAGE,
                  text_settings: T.TextSettings = T.TextSettings(max_new_tokens=256), seeds=0,
                  batch_size: int = 8) -> list[dict]:
  """Prompt -> image (uint8). sizes: per request (H, W) or one (H, W) or None (the config's
  largest VAE size, square). Returns per request {'image', 'plan' (think mode, else None)}."""
  runner = Runner(model, tokenizer, cfg)
  n = len(prompts)
  sizes = _sizes(cfg, sizes, n)
  progs = []
  for prompt, hw in zip(prompts, sizes):
    items = [runner.text(THINK_GEN_SYSTEM)] if think else []
    items.append(runner.text(prompt))
    steps = (['text'] if think else []) + [('image', runner.output_grid(*hw))]
    progs.append(Program(items, steps))
  outs = _run(runner, progs, seeds, batch_size, text_settings=text_settings,
              flow_settings=flow_settings)
  return [dict(image=o[-1].image, plan=o[0].text if think else None) for o in outs]


def _sizes(cfg, sizes, n):
  if sizes is None:
    s = int(cfg.data.vae_max_size)
    return [(s, s)] * n
  if len(sizes) == 2 and all(isinstance(x, (int, np.integer)) for x in sizes):
    return [tuple(sizes)] * n
  sizes = list(sizes)
  if len(sizes) != n:
    raise ValueError(f'{len(sizes)} sizes for {n} requests')
  return sizes


def edit(model, tokenizer, cfg, images, instructions: Sequence[str] | None = None, *,
         task: str = 'editing', sizes=None, scale: float | None = None,
         flow_settings: I.FlowSettings = I.EDITING,
         text_settings: T.TextSettings = T.TextSettings(max_new_tokens=128),
         explain: bool | None = None, reply_first: bool = False, seeds=0,
         batch_size: int = 8) -> list[dict]:
  """Image editing family. Per request: input image(s) (uint8) and an instruction (default:
  EDIT_PROMPTS[task]). Output size: `sizes`, else the first input's VAE size times `scale`
  (default 2 for super_resolution, else 1). Counterfactual (explain defaults to True there)
  generates the explanation after the image. Returns per request {'image', 'reply',
  'explanation'}."""
  runner = Runner(model, tokenizer, cfg)
  images = list(images)
  n = len(images)
  if instructions is None:
    if task not in EDIT_PROMPTS:
      raise ValueError(f'no default instruction for task {task!r}; give instructions')
    instructions = [EDIT_PROMPTS[task]] * n
  if explain is None:
    explain = task == 'counterfactual'
  if scale is None:
    scale = 2.0 if task == 'super_resolution' else 1.0
  explicit = None if sizes is None else _sizes(cfg, sizes, n)
  progs = []
  for i, (imgs, ins) in enumerate(zip(images, instructions, strict=True)):
    imgs = _images_list(imgs)
    prompt = ins if IMAGE_PLACEHOLDER in ins else f'{IMAGE_PLACEHOLDER}\n{ins}'
    if prompt.count(IMAGE_PLACEHOLDER) != len(imgs):
      prompt = ins.replace(IMAGE_PLACEHOLDER, ' ')   # images first
    items = human_items(runner, prompt, imgs, lambda im: [runner.vae(im), runner.vit(im)])
    if explicit is not None:
      hw = explicit[i]
    else:
      x = runner.vae_pixels(imgs[0])
      hw = (int(round(x.shape[0] * scale)), int(round(x.shape[1] * scale)))
    steps = (['text'] if reply_first else []) + [('image', runner.output_grid(*hw))]
    steps += ['text'] if explain else []
    progs.append(Program(items, steps))
  outs = _run(runner, progs, seeds, batch_size, text_settings=text_settings,
              flow_settings=flow_settings)
  res = []
  for o in outs:
    texts = [s for s in o if s.kind == 'text']
    img = [s for s in o if s.kind == 'image'][0]
    res.append(dict(image=img.image,
                    reply=texts[0].text if reply_first else None,
                    explanation=texts[-1].text if explain else None))
  return res
