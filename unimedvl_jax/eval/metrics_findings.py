"""Structured-finding metrics for generated reports: rule-based extraction and P/R/F1.

``extract_findings`` is a small NegEx-style matcher, not a clinical labeler (CheXpert /
CheXbert): it finds vocabulary phrases, drops negated mentions, and knows nothing about
uncertainty ("possible", "cannot exclude" count as positive).  Use it for relative
comparisons under one fixed vocabulary, and state the vocabulary with the numbers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["finding_prf", "extract_findings", "NEGATION_PRE", "NEGATION_POST"]

# Cues that negate a finding mentioned AFTER them in the same clause ("no X", "without X",
# "no evidence of X or Y").
NEGATION_PRE: tuple[str, ...] = (
    "no", "not", "without", "negative for", "free of", "absence of", "resolution of",
)
# Cues that negate a finding mentioned BEFORE them in the same clause ("X is not seen").
NEGATION_POST: tuple[str, ...] = (
    "not seen", "not identified", "not present", "not visualized", "not evident",
    "is absent", "are absent", "has resolved", "have resolved", "resolved", "ruled out",
    "excluded",
)
# Phrases that contain a negation cue but do not negate ("no change in the effusion").
_PSEUDO_NEGATION: tuple[str, ...] = (
    "no change", "no significant change", "no interval change", "no increase", "no decrease",
    "not only", "not significantly changed", "not changed", "no longer decreasing",
    "without change", "without interval change", "without significant change",
)
# Words that end a negation's scope inside a sentence ("no effusion but cardiomegaly").
_SCOPE_END = frozenset(
    {"but", "however", "although", "though", "except", "which", "whereas", "yet", "apart",
     "aside", "otherwise", "nevertheless", "still"}
)
_CLAUSE_SPLIT_RE = re.compile(r"[;:!?\n]+|\.+(?!\d)")  # a decimal point does not split
_WORD_RE = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def _find(tokens: list[str], phrase: tuple[str, ...]) -> list[int]:
    n = len(phrase)
    return [i for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n]) == phrase]


def _clauses(text: str) -> list[list[str]]:
    out: list[list[str]] = []
    for sentence in _CLAUSE_SPLIT_RE.split(text.lower()):
        cur: list[str] = []
        for w in _words(sentence):
            if w in _SCOPE_END:
                if cur:
                    out.append(cur)
                cur = []
            else:
                cur.append(w)
        if cur:
            out.append(cur)
    return out


def _mask(tokens: list[str], phrases: Iterable[tuple[str, ...]]) -> list[bool]:
    m = [False] * len(tokens)
    for ph in phrases:
        for i in _find(tokens, ph):
            for k in range(i, i + len(ph)):
                m[k] = True
    return m


_PRE = tuple(tuple(c.split()) for c in NEGATION_PRE)
_POST = tuple(tuple(c.split()) for c in NEGATION_POST)
_PSEUDO = tuple(tuple(c.split()) for c in _PSEUDO_NEGATION)


def extract_findings(
    report_text: str,
    vocabulary: Iterable[str] | Mapping[str, Iterable[str]],
    *,
    return_negated: bool = False,
):
    """Set of vocabulary findings asserted (not negated) in a report.

    ``vocabulary``: finding phrases (each its own label), or a mapping ``label -> synonyms``
    (a synonym list that omits the label itself does not match the label text).  Matching is
    case-insensitive on whole words ("effusion" does not match "effusions"; list plural forms
    as synonyms).

    Negation (NegEx-like): the text is split into clauses at ``.;:!?``/newlines and at scope
    terminators ("but", "however", "except", "which", ...).  A mention is negated if a
    ``NEGATION_PRE`` cue ("no", "without", "negative for", "free of", ...) occurs before it in
    its clause, or a ``NEGATION_POST`` cue ("not seen", "has resolved", ...) after it.  Commas
    and "and"/"or" do not end the scope, so "No effusion, consolidation or pneumothorax"
    negates all three.  Pseudo-negations ("no change in", "no interval change") are not
    cues.  Uncertainty ("possible X", "cannot exclude X", "rule out X") is not modelled and
    counts as positive.  A finding asserted anywhere in the report is positive even if negated elsewhere.

    Returns the positive label set, or ``(positive, negated_only)`` with ``return_negated``.
    """
    if isinstance(vocabulary, Mapping):
        vocab = {label: [tuple(_words(s)) for s in syns] for label, syns in vocabulary.items()}
    else:
        vocab = {label: [tuple(_words(label))] for label in vocabulary}
    vocab = {k: [p for p in v if p] for k, v in vocab.items()}
    positive: set[str] = set()
    negated: set[str] = set()
    for clause in _clauses(str(report_text)):
        pseudo = _mask(clause, _PSEUDO)
        pre_pos = [i for ph in _PRE for i in _find(clause, ph) if not pseudo[i]]
        post_start = [i for ph in _POST for i in _find(clause, ph) if not pseudo[i]]
        for label, phrases in vocab.items():
            for ph in phrases:
                for start in _find(clause, ph):
                    end = start + len(ph)
                    is_neg = any(p < start for p in pre_pos) or any(q >= end for q in post_start)
                    (negated if is_neg else positive).add(label)
    negated -= positive
    return (positive, negated) if return_negated else positive


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def finding_prf(
    pred_findings: Sequence[set],
    ref_findings: Sequence[set],
    labels: Iterable | None = None,
) -> dict:
    """Micro and macro precision / recall / F1 of predicted finding sets against references.

    One set of labels per report.  Micro: TP, FP, FN pooled over all reports and labels.
    Macro: P, R, F1 computed per label, then averaged over ``labels`` (default: every label
    occurring in any reference or prediction); macro F1 is the mean of per-label F1 (as in
    scikit-learn), not the F1 of macro P and R.  A zero denominator gives 0.0 (scikit-learn's
    ``zero_division=0``); if both sides are empty everywhere, micro scores are 0.0 and macro
    scores ``nan`` (no labels).  With explicit ``labels``, findings outside them are ignored.

    Returns ``{"micro": {"precision", "recall", "f1"}, "macro": {...},
    "per_label": {label: {"precision", "recall", "f1", "support"}}}`` where support is the
    number of reference reports containing the label.
    """
    if len(pred_findings) != len(ref_findings):
        raise ValueError(f"{len(pred_findings)} predictions vs {len(ref_findings)} references")
    preds = [set(p) for p in pred_findings]
    refs = [set(r) for r in ref_findings]
    if labels is None:
        label_list = sorted(set().union(*preds, *refs), key=str)
    else:
        label_list = list(dict.fromkeys(labels))
        keep = set(label_list)
        preds = [p & keep for p in preds]
        refs = [r & keep for r in refs]
    per_label = {}
    for lab in label_list:
        tp = sum(1 for p, r in zip(preds, refs) if lab in p and lab in r)
        fp = sum(1 for p, r in zip(preds, refs) if lab in p and lab not in r)
        fn = sum(1 for p, r in zip(preds, refs) if lab not in p and lab in r)
        p, r, f = _prf(tp, fp, fn)
        per_label[lab] = {"precision": p, "recall": r, "f1": f, "support": tp + fn}
    tp = sum(len(p & r) for p, r in zip(preds, refs))
    fp = sum(len(p - r) for p, r in zip(preds, refs))
    fn = sum(len(r - p) for p, r in zip(preds, refs))
    mp, mr, mf = _prf(tp, fp, fn)
    if label_list:
        macro = {
            k: sum(v[k] for v in per_label.values()) / len(label_list)
            for k in ("precision", "recall", "f1")
        }
    else:
        macro = {"precision": float("nan"), "recall": float("nan"), "f1": float("nan")}
    return {
        "micro": {"precision": mp, "recall": mr, "f1": mf},
        "macro": macro,
        "per_label": per_label,
    }
