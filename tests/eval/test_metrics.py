"""Tests of unimedvl_jax.eval.metrics against independent references.

References used: scikit-image (PSNR, SSIM, Otsu), PIL (RGB bicubic), hand computations from
the papers' definitions (BLEU, ROUGE-L, METEOR), closed forms (Dice/IoU on constructed masks,
Frechet distance of Gaussians), and small brute-force implementations written here.
Run: .venv/bin/python -m pytest tests/eval -q
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage

from unimedvl_jax.eval import metrics as M


# ----------------------------------------------------------------------------------------------
# VQA
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("Yes, there is a mass in the left lung.", "yes"),
        ("YES it is", "yes"),
        ("No.", "no"),
        ("no, it is not", "no"),
        ("No", "no"),
        ("no evidence of fracture", "no evidence of fracture"),  # genuine open answer
        ("yesterday", "yesterday"),
        ("The answer is: Left lung", "left lung"),
        ("  The   Left  Lung!! ", "left lung"),
        ("An X-ray of a chest", "x ray of chest"),
        ("Twenty-one", "21"),
        ("two nodules", "2 nodules"),
        ("1,000 cells", "1000 cells"),
        ("2.5 cm", "2.5 cm"),
        ("the patient's heart", "patients heart"),
        ("T2-weighted MRI", "t2 weighted mri"),
        ("none", "none"),
    ],
)
def test_normalize_answer(raw, expected):
    assert M.normalize_answer(raw) == expected


def test_is_closed_question():
    assert M.is_closed_question("Yes.")
    assert M.is_closed_question("no")
    assert not M.is_closed_question("no evidence of fracture")
    assert not M.is_closed_question("left lung")
    assert M.is_closed_question("left lung", options=["left lung", "right lung"])
    assert not M.is_closed_question("left lung", options=[])


def test_match_option():
    opts = ["Pneumonia", "Pleural effusion", "Normal", "Atelectasis"]
    assert M.match_option("B", opts) == 1
    assert M.match_option("(c)", opts) == 2
    assert M.match_option("D. Atelectasis", opts) == 3
    assert M.match_option("The answer is A", opts) == 0
    assert M.match_option("pleural effusion.", opts) == 1
    assert M.match_option("I think it shows pneumonia here", opts) == 0
    assert M.match_option("E", opts) is None  # letter beyond the options
    assert M.match_option("cardiomegaly", opts) is None
    # "A mass" begins with the article, not option A.
    assert M.match_option("A mass", ["nodule", "mass"]) == 1
    # Two options mentioned, one containing the other -> the longer one.
    assert M.match_option("pleural effusion", ["effusion", "pleural effusion"]) == 1
    # Two unrelated options mentioned -> ambiguous.
    assert M.match_option("pneumonia or atelectasis", opts) is None


def test_vqa_closed_accuracy():
    preds = ["Yes, it is.", "no", "Yes", "No."]
    refs = ["yes", "yes", "yes", "no"]
    assert M.vqa_closed_accuracy(preds, refs) == pytest.approx(3 / 4)
    # Multiple choice: refs given as text or letter.
    opts = [["CT", "MRI", "X-ray"], ["CT", "MRI", "X-ray"], None]
    assert M.vqa_closed_accuracy(["B", "(a) CT", "no"], ["MRI", "C", "no"], options=opts) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        M.vqa_closed_accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError):  # reference not among the options
        M.vqa_closed_accuracy(["A"], ["PET"], options=[["CT", "MRI"]])
    assert math.isnan(M.vqa_closed_accuracy([], []))


def test_vqa_open_accuracy_and_recall():
    preds = ["Left lung", "the liver", "kidney", "left lung"]
    refs = ["left lung", "Liver", "spleen", ["right lung", "left lung"]]
    assert M.vqa_open_accuracy(preds, refs) == pytest.approx(3 / 4)
    # Token recall: ref "the left lower lung" -> {left, lower, lung} (article dropped);
    # pred "left lung" contains 2 of 3 -> 2/3.  Ref "brain" vs pred "lung" -> 0.
    assert M.token_recall("left lung", "the left lower lung") == pytest.approx(2 / 3)
    assert M.token_recall("there is a large mass in the left lung", "left lung") == 1.0
    assert M.open_recall(["left lung", "lung"], ["the left lower lung", "brain"]) == pytest.approx((2 / 3 + 0) / 2)
    # Exact match is stricter than recall.
    assert M.exact_match("there is a large mass in the left lung", "left lung") == 0.0


def test_majority_baseline():
    train = ["Yes", "yes.", "no", "No", "Yes, it is", "liver"]
    ans, acc = M.majority_baseline(train, ["yes", "no", "Yes.", "lung"])
    assert ans == "yes"
    assert acc == pytest.approx(2 / 4)
    # Tie (1 "liver", 1 "kidney") -> lexicographically smallest, independent of order.
    assert M.majority_baseline(["liver", "kidney"], ["kidney"]) == ("kidney", 1.0)
    assert M.majority_baseline(["kidney", "liver"], ["liver"]) == ("kidney", 0.0)


# ----------------------------------------------------------------------------------------------
# BLEU
# ----------------------------------------------------------------------------------------------

def test_bleu_papineni_modified_precision_the_the():
    # Papineni et al. 2002, section 2.1: candidate "the" x 7.  Count("the") = 7; the maximum
    # count of "the" in any single reference is 2 (ref 1), so Count_clip = min(7, 2) = 2 and the
    # modified unigram precision is 2/7.  Lengths: c = 7, reference lengths 6 and 7 -> closest
    # is 7 -> BP = 1 -> BLEU-1 = 2/7.
    d = M.bleu(["the the the the the the the"],
               [["The cat is on the mat.", "There is a cat on the mat."]], n=1, return_details=True)
    assert d["precisions"][0] == pytest.approx(2 / 7, abs=1e-15)
    assert d["bp"] == 1.0 and d["ref_len"] == 7 and d["hyp_len"] == 7
    assert d["bleu"] == pytest.approx(2 / 7, abs=1e-15)


PAPINENI_REFS = [
    "It is a guide to action that ensures that the military will forever heed Party commands.",
    "It is the guiding principle which guarantees the military forces always being under the "
    "command of the Party.",
    "It is the practical guide for the army always to heed the directions of the party.",
]


def test_bleu_papineni_example_1_precisions():
    # Paper, section 2.1.1: candidate 1 has modified unigram precision 17/18 (all words but
    # "obeys" occur in some reference within clip limits) and bigram precision 10/17: matched
    # bigrams are "it is", "is a", "a guide", "guide to", "to action", "ensures that",
    # "that the", "the military", "of the", "the party" (10 of 17).  Candidate 2 has 8/14
    # unigrams (it, is, to, the, the, forever, that, party) and 1/13 bigrams ("it is").
    c1 = "It is a guide to action which ensures that the military always obeys the commands of the party."
    c2 = "It is to insure the troops forever hearing the activity guidebook that party direct."
    d1 = M.bleu([c1], [PAPINENI_REFS], n=2, return_details=True)
    d2 = M.bleu([c2], [PAPINENI_REFS], n=2, return_details=True)
    assert d1["precisions"] == pytest.approx([17 / 18, 10 / 17], abs=1e-15)
    assert d2["precisions"] == pytest.approx([8 / 14, 1 / 13], abs=1e-15)
    # c1 has 18 tokens; reference lengths 16, 18, 16 -> r = 18, BP = 1;
    # BLEU-2 = sqrt(17/18 * 10/17) = sqrt(10/18).
    assert d1["bp"] == 1.0
    assert d1["bleu"] == pytest.approx(math.sqrt(10 / 18), abs=1e-12)
    # c2 has 14 tokens; closest reference length 16 -> BP = exp(1 - 16/14).
    assert d2["ref_len"] == 16
    assert d2["bleu"] == pytest.approx(math.exp(1 - 16 / 14) * math.sqrt(8 / 14 * 1 / 13), abs=1e-12)


def test_bleu_brevity_penalty_and_smoothing():
    # "the cat" vs "the cat is on the mat": p1 = 2/2, p2 = 1/1, c = 2, r = 6,
    # BP = exp(1 - 6/2) = e^-2; BLEU-2 = e^-2 * (1 * 1)^(1/2).
    assert M.bleu(["the cat"], ["the cat is on the mat"], n=2) == pytest.approx(math.exp(-2), abs=1e-15)
    # BLEU-4 of "the cat sat" vs "the cat sat on the mat": there is no 4-gram in the
    # hypothesis, so p4 = 0/0 -> 0 and unsmoothed BLEU-4 = 0.
    assert M.bleu(["the cat sat"], ["the cat sat on the mat"], n=4) == 0.0
    # Add-one smoothing for n >= 2: p1 = 3/3, p2 = (2+1)/(2+1), p3 = (1+1)/(1+1),
    # p4 = (0+1)/(0+1); BP = exp(1 - 6/3) = e^-1 -> BLEU-4 = e^-1.
    assert M.sentence_bleu("the cat sat", "the cat sat on the mat", n=4) == pytest.approx(math.exp(-1), abs=1e-15)
    # Unigrams are never smoothed: "the cat ran" -> p1 = 2/3, p2 = (1+1)/(2+1) = 2/3,
    # BP = e^-1 -> BLEU-2 = e^-1 * sqrt(2/3 * 2/3) = e^-1 * 2/3.
    assert M.sentence_bleu("the cat ran", "the cat sat on the mat", n=2) == pytest.approx(math.exp(-1) * 2 / 3, abs=1e-15)
    assert M.sentence_bleu("the cat sat on the mat", "The cat sat on the mat.", n=4) == pytest.approx(1.0)
    assert M.bleu([""], ["the cat"], n=1) == 0.0


def test_bleu_corpus_pools_counts_and_closest_length():
    # Sentence 1: 3/3 unigrams match; sentence 2 ("a dog" vs "the dog"): 1/2.
    # Corpus p1 = (3 + 1) / (3 + 2) = 4/5; c = 5 = r -> BP = exp(0) = 1 -> BLEU-1 = 0.8,
    # not the mean of the sentence scores (1 + 0.5)/2 = 0.75.
    assert M.bleu(["the cat sat", "a dog"], ["the cat sat", "the dog"], n=1) == pytest.approx(0.8, abs=1e-15)
    # Closest reference length: hypothesis length 6, references 5 and 7 are equally close ->
    # the shorter (5) is used, so c > r and BP = 1.
    d = M.bleu(["a b c d e f"], [["a b c d e", "a b c d e f g"]], n=1, return_details=True)
    assert d["ref_len"] == 5 and d["bp"] == 1.0 and d["bleu"] == pytest.approx(1.0)


def _brute_bleu(hyps, refss, n):
    """Independent BLEU with Fractions, straight from the paper's formulas."""
    num = [0] * n
    den = [0] * n
    c = r = 0
    for h, refs in zip(hyps, refss):
        for k in range(1, n + 1):
            grams = [tuple(h[i:i + k]) for i in range(len(h) - k + 1)]
            for g in set(grams):
                max_ref = max(sum(1 for i in range(len(rr) - k + 1) if tuple(rr[i:i + k]) == g) for rr in refs)
                num[k - 1] += min(grams.count(g), max_ref)
            den[k - 1] += len(grams)
        c += len(h)
        r += sorted((abs(len(rr) - len(h)), len(rr)) for rr in refs)[0][1]
    ps = [Fraction(a, b) if b else Fraction(0) for a, b in zip(num, den)]
    if min(ps) == 0:
        return 0.0
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(sum(math.log(p) for p in ps) / n)


