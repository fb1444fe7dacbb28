"""Report / caption metrics: BLEU, ROUGE-L, a METEOR-like score.

Pure Python, no I/O, no nltk.  Inputs are raw strings; they are split into tokens by
``tokenize`` (or a caller-supplied ``tokenizer``).  A reference argument may be one string or
a sequence of strings (multiple references).

``tokenize`` lowercases and keeps runs of word characters, allowing internal ``.`` and ``'``
("3.5", "patient's"); all other punctuation is dropped, like the PTB-tokenise-then-strip-
punctuation step of the coco-caption toolkit.  Scores are therefore close to, but not
bit-identical with, coco-caption (which uses the Stanford PTB tokenizer).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = [
    "tokenize",
    "ngram_counts",
    "bleu",
    "sentence_bleu",
    "lcs_length",
    "rouge_l",
    "meteor_like",
]

Tokenizer = Callable[[str], list[str]]
_TOKEN_RE = re.compile(r"\w+(?:[.'\u2019]\w+)*")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens: runs of ``\\w`` with internal ``.``/``'`` kept; other punctuation dropped."""
    return _TOKEN_RE.findall(str(text).lower())


def _refs_list(ref: str | Sequence[str]) -> list[str]:
    if isinstance(ref, str):
        return [ref]
    refs = list(ref)
    if not refs:
        raise ValueError("empty list of references")
    return refs


def _check(preds: Sequence[str], refs: Sequence) -> None:
    if isinstance(preds, str) or isinstance(refs, str):
        raise TypeError("preds/refs must be sequences of strings (one entry per sample)")
    if len(preds) != len(refs):
        raise ValueError(f"len(preds)={len(preds)} != len(refs)={len(refs)}")


def ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    """Multiset of the n-grams (as tuples) of a token sequence."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _bleu_sentence_stats(hyp: list[str], refs: list[list[str]], max_n: int):
    """Clipped matches and totals per order, hypothesis length, closest reference length."""
    matches, totals = [], []
    for k in range(1, max_n + 1):
        hc = ngram_counts(hyp, k)
        max_ref: Counter = Counter()
        for r in refs:
            for g, c in ngram_counts(r, k).items():
                if c > max_ref[g]:
                    max_ref[g] = c
        matches.append(sum(min(c, max_ref[g]) for g, c in hc.items()))
        totals.append(max(len(hyp) - k + 1, 0))
    # "closest" effective reference length; ties go to the shorter reference (as NLTK and
    # coco-caption do).
    r_len = min((len(r) for r in refs), key=lambda L: (abs(L - len(hyp)), L))
    return matches, totals, len(hyp), r_len


def _combine(matches, totals, c, r, max_n, smooth):
    precisions = []
    for k in range(max_n):
        num, den = matches[k], totals[k]
        if smooth and k > 0:
            num, den = num + 1, den + 1
        precisions.append(num / den if den > 0 else 0.0)
    if c == 0:
        bp = 0.0
    elif c > r:
        bp = 1.0
    else:
        bp = math.exp(1.0 - r / c)
    if min(precisions) <= 0.0:
        score = 0.0
    else:
        score = bp * math.exp(sum(math.log(p) for p in precisions) / max_n)
    return score, precisions, bp


def bleu(
    preds: Sequence[str],
    refs: Sequence[str | Sequence[str]],
    n: int = 4,
    *,
    smooth: bool = False,
    tokenizer: Tokenizer = tokenize,
    return_details: bool = False,
):
    """Corpus BLEU-n (Papineni et al., 2002), uniform weights 1/n over orders 1..n.

    Modified (clipped) n-gram precision p_k = sum over sentences of clipped matches / sum of
    hypothesis k-gram counts, each hypothesis k-gram count clipped at its maximum count in any
    one reference of that sentence.  Brevity penalty BP = 1 if c > r else exp(1 - r/c), with c
    the total hypothesis length and r the sum of the per-sentence reference lengths closest to
    the hypothesis length (ties: shorter).  BLEU = BP * exp(mean_k log p_k); 0 if any p_k is 0
    unless ``smooth`` (add-one to numerator and denominator of orders >= 2, Lin & Och 2004).

    Returns a float in [0, 1], or with ``return_details`` a dict with ``bleu``,
    ``precisions``, ``bp``, ``hyp_len``, ``ref_len``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError("n must be a positive integer")
    _check(preds, refs)
    matches = [0] * n
    totals = [0] * n
    c_sum = r_sum = 0
    for p, rs in zip(preds, refs):
        m, t, c, r = _bleu_sentence_stats(tokenizer(p), [tokenizer(x) for x in _refs_list(rs)], n)
        matches = [a + b for a, b in zip(matches, m)]
        totals = [a + b for a, b in zip(totals, t)]
        c_sum += c
        r_sum += r
    score, precisions, bp = _combine(matches, totals, c_sum, r_sum, n, smooth)
    if return_details:
        return {"bleu": score, "precisions": precisions, "bp": bp, "hyp_len": c_sum, "ref_len": r_sum}
    return score


