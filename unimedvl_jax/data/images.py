"""Image readers, resize rules and pixel transforms (numpy + PIL + pydicom + nibabel; no jax).

Every reader returns `uint8 [H, W, 3]` (RGB). Supported: PNG / JPEG / BMP / GIF / TIFF (pillow),
DICOM (pydicom), NIfTI `.nii` / `.nii.gz` (nibabel). The format is chosen from the file's magic
bytes first and its extension second.

Grey-level conventions:
- 8-bit grey / palette / RGBA pictures: converted to RGB as is (alpha dropped).
- 16-bit or float grey pictures (PNG 'I;16', 'I', 'F'): min-max scaled to 0..255.
- DICOM: modality LUT (RescaleSlope / RescaleIntercept), then a window: the `window` argument,
  else the file's WindowCenter / WindowWidth (first value if several), else a default per
  modality (CT: soft tissue, center 40 / width 400 HU; everything else: the 0.5 / 99.5
  percentiles of the frame). MONOCHROME1 is inverted after windowing. PALETTE COLOR goes
  through the palette; YBR photometrics are converted to RGB. Multi-frame files: `frame`
  (default the middle frame).
- NIfTI: reoriented to RAS, volume 0 of a 4-D file, the axial slice `slice_index` (default the
  middle one), shown in radiological convention (patient right on the image left, anterior up),
  0.5 / 99.5 percentile window.

Errors: `ImageError` with `reason` in REASONS: 'missing_file' (absent, or a directory),
'not_a_regular_file' (a FIFO, socket or device: refused without reading, so never hangs),
'image_too_large' (the header declares more pixels than `max_pixels`: refused before decoding,
see `source_pixel_cap`), 'undecodable_image', 'unsupported_dicom'. A malformed `window`
argument is a ValueError (a caller's mistake, not the file's).

Resize rules (SPEC section 3) are `target_size` + `resize`; model inputs use `to_unit_range`
(pixels to [-1, 1]) and `vit_patchify` ((row, col, channel) order, channel fastest).
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError
from struct import error as struct_error

PathLike = Union[str, os.PathLike]

REASONS = ('missing_file', 'not_a_regular_file', 'image_too_large', 'undecodable_image',
           'unsupported_dicom')

# The pixel cap of a source image is this many times the largest configured model input
# (ViT or VAE), and never below MIN_PIXEL_CAP (4096 x 4096); a NIfTI volume may hold
# VOLUME_FACTOR times the cap in voxels (the whole volume is read to take one slice).
PIXEL_CAP_FACTOR = 32
MIN_PIXEL_CAP = 1 << 24
VOLUME_FACTOR = 16


def source_pixel_cap(*, vit_max_size: int, vae_max_size: int, vit_max_pixels: int | None = None
                     ) -> int:
  """The most pixels a source image may declare (before decoding) given the configured maximum
  model-input sizes: PIXEL_CAP_FACTOR x max(ViT area, VAE area), at least MIN_PIXEL_CAP. With the
  released sizes (ViT <= 980^2, VAE <= 1024^2) it is 32 x 1024^2 = 33.5M pixels (5792^2: a
  5355 x 4915 mammogram passes); a 9000 x 9000 picture (81M pixels, 2.6 GiB once decoded to
  float) is refused."""
  vit = min(vit_max_size ** 2, vit_max_pixels) if vit_max_pixels else vit_max_size ** 2
  return int(max(MIN_PIXEL_CAP, PIXEL_CAP_FACTOR * max(vit, vae_max_size ** 2)))


# Named DICOM windows (center, width) in the modality's units (HU for CT).
WINDOW_PRESETS = {
    'soft_tissue': (40.0, 400.0),
    'lung': (-600.0, 1500.0),
    'bone': (400.0, 1800.0),
    'brain': (40.0, 80.0),
    'liver': (60.0, 160.0),
    'mediastinum': (50.0, 350.0),
}
CT_DEFAULT_WINDOW = WINDOW_PRESETS['soft_tissue']
PERCENTILES = (0.5, 99.5)

_DICOM_EXT = ('.dcm', '.dicom', '.dic')
_NIFTI_EXT = ('.nii', '.nii.gz')
_PIL_EXT = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.gif', '.webp', '.ppm', '.pgm')


class ImageError(Exception):
  """An image that cannot be loaded. `reason` is one of REASONS, `path` the offending file."""

  def __init__(self, reason: str, path: PathLike, detail: str = ''):
    if reason not in REASONS:
      raise ValueError(f'ImageError reason must be one of {REASONS}, got {reason!r}')
    self.reason = reason
    self.path = os.fspath(path)
    self.detail = detail
    super().__init__(reason, self.path, detail)

  def __str__(self) -> str:
    msg = f'{self.reason}: {self.path}'
    return f'{msg} ({self.detail})' if self.detail else msg


# ----------------------------------------------------------------------------------------------
# Format detection
# ----------------------------------------------------------------------------------------------

def _sniff(path: str) -> str:
  """'dicom' | 'nifti' | 'pil' from magic bytes, then the extension. Refuses anything but a
  regular file without blocking (the file is opened non-blocking and checked with fstat)."""
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0))
  except FileNotFoundError:
    raise ImageError('missing_file', path) from None
  except IsADirectoryError:
    raise ImageError('missing_file', path, 'is a directory') from None
  except (OSError, ValueError) as e:
    raise ImageError('missing_file', path, str(e)) from None
  try:
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
      raise ImageError('missing_file', path, 'is a directory')
    if not stat.S_ISREG(mode):
      kind = ('a FIFO' if stat.S_ISFIFO(mode) else 'a socket' if stat.S_ISSOCK(mode)
              else 'a device' if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 'not a file')
      raise ImageError('not_a_regular_file', path, f'{kind}, not a regular file')
    head = os.pread(fd, 352, 0)
  except OSError as e:
    raise ImageError('missing_file', path, str(e)) from None
  finally:
    os.close(fd)
  if len(head) >= 132 and head[128:132] == b'DICM':
    return 'dicom'
  if len(head) >= 348 and head[344:348] in (b'n+1\0', b'ni1\0', b'n+2\0'):
    return 'nifti'
  low = path.lower()
  if head[:2] == b'\x1f\x8b' and low.endswith('.nii.gz'):
    return 'nifti'
  if head[:8] == b'\x89PNG\r\n\x1a\n' or head[:2] == b'\xff\xd8' or head[:2] == b'BM' \
      or head[:4] in (b'II*\0', b'MM\0*') or head[:4] == b'GIF8':
    return 'pil'
  if low.endswith(_DICOM_EXT):
    return 'dicom'
  if low.endswith(_NIFTI_EXT):
    return 'nifti'
  return 'pil'


def load_image(path: PathLike, *, frame: Optional[int] = None, slice_index: Optional[int] = None,
               window: Union[None, str, Sequence[float]] = None,
               modality_hint: Optional[str] = None, max_pixels: Optional[int] = None
               ) -> np.ndarray:
  """Reads any supported file into uint8 [H, W, 3] RGB. Raises ImageError.

  frame: frame of a multi-frame DICOM (default middle) or page of a multi-page TIFF/GIF
    (default 0). slice_index: axial slice of a NIfTI volume (default middle).
  window: (center, width) or a name in WINDOW_PRESETS, for DICOM and NIfTI; overrides the
    file's window (ValueError if malformed). modality_hint: used when the DICOM has no Modality
    tag (e.g. 'CT').
  max_pixels: refuse ('image_too_large') a file whose header declares more pixels (rows x
    columns; a NIfTI volume: more than VOLUME_FACTOR x max_pixels voxels), before decoding.
  """
  path = os.fspath(path)
  win = _resolve_window(window)    # a bad window is the caller's error: raise before any I/O
  kind = _sniff(path)
  if kind == 'dicom':
    return _load_dicom(path, frame=frame, window=win, modality_hint=modality_hint,
                       max_pixels=max_pixels)
  if kind == 'nifti':
    return _load_nifti(path, slice_index=slice_index, window=win, max_pixels=max_pixels)
  return _load_pil(path, frame=frame, max_pixels=max_pixels)


def _too_large(path: str, what: str, n: int, cap: int) -> ImageError:
  return ImageError('image_too_large', path,
                    f'{what} = {n} pixels exceed the cap of {cap} (images.source_pixel_cap of '
                    'the configured vit/vae maximum sizes); refused before decoding')


# ----------------------------------------------------------------------------------------------
# Intensity helpers
# ----------------------------------------------------------------------------------------------

def _resolve_window(window) -> Optional[tuple[float, float]]:
  """None, a preset name, or (center, width) -> None | (center, width). ValueError otherwise."""
  if window is None:
    return None
  if isinstance(window, str):
    if window not in WINDOW_PRESETS:
      raise ValueError(f'unknown window preset {window!r}; choose from {sorted(WINDOW_PRESETS)}')
    return WINDOW_PRESETS[window]
  try:
    c, w = window
    c, w = float(c), float(w)
  except (TypeError, ValueError):
    raise ValueError(f'window must be a preset name or (center, width), got {window!r}'[:300]
                     ) from None
  if not (math.isfinite(c) and math.isfinite(w) and w > 0):
    raise ValueError(f'window (center, width) must be finite with width > 0, got {window!r}')
  return c, w


def apply_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
  """Linear window: [center - width/2, center + width/2] -> [0, 255], clipped, uint8."""
  width = max(float(width), 1e-6)
  lo = float(center) - width / 2.0
  y = (x.astype(np.float64) - lo) / width
  return np.clip(np.round(y * 255.0), 0, 255).astype(np.uint8)


def percentile_window(x: np.ndarray, lo_pct: float = PERCENTILES[0],
                      hi_pct: float = PERCENTILES[1]) -> np.ndarray:
  """Maps the [lo_pct, hi_pct] percentile range to [0, 255] (min-max if that range is empty)."""
  x = np.nan_to_num(x.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  if x.size == 0:
    return np.zeros(x.shape, np.uint8)
  lo, hi = np.percentile(x, [lo_pct, hi_pct])
  if hi <= lo:
    lo, hi = float(x.min()), float(x.max())
  return minmax_scale(x, lo, hi)


def minmax_scale(x: np.ndarray, lo: Optional[float] = None, hi: Optional[float] = None) -> np.ndarray:
  x = x.astype(np.float64)
  lo = float(x.min()) if lo is None else lo
  hi = float(x.max()) if hi is None else hi
  if hi <= lo:
    return np.zeros(x.shape, np.uint8)
  return np.clip(np.round((x - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def _grey_to_rgb(g: np.ndarray) -> np.ndarray:
  return np.repeat(g[..., None], 3, axis=-1)


# ----------------------------------------------------------------------------------------------
# PIL formats
# ----------------------------------------------------------------------------------------------

def _load_pil(path: str, frame: Optional[int] = None, max_pixels: Optional[int] = None
              ) -> np.ndarray:
  def check(im):
    w, h = im.size
    if max_pixels and w * h > max_pixels:
      raise _too_large(path, f'header size {w} x {h}', w * h, max_pixels)

  try:
    with warnings.catch_warnings():
      if max_pixels:   # PIL's own bomb warning (above Image.MAX_IMAGE_PIXELS) refuses too
        warnings.simplefilter('error', Image.DecompressionBombWarning)
      with Image.open(path) as im:   # reads the header only
        check(im)
        if frame:
          try:
            im.seek(frame)
          except EOFError:
            raise ImageError('undecodable_image', path,
                             f'frame {frame} out of range ({getattr(im, "n_frames", 1)} frames)')
          check(im)
        im.load()
        return _pil_to_rgb(im)
  except ImageError:
    raise
  except FileNotFoundError:
    raise ImageError('missing_file', path) from None
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ImageError('image_too_large', path, f'{type(e).__name__}: {e}') from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, TypeError,
          IndexError, KeyError, struct_error, MemoryError) as e:
    raise ImageError('undecodable_image', path, f'{type(e).__name__}: {e}'[:300]) from None


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
  mode = im.mode
  if mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
    a = np.asarray(im).astype(np.float64)
    if a.ndim == 3:
      a = a[..., 0]
    if a.max() > a.min():
      g = minmax_scale(a)
    else:   # constant image: keep its absolute level
      full = 65535.0 if mode.startswith('I;16') else max(float(a.max()), 1.0)
      g = np.clip(np.round(a / full * 255.0), 0, 255).astype(np.uint8)
    return _grey_to_rgb(g)
  if mode == 'RGB':
    return np.array(im, dtype=np.uint8)
  if mode == 'L':
    return _grey_to_rgb(np.array(im, dtype=np.uint8))
  if mode == '1':
    return _grey_to_rgb(np.array(im.convert('L'), dtype=np.uint8))
  return np.array(im.convert('RGB'), dtype=np.uint8)   # P, PA, LA, RGBA, CMYK, YCbCr, ...


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------

def _first(v) -> float:
  try:
    if isinstance(v, (list, tuple)) or (hasattr(v, '__len__') and not isinstance(v, (str, bytes))):
      v = v[0]
  except TypeError:
    pass
  return float(v)


def _load_dicom(path: str, frame=None, window=None, modality_hint=None, max_pixels=None
                ) -> np.ndarray:
  import pydicom
  from pydicom.errors import InvalidDicomError
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      ds = pydicom.dcmread(path)
  except FileNotFoundError:
    raise ImageError('missing_file', path) from None
  except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError,
          AttributeError, IndexError) as e:
    raise ImageError('undecodable_image', path,
                     f'not a readable DICOM file: {type(e).__name__}: {e}') from None

  if not any(t in ds for t in ('PixelData', 'FloatPixelData', 'DoubleFloatPixelData')):
    raise ImageError('unsupported_dicom', path,
                     f'no pixel data (Modality {ds.get("Modality", "?")}, '
                     f'SOPClassUID {getattr(ds.get("SOPClassUID", None), "name", "?")})')
  ts = getattr(ds, 'file_meta', None) and ds.file_meta.get('TransferSyntaxUID', None)
  compressed = bool(ts is not None and getattr(ts, 'is_compressed', False))
  ts_name = getattr(ts, 'name', str(ts))

  n_frames = 1
  try:
    n_frames = int(ds.get('NumberOfFrames', 1) or 1)
  except (TypeError, ValueError):
    raise ImageError('undecodable_image', path,
                     f'bad NumberOfFrames {ds.get("NumberOfFrames")!r}') from None
  if frame is None:
    frame = n_frames // 2
  if not 0 <= frame < n_frames:
    raise ImageError('undecodable_image', path, f'frame {frame} out of range ({n_frames} frames)')
  if max_pixels:
    try:
      rows, cols = int(ds.get('Rows', 0) or 0), int(ds.get('Columns', 0) or 0)
    except (TypeError, ValueError):
      raise ImageError('undecodable_image', path,
                       f'bad Rows/Columns {ds.get("Rows")!r} x {ds.get("Columns")!r}') from None
    if rows * cols > max_pixels:
      raise _too_large(path, f'DICOM Rows x Columns {rows} x {cols}', rows * cols, max_pixels)

  try:
    from pydicom.pixels import pixel_array
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      if n_frames > 1:
        arr = pixel_array(ds, index=frame)
      else:
        arr = pixel_array(ds)
  except Exception as e:  # pydicom raises RuntimeError/ValueError/NotImplementedError/...
    if compressed:
      raise ImageError('unsupported_dicom', path,
                       f'cannot decode transfer syntax {ts_name!r} here: {type(e).__name__}: '
                       f'{str(e)[:200]}') from None
    raise ImageError('undecodable_image', path, f'{type(e).__name__}: {str(e)[:200]}') from None

  try:
    return _dicom_to_rgb(ds, np.asarray(arr), window=window, modality_hint=modality_hint)
  except ImageError:
    raise
  except Exception as e:
    raise ImageError('undecodable_image', path, f'{type(e).__name__}: {str(e)[:200]}') from None


def _dicom_to_rgb(ds, arr: np.ndarray, window=None, modality_hint=None) -> np.ndarray:
  photometric = str(ds.get('PhotometricInterpretation', 'MONOCHROME2')).strip().upper()
  spp = int(ds.get('SamplesPerPixel', 1) or 1)
  if photometric == 'PALETTE COLOR':
    from pydicom.pixels import apply_color_lut
    rgb = apply_color_lut(arr, ds)
    # 16-bit LUT entries are scaled down; some writers put 8-bit values in a 16-bit LUT.
    if rgb.dtype.itemsize > 1 and rgb.max() > 255:
      rgb = np.round(rgb.astype(np.float64) / 65535.0 * 255.0)
    return np.clip(rgb, 0, 255).astype(np.uint8)
  if spp == 3 or arr.ndim == 3:
    # pixel_array already converted YBR_* to RGB.
    rgb = arr
    if rgb.dtype != np.uint8:
      bits = int(ds.get('BitsStored', rgb.dtype.itemsize * 8) or rgb.dtype.itemsize * 8)
      full = float(2 ** bits - 1)
      rgb = np.clip(np.round(rgb.astype(np.float64) / full * 255.0), 0, 255)
    return rgb.astype(np.uint8)

  x = arr.astype(np.float64)
  slope = ds.get('RescaleSlope', None)
  intercept = ds.get('RescaleIntercept', None)
  if slope is not None and str(slope).strip() != '':
    x = x * float(slope)
  if intercept is not None and str(intercept).strip() != '':
    x = x + float(intercept)

  win = _resolve_window(window)
  if win is None and 'WindowCenter' in ds and 'WindowWidth' in ds:
    try:
      c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
      if w > 0:
        win = (c, w)
    except (TypeError, ValueError, IndexError):
      win = None
  modality = str(ds.get('Modality', '') or modality_hint or '').upper()
  if win is None and modality == 'CT':
    win = CT_DEFAULT_WINDOW
  g = apply_window(x, *win) if win is not None else percentile_window(x)
  if photometric == 'MONOCHROME1':
    g = 255 - g
  return _grey_to_rgb(g)


def dicom_tags(path: PathLike) -> dict:
  """A few descriptive tags of a DICOM file (for captions): modality, body part, ... ('' if absent)."""
  import pydicom
  ds = pydicom.dcmread(os.fspath(path), stop_before_pixels=True)
  keys = ('Modality', 'BodyPartExamined', 'StudyDescription', 'SeriesDescription',
          'PhotometricInterpretation', 'Rows', 'Columns', 'NumberOfFrames', 'Manufacturer')
  out = {}
  for k in keys:
    v = ds.get(k, '')
    out[k] = '' if v is None else str(v)
  return out


# ----------------------------------------------------------------------------------------------
# NIfTI
# ----------------------------------------------------------------------------------------------

def _load_nifti(path: str, slice_index=None, window=None, max_pixels=None) -> np.ndarray:
  import nibabel as nib
  try:
    img = nib.load(path)     # the header only; the voxels stay on disk until read
    if max_pixels:
      shape = tuple(int(x) for x in img.header.get_data_shape())
      plane = shape[0] * (shape[1] if len(shape) > 1 else 1) if shape else 0
      vol = int(np.prod(shape[:3], dtype=np.float64)) if shape else 0
      if plane > max_pixels:
        raise _too_large(path, f'NIfTI header in-plane size {shape[:2]}', plane, max_pixels)
      if vol > VOLUME_FACTOR * max_pixels:
        raise _too_large(path, f'NIfTI header volume {shape[:3]}', vol, VOLUME_FACTOR * max_pixels)
    if len(img.shape) > 3:   # volume 0 only: do not read the other volumes
      first = np.asanyarray(img.dataobj[(slice(None),) * 3 + (0,) * (len(img.shape) - 3)])
      img = img.__class__(first, img.affine, img.header)
    try:
      img = nib.as_closest_canonical(img)
    except Exception:  # noqa: BLE001  (odd affines: keep the stored orientation)
      pass
    data = np.asanyarray(img.dataobj)
  except ImageError:
    raise
  except FileNotFoundError:
    raise ImageError('missing_file', path) from None
  except Exception as e:  # nibabel raises ImageFileError, EOFError, zlib/gzip errors, ...
    raise ImageError('undecodable_image', path, f'{type(e).__name__}: {str(e)[:200]}') from None
  data = np.asarray(data)
  if np.iscomplexobj(data):
    data = np.abs(data)
  while data.ndim > 3:
    data = data[..., 0]
  if data.ndim == 2:
    data = data[:, :, None]
  if data.ndim != 3 or min(data.shape) == 0:
    raise ImageError('undecodable_image', path, f'unexpected NIfTI shape {data.shape}')
  n = data.shape[2]
  k = n // 2 if slice_index is None else slice_index
  if not 0 <= k < n:
    raise ImageError('undecodable_image', path, f'slice_index {k} out of range ({n} slices)')
  sl = data[:, :, k]
  # RAS array [x, y] -> radiological view: rows anterior->posterior, columns right->left.
  view = sl[::-1, ::-1].T
  win = _resolve_window(window)
  try:
    g = apply_window(view, *win) if win is not None else percentile_window(view)
  except (TypeError, ValueError) as e:   # e.g. a non-numeric voxel dtype
    raise ImageError('undecodable_image', path, f'{type(e).__name__}: {str(e)[:200]}') from None
  return _grey_to_rgb(np.ascontiguousarray(g))


# ----------------------------------------------------------------------------------------------
# Resize rules and model-input transforms
# ----------------------------------------------------------------------------------------------

def target_size(h: int, w: int, *, max_size: int, min_size: int, stride: int,
                max_pixels: Optional[int] = None) -> tuple[int, int]:
  """The (h2, w2) an image of h x w is resized to (SPEC section 3).

  1. One scale s for both sides: s = 1; if the long side exceeds max_size, s = max_size / long;
     if the short side is then below min_size, s = min_size / short; if that pushes the long side
     over max_size again, s = max_size / long: the long-side limit wins (a very elongated image
     keeps its aspect ratio and gets a short side below min_size).
  2. If max_pixels is set and h*w*s^2 exceeds it, s = sqrt(max_pixels / (h*w)).
  3. Each side is rounded to the nearest multiple of stride, at least stride.
  4. Hard limits after rounding (rounding may overshoot): a side over max_size drops to the largest
     multiple of stride <= max_size; while the area exceeds max_pixels the longer side drops by one
     stride. Soft limit: a side that rounding (only) took below min_size rises by one stride if
     that breaks no hard limit.
  Sides never go below stride (so max_size < stride yields stride).
  """
  if h <= 0 or w <= 0:
    raise ValueError(f'image size must be positive, got {h}x{w}')
  if stride <= 0 or max_size <= 0 or min_size < 0:
    raise ValueError(f'bad resize rule max={max_size} min={min_size} stride={stride}')
  long, short = max(h, w), min(h, w)
  s = 1.0
  if long * s > max_size:
    s = max_size / long
  if short * s < min_size:
    s = min_size / short
  if long * s > max_size:
    s = max_size / long
  if max_pixels and h * w * s * s > max_pixels:
    s = math.sqrt(max_pixels / (h * w))

  def rnd(v: float) -> int:
    return max(stride, int(math.floor(v / stride + 0.5)) * stride)

  h2, w2 = rnd(h * s), rnd(w * s)
  cap = max(stride, (max_size // stride) * stride)
  h2, w2 = min(h2, cap), min(w2, cap)
  if max_pixels:
    while h2 * w2 > max_pixels and max(h2, w2) > stride:
      if h2 >= w2:
        h2 -= stride
      else:
        w2 -= stride

  def ok(a: int, b: int) -> bool:
    return a <= cap and b <= cap and (not max_pixels or a * b <= max_pixels)

  # Rounding (not the long-side limit) took a side below min_size: one stride up if allowed.
  if h2 < min_size <= h * s + 1e-9 and ok(h2 + stride, w2):
    h2 += stride
  if w2 < min_size <= w * s + 1e-9 and ok(h2, w2 + stride):
    w2 += stride
  return h2, w2


def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bicubic resize of uint8 [H, W, 3] to size = (h2, w2), antialiased when downscaling."""
  img = np.asarray(img)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
    raise ValueError(f'resize expects uint8 [H, W, 3], got {img.dtype} {img.shape}')
  h2, w2 = int(size[0]), int(size[1])
  if (h2, w2) == img.shape[:2]:
    return img.copy()
  out = Image.fromarray(img).resize((w2, h2), Image.BICUBIC, reducing_gap=None)
  return np.asarray(out, dtype=np.uint8)


