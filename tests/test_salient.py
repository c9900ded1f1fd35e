"""Salient tokens (t5k.salient) on hand-checked Korean sentences, and the ko_salient_span task end to end."""

import gzip

import numpy as np
import pytest

from t5k import salient
from t5k.vocab import default_vocabulary
from t5k_tasks import corpora, pipeline, pretraining

V = default_vocabulary()
SENTINEL_FLOOR = V.vocab_size - V.extra_ids

# sentence -> the salient runs, as the text of their tokens (spans keep their leading space)
HAND_CHECKED = {
    "2024년 3월 김철수가 서울에서 3,000원을 냈다.": ["2024년 3월 김철수", " 서울", " 3,000"],
    "회의는 2023.10.05 10:30에 한국은행에서 열렸다.": [" 2023.10.05 10:30", " 한국은행"],
    "BTS와 삼성전자가 15일부터 참여한다.": [" 삼성전자", " 15일"],  # Latin runs are not analysed
    "사과 3개를 샀다. 이순신은 7.": [" 3", " 이순신", " 7"],  # other units and a final period stay out
    "하나 둘 셋, 오늘은 날씨가 좋다.": [],  # Hangul numerals (NR) and common nouns are not salient
}


def salient_runs(ids, flags):
    runs, current = [], []
    for i, f in zip(ids, flags):
        if f:
            current.append(i)
        elif current:
            runs.append(V.decode(current))
            current = []
    return runs + ([V.decode(current)] if current else [])


def test_salient_tokens_on_hand_checked_sentences():
    texts = list(HAND_CHECKED)
    for text, (ids, flags) in zip(texts, salient.salient_tokens(V, texts)):
        assert ids == V.encode(text)  # the very ids of the vocabulary
        assert salient_runs(ids, flags) == HAND_CHECKED[text], text


def test_salient_span_boundaries_are_piece_boundaries():
    """A salient span starts and ends where the pre-tokenizer cuts, so no BPE token straddles it."""
    text = "지난 2019년 11월 24일 부산에서 열린 한-아세안 특별정상회의에서 문재인 대통령은 1,200만 명을 언급했다."
    runs = {p.lstrip(" ") for p in salient.morph.pieces_by_pattern(text)}
    tags = dict(zip(runs, salient.morph.piece_tags(list(runs))))
    spans = salient.salient_char_spans(text, tags)
    bounds = set(np.cumsum([0] + [len(p) for p in V.pieces([text])[0]]).tolist())
    assert spans and all(a in bounds and b in bounds for a, b in spans)
    # out of context the analyser tags a lone 만 (10^4) NNP: the number keeps its unit here
    assert [text[a:b] for a, b in spans] == [" 2019년 11월 24일 부산", "아세안", " 문재인", " 1,200만"]


def test_salient_tokens_need_a_morph_bbpe_vocabulary():
    with pytest.raises(ValueError, match="morph_bbpe"):
        salient.salient_tokens(object(), ["서울"])


def merge(inputs, targets):
    """The original tokens and the noise mask of a sentinel-corrupted example."""
    spans, current = {}, None
    for t in targets:
        if t >= SENTINEL_FLOOR:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    tokens, mask = [], []
    for t in inputs:
        filled = spans[t] if t >= SENTINEL_FLOOR else [t]
        tokens += filled
        mask += [t >= SENTINEL_FLOOR] * len(filled)
    return tokens, mask


def test_salient_span_task_masks_salient_tokens_and_merges_back(tmp_path, monkeypatch):
    monkeypatch.setenv("T5K_CACHE_DIR", str(tmp_path / "cache"))
    docs = ["2024년 3월 김철수가 서울에서 3,000원을 냈다.\n한국은행은 15일 기준금리를 동결했다.",
            "이순신은 1592년 한산도에서 싸웠다.\n부산과 대구는 2시간 거리다.",
            "삼성전자가 2023.10.05에 발표했다. 세종대왕은 한글을 만들었다."] * 4
    path = tmp_path / "prose.txt.gz"
    path.write_bytes(gzip.compress("\n\n".join(f"{d} {n}" for n, d in enumerate(docs)).encode()))
    source = corpora.SalientDocumentSource(lambda: [path], V, name="test_salient")
    name = "test_ko_salient_span"
    pretraining.seqio.TaskRegistry.remove(name)
    pretraining.register(name, pretraining.denoise.salient_span_masking, source=source,
                         keys=("targets", "salient_mask"))
    lengths = {"inputs": 32, "targets": 12}
    examples = list(pipeline.get_dataset(name, lengths, shuffle=False).as_numpy_iterator())
    train = [d.text for d in source.documents()["train"]]
    expected = [t for ids in V.encode_batch(train) for t in ids]
    merged, masked = [], []
    for ex in examples:
        assert len(ex["targets"]) <= lengths["targets"] and ex["targets"][-1] == 1  # EOS, nothing trimmed
        tokens, mask = merge(ex["inputs"][:-1], ex["targets"][:-1])
        assert len(tokens) <= lengths["inputs"] - 1
        assert all(ex["salient_mask"][mask]), "only salient tokens are masked"
        merged += tokens
        masked += [t for t, m in zip(tokens, mask) if m]
    assert merged == expected  # one pass in file order: the chunks tile the corpus, none dropped
    masked_text = V.decode(masked)
    for word in ("김철수", "한국은행", "이순신", "1592년", "세종"):  # 세종대왕 -> 세종/NNP 대왕/NNG
        assert word in masked_text
    assert "기준금리" not in masked_text and "냈다" not in masked_text
