"""VQA metrics: answer normalisation, closed / open accuracy, token recall, majority baseline.

Pure Python/numpy, no I/O.  Protocol (stated so reported numbers can be reproduced):

* Every comparison is made on ``normalize_answer`` output (see its docstring for the exact
  steps).
* Closed questions (yes/no, or multiple choice with ``options``) are scored by exact match of
  the normalised answer; for multiple choice the prediction may also name the option by its
  letter ("B", "(B)", "B. text", "The answer is B") -- see ``match_option``.
* Open questions are scored two ways: exact match after normalisation
  (``vqa_open_accuracy``) and token recall (``open_recall``): the fraction of the distinct
  reference tokens that occur in the prediction, the "recall" reported for open questions by
  medical VQA papers (LLaVA-Med and followers).  LLaVA-Med's own script weights tokens by
  their count in the prediction; we use distinct tokens, which is the usual written
  definition.  Both can differ by a few tenths of a point on long answers.
* A reference may be one string or a sequence of acceptable strings (any match counts).
* Aggregates over an empty list are ``nan`` (not an error), so empty subsets stay visible.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "normalize_answer",
    "is_closed_question",
    "match_option",
    "exact_match",
    "token_recall",
    "vqa_closed_accuracy",
    "vqa_open_accuracy",
    "open_recall",
    "majority_baseline",
]

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19,
}
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
    "eighty": 80, "ninety": 90,
}
_ARTICLES = frozenset({"a", "an", "the"})
# Leading "the answer is" / "answer:" boilerplate emitted by chat models.
_PREFIX_RE = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\b\s*(?:is\b)?\s*[:\-]?\s*(?=\S)")
# "yes" opening an answer in any form ("yes", "yes.", "yes, there is", "yes there is").
_YES_RE = re.compile(r"^yes(?:\W|$)")
# "no" only when it is the whole answer or followed by punctuation ("no", "no.", "no, it is
# not"): "no evidence of fracture" is a genuine open answer and must not become "no".
_NO_RE = re.compile(r"^no\s*(?:[.,;:!?]|$)")
_DIGIT_COMMA_RE = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DECIMAL_RE = re.compile(r"(?<=\d)\.(?=\d)")
_APOSTROPHE_RE = re.compile(r"['\u2019`]")
_NON_WORD_RE = re.compile(r"[^\w\u2027]+")  # \u2027 is a placeholder for a decimal point
_DECIMAL_MARK = "\u2027"


def _numbers_to_digits(tokens: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in _TENS:
            value = _TENS[tok]
            if i + 1 < len(tokens) and tokens[i + 1] in _UNITS and 0 < _UNITS[tokens[i + 1]] < 10:
                value += _UNITS[tokens[i + 1]]
                i += 1
            out.append(str(value))
        elif tok in _UNITS:
            out.append(str(_UNITS[tok]))
        else:
            out.append(tok)
        i += 1
    return out


def normalize_answer(s: str) -> str:
    """Canonical form of a VQA answer, applied identically to predictions and references.

    Steps, in order:

    1. ``str(s)``, lowercase, strip surrounding whitespace; drop a leading "answer:",
       "the answer is", "final answer:" prefix.
    2. Yes/no canonicalisation: an answer *starting* with the word "yes" ("Yes", "yes.",
       "Yes, there is a mass", "yes it is") becomes ``"yes"``; an answer that is "no" alone or
       "no" followed by punctuation ("No.", "no, it is not") becomes ``"no"``.  "no" followed
       directly by words ("no evidence of fracture") is left alone: it is an open answer.
    3. Thousands separators between digits are removed ("1,000" -> "1000"); a decimal point
       between digits is kept ("2.5"); apostrophes are deleted ("patient's" -> "patients");
       every other non-word character (punctuation, hyphens, slashes) becomes a space.
    4. Number words zero..ninety-nine become digits ("twenty-one" -> "21", "two" -> "2").
       "none" is *not* mapped to 0 (unlike the VQAv2 script) because it is a real answer in
       medical VQA ("none" abnormality).
    5. Articles "a", "an", "the" are removed; whitespace is collapsed.
    """
    text = str(s).lower().strip()
    text = _PREFIX_RE.sub("", text, count=1)
    if _YES_RE.match(text):
        return "yes"
    if _NO_RE.match(text):
        return "no"
    text = _DIGIT_COMMA_RE.sub("", text)
    text = _DECIMAL_RE.sub(_DECIMAL_MARK, text)
    text = _APOSTROPHE_RE.sub("", text)
    text = _NON_WORD_RE.sub(" ", text).replace("_", " ")
    text = text.replace(_DECIMAL_MARK, ".")
    tokens = _numbers_to_digits(text.split())
    tokens = [t for t in tokens if t not in _ARTICLES]
    return " ".join(tokens)


def _as_ref_list(ref: str | Sequence[str]) -> list[str]:
    if isinstance(ref, str):
        return [ref]
    refs = list(ref)
    if not refs:
        raise ValueError("empty list of acceptable reference answers")
    return refs


def is_closed_question(answer: str, options: Sequence[str] | None = None) -> bool:
    """Whether a question is closed-ended.

    True when the question has a non-empty list of ``options`` (multiple choice), or when its
    reference ``answer`` normalises to "yes" or "no".  This is the heuristic used for datasets
    that do not label answer types; VQA-RAD and SLAKE ship an ``answer_type`` field that should
    be preferred when present.
    """
    if options is not None and len(options) > 0:
        return True
    return normalize_answer(answer) in ("yes", "no")


_LETTER_ONLY_RE = re.compile(r"^\s*[\(\[]?([A-Za-z])[\)\]]?\s*(?:[.):,\]]|$)")
_LETTER_PAREN_RE = re.compile(r"^\s*[\(\[]([A-Za-z])[\)\]]")
_ANSWER_LETTER_RE = re.compile(
    r"(?:answer|option|choice)\s*(?:is\s*)?[:\-]?\s*[\(\[]?([A-Z])[\)\]]?(?![A-Za-z])",
    re.IGNORECASE,
)


def match_option(pred: str, options: Sequence[str]) -> int | None:
    """Index of the option a free-text answer selects, or None if it selects none/ambiguously.

    Tried in order:
    1. a leading option letter that is the whole answer or is followed by ``.``, ``)``, ``:``
       or ``,`` ("B", "b", "(B)", "B.", "B) Pneumonia"; "A mass ..." is *not* a letter);
    2. "answer is B" / "option: B" / "choice (B)";
    3. normalised answer equal to a normalised option text;
    4. exactly one option text occurring as a whole-word substring of the normalised answer
       (if several occur, the longest is taken when it contains all the others, else None).
    Letters beyond ``len(options)`` are ignored.
    """
    n = len(options)
    raw = str(pred)
    for rx in (_LETTER_PAREN_RE, _LETTER_ONLY_RE):
        m = rx.match(raw)
        if m:
            idx = ord(m.group(1).upper()) - ord("A")
            if 0 <= idx < n:
                return idx
    m = _ANSWER_LETTER_RE.search(raw)
    if m:
        idx = ord(m.group(1).upper()) - ord("A")
        if 0 <= idx < n:
            return idx
    norm_pred = normalize_answer(raw)
    norm_opts = [normalize_answer(o) for o in options]
    for i, o in enumerate(norm_opts):
        if o and o == norm_pred:
            return i
    padded = f" {norm_pred} "
    hits = [i for i, o in enumerate(norm_opts) if o and f" {o} " in padded]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        longest = max(hits, key=lambda i: len(norm_opts[i]))
        if all(f" {norm_opts[i]} " in f" {norm_opts[longest]} " for i in hits):
            return longest
    return None


def exact_match(pred: str, ref: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(r) for r in _as_ref_list(ref)))


def token_recall(pred: str, ref: str | Sequence[str]) -> float:
    """Fraction of the distinct normalised reference tokens present in the prediction.

    Max over acceptable references.  A reference that normalises to no tokens scores 1.0 if
    the prediction is also empty, else 0.0.
    """
    p = set(normalize_answer(pred).split())
    best = 0.0
    for r in _as_ref_list(ref):
        rt = set(normalize_answer(r).split())
        if not rt:
            score = 1.0 if not p else 0.0
        else:
            score = len(rt & p) / len(rt)
        best = max(best, score)
    return best


def _check_lengths(preds: Sequence, refs: Sequence) -> None:
    if isinstance(preds, str) or isinstance(refs, str):
        raise TypeError("preds and refs must be sequences of answers, not a single string")
    if len(preds) != len(refs):
        raise ValueError(f"len(preds)={len(preds)} != len(refs)={len(refs)}")


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def vqa_closed_accuracy(
    preds: Sequence[str],
    refs: Sequence[str | Sequence[str]],
    options: Sequence[Sequence[str] | None] | None = None,
) -> float:
    """Accuracy on closed questions.

    Without ``options``: exact match after ``normalize_answer`` (so "Yes, there is." matches
    "yes").  With ``options`` (one list per question, or None for a yes/no question): the
    prediction and the reference are each mapped to an option index by ``match_option``
    (the reference may be the option text or its letter) and compared; an unmatched
    prediction is wrong.  Returns a fraction in [0, 1]; ``nan`` for no questions.
    """
    _check_lengths(preds, refs)
    if options is not None and len(options) != len(preds):
        raise ValueError("options must have one entry per question")
    scores = []
    for i, (p, r) in enumerate(zip(preds, refs)):
        opts = None if options is None else options[i]
        if opts:
            pi = match_option(p, opts)
            ri = [match_option(x, opts) for x in _as_ref_list(r)]
            if any(x is None for x in ri):
                raise ValueError(f"reference {r!r} of question {i} is not one of its options {opts!r}")
            scores.append(float(pi is not None and pi in ri))
        else:
            scores.append(exact_match(p, r))
    return _mean(scores)


def vqa_open_accuracy(preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> float:
    """Exact-match accuracy after ``normalize_answer``; ``nan`` for no questions."""
    _check_lengths(preds, refs)
    return _mean([exact_match(p, r) for p, r in zip(preds, refs)])


def open_recall(preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> float:
    """Mean ``token_recall`` (fraction of distinct reference tokens found in the prediction)."""
    _check_lengths(preds, refs)
    return _mean([token_recall(p, r) for p, r in zip(preds, refs)])


def majority_baseline(
    train_answers: Sequence[str], test_refs: Sequence[str | Sequence[str]]
) -> tuple[str, float]:
    """Accuracy of always answering the most frequent normalised training answer.

    Returns ``(answer, accuracy)``; ties in frequency are broken by the lexicographically
    smallest normalised answer so the result does not depend on data order.
    """
    if isinstance(train_answers, str) or isinstance(test_refs, str):
        raise TypeError("train_answers and test_refs must be sequences")
    if len(train_answers) == 0:
        raise ValueError("no training answers")
    counts = Counter(normalize_answer(a) for a in train_answers)
    answer = min(counts, key=lambda a: (-counts[a], a))
    return answer, _mean([exact_match(answer, r) for r in test_refs])
