"""Metrics of the t5k tasks, seqio style: ``metric(targets, predictions) -> {name: value}`` (values in %, except
correlations), with Korean-aware normalisation and tokenisation.

* Classification: `accuracy`, `macro_f1` (labels compared as given; unparsable predictions count as wrong).
* Regression (STS): `pearson`, `spearman` (average ranks for ties), on floats; `sts_metrics` does both.
* QA: `squad` -> exact match and F1 over *characters* after `normalize_answer` (as KorQuAD's official script:
  word-level F1 punishes Korean particles, "서울" vs "서울에서"). Several gold answers: the best one counts.
* Generation: `bleu` (sacrebleu; `tokenize` "13a", "intl", "char", or "morph" = Kiwi morphemes),
  `bleu_multi` (several tokenisations side by side), `rouge` (ROUGE-1/2/L F1 over `rouge_tokens`, which keeps
  Hangul: the usual ROUGE tokenizer replaces every non-[a-z0-9] character by a space and so scores Korean as empty).
"""

import collections
import math
import re
import unicodedata
from typing import Callable, Dict, List, Sequence, Union

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# Normalisation and tokenisation
# ----------------------------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """NFC (Hangul jamo -> syllables; NFKC would also fold full-width forms, which we do too via width mapping),
    lower case, punctuation (Unicode category P*) and symbols S* removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return " ".join(text.split())


def normalize_answer(text: str) -> str:
    """`normalize_text` then English articles removed (KorQuAD keeps SQuAD's rule for Latin text)."""
    return " ".join(w for w in normalize_text(text).split() if w not in ("a", "an", "the"))


_WORD = re.compile(r"[0-9a-z]+|[\uac00-\ud7a3\u3131-\u318e\u1100-\u11ff]+|[^\W\d_a-z]+", re.UNICODE)


def rouge_tokens(text: str) -> List[str]:
    """Lower-cased runs of Latin letters/digits, of Hangul (syllables and jamo) and of other letters; punctuation
    and symbols are dropped. "삼성전자, 2분기 영업익 8조!" -> ["삼성전자", "2", "분기", "영업익", "8", "조"]."""
    return _WORD.findall(unicodedata.normalize("NFKC", str(text)).lower())


_kiwi = None


def morph_tokens(text: str) -> List[str]:
    """Kiwi morpheme surface forms (lazy, optional kiwipiepy)."""
    global _kiwi
    if _kiwi is None:
        from kiwipiepy import Kiwi

        _kiwi = Kiwi()
    return [t.form for t in _kiwi.tokenize(str(text))]


# ----------------------------------------------------------------------------------------------------------
# Classification and regression
# ----------------------------------------------------------------------------------------------------------


def accuracy(targets: Sequence, predictions: Sequence) -> Dict[str, float]:
    _check(targets, predictions)
    correct = sum(t == p for t, p in zip(targets, predictions))
    return {"accuracy": 100.0 * correct / max(len(targets), 1)}


def macro_f1(targets: Sequence, predictions: Sequence) -> Dict[str, float]:
    """Mean over the gold labels of the per-label F1 (a label never predicted and never gold is not counted)."""
    _check(targets, predictions)
    labels = sorted(set(targets), key=str)
    scores = []
    for label in labels:
        tp = sum(t == label and p == label for t, p in zip(targets, predictions))
        fp = sum(t != label and p == label for t, p in zip(targets, predictions))
        fn = sum(t == label and p != label for t, p in zip(targets, predictions))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"macro_f1": 100.0 * float(np.mean(scores)) if scores else 0.0}


def classification_metrics(targets, predictions):
    return {**accuracy(targets, predictions), **macro_f1(targets, predictions)}


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator else 0.0


def _floats(values) -> np.ndarray:
    out = np.array([float(v) if v is not None else np.nan for v in values], np.float64)
    return np.nan_to_num(out, nan=0.0)  # unparsable predictions score as 0 (counted, not dropped)


def pearson(targets, predictions) -> Dict[str, float]:
    _check(targets, predictions)
    return {"pearson": _corr(_floats(targets), _floats(predictions))}


def spearman(targets, predictions) -> Dict[str, float]:
    _check(targets, predictions)
    return {"spearman": _corr(_ranks(_floats(targets)), _ranks(_floats(predictions)))}