def sentence_bleu(
    pred: str,
    ref: str | Sequence[str],
    n: int = 4,
    *,
    smooth: bool = True,
    tokenizer: Tokenizer = tokenize,
) -> float:
    """BLEU-n of one hypothesis against its reference(s).

    Same definition as ``bleu`` on a one-sentence corpus, but smoothing (add-one for orders
    >= 2) is on by default because unsmoothed sentence BLEU-4 is 0 for most short sentences.
    Averaging sentence BLEU is *not* corpus BLEU; report ``bleu`` for corpus numbers.
    """
    return bleu([pred], [ref], n, smooth=smooth, tokenizer=tokenizer)


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two token sequences.

    Bit-parallel algorithm (Allison & Dix 1986 / Hyyro 2004): one big-integer update per
    element of ``b``, so long reports are cheap in pure Python.
    """
    if len(a) < len(b):
        a, b = b, a  # bit vector over the longer sequence; fewer outer iterations
    m = len(a)
    if m == 0 or len(b) == 0:
        return 0
    masks: dict = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << m) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return m - bin(v).count("1")


def rouge_l(
    pred: str,
    ref: str | Sequence[str],
    *,
    beta: float = 1.2,
    tokenizer: Tokenizer = tokenize,
) -> float:
    """ROUGE-L F-measure (Lin 2004) as implemented in coco-caption (``pycocoevalcap.rouge``).

    P = LCS/len(pred), R = LCS/len(ref); with several references P and R are each maximised
    over references separately (coco-caption's choice).  F = (1 + beta^2) P R / (R + beta^2 P)
    with beta = 1.2 (coco-caption's value; Lin's paper leaves beta free and uses a large beta,
    which makes F close to R).  Returns 0.0 when P or R is 0 (including empty texts).
    Corpus ROUGE-L in coco-caption is the mean of this per-sample score.
    """
    hyp = tokenizer(pred)
    best_p = best_r = 0.0
    for r in _refs_list(ref):
        rt = tokenizer(r)
        lcs = lcs_length(hyp, rt)
        if lcs == 0:
            continue
        best_p = max(best_p, lcs / len(hyp))
        best_r = max(best_r, lcs / len(rt))
    if best_p == 0.0 or best_r == 0.0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * best_p * best_r / (best_r + b2 * best_p)


def _align_exact(hyp: list[str], ref: list[str]) -> list[tuple[int, int]]:
    """Exact-match unigram alignment with as few chunks as a greedy search finds.

    Repeatedly links the longest run of consecutive still-unaligned tokens that is identical
    in both sequences (leftmost in the hypothesis, then in the reference, on ties) until no
    unaligned token pair matches.  This always reaches the maximum number of matches
    (sum over words of min(count in hyp, count in ref)); its chunk count is the minimum in
    all cases without repeated words and in the usual cases with them, but is not proven
    minimal in general (METEOR 1.x finds the alignment by beam search).
    """
    positions: dict[str, list[int]] = {}
    for j, tok in enumerate(ref):
        positions.setdefault(tok, []).append(j)
    used_h = [False] * len(hyp)
    used_r = [False] * len(ref)
    pairs: list[tuple[int, int]] = []
    while True:
        best = (0, 0, 0)  # (length, start_i, start_j)
        # Run lengths of consecutive unused equal tokens ending at (i, j), row by row; only
        # matching (i, j) pairs are visited.
        prev: dict[int, int] = {}
        for i, tok in enumerate(hyp):
            cur: dict[int, int] = {}
            if not used_h[i]:
                for j in positions.get(tok, ()):
                    if used_r[j]:
                        continue
                    L = prev.get(j - 1, 0) + 1
                    cur[j] = L
                    key = (L, -(i - L + 1), -(j - L + 1))
                    if key > (best[0], -best[1], -best[2]):
                        best = (L, i - L + 1, j - L + 1)
            prev = cur
        L, i0, j0 = best
        if L == 0:
            break
        for k in range(L):
            used_h[i0 + k] = used_r[j0 + k] = True
            pairs.append((i0 + k, j0 + k))
    pairs.sort()
    return pairs


def _count_chunks(pairs: list[tuple[int, int]]) -> int:
    """Chunks: maximal runs of alignments adjacent in both hypothesis and reference order."""
    if not pairs:
        return 0
    chunks = 1
    for (i0, j0), (i1, j1) in zip(pairs, pairs[1:]):
        if not (i1 == i0 + 1 and j1 == j0 + 1):
            chunks += 1
    return chunks


def meteor_like(
    pred: str,
    ref: str | Sequence[str],
    *,
    alpha: float = 0.9,
    beta: float = 3.0,
    gamma: float = 0.5,
    tokenizer: Tokenizer = tokenize,
) -> float:
    """METEOR-style score (Banerjee & Lavie 2005) with **exact unigram matching only**.

    No stemming, no WordNet synonyms, no paraphrase tables: it is NOT the official METEOR
    (1.5 / coco-caption jar) and typically scores lower than it.  With m matched unigrams,
    P = m/len(pred), R = m/len(ref):
        Fmean   = P R / (alpha P + (1 - alpha) R)        (alpha=0.9 gives 10PR/(R+9P))
        Penalty = gamma * (chunks / m) ** beta          (gamma=0.5, beta=3)
        score   = Fmean * (1 - Penalty)
    where chunks is the number of groups of matched unigrams that are contiguous and in the
    same order in both texts (alignment by ``_align_exact``).  Several references: the
    maximum score.  0.0 when nothing matches.
    """
    hyp = tokenizer(pred)
    best = 0.0
    for r in _refs_list(ref):
        rt = tokenizer(r)
        pairs = _align_exact(hyp, rt)
        m = len(pairs)
        if m == 0:
            continue
        p, rec = m / len(hyp), m / len(rt)
        fmean = p * rec / (alpha * p + (1 - alpha) * rec)
        penalty = gamma * (_count_chunks(pairs) / m) ** beta
        best = max(best, fmean * (1 - penalty))
    return best
