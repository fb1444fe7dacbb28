"""Batched "programs": prompt items + generation steps, run over KV-cache contexts.

A `Program` is one request: the prompt (items in context order: a training plan's items before
its first loss item) and the steps to generate (the plan's loss items, in order):

    Program(prompt=[Item.vit(...), Item.text(ids)], steps=['text'])              # VQA / report
    Program(prompt=[Item.text(ids)], steps=[('image', (gh, gw))])               # text-to-image
    Program(prompt=[Item.vae(...), Item.vit(...), Item.text(ids)],
            steps=[('image', (gh, gw)), 'text'])                                # counterfactual

Prompts are written as plan items by the training template (`data.plans.prompt_plan`; tasks.py)
and turned into Items by `Runner.prompt` (text encoded, images resized by the training rules).
`run_programs` lays each prompt out with `data.plans.lay_out` -- the layout training's
`tokenize` is built from -- and prefills it through `BlockBuilder.layout` (`prompt_builders`).

`run_programs(runner, programs, ...)` prefills the contexts of a batch of programs (ragged rows)
and runs the steps together (the programs of one call must have the same step kinds):
- a 'text' step decodes one text item (text.py) and APPENDS it to the full context (so a later
  image sees it: think-mode plans, editing replies); the CFG contexts are not changed (BAGEL);
- an ('image', grid) step samples an image (image.py) from the full context with the CFG
  contexts (SPEC 7): "cfg_text" = the prompt before its last text item (the whole prompt if an
  image follows that text), "cfg_img" = the prompt's text items only. The generated image is
  never written into a context (a noised target is invisible to every later item, as in
  training).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from unimedvl_jax.batch import Geometry
from unimedvl_jax.data import plans
from unimedvl_jax.infer import context as C
from unimedvl_jax.infer import image as I
from unimedvl_jax.infer import text as T

MIN_CAPACITY = 64


@dataclasses.dataclass
class Item:
  kind: str                     # 'text' | 'vit' | 'vae'
  ids: Any = None               # text: token ids (no markers)
  patches: Any = None           # vit: [nh*nw, K] float32
  tokens: Any = None            # vae: clean latent tokens [gh*gw, 64]
  grid: tuple = (0, 0)

  @classmethod
  def text(cls, ids):
    return cls('text', ids=[int(i) for i in ids])

  @property
  def n_tokens(self) -> int:
    return len(self.ids) + 2 if self.kind == 'text' else self.grid[0] * self.grid[1] + 2

  def plan_item(self) -> plans.PlanItem:
    """This item as a (materialized) prompt plan item, for `plans.lay_out`."""
    if self.kind not in ('text', 'vit', 'vae'):
      raise ValueError(f'unknown item kind {self.kind!r}')
    return plans.PlanItem(self.kind, ids=self.ids, grid=tuple(self.grid))

  @property
  def payload(self):
    """What `BlockBuilder.layout` embeds: ViT patches, clean VAE latent tokens (None: text)."""
    return {'text': None, 'vit': self.patches, 'vae': self.tokens}[self.kind]


@dataclasses.dataclass
class Program:
  prompt: list
  steps: list                   # 'text' | ('image', (gh, gw))

  def signature(self) -> tuple:
    return tuple(s if s == 'text' else 'image' for s in self.steps)


@dataclasses.dataclass
class StepOutput:
  kind: str                     # 'text' | 'image'
  tokens: list | None = None    # text ids
  text: str | None = None
  finished: bool | None = None  # text: <|im_end|> emitted (not forced)
  image: np.ndarray | None = None   # uint8 [H, W, 3]
  latents: np.ndarray | None = None


class Runner:
  """model + tokenizer + config: image preprocessing (the training resize rules) and programs."""

  def __init__(self, model, tokenizer, cfg):
    # split once per loaded checkpoint (context.prepare): every call below reuses it
    self.model = C.prepare(model)
    self.tok = tokenizer
    self.cfg = cfg
    self.specials = C.Specials.from_tokenizer(tokenizer)
    geom = Geometry.from_config(cfg)    # the training resize rules, read from the same place
    self.geom = geom
    self.vit_patch = int(geom.vit_patch)
    self.latent_px = int(geom.latent_px)
    self.vit_rule = geom.vit_rule
    self.vae_rule = geom.vae_rule

  # ----------------------------------------------------------------------------- items
  def prompt(self, plan: Sequence[plans.PlanItem], blank=None) -> list[Item]:
    """Prompt plan items -> Items, the one conversion of a prompt plan for inference. Items are
    either written (`plans.prompt_plan`: text strings, uint8 [H, W, 3] images, resized here by
    the training rules, vit / vae below) or materialized (`plans.materialize`, as the evaluation
    prepares dataset samples: ids, ViT patches and VAE pixels already resized, uint8 range).
    blank: a function applied to every image first (the image-conditioning ablation)."""
    from unimedvl_jax.data import images as imlib
    blank = blank or (lambda x: x)
    out = []
    for it in plan:
      if it.loss or it.noised:
        raise ValueError(f'a prompt holds no loss item and no noised target, got {it.describe()}')
      if it.kind == 'text':
        out.append(Item.text(it.ids) if it.ids is not None else self.text(it.text))
      elif it.kind == 'vit':
        out.append(Item('vit', patches=imlib.to_unit_range(blank(it.patches)),
                        grid=tuple(it.grid)) if it.patches is not None
                   else self.vit(blank(it.image)))
      elif it.kind == 'vae':
        if it.pixels is not None:
          tokens, grid = C.encode_vae_tokens(self.model, imlib.to_unit_range(blank(it.pixels)))
          out.append(Item('vae', tokens=tokens, grid=grid))
        else:
          out.append(self.vae(blank(it.image)))
      else:
        raise ValueError(f'unknown item kind {it.kind!r}')
    return out

  def text(self, s: str) -> Item:
    return Item.text(self.tok.encode(s))

  def vit(self, img: np.ndarray) -> Item:
    """uint8 [H, W, 3] -> a ViT item (resized by the ViT rule, pixels to [-1, 1])."""
    from unimedvl_jax.data import images as imlib
    img = _as_uint8_rgb(img)
    h2, w2 = imlib.target_size(img.shape[0], img.shape[1], **self.vit_rule)
    x = imlib.to_unit_range(imlib.resize(img, (h2, w2)))
    p, grid = C.vit_patches(x, self.vit_patch)
    g = int(self.cfg.model.vit.grid_size)
    if grid[0] > g or grid[1] > g:
      raise C.ContextError(f'image too large: its {grid[0]}x{grid[1]} ViT patch grid exceeds '
                           f'model.vit.grid_size ({g})')
    return Item('vit', patches=p, grid=grid)

  def vae_pixels(self, img: np.ndarray, size=None) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [-1, 1] resized by the VAE rule (or to `size` = (h, w))."""
    from unimedvl_jax.data import images as imlib
    img = _as_uint8_rgb(img)
    h2, w2 = size or imlib.target_size(img.shape[0], img.shape[1], **self.vae_rule)
    return np.asarray(imlib.to_unit_range(imlib.resize(img, (h2, w2))), np.float32)

  def vae(self, img: np.ndarray) -> Item:
    """uint8 [H, W, 3] -> a clean VAE item (latent mean of the resized image)."""
    x = self.vae_pixels(img)
    gh, gw = x.shape[0] // self.latent_px, x.shape[1] // self.latent_px
    g = int(self.cfg.model.max_latent_size)
    if gh > g or gw > g:
      raise C.ContextError(f'image too large: its {gh}x{gw} latent grid exceeds '
                           f'model.max_latent_size ({g})')
    tokens, grid = C.encode_vae_tokens(self.model, x)
    return Item('vae', tokens=tokens, grid=grid)

  def output_grid(self, height: int, width: int) -> tuple[int, int]:
    """The latent grid of a generated image of about height x width (VAE resize rule)."""
    from unimedvl_jax.data import images as imlib
    mx = int(self.vae_rule['max_size'])
    if int(height) > mx or int(width) > mx or int(height) < 1 or int(width) < 1:
      raise C.ContextError(f'image too large: a {height}x{width} output is requested; sides must '
                           f'be in 1..{mx} (data.vae_max_size of the checkpoint\'s config)')
    h2, w2 = imlib.target_size(int(height), int(width), **self.vae_rule)
    gh, gw = h2 // self.latent_px, w2 // self.latent_px
    g = int(self.cfg.model.max_latent_size)
    if gh > g or gw > g:
      raise C.ContextError(f'image too large: a {h2}x{w2} output needs a {gh}x{gw} latent grid, '
                           f'over model.max_latent_size ({g})')
    return gh, gw

  def decode(self, ids) -> str:
    return self.tok.decode(list(ids)).strip()