def test_bleu_matches_bruteforce_on_random_corpus():
    rng = random.Random(0)
    vocab = "a b c d e f".split()
    hyps, refss = [], []
    for _ in range(30):
        hyps.append([rng.choice(vocab) for _ in range(rng.randint(3, 12))])
        refss.append([[rng.choice(vocab) for _ in range(rng.randint(3, 12))] for _ in range(rng.randint(1, 3))])
    for n in (1, 2, 3, 4):
        got = M.bleu([" ".join(h) for h in hyps], [[" ".join(r) for r in rs] for rs in refss], n=n)
        assert got == pytest.approx(_brute_bleu(hyps, refss, n), rel=1e-12)
        assert got > 0


# ----------------------------------------------------------------------------------------------
# ROUGE-L
# ----------------------------------------------------------------------------------------------

def _dp_lcs(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1][j], t[i][j - 1])
    return t[-1][-1]


def test_lcs_length_matches_dynamic_programming():
    rng = random.Random(1)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 25))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 25))]
        assert M.lcs_length(a, b) == _dp_lcs(a, b)
    assert M.lcs_length("police killed the gunman".split(), "the gunman kill police".split()) == 2


def test_rouge_l_hand_examples():
    # Lin 2004: "police killed the gunman" vs "police kill the gunman": LCS = 3
    # (police, the, gunman); P = R = 3/4 -> F = (1+b^2) P R / (R + b^2 P) = 3/4 for any beta.
    assert M.rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75, abs=1e-15)
    # vs "the gunman kill police": LCS = 2 ("the gunman") -> P = R = 1/2 -> F = 1/2.
    assert M.rouge_l("police killed the gunman", "the gunman kill police") == pytest.approx(0.5, abs=1e-15)
    # "the cat sat" vs "the cat sat on the mat": LCS 3, P = 3/3 = 1, R = 3/6 = 0.5, beta = 1.2:
    # F = 2.44 * 1 * 0.5 / (0.5 + 1.44 * 1) = 1.22 / 1.94 = 0.6288659793...
    assert M.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(1.22 / 1.94, abs=1e-15)
    # beta = 1 is the harmonic mean: 2 * 1 * 0.5 / 1.5 = 2/3.
    assert M.rouge_l("the cat sat", "the cat sat on the mat", beta=1.0) == pytest.approx(2 / 3, abs=1e-15)
    assert M.rouge_l("a b", "c d") == 0.0
    assert M.rouge_l("", "c d") == 0.0