def resize_to_rule(img: np.ndarray, *, max_size: int, min_size: int, stride: int,
                   max_pixels: Optional[int] = None) -> np.ndarray:
  """`resize(img, target_size(...))`."""
  h2, w2 = target_size(img.shape[0], img.shape[1], max_size=max_size, min_size=min_size,
                       stride=stride, max_pixels=max_pixels)
  return resize(img, (h2, w2))


def to_unit_range(img: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1]: (x / 255 - 0.5) / 0.5."""
  return ((np.asarray(img, np.float32) / 255.0) - 0.5) / 0.5


def from_unit_range(x: np.ndarray) -> np.ndarray:
  """float in [-1, 1] -> uint8 (inverse of to_unit_range, clipped and rounded)."""
  y = (np.asarray(x, np.float32) * 0.5 + 0.5) * 255.0
  return np.clip(np.round(y), 0, 255).astype(np.uint8)


def vit_patchify(img: np.ndarray, patch: int) -> tuple[np.ndarray, int, int]:
  """[H, W, C] -> (patches [nh*nw, patch*patch*C], nh, nw).

  Patches in row-major order (patch index = row * nw + col); each flattened in (row, col,
  channel) order, channel fastest. H and W must be multiples of patch.
  """
  img = np.asarray(img)
  if img.ndim != 3:
    raise ValueError(f'vit_patchify expects [H, W, C], got shape {img.shape}')
  H, W, C = img.shape
  if H % patch or W % patch:
    raise ValueError(f'image {H}x{W} is not a multiple of the patch size {patch}')
  nh, nw = H // patch, W // patch
  p = img.reshape(nh, patch, nw, patch, C).transpose(0, 2, 1, 3, 4).reshape(nh * nw, patch * patch * C)
  return p, nh, nw


def patchify_image(img: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`vit_patchify` plus each patch's grid row and column: (patches [nh*nw, p*p*C], rows [nh*nw],
  cols [nh*nw]), the patch's position id being row * vit.grid_size + col."""
  p, nh, nw = vit_patchify(img, patch)
  rows, cols = np.divmod(np.arange(nh * nw), nw)
  return p, rows, cols


def save_png(img: np.ndarray, path: PathLike) -> None:
  """Writes uint8 [H, W, 3] or [H, W] as a PNG with deterministic bytes (no metadata)."""
  img = np.asarray(img, np.uint8)
  Image.fromarray(np.ascontiguousarray(img)).save(os.fspath(path), format='PNG', optimize=False,
                                                   compress_level=6)