def _as_uint8_rgb(img) -> np.ndarray:
  a = np.asarray(img)
  if a.ndim == 2:
    a = np.repeat(a[..., None], 3, axis=-1)
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise C.ContextError(f'expected an image [H, W, 3], got shape {a.shape}')
  if a.shape[-1] == 1:
    a = np.repeat(a, 3, axis=-1)
  if a.shape[-1] == 4:
    a = a[..., :3]
  if a.dtype != np.uint8:
    raise C.ContextError(f'expected a uint8 image, got {a.dtype}')
  return a


def _lay_out(runner: Runner, prompt: Sequence[Item]):
  """(plan items, their token layout (`plans.lay_out`, as training's tokenize), payloads)."""
  items = [it.plan_item() for it in prompt]
  return items, plans.lay_out(items, runner.specials, runner.geom), [it.payload for it in prompt]


def cfg_text_cut(prompt: Sequence[Item]) -> int:
  """Index where the "cfg_text" context stops: before the last text item, unless an image
  follows it (then the whole prompt)."""
  last = max((i for i, it in enumerate(prompt) if it.kind == 'text'), default=None)
  if last is None or any(it.kind != 'text' for it in prompt[last + 1:]):
    return len(prompt)
  return last


def capacity_for(programs: Sequence[Program], max_new_tokens: int) -> int:
  need = 0
  for p in programs:
    n = sum(it.n_tokens for it in p.prompt)
    n += sum(max_new_tokens + 2 for s in p.steps if s == 'text')
    need = max(need, n)
  return C.bucket(max(need, 1), MIN_CAPACITY)