def test_rouge_l_multi_reference_is_coco_style():
    # coco-caption maximises P and R separately over references:
    # ref "a b": LCS 2 -> P = 2/4, R = 2/2; ref "a b c d e f g h": LCS 4 -> P = 4/4, R = 4/8.
    # P_max = 1, R_max = 1 -> F = 1 although no single reference gives F = 1.
    assert M.rouge_l("a b c d", ["a b", "a b c d e f g h"]) == pytest.approx(1.0)
    single = [M.rouge_l("a b c d", r) for r in ["a b", "a b c d e f g h"]]
    assert max(single) < 0.8


# ----------------------------------------------------------------------------------------------
# METEOR-like
# ----------------------------------------------------------------------------------------------

def test_meteor_like_paper_example():
    # Banerjee & Lavie 2005: "the president spoke to the audience" vs
    # "the president then spoke to the audience": 6 matches in 2 chunks
    # ("the president", "spoke to the audience").  P = 6/6, R = 6/7,
    # Fmean = 10PR / (R + 9P) = (60/7) / (6/7 + 9) = 60/69; Penalty = 0.5 (2/6)^3 = 1/54;
    # score = 60/69 * 53/54 = 0.853462...
    got = M.meteor_like("the president spoke to the audience", "the president then spoke to the audience")
    assert got == pytest.approx(60 / 69 * 53 / 54, abs=1e-15)


