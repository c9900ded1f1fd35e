"""Metrics on hand-computed examples (Korean EM/F1, ROUGE on Hangul, correlations, BLEU)."""

import math

import pytest

from t5k import metrics


def test_accuracy_and_macro_f1_by_hand():
    targets = [0, 0, 0, 1, 1, 2]
    predictions = [0, 0, 1, 1, 2, 2]
    assert metrics.accuracy(targets, predictions)["accuracy"] == pytest.approx(400 / 6)
    # label 0: tp 2 fp 0 fn 1 -> 4/5; label 1: tp 1 fp 1 fn 1 -> 1/2; label 2: tp 1 fp 1 fn 0 -> 2/3
    assert metrics.macro_f1(targets, predictions)["macro_f1"] == pytest.approx(100 * (0.8 + 0.5 + 2 / 3) / 3)
    assert metrics.macro_f1(["긍정", "부정"], ["긍정", -1])["macro_f1"] == pytest.approx(50.0)


def test_pearson_spearman_by_hand():
    t, p = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    # centred: t = [-1.5 -.5 .5 1.5], p = [-1.5 .5 -.5 1.5]; sum tp = 2.25 - .25 - .25 + 2.25 = 4; sum t^2 = 5
    assert metrics.pearson(t, p)["pearson"] == pytest.approx(0.8)
    assert metrics.spearman(t, p)["spearman"] == pytest.approx(0.8)
    # ties: ranks of [1, 1, 2] are [1.5, 1.5, 3]
    assert metrics.spearman([1, 1, 2], [0.1, 0.2, 0.3])["spearman"] == pytest.approx(math.sqrt(3) / 2)
    assert metrics.spearman([1, 2, 3], [3, 2, 1])["spearman"] == pytest.approx(-1.0)


def test_korean_exact_match_and_f1_by_hand():
    # Spacing and punctuation do not matter for EM.
    assert metrics.exact_match_score("1989년 2월 15일", "1989년2월 15일.") == 1.0
    assert metrics.exact_match_score("서울", "서울에서") == 0.0
    # Character F1: gold 1989년2월15일 (10 chars), prediction + 에 (11 chars), 10 common -> 2 * 10/11 * 1 / (21/11)
    assert metrics.f1_score("1989년 2월 15일", "1989년 2월 15일에") == pytest.approx(20 / 21)
    # 서울 vs 서울에서: P = 2/4, R = 1 -> 2/3 (word-level F1 would give 0)
    assert metrics.f1_score("서울", "서울에서") == pytest.approx(2 / 3)
    # Full-width and NFD jamo normalise to the same string.
    assert metrics.exact_match_score("ＫＢＳ 한국", "kbs 한국") == 1.0
    assert metrics.exact_match_score("한국", "\u1112\u1161\u11ab\u1100\u116e\u11a8") == 1.0
    # Several gold answers: the best counts.
    out = metrics.squad([["임종석", "임종석 의원"], "1950년"], ["임종석 의원", "1951년"])
    assert out["em"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(100 * (1 + 4 / 5) / 2)  # 1950년 vs 1951년: 4 of 5 characters


def test_rouge_keeps_hangul_by_hand():
    assert metrics.rouge_tokens("삼성전자, 2분기 영업익 8조!") == ["삼성전자", "2", "분기", "영업익", "8", "조"]
    target, prediction = "한강 공원 화재로 차량 11대 불에 타", "한강 공원 주차장 화재로 차량 불에 타"
    # target tokens: 한강 공원 화재로 차량 11 대 불에 타 (8); prediction: 한강 공원 주차장 화재로 차량 불에 타 (7)
    # unigram overlap 6 -> P 6/7, R 6/8 -> F = 2*6/(7+8) = 0.8
    # bigrams: target 7, prediction 6, common (한강 공원)(화재로 차량)(불에 타) = 3 -> F = 2*3/13
    # LCS: 한강 공원 화재로 차량 불에 타 = 6 -> F = 0.8
    scores = metrics.rouge([target], [prediction])
    assert scores["rouge1"] == pytest.approx(80.0)
    assert scores["rouge2"] == pytest.approx(100 * 6 / 13)
    assert scores["rougeL"] == pytest.approx(80.0)
    assert metrics.rouge(["완전히 같은 문장"], ["완전히 같은 문장"])["rouge2"] == pytest.approx(100.0)
    assert metrics.rouge(["가나"], ["다라"])["rouge1"] == 0.0


def test_bleu_tokenizations():
    refs = ["The cat sat on the mat.", "한국어 문장을 번역했다."]
    assert metrics.bleu(refs, refs)["bleu"] == pytest.approx(100.0)
    multi = metrics.bleu_multi(["한국어 문장을 번역했다"], ["한국어 문장을 번역하였다"])
    assert set(multi) == {"bleu_13a", "bleu_intl", "bleu_char"}
    # Character BLEU gives partial credit to the morphological variant that word BLEU scores low.
    assert multi["bleu_char"] > multi["bleu_13a"]


def test_no_examples_score_zero_in_every_metric():
    assert metrics.bleu([], []) == {"bleu": 0.0}
    assert metrics.bleu_multi([], []) == {"bleu_13a": 0.0, "bleu_intl": 0.0, "bleu_char": 0.0}
    assert metrics.accuracy([], [])["accuracy"] == 0.0 and metrics.squad([], []) == {"em": 0.0, "f1": 0.0}
    assert set(metrics.rouge([], []).values()) == {0.0}


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        metrics.accuracy([1, 2], [1])