def sts_metrics(targets, predictions):
    return {**pearson(targets, predictions), **spearman(targets, predictions)}


# ----------------------------------------------------------------------------------------------------------
# Question answering
# ----------------------------------------------------------------------------------------------------------


def exact_match_score(target: str, prediction: str) -> float:
    """Equal after normalisation, spaces ignored (Korean spacing varies: "1989년 2월" == "1989년2월")."""
    return float(normalize_answer(target).replace(" ", "") == normalize_answer(prediction).replace(" ", ""))


def f1_score(target: str, prediction: str) -> float:
    """Character-level F1 of the normalised strings without spaces (KorQuAD 1.0's official F1)."""
    t = list(normalize_answer(target).replace(" ", ""))
    p = list(normalize_answer(prediction).replace(" ", ""))
    common = sum((collections.Counter(t) & collections.Counter(p)).values())
    if not t or not p:
        return float(t == p)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Union[str, Sequence[str]]], predictions: Sequence[str]) -> Dict[str, float]:
    """{"em", "f1"} in %, each example scored against its best gold answer."""
    _check(targets, predictions)
    em = f1 = 0.0
    for gold, prediction in zip(targets, predictions):
        answers = [gold] if isinstance(gold, str) else list(gold)
        em += max(exact_match_score(a, prediction) for a in answers)
        f1 += max(f1_score(a, prediction) for a in answers)
    n = max(len(targets), 1)
    return {"em": 100.0 * em / n, "f1": 100.0 * f1 / n}


# ----------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------


def bleu(targets: Sequence[Union[str, Sequence[str]]], predictions: Sequence[str], tokenize: str = "13a") -> Dict:
    """Corpus BLEU (sacrebleu). `tokenize`: a sacrebleu tokenizer ("13a", "intl", "char", "none", ...) or
    "morph" (Kiwi morphemes joined by spaces, then no further tokenisation)."""
    import sacrebleu

    _check(targets, predictions)
    if not targets:  # like the other metrics on no examples (sacrebleu itself fails on empty streams)
        return {"bleu": 0.0}
    refs = [[t] if isinstance(t, str) else list(t) for t in targets]
    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(width)]
    preds = list(predictions)
    if tokenize == "morph":
        streams = [[" ".join(morph_tokens(x)) for x in s] for s in streams]
        preds = [" ".join(morph_tokens(x)) for x in preds]
        tokenize = "none"
    result = sacrebleu.corpus_bleu(preds, streams, tokenize=tokenize)
    return {"bleu": float(result.score)}


def bleu_multi(targets, predictions, tokenizers: Sequence[str] = ("13a", "intl", "char")) -> Dict[str, float]:
    """BLEU under several tokenisations: {"bleu_13a", "bleu_intl", "bleu_char", ...}."""
    return {f"bleu_{t}": bleu(targets, predictions, t)["bleu"] for t in tokenizers}


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _f(overlap: float, n_pred: int, n_ref: int) -> float:
    if not n_pred or not n_ref or not overlap:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_scores(target: str, prediction: str, tokenizer: Callable[[str], List[str]] = rouge_tokens) -> Dict:
    """ROUGE-1/2/L F1 (fractions) of one pair."""
    t, p = tokenizer(target), tokenizer(prediction)
    out = {}
    for n in (1, 2):
        tn, pn = _ngrams(t, n), _ngrams(p, n)
        out[f"rouge{n}"] = _f(sum((tn & pn).values()), sum(pn.values()), sum(tn.values()))
    out["rougeL"] = _f(_lcs(t, p), len(p), len(t))
    return out


def rouge(targets: Sequence[str], predictions: Sequence[str], tokenizer: Union[str, Callable] = "hangul") -> Dict:
    """Mean ROUGE-1/2/L F1 in %. tokenizer: "hangul" (`rouge_tokens`), "morph" (Kiwi) or a callable."""
    _check(targets, predictions)
    fn = {"hangul": rouge_tokens, "morph": morph_tokens}.get(tokenizer, tokenizer)
    sums = collections.Counter()
    for t, p in zip(targets, predictions):
        sums.update(rouge_scores(t, p, fn))
    n = max(len(targets), 1)
    return {k: 100.0 * sums[k] / n for k in ("rouge1", "rouge2", "rougeL")}


def _check(targets, predictions):
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