def test_meteor_like_fragmentation_hand_cases():
    # One-word exact match: Fmean 1, 1 chunk / 1 match -> penalty 0.5 -> 0.5 (as METEOR).
    assert M.meteor_like("cat", "cat") == pytest.approx(0.5)
    # Full reversal: 4 chunks / 4 matches -> penalty 0.5 -> 0.5.
    assert M.meteor_like("a b c d", "d c b a") == pytest.approx(0.5)
    # Two swapped blocks: 2 chunks -> penalty 0.5 (1/2)^3 = 1/16 -> 15/16.
    assert M.meteor_like("a b c d", "c d a b") == pytest.approx(15 / 16)
    # No stemming: "effusions" does not match "effusion".
    assert M.meteor_like("effusions", "effusion") == 0.0


def test_meteor_like_unique_words_against_direct_formula():
    # Without repeated words the alignment is unique; compute chunks directly.
    rng = random.Random(2)
    words = [f"w{i}" for i in range(30)]
    for _ in range(200):
        hyp = rng.sample(words, rng.randint(1, 12))
        ref = rng.sample(words, rng.randint(1, 12))
        pos = {w: j for j, w in enumerate(ref)}
        pairs = [(i, pos[w]) for i, w in enumerate(hyp) if w in pos]
        got = M.meteor_like(" ".join(hyp), " ".join(ref))
        if not pairs:
            assert got == 0.0
            continue
        m = len(pairs)
        chunks = 1 + sum(1 for (i0, j0), (i1, j1) in zip(pairs, pairs[1:]) if (i1, j1) != (i0 + 1, j0 + 1))
        p, r = m / len(hyp), m / len(ref)
        expected = 10 * p * r / (r + 9 * p) * (1 - 0.5 * (chunks / m) ** 3)
        assert got == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Findings
# ----------------------------------------------------------------------------------------------

def test_finding_prf_hand_example():
    preds = [{"a", "b"}, {"a"}, {"c"}]
    refs = [{"a"}, {"a", "b"}, set()]
    out = M.finding_prf(preds, refs)
    # Micro: report 1 tp=1 (a) fp=1 (b); report 2 tp=1 fn=1 (b); report 3 fp=1 (c).
    # TP=2, FP=2, FN=1 -> P = 1/2, R = 2/3, F1 = 2 (1/2)(2/3) / (7/6) = 4/7.
    assert out["micro"]["precision"] == pytest.approx(1 / 2)
    assert out["micro"]["recall"] == pytest.approx(2 / 3)
    assert out["micro"]["f1"] == pytest.approx(4 / 7)
    # Per label: a -> P=R=F=1; b -> tp 0 fp 1 fn 1 -> 0; c -> tp 0 fp 1 -> P 0, R 0/0 -> 0.
    # Macro over {a, b, c}: 1/3 each.
    for k in ("precision", "recall", "f1"):
        assert out["macro"][k] == pytest.approx(1 / 3)
    assert out["per_label"]["a"]["support"] == 2 and out["per_label"]["c"]["support"] == 0
    # Explicit labels restrict: only {a, b} -> micro TP=2, FP=1, FN=1 -> P = R = F1 = 2/3.
    out2 = M.finding_prf(preds, refs, labels=["a", "b"])
    assert out2["micro"]["f1"] == pytest.approx(2 / 3)
    assert out2["macro"]["f1"] == pytest.approx(1 / 2)


