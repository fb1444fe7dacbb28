"""Inference tasks, mirroring the training plans (SPEC 6) -- model + tokenizer + cfg + inputs.

Every prompt is written by the training template: the request's human text and input images go
through `data.plans.prompt_plan` (the conversation / family template `plan_sample` uses), so a
prompt is the training plan of the same sample truncated before its first loss item; the
`*_program` functions build the `Program` of one request.

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

from unimedvl_jax.data import plans
from unimedvl_jax.data.synthetic.common import VQA_SUFFIX, vqa_prompt  # the datasets' VQA prompt
from unimedvl_jax.infer import image as I
from unimedvl_jax.infer import text as T
from unimedvl_jax.infer.runner import Program, Runner, run_programs

IMAGE_PLACEHOLDER = plans.IMAGE_PLACEHOLDER
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


def prompt_items(runner: Runner, family: str, text: str, images: Sequence[np.ndarray],
                 system: str | None = None) -> list:
  """The prompt of one request as runner Items: an optional system text item (think mode), then
  the human turn `text` with its input images laid out by the training template of the task
  family (`plans.prompt_plan`: split at `<image>`, images first without a placeholder, empty
  pieces dropped; understanding: a ViT item per image; editing: VAE then ViT)."""
  plan = [plans.PlanItem('text', text=system)] if system is not None else []
  return runner.prompt(plan + plans.prompt_plan(family, text, list(images)))


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


def understanding_program(runner: Runner, images, prompt: str, *, think: bool = False) -> Program:
  """One image-to-text request (an image or a list, and its prompt): the prompt, then a text."""
  items = prompt_items(runner, 'understanding', prompt, _images_list(images),
                       system=THINK_VLM_SYSTEM if think else None)
  return Program(items, ['text'])


def image_to_text(model, tokenizer, cfg, images, prompts: Sequence[str], *,
                  text_settings: T.TextSettings = T.TextSettings(), seeds=0, batch_size: int = 8,
                  think: bool = False) -> list[str]:
  """Generic understanding: per request one image (or a list) and a prompt -> generated text."""
  runner = Runner(model, tokenizer, cfg)
  progs = [understanding_program(runner, imgs, prompt, think=think)
           for imgs, prompt in zip(images, prompts, strict=True)]
  outs = _run(runner, progs, seeds, batch_size, text_settings=text_settings)
  return [o[0].text for o in outs]


def vqa(model, tokenizer, cfg, images, questions: Sequence[str], *, suffix: str = VQA_SUFFIX,
        text_settings: T.TextSettings = T.TextSettings(max_new_tokens=32), seeds=0,
        batch_size: int = 8) -> list[str]:
  """Visual question answering: `<image>\\n{question}\\n{suffix}` (the image first when the
  question has no placeholder) -> the answer."""
  prompts = [vqa_prompt(q, suffix) for q in questions]
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
  progs = [text_to_image_program(runner, prompt, hw, think=think)
           for prompt, hw in zip(prompts, sizes)]
  outs = _run(runner, progs, seeds, batch_size, text_settings=text_settings,
              flow_settings=flow_settings)
  return [dict(image=o[-1].image, plan=o[0].text if think else None) for o in outs]


def text_to_image_program(runner: Runner, prompt: str, size, *, think: bool = False) -> Program:
  """One text-to-image request: the prompt (think mode: the system text first, then a generated
  plan), then an image of about `size` = (H, W)."""
  items = prompt_items(runner, 'text_to_image', prompt, (),
                       system=THINK_GEN_SYSTEM if think else None)
  return Program(items, (['text'] if think else []) + [('image', runner.output_grid(*size))])


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


def edit_program(runner: Runner, images, instruction: str, size=None, *, scale: float = 1.0,
                 reply_first: bool = False, explain: bool = False) -> Program:
  """One editing request: the input image(s) (each a VAE then a ViT item) and the instruction
  (the images first unless its `<image>` placeholders match them), then (the reply,) the image of
  `size` (default: the first input's VAE size times `scale`) (and the explanation)."""
  imgs = _images_list(images)
  prompt = (instruction if IMAGE_PLACEHOLDER in instruction
            else f'{IMAGE_PLACEHOLDER}\n{instruction}')
  if prompt.count(IMAGE_PLACEHOLDER) != len(imgs):
    prompt = instruction.replace(IMAGE_PLACEHOLDER, ' ')   # images first
  items = prompt_items(runner, 'editing', prompt, imgs)
  if size is None:
    x = runner.vae_pixels(imgs[0])
    size = (int(round(x.shape[0] * scale)), int(round(x.shape[1] * scale)))
  steps = (['text'] if reply_first else []) + [('image', runner.output_grid(*size))]
  return Program(items, steps + (['text'] if explain else []))


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
  progs = [edit_program(runner, imgs, ins, None if explicit is None else explicit[i],
                        scale=scale, reply_first=reply_first, explain=explain)
           for i, (imgs, ins) in enumerate(zip(images, instructions, strict=True))]
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
