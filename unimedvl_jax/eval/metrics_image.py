"""Image metrics: masks (binarize, Dice, IoU), PSNR, SSIM, and trivial image-to-image baselines.

Pure numpy/scipy (+ PIL for the bicubic baseline), no I/O.  All arithmetic is float64.

Conventions, stated so that reported numbers can be reproduced:

* ``psnr`` / ``ssim`` take ``data_range`` explicitly for float and signed-integer images (e.g.
  1.0 for [0, 1] images, the window width for CT in HU).  For unsigned integer images it may
  be omitted and is the dtype maximum, as in scikit-image (uint8 -> 255, uint16 -> 65535).
* ``ssim`` reproduces ``skimage.metrics.structural_similarity`` (0.26) exactly for float64 and
  integer inputs (tested to 1e-6): 7x7 uniform window, K1=0.01, K2=0.03, sample covariance,
  ``reflect`` borders, mean over the map with a (win_size-1)/2 border cropped, channel-wise
  mean with ``channel_axis``.  float32 inputs are computed in float64 here (skimage computes
  them in float32), so those may differ by ~1e-6.
* Dice/IoU: both masks empty -> 1.0 (perfect agreement on "nothing there"); exactly one
  empty -> 0.0.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "to_unit_float",
    "otsu_threshold",
    "binarize",
    "dice",
    "iou",
    "psnr",
    "ssim",
    "bicubic_upsample",
    "identity_baseline",
]


def to_unit_float(img) -> np.ndarray:
    """float64 copy of an image; unsigned integers are divided by their dtype maximum
    (uint8 -> /255), bool becomes 0/1, floats are unchanged."""
    a = np.asarray(img)
    if a.dtype == bool:
        return a.astype(np.float64)
    if np.issubdtype(a.dtype, np.unsignedinteger):
        return a.astype(np.float64) / np.iinfo(a.dtype).max
    if np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"signed integer image ({a.dtype}) has no canonical [0,1] scaling")
    return a.astype(np.float64)


def otsu_threshold(img, nbins: int = 256) -> float:
    """Otsu's threshold, same algorithm as ``skimage.filters.threshold_otsu`` (histogram with
    ``nbins`` bins over [min, max], bin centres as candidate thresholds, maximise the
    between-class variance; first maximum on ties).  A constant image returns its value."""
    a = np.asarray(img, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("empty image")
    lo, hi = float(a.min()), float(a.max())
    if lo == hi:
        return lo
    if np.issubdtype(np.asarray(img).dtype, np.integer):
        # skimage bins integer images by value (one bin per integer level) when the span is small.
        counts = np.bincount((a - lo).astype(np.int64)).astype(np.float64)
        centers = np.arange(counts.size, dtype=np.float64) + lo
    else:
        counts, edges = np.histogram(a, bins=nbins, range=(lo, hi))
        counts = counts.astype(np.float64)
        centers = (edges[:-1] + edges[1:]) / 2.0
    w1 = np.cumsum(counts)
    w2 = np.cumsum(counts[::-1])[::-1]
    m1 = np.cumsum(counts * centers) / w1
    m2 = (np.cumsum((counts * centers)[::-1]) / w2[::-1])[::-1]
    var = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centers[int(np.argmax(var))])


def binarize(img, threshold: float | str = 0.5, channel_axis: int | None = None) -> np.ndarray:
    """Boolean mask ``value > threshold`` from a generated mask image.

    The image is first scaled by ``to_unit_float`` (uint8 /255) and, if ``channel_axis`` is
    given, averaged over that axis (RGB renderings of masks).  ``threshold`` is a number in
    those units (default 0.5) or ``"otsu"`` (``otsu_threshold`` of the image; a constant image
    then gives an all-False mask).  The comparison is strict, as in scikit-image.
    """
    a = to_unit_float(img)
    if channel_axis is not None:
        a = a.mean(axis=channel_axis)
    if isinstance(threshold, str):
        if threshold.lower() != "otsu":
            raise ValueError(f"threshold must be a number or 'otsu', got {threshold!r}")
        t = otsu_threshold(a)
    else:
        t = float(threshold)
    return a > t


def _masks(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred)
    r = np.asarray(ref)
    if p.shape != r.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {r.shape}")
    return p.astype(bool), r.astype(bool)


def dice(pred_mask, ref_mask) -> float:
    """Dice = 2|P & R| / (|P| + |R|) over boolean masks (non-zero = foreground).

    Both empty -> 1.0; one empty -> 0.0."""
    p, r = _masks(pred_mask, ref_mask)
    denom = int(p.sum()) + int(r.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, r).sum()) / denom


def iou(pred_mask, ref_mask) -> float:
    """Jaccard index |P & R| / |P | R| over boolean masks.  Both empty -> 1.0; one empty -> 0.0."""
    p, r = _masks(pred_mask, ref_mask)
    union = int(np.logical_or(p, r).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(p, r).sum()) / union


def _data_range(pred: np.ndarray, ref: np.ndarray, data_range) -> float:
    if data_range is not None:
        dr = float(data_range)
        if not dr > 0:
            raise ValueError("data_range must be positive")
        return dr
    for a in (pred, ref):
        if not (np.issubdtype(a.dtype, np.unsignedinteger) or a.dtype == bool):
            raise ValueError(
                f"data_range is required for {a.dtype} images (only unsigned integer and bool "
                "images have an unambiguous range; e.g. CT in int16 HU needs the window width)"
            )
    if ref.dtype == bool:
        return 1.0
    return float(np.iinfo(ref.dtype).max)


def psnr(pred, ref, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio 10 log10(data_range^2 / MSE) in dB, float64.

    ``data_range`` is required for float and signed-integer images; for unsigned integer images
    ``None`` uses the dtype maximum (uint8 -> 255), as ``skimage.metrics.peak_signal_noise_ratio``
    does.  Identical images give ``inf``.
    """
    p = np.asarray(pred)
    r = np.asarray(ref)
    if p.shape != r.shape:
        raise ValueError(f"image shapes differ: {p.shape} vs {r.shape}")
    dr = _data_range(p, r, data_range)
    mse = np.mean((p.astype(np.float64) - r.astype(np.float64)) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(dr * dr / mse))


