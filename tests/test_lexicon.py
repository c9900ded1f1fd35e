"""t5k.morph lexicon (saved run -> morpheme cuts): exact against live Kiwi, exact ids, versioning, bad files, CLI."""

import gzip
import logging
import re
from pathlib import Path

import pytest

from t5k import cli, morph, vocab

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHIPPED_LEXICON = vocab.DEFAULT_DIR / vocab.LEXICON_FILE
OTHER_VERSION = "kiwipiepy 0.0.0 (kiwipiepy-model 0.0.0)"


def _held_out_lines(n=300):
    """Real lines the shipped vocabulary never saw: every 20th wikinews line (bench/vocab.py export holds them out)
    and NSMC test-set reviews (train.txt takes its reviews from the raw review dump)."""
    if not DATA.exists():
        pytest.skip(f"{DATA} not found")
    news = [l for l in (DATA / "boddari/wikinews.txt").read_text(encoding="utf-8").splitlines() if l.strip()][::20]
    with gzip.open(DATA / "nsmc/ratings_test.txt.gz", "rt", encoding="utf-8") as f:
        reviews = [line.split("\t")[1] for _, line in zip(range(n // 2 + 1), f)][1:]
    return news[: n // 2] + reviews


def test_shipped_lexicon_is_listed_and_matches_live_analysis():
    meta = vocab.read_meta(vocab.DEFAULT_DIR)["lexicon"]
    lexicon = morph.read_lexicon(SHIPPED_LEXICON)
    assert meta["file"] == vocab.LEXICON_FILE and meta["runs"] == len(lexicon) > 100_000
    assert lexicon.analyser == meta["analyser"] == morph.analyser_version()
    assert meta["command"].startswith("t5k vocab lexicon")
    runs = sorted(lexicon.entries)[::500]  # ~360 runs spread over the sorted file
    live = morph.analyse_runs(runs)
    assert {r: lexicon.entries[r] for r in runs} == live


def test_encode_with_lexicon_equals_live_analysis_on_held_out_text():
    lines = _held_out_lines()
    with_lexicon = vocab.BPEVocabulary(vocab.DEFAULT_DIR)
    live = vocab.BPEVocabulary(vocab.DEFAULT_DIR, use_lexicon=False)
    assert with_lexicon.encode_batch(lines) == live.encode_batch(lines)
    assert with_lexicon.pieces(lines) == live.pieces(lines)
    # both layers were exercised: runs found in the lexicon and runs Kiwi had to analyse
    runs = morph.count_runs(lines)
    in_lexicon = sum(r in with_lexicon._splitter.lexicon_entries() for r in runs)
    assert 0.3 * len(runs) < in_lexicon < len(runs)
    assert live._splitter.lexicon_entries() == {}


def test_analysing_in_the_calling_thread_gives_the_same_ids():
    """T5K_KIWI_THREADS=0 (process pools: each process analyses in its own thread) changes where Kiwi runs, never
    the cuts: a fresh process with it encodes held-out text to the same ids, lexicon off so every run is analysed."""
    import json
    import os
    import subprocess
    import sys

    lines = _held_out_lines(120)
    script = ("import json, sys\nfrom t5k import morph, vocab\n"
              "v = vocab.BPEVocabulary(vocab.DEFAULT_DIR, use_lexicon=False)\n"
              "print(json.dumps([morph.analyser_threads(), v.encode_batch(json.load(sys.stdin))]))\n")
    env = dict(os.environ, T5K_KIWI_THREADS="0")
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(lines), env=env, capture_output=True,
                         text=True, check=True).stdout
    threads, ids = json.loads(out.splitlines()[-1])
    assert threads == 0 and morph.analyser_threads() == -1  # the test process keeps the default workers
    assert ids == vocab.BPEVocabulary(vocab.DEFAULT_DIR, use_lexicon=False).encode_batch(lines)


@pytest.mark.parametrize("value", ["none", "-2", "1.5"])
def test_a_bad_analyser_thread_count_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("T5K_KIWI_THREADS", value)
    morph.analyser_threads.cache_clear()
    try:
        with pytest.raises(ValueError, match=f"T5K_KIWI_THREADS={value!r}: expected -1"):
            morph.analyser_threads()
    finally:
        monkeypatch.delenv("T5K_KIWI_THREADS")
        morph.analyser_threads.cache_clear()
        assert morph.analyser_threads() == -1


def test_write_read_round_trip_is_exact_and_deterministic(tmp_path):
    entries = {"마감이": (2,), "안돼서": (1,), "가": (), "AR이모지": (2, 4, 4), "옆부분이": (1, 3)}
    first = morph.write_lexicon(tmp_path / "a.tsv.gz", entries)
    second = morph.write_lexicon(tmp_path / "b.tsv.gz", dict(reversed(entries.items())))
    lexicon = morph.read_lexicon(first)
    assert lexicon.entries == entries and lexicon.analyser == morph.analyser_version()
    assert first.read_bytes() == second.read_bytes()
    assert gzip.decompress(first.read_bytes()).decode().splitlines()[1:3] == ["AR이모지\t2,4,4", "가\t"]


def test_lexicon_is_used_and_survives_cache_swaps(tmp_path, monkeypatch):
    """A planted (wrong) entry shows that lookups go cache -> lexicon -> Kiwi, also after the cache was swapped."""
    path = morph.write_lexicon(tmp_path / "l.tsv.gz", {"마감이": (1,)})
    monkeypatch.setattr(morph, "_CACHE_LIMIT", 3)
    splitter = morph.MorphSplitter(path)
    for text in ("마감이", "잘 안돼서 옆부분이 안맞은게", "불편했고 흰색이라", "마감이 좋다"):
        splitter.split(text)
    assert splitter.split("마감이") == ["마", "감이"]
    assert morph.MorphSplitter().split("마감이") == ["마감", "이"]


def test_other_analyser_version_warns_once_and_is_not_used(tmp_path, caplog):
    path = morph.write_lexicon(tmp_path / "old.tsv.gz", {"마감이": (1,)}, analyser=OTHER_VERSION)
    splitter = morph.MorphSplitter(path)
    with caplog.at_level(logging.WARNING, logger="t5k.morph"):
        assert splitter.split("마감이") == ["마감", "이"]
        assert splitter.split("잘 안돼서") == morph.MorphSplitter().split("잘 안돼서")
        morph.MorphSplitter(path).split("흰색이라")
    warnings = [r.getMessage() for r in caplog.records if "lexicon recorded with" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0] and OTHER_VERSION in warnings[0]


@pytest.mark.parametrize("body, line, what", [
    ("마감이\t2\n안돼서 1\n", 3, "expected RUN<TAB>CUT"),
    ("마감이\t2\n안돼서\t1,x\n", 3, "not comma-separated"),
    ("마감이\t3\n", 2, "inside '마감이'"),
    ("마감이\t2,1\n", 2, "non-decreasing"),
    ("마감이\t2", 2, "not terminated"),
])
def test_corrupt_lexicon_names_file_and_line(tmp_path, body, line, what):
    path = tmp_path / "bad.tsv.gz"
    path.write_bytes(gzip.compress(f"#{morph.LEXICON_FORMAT}\t{morph.analyser_version()}\n{body}".encode()))
    with pytest.raises(morph.LexiconError, match=f"{re.escape(str(path))}:{line}: .*{re.escape(what)}"):
        morph.read_lexicon(path)
    with pytest.raises(morph.LexiconError, match=f"{re.escape(str(path))}:{line}:"):  # lazily, on the first cache miss
        morph.MorphSplitter(path).split("마감이")
    path.write_bytes(gzip.compress(b"run\t1\n"))
    with pytest.raises(morph.LexiconError, match=f"{re.escape(str(path))}:1: expected the header"):
        morph.read_lexicon(path)


def test_train_writes_lexicon_and_cli_replaces_it_without_touching_the_tokenizer(tmp_path, capsys):
    text = tmp_path / "train.txt"
    text.write_text("\n".join(_held_out_lines(200) * 2) + "\n", encoding="utf-8")
    out = vocab.train([text], 700, "morph_bbpe", tmp_path / "v", extra_ids=100, min_frequency=1, lexicon_min_count=3)
    counts = morph.count_runs(text.read_text(encoding="utf-8").splitlines())
    entries = morph.read_lexicon(out / vocab.LEXICON_FILE).entries
    assert set(entries) == {r for r, n in counts.items() if n >= 3}
    assert entries == morph.analyse_runs(sorted(entries))
    assert vocab.read_meta(out)["lexicon"]["min_count"] == 3
    tokenizer = (out / "tokenizer.json").read_bytes()
    status = cli.main(["vocab", "lexicon", "--vocab", str(out), "--input", str(text), "--min_count", "4"])
    assert status == 0, capsys.readouterr().err
    meta = vocab.read_meta(out)
    assert meta["lexicon"]["min_count"] == 4 and meta["lexicon"]["runs"] == sum(n >= 4 for n in counts.values())
    assert (out / "tokenizer.json").read_bytes() == tokenizer
    assert vocab.train([text], 700, "bbpe", tmp_path / "b", extra_ids=100, min_frequency=1).joinpath(
        vocab.LEXICON_FILE).exists() is False
    status = cli.main(["vocab", "lexicon", "--vocab", str(tmp_path / "b"), "--input", str(text)])
    assert status == 2 and "has no morpheme cuts" in capsys.readouterr().err
