"""Per-sample processing (runs inside grain, possibly in worker processes): a JSONL line ->
`Good` (materialized plan items) or `Bad` (a reason of SAMPLE_ERROR_REASONS), never an exception.
"""

from __future__ import annotations

from unimedvl_jax.batch import latent_cache_path
from unimedvl_jax.data import latent_cache as latent_cache_lib
from unimedvl_jax.data import locate
from unimedvl_jax.data.jsonl import RawLine, SampleError, parse_record
from unimedvl_jax.data.plans import Geometry, materialize, plan_sample


class Bad:
  """A sample that cannot be used, as an element of the dataset (counted, never raised)."""
  __slots__ = ('reason', 'loc', 'detail')

  def __init__(self, reason, loc, detail=''):
    self.reason, self.loc, self.detail = reason, loc, detail


class Good:
  __slots__ = ('items', 'loc', 'group')

  def __init__(self, items, loc, group):
    self.items, self.loc, self.group = items, loc, group


def exception_text(e: BaseException) -> str:
  return f'{type(e).__name__}: {e}'[:300]


def sample_pixel_cap(cfg) -> int:
  """The pixel cap applied to the training images of `cfg` (images.source_pixel_cap)."""
  from unimedvl_jax.data.images import source_pixel_cap
  d = cfg.data
  return source_pixel_cap(vit_max_size=d.vit_max_size, vae_max_size=d.vae_max_size,
                          vit_max_pixels=d.vit_max_pixels or None)


class SampleProcessor:
  """RawLine -> Good(materialized plan items) | Bad(reason). Picklable; loads its tokenizer
  lazily in whatever process runs it. Never raises for a sample: any failure becomes a Bad with
  a reason of SAMPLE_ERROR_REASONS ('processing_error' with the exception type and text for an
  exception no other reason covers)."""

  def __init__(self, cfg, group: str, root: str):
    self.group, self.root = group, root
    self.geom = Geometry.from_config(cfg)
    self.tok_source = locate.tokenizer_source(cfg, root)   # loaded lazily, in the worker
    self.allow_outside_root = bool(cfg.data.get('allow_outside_root', False))
    self.max_pixels = sample_pixel_cap(cfg)
    self._tok = None
    # VAE images from the latent cache (moments) instead of pixels; opened once per process
    path = latent_cache_path(cfg.data)
    self.latent_cache = latent_cache_lib.LatentCache(path, root, cfg) if path else None

  @property
  def tokenizer(self):
    if self._tok is None:
      self._tok = locate.read_tokenizer(self.tok_source)
    return self._tok

  def __getstate__(self):
    d = dict(self.__dict__)
    d['_tok'] = None
    return d

  def __call__(self, raw: RawLine):
    tok = self.tokenizer    # a missing/corrupt tokenizer is not a per-sample problem: raise
    loc = getattr(raw, 'loc', '?')
    try:
      sample = parse_record(raw, self.root, self.group, allow_outside_root=self.allow_outside_root,
                            max_image_pixels=self.max_pixels)
      items = materialize(plan_sample(sample), _CheckedTokenizer(tok), self.geom, sample,
                          latent_cache=self.latent_cache)
      return Good(items, sample.loc, self.group)
    except SampleError as e:
      return Bad(e.reason, e.loc, e.detail)
    except latent_cache_lib.LatentCacheError:
      raise     # a stale or incomplete cache is not a per-sample problem: rebuild it
    except _TextError as e:
      return Bad('invalid_text', loc, str(e))
    except Exception as e:  # noqa: BLE001  (one bad sample never stops the pipeline)
      return Bad('processing_error', loc, exception_text(e))


class _TextError(Exception):
  pass


class _CheckedTokenizer:
  """The tokenizer, with `encode` failures told apart from other errors (-> 'invalid_text')."""
  __slots__ = ('_tok',)

  def __init__(self, tok):
    self._tok = tok

  def encode(self, text):
    try:
      return self._tok.encode(text)
    except Exception as e:  # noqa: BLE001  (sentencepiece raises RuntimeError, tokenizers ...)
      raise _TextError(f'the tokenizer cannot encode a text of {len(text)} characters '
                       f'({exception_text(e)}): {text[:60]!r}') from None

  def __getattr__(self, name):
    return getattr(self._tok, name)