def ssim(
    pred,
    ref,
    data_range: float | None = None,
    *,
    channel_axis: int | None = None,
    win_size: int | None = None,
    K1: float = 0.01,
    K2: float = 0.03,
    use_sample_covariance: bool = True,
    gaussian_weights: bool = False,
    sigma: float = 1.5,
    full: bool = False,
):
    """Mean structural similarity, reproducing ``skimage.metrics.structural_similarity``.

    Any number of spatial dimensions (2-D images, 3-D volumes).  Defaults as in scikit-image:
    uniform ``win_size`` = 7 window, K1 = 0.01, K2 = 0.03, sample covariance (N/(N-1)).
    ``gaussian_weights=True`` uses a Gaussian window (``sigma``, truncated at 3.5 sigma, so 11
    taps for sigma = 1.5) and, as in scikit-image, still applies the N/(N-1) factor with
    N = win_size**ndim unless ``use_sample_covariance=False`` (Wang et al. 2004 settings:
    ``gaussian_weights=True, use_sample_covariance=False``).  With ``channel_axis`` the score
    is the mean over channels.  ``full=True`` also returns the SSIM map (same shape as input).
    """
    p = np.asarray(pred)
    r = np.asarray(ref)
    if p.shape != r.shape:
        raise ValueError(f"image shapes differ: {p.shape} vs {r.shape}")
    dr = _data_range(p, r, data_range)
    if K1 < 0 or K2 < 0 or sigma < 0:
        raise ValueError("K1, K2 and sigma must be non-negative")
    kw = dict(win_size=win_size, K1=K1, K2=K2, use_sample_covariance=use_sample_covariance,
              gaussian_weights=gaussian_weights, sigma=sigma)
    if channel_axis is not None:
        ax = channel_axis % p.ndim
        pc = np.moveaxis(p, ax, 0)
        rc = np.moveaxis(r, ax, 0)
        results = [_ssim_single(pc[c], rc[c], dr, **kw) for c in range(pc.shape[0])]
        mean = float(np.mean([m for m, _ in results]))
        if full:
            return mean, np.moveaxis(np.stack([s for _, s in results]), 0, ax)
        return mean
    mean, smap = _ssim_single(p, r, dr, **kw)
    return (mean, smap) if full else mean


