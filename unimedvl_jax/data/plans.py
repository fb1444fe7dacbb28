"""Sample -> sequence plan (items) -> per-token arrays, SPEC sections 3 and 6 exactly.

Three steps, each testable on its own:

1. `plan_sample(sample) -> [PlanItem]`: the task-family plan, no I/O (`family_plan`, built from
   the conversation template `turn_items`; inference writes its prompts with the same functions:
   `prompt_plan(family, text, images)` = the plan of that human turn, with no loss item).
   - understanding (VQA / report / caption, and text-only): every turn in order; a human turn is
     split at `<image>` with the next input image (ViT) at each placeholder; gpt turns carry loss.
     Without placeholders the input images go before the first human text.
   - text_to_image (output images, no input image): human text (enable_cfg), gpt planning text
     (loss), then each output image as a noised VAE target (loss).
   - editing (input and output images: segmentation, super-resolution, modality translation,
     virtual staining, ...): human turns split at `<image>` as above but each input image becomes
     a clean VAE item followed by a ViT item (both enable_cfg); instruction text (enable_cfg); gpt
     reply (loss); then the noised VAE target(s) (loss).
   - counterfactual (sub_task_type contains "counterfactual"): human turns (input images as
     VAE + ViT, instruction), the noised VAE target(s), THEN the gpt explanation (loss): it sits
     after the target but cannot see it (noise mode hides a noised image from every other split).
2. `materialize(items, tokenizer, geom)`: encodes text, loads, resizes and patchifies images.
3. `tokenize(items, specials, geom, rng, dropout)`: CFG dropout and the token arrays, built on
   `lay_out` (each kept item's `item_tokens` at the running counter), which inference prefills
   prompts from (infer/blocks.py `BlockBuilder.layout`):
   text = <|im_start|> ids <|im_end|>; with loss the labels are ids + <|im_end|> at the positions
   of <|im_start|> + ids (the <|im_end|> position has no label). ViT / VAE image =
   <|vision_start|> tokens <|vision_end|>, all at ONE position; the counter then advances by 1,
   except after a noised VAE target. A dropped image still advances the counter, a dropped text
   does not. Split modes: text causal, ViT and clean VAE full, noised VAE noise; markers belong to
   their image's split (token_type 1, understanding expert).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import numpy as np

from unimedvl_jax import batch as batch_lib
from unimedvl_jax.batch import MODE_CAUSAL, MODE_FULL, MODE_NOISE
from unimedvl_jax.batch import TOKEN_TEXT, TOKEN_VAE, TOKEN_VIT
from unimedvl_jax.data.jsonl import ImageRef, Sample, SampleError, Turn

IMAGE_PLACEHOLDER = '<image>'
FAMILIES = ('understanding', 'text_to_image', 'editing', 'counterfactual')


# ----------------------------------------------------------------------------------------------
# geometry of one pack / one sample, from the config


# The pack geometry lives with the batch contract (batch.py); re-exported here for the data code.
Geometry = batch_lib.Geometry


@dataclasses.dataclass(frozen=True)
class Specials:
  im_start: int
  im_end: int
  vision_start: int
  vision_end: int

  @classmethod
  def from_tokenizer(cls, tok) -> 'Specials':
    return cls(int(tok.im_start), int(tok.im_end), int(tok.vision_start), int(tok.vision_end))


# ----------------------------------------------------------------------------------------------
# 1. plans


@dataclasses.dataclass
class PlanItem:
  kind: str                          # 'text' | 'vit' | 'vae'
  loss: bool = False
  enable_cfg: bool = False
  noised: bool = False               # vae only: a noised generation target
  text: str = ''                     # text: the string (before materialize)
  image: Any = None                  # vit / vae: the source image (an ImageRef; at
                                     # inference an in-memory uint8 [H, W, 3] array)
  ids: Any = None                    # text, after materialize: int ids (no specials)
  patches: Any = None                # vit, after materialize: uint8 [nh*nw, K] raw pixels
  grid: tuple[int, int] = (0, 0)     # vit: (nh, nw) patches; vae: (gh, gw) latent tokens
  pixels: Any = None                 # vae, after materialize: uint8 [h, w, 3] (resized)
  moments: Any = None                # vae with a latent cache: (mean, logvar) float32 [gh*gw, D]

  def describe(self) -> str:
    flags = ''.join(f for f, on in (('L', self.loss), ('C', self.enable_cfg), ('N', self.noised))
                    if on)
    return f'{self.kind}[{flags}]'


def task_family(sample: Sample) -> str:
  if 'counterfactual' in (sample.sub_task_type or '').lower():
    return 'counterfactual'
  if sample.output_img:
    return 'editing' if sample.input_img else 'text_to_image'
  return 'understanding'


def _text(s: str, **kw) -> PlanItem | None:
  s = s.strip()
  return PlanItem('text', text=s, **kw) if s else None


def turn_items(turns, images, image_items, human_cfg: bool) -> list[PlanItem]:
  """The conversation template (training and inference): turns in order; a human turn is split
  at <image>, with `image_items(image)` (the next input image) at each placeholder; its text
  pieces get enable_cfg=human_cfg. A gpt turn is one text item with loss. Without any
  placeholder the input images go before the first human turn. `images`: the input images
  (ImageRefs in training, in-memory uint8 arrays at inference); image_items None: no image items
  (a stray <image> is dropped). Raises ValueError when placeholders and images disagree."""
  n_ph = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns if t.role == 'human')
  imgs = list(images) if image_items is not None else []
  n_ph = n_ph if image_items is not None else 0
  if n_ph and n_ph != len(imgs):
    raise ValueError(f'message has {n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but input_img has '
                     f'{len(imgs)} image(s)')
  out: list[PlanItem] = []
  lead = imgs if not n_ph else []
  for t in turns:
    if t.role == 'human':
      for ref in lead:
        out += image_items(ref)
      lead = []
      text = t.text if image_items is not None else t.text.replace(IMAGE_PLACEHOLDER, ' ')
      for j, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if j:
          out += image_items(imgs.pop(0))
        it = _text(piece, enable_cfg=human_cfg)
        if it:
          out.append(it)
    else:
      it = _text(t.text, loss=True)
      if it:
        out.append(it)
  if lead:   # images but no human turn: they open the sample
    out = [x for ref in lead for x in image_items(ref)] + out
  return out


def _understanding_image(ref) -> list[PlanItem]:
  return [PlanItem('vit', image=ref)]


def _condition_image(ref) -> list[PlanItem]:
  """An editing input image: a clean VAE item, then a ViT item (both enable_cfg)."""
  return [PlanItem('vae', image=ref, enable_cfg=True), PlanItem('vit', image=ref, enable_cfg=True)]


def family_plan(family: str, turns, input_img=(), output_img=()) -> list[PlanItem]:
  """The items of a task family's plan (module doc, step 1) from its turns, input images and
  output images (ImageRefs in training; at inference the prompt: human turns, in-memory input
  images, no output image). Raises ValueError (placeholders and images disagree)."""
  targets = [PlanItem('vae', image=ref, noised=True, loss=True) for ref in output_img]
  if family == 'understanding':
    return turn_items(turns, input_img, _understanding_image, human_cfg=False)
  if family == 'text_to_image':   # no input image: a stray <image> in the prompt is dropped
    return turn_items(turns, (), None, human_cfg=True) + targets
  if family == 'editing':
    return turn_items(turns, input_img, _condition_image, human_cfg=True) + targets
  if family == 'counterfactual':   # the explanation follows the target and cannot see it
    human = [t for t in turns if t.role == 'human']
    gpt = [t for t in turns if t.role == 'gpt']
    return (turn_items(human, input_img, _condition_image, human_cfg=True) + targets
            + turn_items(gpt, (), None, human_cfg=False))
  raise ValueError(f'unknown task family {family!r} (one of {FAMILIES})')


def prompt_plan(family: str, text: str, images=()) -> list[PlanItem]:
  """An inference prompt as plan items: one human turn `text` (split at <image>, the images
  first without a placeholder) with its input images, laid out by the family's training
  template: the training plan of the same sample truncated before its first loss item."""
  return family_plan(family, [Turn('human', text)], images)


def plan_sample(sample: Sample) -> list[PlanItem]:
  """The item list of one sample (SPEC section 6 "Task plans"). Raises SampleError."""
  fam = task_family(sample)
  try:
    out = family_plan(fam, sample.message, sample.input_img, sample.output_img)
  except ValueError as e:
    raise SampleError('missing_fields', sample.file, sample.line, str(e)) from None
  if not any(it.loss for it in out):
    raise SampleError('missing_fields', sample.file, sample.line,
                      f'{fam} sample has nothing to learn: no gpt text and no output image')
  return out


def prompt_items(items: Sequence[PlanItem]) -> list[PlanItem]:
  """The items of a plan before its first loss item: what an inference prompt holds."""
  first = next((i for i, it in enumerate(items) if it.loss), len(items))
  return list(items[:first])


# ----------------------------------------------------------------------------------------------
# 2. materialize: text ids, images


def _check_grid(sample, what, gh, gw, limit, limit_name):
  if gh > limit or gw > limit:
    raise SampleError('too_long', sample.file, sample.line,
                      f'{what} grid {gh}x{gw} exceeds {limit_name} ({limit})')


def materialize(items: Sequence[PlanItem], tokenizer, geom: Geometry, sample: Sample,
                latent_cache=None, for_training: bool = True) -> list[PlanItem]:
  """Fills ids / patches / pixels (or, with a `latent_cache` (data/latent_cache.py), the cached
  moments of every VAE image instead of its pixels: the image is then not decoded at all).
  Image errors become SampleError with the image's reason. for_training: a VAE image must have
  a slot in the pack's size buckets (inference encodes any size)."""
  from unimedvl_jax.data import images as imlib   # Data A's module
  cache: dict[ImageRef, np.ndarray] = {}

  def load(ref: ImageRef) -> np.ndarray:
    if ref not in cache:
      try:
        cache[ref] = imlib.load_image(ref.path, **ref.load_kwargs())
      except imlib.ImageError as e:
        msg = str(e)
        raise SampleError(e.reason, sample.file, sample.line,
                          msg if ref.path in msg else f'{ref.path}: {msg}') from None
      except (OSError, ValueError, MemoryError) as e:   # a reader failing in an unexpected way
        raise SampleError('undecodable_image', sample.file, sample.line,
                          f'{ref.path}: {type(e).__name__}: {e}') from None
    return cache[ref]

  out = []
  for it in items:
    it = dataclasses.replace(it)
    if it.kind == 'text':
      it.ids = np.asarray(tokenizer.encode(it.text), np.int32)
    elif it.kind == 'vit':
      img = load(it.image)
      h2, w2 = imlib.target_size(img.shape[0], img.shape[1], **geom.vit_rule)
      patches, nh, nw = imlib.vit_patchify(imlib.resize(img, (h2, w2)), geom.vit_patch)
      _check_grid(sample, 'ViT patch', nh, nw, geom.vit_grid, 'model.vit.grid_size')
      it.patches, it.grid = np.asarray(patches, np.uint8), (int(nh), int(nw))
    elif it.kind == 'vae':
      if latent_cache is not None:
        it.moments, (h2, w2) = latent_cache.lookup(it.image, sample)
      else:
        img = load(it.image)
        h2, w2 = imlib.target_size(img.shape[0], img.shape[1], **geom.vae_rule)
        if for_training and geom.bucket_index(h2, w2) is None:
          raise SampleError('vae_size', sample.file, sample.line,
                            f'{it.image.path}: VAE size {h2}x{w2} has no slot in '
                            f'data.vae_buckets {[b[:2] for b in geom.vae_buckets]} (add a bucket, '
                            'or train from a latent cache: data.latent_cache)')
        it.pixels = imlib.resize(img, (h2, w2))
      gh, gw = h2 // geom.latent_px, w2 // geom.latent_px
      _check_grid(sample, 'VAE latent', gh, gw, geom.max_latent_size, 'model.max_latent_size')
      it.grid = (gh, gw)
    else:
      raise ValueError(f'unknown item kind {it.kind!r}')
    out.append(it)
  return out