def prompt_builders(runner: Runner, programs: Sequence[Program], cfg: bool = False) -> dict:
  """The prefill blocks of a batch of programs, every prompt laid out by `plans.lay_out` and
  appended through `BlockBuilder.layout`. Without cfg: {'full': the whole prompt}. With cfg
  (an image is generated): 'cfg_text' (the layout before `cfg_text_cut`), 'rest' (the layout
  from there on, continuing the cfg_text context: together they are the whole prompt) and
  'cfg_img' (the prompt's text items alone, laid out on their own)."""
  model, sp, B = runner.model, runner.specials, len(programs)
  names = ('cfg_text', 'rest', 'cfg_img') if cfg else ('full',)
  out = {k: C.make_builder(model, B, sp) for k in names}
  for r, p in enumerate(programs):
    items, lay, payloads = _lay_out(runner, p.prompt)
    if not cfg:
      out['full'].layout(r, items, lay, payloads)
      continue
    cut = cfg_text_cut(p.prompt)   # no item is dropped: segment j is prompt item j
    out['cfg_text'].layout(r, items, lay, payloads, 0, cut)
    out['rest'].layout(r, items, lay, payloads, cut)
    texts = [it for it in p.prompt if it.kind == 'text']
    t_items, t_lay, t_payloads = _lay_out(runner, texts)
    out['cfg_img'].layout(r, t_items, t_lay, t_payloads)
  return out


def run_programs(runner: Runner, programs: Sequence[Program], *,
                 text_settings: T.TextSettings = T.TextSettings(),
                 flow_settings: I.FlowSettings = I.TEXT_TO_IMAGE,
                 seeds: Sequence[int] | int = 0, decode_images: bool = True
                 ) -> list[list[StepOutput]]:
  """Runs a batch of programs (same step kinds) and returns each program's step outputs."""
  programs = list(programs)
  if not programs:
    return []
  sig = programs[0].signature()
  for p in programs[1:]:
    if p.signature() != sig:
      raise ValueError(f'programs of one batch must have the same steps; got {sig} and '
                       f'{p.signature()}')
  B = len(programs)
  model, sp = runner.model, runner.specials
  if isinstance(seeds, (int, np.integer)):
    seeds = [int(seeds) + b for b in range(B)]
  seeds = [int(s) for s in seeds]
  cap = capacity_for(programs, text_settings.max_new_tokens)
  has_image = 'image' in sig
  empty = C.new_context(model, B, cap)
  bs = prompt_builders(runner, programs, cfg=has_image)
  if has_image:
    cfg_text = C.prefill(model, empty, bs['cfg_text'])
    full = C.prefill(model, cfg_text, bs['rest'])
    cfg_img = C.prefill(model, empty, bs['cfg_img']) if flow_settings.s_img > 1.0 else None
  else:
    full = C.prefill(model, empty, bs['full'])
    cfg_text = cfg_img = None
  outs: list[list[StepOutput]] = [[] for _ in range(B)]
  for j, _ in enumerate(sig):
    if sig[j] == 'text':
      res = T.generate_text(model, full, sp, text_settings,
                            seeds=[s * 1000 + j for s in seeds])
      full = res.ctx
      for r in range(B):
        outs[r].append(StepOutput('text', tokens=res.tokens[r], text=runner.decode(res.tokens[r]),
                                  finished=res.finished[r]))
    else:
      grids = [tuple(p.steps[j][1]) for p in programs]
      lat = I.generate_latents(model, full, sp, grids, cfg_text_ctx=cfg_text, cfg_img_ctx=cfg_img,
                               settings=flow_settings, seeds=[s * 1000 + j for s in seeds])
      for r in range(B):
        img = I.decode_latents(model, lat[r], grids[r]) if decode_images else None
        outs[r].append(StepOutput('image', image=img, latents=lat[r]))
  return outs