def test_finding_prf_against_indicator_matrices():
    rng = np.random.default_rng(3)
    labels = list("abcdef")
    P = rng.random((50, 6)) < 0.3
    R = rng.random((50, 6)) < 0.3
    preds = [{labels[j] for j in np.flatnonzero(row)} for row in P]
    refs = [{labels[j] for j in np.flatnonzero(row)} for row in R]
    out = M.finding_prf(preds, refs, labels=labels)
    tp = (P & R).sum(0)
    fp = (P & ~R).sum(0)
    fn = (~P & R).sum(0)
    prec = tp / np.maximum(tp + fp, 1)
    rec = tp / np.maximum(tp + fn, 1)
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-300), 0)
    assert out["macro"]["precision"] == pytest.approx(prec.mean())
    assert out["macro"]["recall"] == pytest.approx(rec.mean())
    assert out["macro"]["f1"] == pytest.approx(f1.mean())
    mp, mr = tp.sum() / (tp.sum() + fp.sum()), tp.sum() / (tp.sum() + fn.sum())
    assert out["micro"]["f1"] == pytest.approx(2 * mp * mr / (mp + mr))


VOCAB = {
    "effusion": ["pleural effusion", "effusion", "effusions"],
    "pneumothorax": ["pneumothorax"],
    "cardiomegaly": ["cardiomegaly", "enlarged heart"],
    "consolidation": ["consolidation"],
    "edema": ["edema", "oedema"],
}


@pytest.mark.parametrize(
    "text, positive, negated",
    [
        ("No pleural effusion, consolidation or pneumothorax. Mild cardiomegaly.",
         {"cardiomegaly"}, {"effusion", "consolidation", "pneumothorax"}),
        ("No effusion, but there is a small right pneumothorax.", {"pneumothorax"}, {"effusion"}),
        ("Lungs are clear without consolidation; small bilateral effusions.",
         {"effusion"}, {"consolidation"}),
        ("Pneumothorax is not seen. No change in the 3.5 cm pleural effusion.",
         {"effusion"}, {"pneumothorax"}),
        ("Enlarged heart. Pulmonary edema has resolved.", {"cardiomegaly"}, {"edema"}),
        ("Cardiomegaly. No cardiomegaly on the lateral view.", {"cardiomegaly"}, set()),
        ("Normal chest radiograph.", set(), set()),
        ("Pneumothoraces are not mentioned here: cardiomegalyX", set(), set()),
    ],
)
def test_extract_findings(text, positive, negated):
    pos, neg = M.extract_findings(text, VOCAB, return_negated=True)
    assert pos == positive
    assert neg == negated
    assert M.extract_findings(text, VOCAB) == positive


def test_extract_findings_plain_vocabulary_list():
    assert M.extract_findings("Small pleural effusion. No pneumothorax.", ["pleural effusion", "pneumothorax"]) == {
        "pleural effusion"
    }


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------

def test_dice_iou_constructed_masks():
    a = np.zeros((32, 32), bool)
    b = np.zeros((32, 32), bool)
    a[5:15, 5:15] = True   # 100 px
    b[5:15, 10:20] = True  # 100 px, overlap 10 x 5 = 50 px
    # Dice = 2*50/(100+100) = 0.5; IoU = 50/(100+100-50) = 1/3.
    assert M.dice(a, b) == pytest.approx(0.5, abs=1e-15)
    assert M.iou(a, b) == pytest.approx(1 / 3, abs=1e-15)
    c = np.zeros_like(a)
    c[20:30, 20:30] = True
    assert M.dice(a, c) == 0.0 and M.iou(a, c) == 0.0
    assert M.dice(a, a) == 1.0 and M.iou(a, a) == 1.0
    empty = np.zeros_like(a)
    assert M.dice(empty, empty) == 1.0 and M.iou(empty, empty) == 1.0  # documented convention
    assert M.dice(empty, a) == 0.0 and M.iou(a, empty) == 0.0
    # Non-bool inputs: non-zero is foreground; 3-D masks work.
    assert M.dice(a.astype(np.uint8) * 255, b.astype(np.float32)) == pytest.approx(0.5)
    v1 = np.zeros((4, 8, 8), bool)
    v2 = np.zeros((4, 8, 8), bool)
    v1[:2] = True
    v2[1:3] = True
    assert M.dice(v1, v2) == pytest.approx(2 * 64 / 256) and M.iou(v1, v2) == pytest.approx(64 / 192)
    with pytest.raises(ValueError):
        M.dice(a, a[:-1])