# ----------------------------------------------------------------------------------------------
# 3. tokens


class VaeEntry(NamedTuple):
  """One VAE item of a TokenSample: its pixels (or cached moments) and where its tokens go."""
  pixels: Any                # uint8 [h, w, 3], or None with a latent cache
  moments: Any               # (mean, logvar) float32 [k, D] from the latent cache, or None
  noised: bool
  tok: np.ndarray            # token offsets [k] in the sample
  lpos: np.ndarray           # latent position ids [k] (row * max_latent_size + col)
  size: tuple                # (h, w) pixels


@dataclasses.dataclass
class TokenSample:
  """One sample as token arrays (length n) plus its image payloads, ready to pack."""
  input_ids: np.ndarray
  split: np.ndarray          # item index within the sample, 0..
  modes: np.ndarray
  positions: np.ndarray
  token_type: np.ndarray
  label_ids: np.ndarray
  loss_mask: np.ndarray      # float32
  # per ViT item: (patches [m, K] uint8, pos_ids [m], token offsets [m])
  vit: list = dataclasses.field(default_factory=list)
  vae: list = dataclasses.field(default_factory=list)   # VaeEntry per VAE item
  loc: str = ''
  group: str = ''

  @property
  def n_tokens(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def n_lat(self) -> int:
    return int(sum(v.tok.shape[0] for v in self.vae))

  @property
  def n_und(self) -> int:
    return self.n_tokens - self.n_lat

  @property
  def n_labels(self) -> int:
    return int(np.count_nonzero(self.loss_mask))

  @property
  def n_patches(self) -> int:
    return int(sum(v[0].shape[0] for v in self.vit))

  @property
  def n_vae(self) -> int:
    return len(self.vae)

  @property
  def n_splits(self) -> int:
    return int(self.split.max()) + 1 if self.n_tokens else 0

  def bucket_counts(self, geom: Geometry) -> dict[int, int]:
    """VAE pixel slots this sample needs per bucket index (empty with a latent cache)."""
    out: dict[int, int] = {}
    if geom.latent_cache:
      return out
    for v in self.vae:
      j = geom.bucket_index(*v.size)
      out[j] = out.get(j, 0) + 1
    return out

  def budget_problem(self, geom: Geometry) -> str | None:
    """Why this sample can never be packed (None if it fits an empty pack)."""
    if self.n_tokens == 0:
      return 'the sample has no tokens'
    checks = ((self.n_tokens, geom.max_sample_tokens, 'tokens > data.max_sample_tokens'),
              (self.n_tokens, geom.T, 'tokens > data.seq_len'),
              (self.n_und, geom.U, 'understanding tokens > seq_len - max_latent_tokens'),
              (self.n_lat, geom.L, 'latent tokens > data.max_latent_tokens'),
              (self.n_labels, geom.labels, 'CE targets > data.max_label_tokens'),
              (self.n_patches, geom.P, 'ViT patches > data.max_vit_patches'),
              (self.n_vae, geom.N, 'VAE images > data.max_vae_images'))
    for have, cap, what in checks:
      if have > cap:
        return f'{have} {what} ({cap})'
    buckets = geom.vae_buckets
    for j, n in self.bucket_counts(geom).items():
      if j is None:
        return 'a VAE image size has no bucket in data.vae_buckets'
      if n > buckets[j][2]:
        h, w, cap = buckets[j]
        return f'{n} VAE images of {h}x{w} > the {cap} slots of its data.vae_buckets entry'
    return None


class ItemTokens(NamedTuple):
  """The tokens of ONE item (SPEC section 3), relative to the position counter before it: the
  layout rule shared by training (`tokenize`) and inference (infer/blocks.py's BlockBuilder)."""
  ids: np.ndarray            # [m] int32: <|im_start|> ids <|im_end|>, or markers around 0s
  mode: int                  # the item's split mode
  token_type: np.ndarray     # [m] int32 (markers are TOKEN_TEXT)
  positions: np.ndarray      # [m] int32 RoPE positions (an image: all at the counter)
  label_ids: np.ndarray      # [m] int32 (with loss: ids[j + 1] at j; 0 elsewhere)
  loss_mask: np.ndarray      # [m] float32
  pos_ids: np.ndarray | None   # image: [k] row * pos_grid + col of its tokens (offsets 1..k)
  advance: int               # how far the item moves the position counter


def grid_pos_ids(gh: int, gw: int, stride: int) -> np.ndarray:
  """Position-table ids row * stride + col of a (gh, gw) grid, row-major (ViT patches with
  stride vit.grid_size, VAE latents with stride model.max_latent_size)."""
  r, c = np.divmod(np.arange(gh * gw, dtype=np.int32), gw)
  return (r * stride + c).astype(np.int32)


def item_tokens(kind: str, specials: Specials, counter: int = 0, *, ids=None, grid=(0, 0),
                noised: bool = False, loss: bool = False, pos_grid: int = 0) -> ItemTokens:
  """The tokens of one 'text' (ids, no specials), 'vit' or 'vae' (a (gh, gw) grid; `noised`: a
  generation target) item whose first token sits at position `counter`. Text is causal at
  consecutive positions; an image is <|vision_start|> tokens <|vision_end|>, all at ONE position,
  full (ViT, clean VAE) or noise (noised VAE; then the counter does not advance)."""
  if kind == 'text':
    t = np.asarray(ids, np.int32).reshape(-1)
    m = t.size + 2
    tok = np.concatenate([[specials.im_start], t, [specials.im_end]]).astype(np.int32)
    tt = np.full(m, TOKEN_TEXT, np.int32)
    pos = np.arange(counter, counter + m, dtype=np.int32)
    if loss:   # position j predicts ids[j + 1]; the final <|im_end|> has no label
      lab = np.concatenate([tok[1:], [0]]).astype(np.int32)
      lm = np.concatenate([np.ones(m - 1, np.float32), [0.0]]).astype(np.float32)
    else:
      lab, lm = np.zeros(m, np.int32), np.zeros(m, np.float32)
    return ItemTokens(tok, MODE_CAUSAL, tt, pos, lab, lm, None, m)
  if kind in ('vit', 'vae'):
    gh, gw = grid
    k = gh * gw
    m = k + 2
    tok = np.zeros(m, np.int32)
    tok[0], tok[-1] = specials.vision_start, specials.vision_end
    tt = np.full(m, TOKEN_VIT if kind == 'vit' else TOKEN_VAE, np.int32)
    tt[0] = tt[-1] = TOKEN_TEXT
    noise = kind == 'vae' and noised
    mode = MODE_NOISE if noise else MODE_FULL
    return ItemTokens(tok, mode, tt, np.full(m, counter, np.int32), np.zeros(m, np.int32),
                      np.zeros(m, np.float32), grid_pos_ids(gh, gw, pos_grid),
                      0 if noise else 1)
  raise ValueError(f'unknown item kind {kind!r}')


class Segment(NamedTuple):
  """One kept item of a laid-out plan: its tokens, where they sit in the sample."""
  index: int                 # the item's index in the plan
  start: int                 # offset of its first token in the sample
  tokens: ItemTokens         # positions counted from the sample's start (0)


class Layout(NamedTuple):
  """A plan's token layout (`lay_out`): the kept items' tokens, one split each, in order."""
  segments: list
  end: int                   # the position counter after the last item (the next one's start)


def lay_out(items: Sequence[PlanItem], specials: Specials, geom: Geometry,
            rng: np.random.Generator | None = None, dropout=(0.0, 0.0, 0.0)) -> Layout:
  """The token layout of a plan: each kept item's `item_tokens` at the running position counter
  (`dropout` = (p_text, p_vit, p_vae): an item with enable_cfg is dropped with that probability,
  one rng.random() draw per such item; a dropped image still advances the counter). Training's
  `tokenize` and inference's prompts (infer/runner.py, BlockBuilder.layout) both build on it."""
  p_text, p_vit, p_vae = dropout
  segs = []
  counter, n = 0, 0
  for i, it in enumerate(items):
    p_drop = {'text': p_text, 'vit': p_vit, 'vae': p_vae}[it.kind]
    if it.enable_cfg and p_drop > 0 and rng is not None and rng.random() < p_drop:
      if it.kind != 'text':
        counter += 1
      continue
    pos_grid = geom.vit_grid if it.kind == 'vit' else geom.max_latent_size
    seg = item_tokens(it.kind, specials, counter, ids=it.ids, grid=it.grid, noised=it.noised,
                      loss=it.loss, pos_grid=pos_grid)
    segs.append(Segment(i, n, seg))
    counter += seg.advance
    n += seg.ids.size
  return Layout(segs, counter)


def tokenize(items: Sequence[PlanItem], specials: Specials, geom: Geometry,
             rng: np.random.Generator | None = None, dropout=(0.0, 0.0, 0.0),
             loc: str = '', group: str = '') -> TokenSample:
  """Token arrays of one sample (SPEC section 3): the plan's `lay_out` (each kept item's
  `item_tokens`, its split the item's index among the kept ones) with its image payloads."""
  segs = lay_out(items, specials, geom, rng, dropout).segments
  vit, vae = [], []
  for i, n, seg in segs:
    it = items[i]
    if it.kind in ('vit', 'vae'):
      gh, gw = it.grid
      k = gh * gw
      offs = np.arange(n + 1, n + 1 + k, dtype=np.int32)
      if it.kind == 'vit':
        vit.append((np.asarray(it.patches, np.uint8).reshape(k, geom.K), seg.pos_ids, offs))
      else:
        size = (gh * geom.latent_px, gw * geom.latent_px)
        vae.append(VaeEntry(None if it.pixels is None else np.asarray(it.pixels, np.uint8),
                            it.moments, bool(it.noised), offs, seg.pos_ids, size))
  if not segs:
    z = np.zeros(0, np.int32)
    return TokenSample(z, z, z, z, z, z, np.zeros(0, np.float32), [], [], loc, group)
  toks = [sg.tokens for sg in segs]
  cat = lambda f: np.concatenate([getattr(t, f) for t in toks])
  split = np.concatenate([np.full(t.ids.size, j, np.int32) for j, t in enumerate(toks)])
  modes = np.concatenate([np.full(t.ids.size, t.mode, np.int32) for t in toks])
  return TokenSample(cat('ids'), split, modes, cat('positions'), cat('token_type'),
                     cat('label_ids'), cat('loss_mask'), vit, vae, loc, group)


def sample_token_counts(items: Sequence[PlanItem], geom: Geometry) -> dict:
  """Token / patch / latent counts of materialized items without dropout (SPEC section 3)."""
  n = lat = patches = vae = 0
  for it in items:
    if it.kind == 'text':
      n += len(np.asarray(it.ids).reshape(-1)) + 2
    elif it.kind == 'vit':
      patches += it.grid[0] * it.grid[1]
      n += it.grid[0] * it.grid[1] + 2
    else:
      lat += it.grid[0] * it.grid[1]
      vae += 1
      n += it.grid[0] * it.grid[1] + 2
  return dict(tokens=n, latent=lat, und=n - lat, patches=patches, vae_images=vae)