def _ssim_single(x, y, dr, *, win_size, K1, K2, use_sample_covariance, gaussian_weights, sigma):
    truncate = 3.5
    if win_size is None:
        win_size = 2 * int(truncate * sigma + 0.5) + 1 if gaussian_weights else 7
    if win_size % 2 != 1:
        raise ValueError("win_size must be odd")
    if any(s < win_size for s in x.shape):
        raise ValueError(
            f"win_size {win_size} exceeds image extent {x.shape}; for multichannel images set "
            "channel_axis"
        )
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    if gaussian_weights:
        def filt(a):
            return ndimage.gaussian_filter(a, sigma, mode="reflect", truncate=truncate)
    else:
        def filt(a):
            return ndimage.uniform_filter(a, size=win_size)
    n_pix = win_size**x.ndim
    cov_norm = n_pix / (n_pix - 1) if use_sample_covariance else 1.0
    ux, uy = filt(x), filt(y)
    vx = cov_norm * (filt(x * x) - ux * ux)
    vy = cov_norm * (filt(y * y) - uy * uy)
    vxy = cov_norm * (filt(x * y) - ux * uy)
    c1 = (K1 * dr) ** 2
    c2 = (K2 * dr) ** 2
    smap = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    inner = smap[tuple(slice(pad, s - pad) for s in smap.shape)]
    return float(inner.mean(dtype=np.float64)), smap


def bicubic_upsample(lowres, scale: float) -> np.ndarray:
    """Bicubic upsampling baseline with PIL (``Image.BICUBIC``, Keys a = -0.5).

    ``lowres``: [H, W] or [H, W, C].  Output size is ``round(H*scale) x round(W*scale)``.
    uint8 images are resized per channel in PIL mode ``L`` (rounded and clipped to 0..255, as a
    PIL ``RGB`` resize is); any other dtype per channel in mode ``F`` (float32, no clipping),
    returned as float32.  The usual super-resolution baseline for 4x MRI SR is
    ``bicubic_upsample(lowres, 4)`` scored with ``psnr``/``ssim`` against the high-res image.
    """
    from PIL import Image

    a = np.asarray(lowres)
    if a.ndim not in (2, 3):
        raise ValueError(f"expected [H, W] or [H, W, C], got shape {a.shape}")
    if not scale > 0:
        raise ValueError("scale must be positive")
    h, w = a.shape[:2]
    size = (int(round(w * scale)), int(round(h * scale)))  # PIL takes (width, height)
    chans = a[..., None] if a.ndim == 2 else a
    if a.dtype == np.uint8:
        planes = [np.ascontiguousarray(chans[..., c]) for c in range(chans.shape[-1])]
    else:
        planes = [np.ascontiguousarray(chans[..., c], dtype=np.float32) for c in range(chans.shape[-1])]
    # PIL infers mode "L" for uint8 and "F" for float32 planes.
    out = [np.asarray(Image.fromarray(pl).resize(size, Image.BICUBIC)) for pl in planes]
    res = np.stack(out, axis=-1)
    return res[..., 0] if a.ndim == 2 else res


def identity_baseline(source) -> np.ndarray:
    """The "copy the input" baseline for image-to-image tasks (e.g. score T2 as a FLAIR
    prediction, H&E as an IHC prediction); a copy of ``source`` as an array."""
    return np.array(source, copy=True)
