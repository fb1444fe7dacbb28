"""Metric functions of the evaluation harness (pure numpy/scipy; no model code, no I/O).

Re-exports the metric modules:

* ``metrics_vqa``      -- answer normalisation, closed/open VQA accuracy, token recall, majority baseline
* ``metrics_text``     -- BLEU (corpus/sentence), ROUGE-L, METEOR-like (exact match only)
* ``metrics_findings`` -- finding extraction with negation, micro/macro P/R/F1
* ``metrics_image``    -- binarize/Otsu, Dice, IoU, PSNR, SSIM, bicubic and identity baselines
* ``metrics_fid``      -- Frechet distance, FeatureExtractor protocol, PixelStatsExtractor
* ``metrics_stats``    -- aggregate: mean with bootstrap CI

Each function's docstring states its protocol (normalisation, tokenisation, conventions for
empty inputs) so reported numbers can be reproduced.
"""

from .metrics_findings import extract_findings, finding_prf
from .metrics_fid import (
    FeatureExtractor,
    PixelStatsExtractor,
    frechet_distance,
    frechet_distance_from_features,
    gaussian_stats,
)
from .metrics_image import (
    bicubic_upsample,
    binarize,
    dice,
    identity_baseline,
    iou,
    otsu_threshold,
    psnr,
    ssim,
    to_unit_float,
)
from .metrics_stats import aggregate
from .metrics_text import bleu, lcs_length, meteor_like, ngram_counts, rouge_l, sentence_bleu, tokenize
from .metrics_vqa import (
    exact_match,
    is_closed_question,
    majority_baseline,
    match_option,
    normalize_answer,
    open_recall,
    token_recall,
    vqa_closed_accuracy,
    vqa_open_accuracy,
)

__all__ = [
    # VQA
    "normalize_answer", "is_closed_question", "match_option", "exact_match", "token_recall",
    "vqa_closed_accuracy", "vqa_open_accuracy", "open_recall", "majority_baseline",
    # text
    "tokenize", "ngram_counts", "bleu", "sentence_bleu", "lcs_length", "rouge_l", "meteor_like",
    # findings
    "extract_findings", "finding_prf",
    # masks / images
    "to_unit_float", "otsu_threshold", "binarize", "dice", "iou", "psnr", "ssim",
    "bicubic_upsample", "identity_baseline",
    # generation
    "frechet_distance", "frechet_distance_from_features", "gaussian_stats",
    "FeatureExtractor", "PixelStatsExtractor",
    # statistics
    "aggregate",
]
