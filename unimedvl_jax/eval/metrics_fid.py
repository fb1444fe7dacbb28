"""Frechet distance between feature distributions (FID-style) and a weight-free feature extractor.

``frechet_distance`` is the Frechet (2-Wasserstein) distance between two Gaussians:

    FD = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})

The default ``method="eigh"`` evaluates Tr((S1 S2)^{1/2}) as the sum of square roots of the
eigenvalues of the symmetric PSD matrix S1^{1/2} S2 S1^{1/2} (which has the same spectrum as
S1 S2): no complex intermediates and no failure on singular covariances.  ``method="sqrtm"``
is the pytorch-fid / TTUR recipe (``scipy.linalg.sqrtm`` of S1 S2, retried with ``eps`` * I
added to both covariances if the result is not finite, imaginary part dropped).  Both agree
to numerical precision on well-conditioned inputs.

A number is only an "FID" when the features come from the standard InceptionV3 pool3
network; with ``PixelStatsExtractor`` (no network weights) it is a pixel-statistics Frechet
distance, useful for relative comparisons only, and must be reported under that name.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from scipy import linalg

__all__ = [
    "frechet_distance",
    "frechet_distance_from_features",
    "gaussian_stats",
    "FeatureExtractor",
    "PixelStatsExtractor",
]


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    w = np.clip(w, 0.0, None)
    return (v * np.sqrt(w)) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method: str = "eigh", eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    ``method``: "eigh" (default, stable for singular/ill-conditioned covariances) or "sqrtm"
    (pytorch-fid compatible; ``eps`` is the diagonal offset used only when sqrtm fails).
    Tiny negative results from round-off are clipped to 0.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mean vectors must be 1-D and equal length: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be {d}x{d}: got {s1.shape} and {s2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        r1 = _psd_sqrt(s1)
        m = r1 @ s2 @ r1
        ev = np.linalg.eigvalsh((m + m.T) / 2.0)
        tr_covmean = float(np.sqrt(np.clip(ev, 0.0, None)).sum())
    elif method == "sqrtm":
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"sqrtm has a large imaginary component {np.abs(covmean.imag).max()}")
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (N-1) covariance of [N, F] features, float64 (as pytorch-fid)."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be [N, F], got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError("need at least 2 samples to estimate a covariance")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance_from_features(feats1, feats2, **kwargs) -> float:
    """``frechet_distance`` of the Gaussians fitted to two [N, F] feature sets.

    The plug-in estimate is biased upwards by O(F/N); compare numbers only at equal N.
    """
    mu1, s1 = gaussian_stats(feats1)
    mu2, s2 = gaussian_stats(feats2)
    return frechet_distance(mu1, s1, mu2, s2, **kwargs)


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything mapping a batch of images [N, H, W, C] uint8 to features [N, F] float.

    Plug in InceptionV3 (FID), BiomedCLIP image towers, etc.; the harness only calls it.
    """

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


class PixelStatsExtractor:
    """Deterministic, weight-free image features for Frechet distances when no network exists.

    Per image (each image independently, so features do not depend on batching):

    * grey = RGB luma (ITU-R 601: 0.299, 0.587, 0.114) or the single channel, scaled to [0,1],
      resized with PIL bilinear to ``size`` x ``size``;
    * ``hist_bins`` grey-level histogram (fractions);
    * mean and standard deviation of each colour channel (R, G, B; a grey image repeats its
      channel) -- 6 values;
    * gradient magnitude (central differences) mean, std, 50th and 90th percentile, and an
      8-bin magnitude-weighted orientation histogram (unsigned, 0..pi) -- 12 values;
    * 4x4 grid of block means of grey -- 16 values;
    * ``n_proj`` random projections of the 16x16 block-mean thumbnail (zero-mean per image),
      Gaussian matrix from ``numpy.random.default_rng(seed)`` scaled by 1/16.

    ``feature_dim = hist_bins + 6 + 12 + 16 + n_proj`` (126 with the defaults).
    """

    def __init__(self, size: int = 64, hist_bins: int = 32, n_proj: int = 60, seed: int = 0):
        if size % 16 != 0:
            raise ValueError("size must be a multiple of 16")
        self.size = size
        self.hist_bins = hist_bins
        self.n_proj = n_proj
        self.seed = seed
        rng = np.random.default_rng(seed)
        self._proj = rng.standard_normal((256, n_proj)) / 16.0
        self.feature_dim = hist_bins + 6 + 12 + 16 + n_proj

    def _one(self, img: np.ndarray) -> np.ndarray:
        from PIL import Image

        if img.ndim == 2:
            img = img[..., None]
        if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
            raise ValueError(f"expected an image [H, W, C] with C in (1, 3, 4), got {img.shape}")
        if img.dtype != np.uint8:
            raise TypeError(f"expected uint8 images, got {img.dtype}")
        x = img[..., :3].astype(np.float64) / 255.0
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        grey_full = x @ np.array([0.299, 0.587, 0.114])
        grey = np.asarray(
            Image.fromarray(grey_full.astype(np.float32)).resize(
                (self.size, self.size), Image.BILINEAR
            ),
            dtype=np.float64,
        )
        hist = np.histogram(np.clip(grey, 0.0, 1.0), bins=self.hist_bins, range=(0.0, 1.0))[0]
        hist = hist / grey.size
        chan = np.concatenate([x.mean(axis=(0, 1)), x.std(axis=(0, 1))])
        gy, gx = np.gradient(grey)
        mag = np.hypot(gx, gy)
        ang = np.mod(np.arctan2(gy, gx), np.pi)
        ori = np.histogram(ang, bins=8, range=(0.0, np.pi), weights=mag)[0]
        ori = ori / (mag.sum() + 1e-12)
        grad = np.concatenate([[mag.mean(), mag.std(), *np.percentile(mag, [50, 90])], ori])
        s = self.size
        grid = grey.reshape(4, s // 4, 4, s // 4).mean(axis=(1, 3)).ravel()
        thumb = grey.reshape(16, s // 16, 16, s // 16).mean(axis=(1, 3)).ravel()
        proj = (thumb - thumb.mean()) @ self._proj
        return np.concatenate([hist, chan, grad, grid, proj])

    def __call__(self, images) -> np.ndarray:
        imgs = np.asarray(images)
        if imgs.ndim == 3:  # [N, H, W] grey
            imgs = imgs[..., None]
        if imgs.ndim != 4:
            raise ValueError(f"expected images [N, H, W, C], got shape {imgs.shape}")
        if imgs.shape[0] == 0:
            return np.zeros((0, self.feature_dim))
        return np.stack([self._one(im) for im in imgs])