def test_dice_iou_relation_random():
    rng = np.random.default_rng(4)
    for _ in range(20):
        p = rng.random((16, 16)) < rng.random()
        r = rng.random((16, 16)) < rng.random()
        d, j = M.dice(p, r), M.iou(p, r)
        assert d == pytest.approx(2 * j / (1 + j), abs=1e-12)


def test_binarize_threshold_and_otsu():
    from skimage.filters import threshold_otsu

    u8 = np.array([[0, 127, 128, 255]], np.uint8)
    # 127/255 = 0.498 <= 0.5, 128/255 = 0.502 > 0.5.
    assert M.binarize(u8).tolist() == [[False, False, True, True]]
    assert M.binarize(np.array([0.2, 0.5, 0.51])).tolist() == [False, False, True]  # strict >
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = 255
    rgb[0, 1] = (255, 0, 0)  # mean 85/255 < 0.5
    assert M.binarize(rgb, channel_axis=-1).tolist() == [[True, False], [False, False]]
    rng = np.random.default_rng(5)
    bimodal_f = np.concatenate([rng.normal(0.25, 0.05, 500), rng.normal(0.7, 0.1, 300)]).reshape(40, 20)
    assert M.otsu_threshold(bimodal_f) == pytest.approx(threshold_otsu(bimodal_f), abs=1e-12)
    bimodal_u8 = np.clip(bimodal_f * 255, 0, 255).astype(np.uint8)
    assert M.otsu_threshold(bimodal_u8) == threshold_otsu(bimodal_u8)
    assert np.array_equal(M.binarize(bimodal_f, "otsu"), bimodal_f > threshold_otsu(bimodal_f))
    assert not M.binarize(np.full((3, 3), 0.7), "otsu").any()
    with pytest.raises(ValueError):
        M.binarize(bimodal_f, "mean")


# ----------------------------------------------------------------------------------------------
# PSNR / SSIM
# ----------------------------------------------------------------------------------------------

def _pair(rng, shape, noise=0.1):
    ref = ndimage.gaussian_filter(rng.random(shape), 2)
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    pred = np.clip(ref + noise * rng.standard_normal(shape), 0, 1)
    return pred, ref


def test_psnr_against_skimage():
    from skimage.metrics import peak_signal_noise_ratio as sk_psnr

    rng = np.random.default_rng(6)
    pred, ref = _pair(rng, (40, 50))
    assert M.psnr(pred, ref, 1.0) == pytest.approx(sk_psnr(ref, pred, data_range=1.0), abs=1e-10)
    assert M.psnr(pred, ref, 2.0) == pytest.approx(sk_psnr(ref, pred, data_range=2.0), abs=1e-10)
    p8, r8 = (pred * 255).astype(np.uint8), (ref * 255).astype(np.uint8)
    assert M.psnr(p8, r8) == pytest.approx(sk_psnr(r8, p8), abs=1e-10)  # data_range from uint8 = 255
    # Hand value: MSE 0.01 at range 1 -> 10 log10(1/0.01) = 20 dB.
    assert M.psnr(np.full(4, 0.1), np.zeros(4), 1.0) == pytest.approx(20.0)
    assert M.psnr(ref, ref, 1.0) == math.inf
    with pytest.raises(ValueError):
        M.psnr(pred, ref)  # float images need data_range
    with pytest.raises(ValueError):
        M.psnr(p8.astype(np.int16), r8.astype(np.int16))  # so do signed integers (CT in HU)
    assert M.psnr(p8.astype(np.int16), r8.astype(np.int16), 255) == pytest.approx(sk_psnr(r8, p8), abs=1e-10)


@pytest.mark.parametrize(
    "shape, channel_axis",
    [((48, 48), None), ((37, 61), None), ((40, 44, 3), -1), ((3, 40, 44), 0), ((12, 20, 24), None)],
)
def test_ssim_against_skimage_defaults(shape, channel_axis):
    from skimage.metrics import structural_similarity as sk_ssim

    rng = np.random.default_rng(7)
    pred, ref = _pair(rng, shape)
    got = M.ssim(pred, ref, 1.0, channel_axis=channel_axis)
    exp = sk_ssim(ref, pred, data_range=1.0, channel_axis=channel_axis)
    assert got == pytest.approx(exp, abs=1e-6)
    assert 0.0 < got < 0.99  # a noisy image: not trivially 1


