"""Corpus cleaning (HyperCLOVA's refinement): MinHash estimates match exact Jaccard within their standard error,
planted near duplicates of real documents are found and distinct ones kept, identifiers become placeholders while
dates and prices stay, each quality rule rejects its case and real prose passes, and `t5k corpus clean` writes a
corpus the pre-training reader reads back exactly."""

import gzip
import json
import os

import numpy as np
import pytest

from t5k import cli
from t5k_tasks import corpora, dedup, deidentify, quality


@pytest.fixture(scope="module")
def news():
    return [d.text for d in corpora.read_documents(corpora.PROSE_FILES["wikinews"]) if len(d.text) > 400]


def _edit(text: str, rng, share: float) -> str:
    """`text` with about `share` of its characters replaced by other Hangul syllables."""
    chars = list(text)
    for i in rng.choice(len(chars), int(share * len(chars)), replace=False):
        chars[i] = chr(0xAC00 + int(rng.integers(0, 11172)))
    return "".join(chars)


def test_minhash_estimates_the_exact_jaccard(news):
    rng = np.random.default_rng(0)
    hasher = dedup.MinHasher(num_perm=128)
    errors = []
    for text in news[:40]:
        other = _edit(text, rng, float(rng.uniform(0.0, 0.08)))
        exact = dedup.jaccard(text, other)
        estimate = dedup.estimated_jaccard(hasher.signature(text), hasher.signature(other))
        errors.append(estimate - exact)
    errors = np.abs(errors)
    assert errors.max() < 0.15 and errors.mean() < 0.05, errors  # sd sqrt(J(1-J)/128) <= 0.044


def test_planted_near_duplicates_are_found_and_distinct_documents_kept(news):
    rng = np.random.default_rng(1)
    originals = news[:150]
    planted = [_edit(text, rng, 0.01) for text in originals[:20]]  # one character in a hundred changed
    assert min(dedup.jaccard(a, b) for a, b in zip(originals, planted)) > 0.85
    unrelated = _edit(originals[30], rng, 0.3)  # too far from its source to count
    assert dedup.jaccard(originals[30], unrelated) < 0.3
    near = dedup.NearDuplicateFilter(threshold=0.8)
    assert [near.check(text) for text in originals] == [None] * 150  # the real documents are distinct
    flagged = [near.check(text) for text in planted]
    assert [f[0] for f in flagged] == list(range(20)) and all(f[1] >= 0.8 for f in flagged)
    assert near.check(unrelated) is None


@pytest.mark.parametrize("text, expected, kinds", [
    ("주민등록번호 900101-1234567 입니다", "주민등록번호 <주민번호> 입니다", {"rrn": 1}),
    ("카드 1234-5678-9012-3456 결제", "카드 <카드번호> 결제", {"card": 1}),
    ("메일은 hong.gildong@example.co.kr 로", "메일은 <이메일> 로", {"email": 1}),
    ("010-1234-5678, 02-123-4567, 031)123-4567, +82 10 1234 5678, 01012345678",
     "<전화번호>, <전화번호>, <전화번호>, <전화번호>, <전화번호>", {"phone": 5}),
    ("입금계좌: 신한 110-123-456789 입니다", "입금계좌: 신한 <계좌번호> 입니다", {"account": 1}),
    ("서버 192.168.0.1 접속", "서버 <IP주소> 접속", {"ip": 1}),
    ("2021-05-23 행사, 12,000원, 1998년, 3.14, 버전 1.2.3.4.5, ISBN 978-89-364-3727-9, 010-1234-5678-9",
     "2021-05-23 행사, 12,000원, 1998년, 3.14, 버전 1.2.3.4.5, ISBN 978-89-364-3727-9, 010-1234-5678-9", {}),
    ("번호 123-45-67890 (사업자)", "번호 123-45-67890 (사업자)", {}),  # no announcing word: not an account
])
def test_identifiers_become_placeholders(text, expected, kinds):
    out, counts = deidentify.deidentify(text)
    assert out == expected and dict(counts) == kinds


def test_each_quality_rule_rejects_its_case_and_real_prose_passes():
    rules = quality.QualityRules()
    prose = "오늘은 날씨가 맑아서 공원에 산책을 나갔다. 나무 아래에서 책을 읽으며 오후를 보냈다. " * 2
    assert rules.reject(prose) is None
    cases = {
        "too_short": "짧은 글입니다.",
        "not_text": "12345 67890 " * 20 + "표",
        "word_list": "\n".join(["사과 배", "포도", "귤 한라봉", "수박 참외", "딸기", "바나나", "키위", "망고", "자두"] * 3),
        "repetitive": "대박 " * 40 + prose,
        "profanity": prose + " 씨발 이게 뭐야 병신같이",
        "promotional": prose + " 최저가 특가 할인 이벤트! 카톡 문의 010-1234-5678",
    }
    for rule, text in cases.items():
        assert rules.reject(text) == rule, rule
    assert rules.reject(prose + " 시발점과 허리띠를 졸라매다") is None  # words that merely contain a lexicon entry
    for name, path in corpora.PROSE_FILES.items():
        texts = [d.text for d in corpora.read_documents(path) if len(d.text.replace(" ", "")) >= 50]
        kept = sum(rules.reject(text) is None for text in texts)
        assert kept >= 0.98 * len(texts), (name, kept, len(texts))


def test_corpus_clean_writes_what_the_pretraining_reader_reads(tmp_path, news, capsys):
    rng = np.random.default_rng(2)
    prose = news[:30]
    crawl = prose + [
        prose[3],  # exact
        _edit(prose[4], rng, 0.01),  # near
        news[40] + "\n연락처 010-9876-5432 / hong@example.com",  # PII, kept
        "최저가 특가 할인 이벤트 진행 중입니다. 지금 바로 카톡 문의 주세요. 상담 무료! 010-1111-2222 " * 2,
        "짧다",
    ]
    source = tmp_path / "crawl.jsonl.gz"
    with gzip.open(source, "wt", encoding="utf-8") as f:
        for text in crawl:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    out = tmp_path / "clean" / "corpus.txt.gz"
    assert cli.main(["corpus", "clean", f"--input={source}", f"--out={out}"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == {"documents": 35, "kept": 31, "rejected": {"promotional": 1, "too_short": 1},
                      "exact_duplicates": 1, "near_duplicates": 1, "identifiers": {"phone": 1, "email": 1}}
    assert json.loads((tmp_path / "clean" / "corpus.txt.gz.report.json").read_text()) == report
    read = [d.text for d in corpora.read_documents(out)]
    expected = ["\n".join(line for line in text.splitlines() if line.strip()) for text in prose + [news[40]]]
    expected[-1] += "\n연락처 <전화번호> / <이메일>"
    assert read == expected
    assert sorted(os.listdir(out.parent)) == ["corpus.txt.gz", "corpus.txt.gz.report.json"]  # no temporary left
    assert cli.main(["corpus", "clean", f"--input={tmp_path / 'missing.txt'}", f"--out={out}"]) == 2
    assert capsys.readouterr().err.strip() == f"t5k corpus: --input {tmp_path / 'missing.txt'}: no such file"