def test_ssim_uint8_options_and_full_map():
    from skimage.metrics import structural_similarity as sk_ssim

    rng = np.random.default_rng(8)
    pred, ref = _pair(rng, (50, 40), noise=0.2)
    p8, r8 = (pred * 255).astype(np.uint8), (ref * 255).astype(np.uint8)
    assert M.ssim(p8, r8) == pytest.approx(sk_ssim(r8, p8), abs=1e-6)  # data_range inferred 255
    assert M.ssim(pred, ref, 1.0, win_size=5) == pytest.approx(sk_ssim(ref, pred, data_range=1.0, win_size=5), abs=1e-6)
    kw = dict(gaussian_weights=True, use_sample_covariance=False, sigma=1.5)
    assert M.ssim(pred, ref, 1.0, **kw) == pytest.approx(sk_ssim(ref, pred, data_range=1.0, **kw), abs=1e-6)
    assert M.ssim(pred, ref, 1.0, K1=0.05, K2=0.1) == pytest.approx(
        sk_ssim(ref, pred, data_range=1.0, K1=0.05, K2=0.1), abs=1e-6)
    m, smap = M.ssim(pred, ref, 1.0, full=True)
    sk_m, sk_map = sk_ssim(ref, pred, data_range=1.0, full=True)
    assert m == pytest.approx(sk_m, abs=1e-6)
    np.testing.assert_allclose(smap, sk_map, atol=1e-6)
    assert M.ssim(ref, ref, 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.ssim(pred, ref)  # float needs data_range
    with pytest.raises(ValueError):
        M.ssim(pred[:5, :5], ref[:5, :5], 1.0)  # smaller than the 7x7 window
    with pytest.raises(ValueError):
        M.ssim(pred, ref, 1.0, win_size=6)


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------

def test_bicubic_upsample():
    from PIL import Image

    const = np.full((8, 10), 0.37, np.float32)
    up = M.bicubic_upsample(const, 4)
    assert up.shape == (32, 40) and up.dtype == np.float32
    np.testing.assert_allclose(up, 0.37, atol=1e-6)
    # Keys' cubic (a = -0.5) reproduces linear functions exactly away from the border.
    ramp = np.tile(np.arange(16, dtype=np.float32), (16, 1))  # value = column index
    up = M.bicubic_upsample(ramp, 2)
    # Output column x samples input coordinate (x + 0.5)/2 - 0.5 (pixel-centre convention).
    x = np.arange(32)
    expected = (x + 0.5) / 2 - 0.5
    np.testing.assert_allclose(up[8, 6:26], expected[6:26], atol=1e-4)
    # uint8 RGB per-channel path equals PIL's own RGB resize.
    rng = np.random.default_rng(9)
    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    mine = M.bicubic_upsample(rgb, 3)
    ref = np.asarray(Image.fromarray(rgb).resize((21, 27), Image.BICUBIC))
    assert mine.dtype == np.uint8 and np.array_equal(mine, ref)
    assert M.bicubic_upsample(rgb[..., 0], 1.5).shape == (14, 10)  # round(13.5) = 14, round(10.5) = 10


def test_identity_baseline_is_a_copy():
    a = np.arange(6.0).reshape(2, 3)
    b = M.identity_baseline(a)
    assert np.array_equal(a, b)
    b[0, 0] = 100
    assert a[0, 0] == 0


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_diagonal_and_commuting_closed_form(method):
    rng = np.random.default_rng(10)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(closed, rel=1e-9)
    # Commuting covariances (shared eigenbasis Q): same formula on the eigenvalues.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert M.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(closed, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2 = (1 - 4)^2 + (2 - 3)^2 = 10.
    assert M.frechet_distance([1.0], [[4.0]], [4.0], [[9.0]], method=method) == pytest.approx(10.0)


def test_frechet_distance_general_gaussians():
    rng = np.random.default_rng(11)
    # 2-D closed form: for a 2x2 matrix A with non-negative real eigenvalues,
    # Tr sqrt(A) = sqrt(Tr A + 2 sqrt(det A)); here A = S1 S2, det A = det S1 det S2.
    for _ in range(10):
        x, y = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
        s1, s2 = x @ x.T + 0.1 * np.eye(2), y @ y.T + 0.1 * np.eye(2)
        mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
        tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
        closed = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-9, abs=1e-12)
        assert M.frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(closed, rel=1e-7, abs=1e-10)
    # d = 10: direct float64 computation from the (real, non-negative) eigenvalues of S1 S2.
    d = 10
    x, y = rng.normal(size=(d, 2 * d)), rng.normal(size=(d, 2 * d))
    s1, s2 = x @ x.T / d, y @ y.T / d
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    ev = np.linalg.eigvals(s1 @ s2)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(ev.real))
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)
    assert M.frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(direct, rel=1e-7)
    # Symmetry and identity.
    assert M.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(direct, rel=1e-9)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_singular_covariances():
    # Rank-1 equal covariances: trace terms cancel, FD = |mu1 - mu2|^2 = 1 + 4 = 5.
    v = np.array([[1.0], [2.0], [0.0]])
    s = v @ v.T
    assert M.frechet_distance([0, 0, 0], s, [1, 2, 0], s) == pytest.approx(5.0, abs=1e-9)
    # diag(1, 0) vs diag(4, 0): (sqrt 1 - sqrt 4)^2 = 1.
    assert M.frechet_distance([0, 0], np.diag([1.0, 0.0]), [0, 0], np.diag([4.0, 0.0])) == pytest.approx(1.0, abs=1e-9)


def test_frechet_distance_from_samples_converges():
    rng = np.random.default_rng(12)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, 0.0])
    a = rng.normal(size=(3, 3))
    b = rng.normal(size=(3, 3))
    s1, s2 = a @ a.T + 0.5 * np.eye(3), b @ b.T + 0.5 * np.eye(3)
    exact = M.frechet_distance(mu1, s1, mu2, s2)
    errs = []
    for n in (500, 200_000):
        f1 = rng.multivariate_normal(mu1, s1, size=n)
        f2 = rng.multivariate_normal(mu2, s2, size=n)
        errs.append(abs(M.frechet_distance_from_features(f1, f2) - exact))
    assert errs[1] < 0.01 * exact
    assert errs[1] < errs[0]
    mu_hat, s_hat = M.gaussian_stats(f1)
    np.testing.assert_allclose(s_hat, np.cov(f1.T), rtol=1e-12)


def test_pixel_stats_extractor():
    ext = M.PixelStatsExtractor()
    assert isinstance(ext, M.FeatureExtractor)
    rng = np.random.default_rng(13)
    yy, xx = np.mgrid[0:48, 0:48]

    def smooth_batch(k):
        out = []
        for _ in range(k):
            fx, fy, ph = rng.uniform(0.05, 0.2), rng.uniform(0.05, 0.2), rng.uniform(0, 6)
            g = 127 + 100 * np.sin(fx * xx + fy * yy + ph)
            out.append(np.repeat(g[..., None], 3, -1).astype(np.uint8))
        return np.stack(out)

    def noise_batch(k):
        return rng.integers(0, 256, (k, 48, 48, 3), dtype=np.uint8)

    a1, a2, b = smooth_batch(60), smooth_batch(60), noise_batch(60)
    fa1 = ext(a1)
    assert fa1.shape == (60, ext.feature_dim) and np.isfinite(fa1).all()
    # Deterministic and batch-independent.
    np.testing.assert_array_equal(fa1, M.PixelStatsExtractor()(a1))
    np.testing.assert_array_equal(fa1[:7], ext(a1[:7]))
    # A grey [N,H,W] / [N,H,W,1] batch equals the RGB batch with equal channels.
    np.testing.assert_allclose(ext(a1[:5, ..., 0]), fa1[:5], atol=1e-12)
    np.testing.assert_allclose(ext(a1[:5, ..., :1]), fa1[:5], atol=1e-12)
    # Same distribution -> much smaller distance than a different one.
    same = M.frechet_distance_from_features(fa1, ext(a2))
    diff = M.frechet_distance_from_features(fa1, ext(b))
    assert diff > 10 * same
    # Different seed -> different projection features.
    assert not np.allclose(M.PixelStatsExtractor(seed=1)(a1[:2]), fa1[:2])
    with pytest.raises(TypeError):
        ext(a1.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------

def test_aggregate_bootstrap_ci():
    rng = np.random.default_rng(14)
    x = (rng.random(400) < 0.6).astype(float)
    out = M.aggregate(x)
    assert out["mean"] == pytest.approx(x.mean())
    assert out["n"] == 400
    assert out["ci_low"] < out["mean"] < out["ci_high"]
    # Normal-theory half-width 1.96 sqrt(p(1-p)/n) ~ 0.048; the bootstrap should be close.
    half = 1.96 * x.std() / math.sqrt(400)
    assert (out["ci_high"] - out["ci_low"]) / 2 == pytest.approx(half, rel=0.15)
    assert M.aggregate(x) == out  # fixed seed -> reproducible
    assert M.aggregate(x, seed=1)["ci_low"] != out["ci_low"] or M.aggregate(x, seed=1)["ci_high"] != out["ci_high"]
    one = M.aggregate([3.0])
    assert one["mean"] == one["ci_low"] == one["ci_high"] == 3.0
    assert math.isnan(M.aggregate([])["mean"])
    with pytest.raises(ValueError):
        M.aggregate([1.0, float("nan")])
