"""t5k_tasks: readers on bad input, sources, span corruption lengths, determinism and resume, mixture rates,
feature conversion, downstream tasks, CLI."""

import gzip
import inspect
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import seqio
import tensorflow as tf

import t5k_tasks
from t5k import feature_converters
from t5k.preprocessors import dialog as dialog_preprocessors
from t5k_tasks import corpora, mixtures

ROOT = Path(__file__).resolve().parent.parent

SHARED = corpora.shared_data_dir()
needs_shared = pytest.mark.skipif(not (SHARED / "nsmc").exists(), reason="../shared/data (T5K_DATA_DIR) absent")
SMALL = {"inputs": 128, "targets": 32}


# ----------------------------------------------------------------------------------------------------------
# Embedded data
# ----------------------------------------------------------------------------------------------------------


def test_embedded_data_found_relative_to_the_package():
    files = list(corpora.PROSE_FILES.values()) + list(corpora.SESSION_FILES.values()) + [corpora.WIKINEWS_CSV]
    assert all(f.exists() and f.is_relative_to(Path(t5k_tasks.__file__).parent) for f in files)
    total = sum(f.stat().st_size for f in (corpora.EMBEDDED_DIR).rglob("*") if f.is_file())
    assert total < 6_000_000
    notice = (corpora.PACKAGE_DIR / "NOTICE.md").read_text(encoding="utf-8")
    for needle in ("CC BY 2.5", "NLPlab-skku", "CAiRE", "fairytale01_SOURCES.md"):
        assert needle in notice


# ----------------------------------------------------------------------------------------------------------
# Bad input: skipped, counted, logged with file and line; never a crash or a silent change
# ----------------------------------------------------------------------------------------------------------


def test_a_corpus_without_usable_documents_is_a_named_error(tmp_path, capsys):
    """One line per file is a document-per-line corpus, not the blank-line separated .txt format: the whole file
    is one over-long document, skipped. No document left is an error naming the files and the formats (before,
    `tasks show` printed nothing with rc 0 and `t5k train` ended in a StopIteration traceback)."""
    from t5k import cli

    path = tmp_path / "lines.txt"
    path.write_text("".join(f"문장 {i}번은 줄마다 하나씩 적혀 있다.\n" for i in range(12000)), encoding="utf-8")
    source = corpora.DocumentSource(lambda: [path], name="t5k_test_lines")
    with pytest.raises(corpora.DataMissingError, match=r"lines.txt: 0 usable document\(s\), none in the train "
                                                       r"split .* separated by blank lines"):
        source.documents()
    assert cli.main(["tasks", "show", "ko_span_corruption", "--split", "validation", "--step", "100000"]) == 2
    assert capsys.readouterr().err.strip().endswith("ko_span_corruption has no 'validation' examples from example "
                                                    "100000 on")


def test_a_task_of_ones_own_is_found_through_a_gin_import(tmp_path, monkeypatch, capsys):
    """docs/tasks.md "A task of your own": a module registering a task, imported by a gin file, serves `t5k tasks
    show`; without the gin file the error says how to make it visible."""
    import gin

    from t5k import cli

    module = "t5k_test_own_tasks"
    (tmp_path / f"{module}.py").write_text(
        "from t5k import metrics\n"
        "from t5k_tasks.downstream import label_postprocessor, register\n"
        "def records(split):\n"
        "    return [{'inputs': f'감정: {split} 리뷰 {i}', 'targets': '긍정'} for i in range(3)]\n"
        "register('t5k_test_own', records, label_postprocessor(('부정', '긍정')), [metrics.classification_metrics],"
        " 'test')\n", encoding="utf-8")
    (tmp_path / "own.gin").write_text(f"import {module}\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert cli.main(["tasks", "show", "t5k_test_own", "-n", "5"]) == 2
        assert "a task of your own: `import` its module in a gin file" in capsys.readouterr().err
        assert cli.main(["tasks", "show", "t5k_test_own", f"--gin_file={tmp_path / 'own.gin'}", "-n", "5",
                         "--json"]) == 0
        shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        # The endless, shuffled train stream: each epoch is the 3 records in some order.
        assert len(shown) == 5 and {r["inputs"] for r in shown[:3]} == {f"감정: train 리뷰 {i}" for i in range(3)}
    finally:
        gin.clear_config()
        if "t5k_test_own" in seqio.TaskRegistry.names():
            seqio.TaskRegistry.remove("t5k_test_own")


def test_train_takes_the_corpus_binding_of_t5k_tasks_without_an_import_line(tmp_path):
    """`--gin.t5k_tasks.pretraining_files.files` works with run files that do not import t5k_tasks (the CLI
    imports it before parsing gin): a pattern matching nothing is the corpus's named error, not 'No configurable
    matching'."""
    import subprocess
    import sys

    pattern = str(tmp_path / "none" / "*.txt")
    out = subprocess.run([sys.executable, "-m", "t5k.cli", "train", "--gin_file=gin/runs/quickstart.gin",
                          f"--gin.t5k_tasks.pretraining_files.files=['{pattern}']",
                          f"--model_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == f"t5k train: pretraining file pattern {pattern!r} matches nothing"


def test_bad_prose_input_is_skipped_and_logged(tmp_path, caplog):
    path = tmp_path / "prose.txt.gz"
    body = (b"title one\nfirst paragraph.\n\n\n\n"  # several blank lines: no empty document emitted
            b"   \t\n"  # line 6: whitespace-only
            b"title two\nbad \xff byte\n\n"  # lines 7-8: non-UTF-8 -> the whole document skipped
            b"long " + b"x" * 300 + b"\n\n"  # line 10: over-long
            b"title three\nlast paragraph.\n")  # lines 12-13
    path.write_bytes(gzip.compress(body))
    with caplog.at_level(logging.WARNING, logger="t5k_tasks"):
        docs = corpora.read_text_documents(path, max_chars=100)
    assert [(d.text, d.line) for d in docs] == [("title one\nfirst paragraph.", 1), ("title three\nlast paragraph.", 12)]
    counts = corpora.SKIPPED[str(path)]
    assert sum(counts.values()) == 3 and counts["whitespace_line"] == 1
    text = caplog.text
    assert f"{path}:6: skipped whitespace-only line" in text
    assert f"{path}:7: skipped document (non_utf8: line 8" in text
    assert f"{path}:10: skipped document (too_long" in text
    assert f"{path}: kept 2 documents, skipped 3" in text

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": ""}\n{"text": "   "}\nnot json\n{"content": "also ok"}\n')
    with caplog.at_level(logging.WARNING, logger="t5k_tasks"):
        docs = corpora.read_jsonl_documents(jsonl)
    assert [d.text for d in docs] == ["ok", "also ok"]
    assert corpora.SKIPPED[str(jsonl)]["empty_document"] == 2
    assert f"{jsonl}:4: skipped document (invalid_json" in caplog.text


def test_bad_sessions_are_skipped_and_logged(tmp_path, caplog):
    path = tmp_path / "sessions.jsonl"
    good = {"id": "g", "turns": [{"speaker": "u", "text": "안녕"}, {"speaker": "s", "text": ""},
                                 {"speaker": "s", "text": "네 안녕하세요"}]}
    lines = [json.dumps(good, ensure_ascii=False).encode(),
             json.dumps({"id": "one", "turns": [{"speaker": "u", "text": "혼자"}]}).encode(),
             b'{"id": "broken", "turns": [',
             '{"id": "x", "turns": [{"speaker": "a", "text": "\ubc14'.encode() + b"\xc3\x28" + b'"}]}',
             b"   ",
             json.dumps({"id": "empty", "turns": [{"speaker": "a", "text": " "}, {"speaker": "b", "text": "응"}]}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="t5k_tasks"):
        sessions = corpora.read_sessions(path)
    assert [(s.id, s.turns) for s in sessions] == [("g", (("u", "안녕"), ("s", "네 안녕하세요")))]
    counts = corpora.SKIPPED[str(path)]
    assert counts["empty_utterance"] == 2
    assert sum(v for k, v in counts.items() if k.startswith("too_few_turns")) == 2
    assert f"{path}:1: skipped utterance 1 (empty_utterance)" in caplog.text
    assert f"{path}:2: skipped session (too_few_turns: 1)" in caplog.text
    assert f"{path}:3: skipped session (invalid_json" in caplog.text
    assert f"{path}:4: skipped session (non_utf8" in caplog.text
    assert f"{path}:5: skipped whitespace-only line" in caplog.text


def test_bad_downstream_rows_are_skipped_and_summarised(tmp_path, monkeypatch, caplog):
    """Rows the TSV reader skips and rows its task rejects both count, and the file gets its summary line."""
    from t5k_tasks import downstream

    (tmp_path / "nsmc").mkdir()
    path = tmp_path / "nsmc" / "ratings_train.txt.gz"
    path.write_bytes(gzip.compress("id\tdocument\tlabel\n1\t좋아요\t1\n2\t\t0\n".encode()
                                   + b"3\t\xff\xfe\t1\n" + "4\t별로\t2\n5\t두 칸\n6\t최고\t1\n".encode()))
    monkeypatch.setenv("T5K_DATA_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="t5k_tasks"):
        records = downstream.nsmc_records("train")
    assert [r["inputs"] for r in records] == ["nsmc 문장: 좋아요", "nsmc 문장: 최고"]
    assert f"{path}:3: skipped row (empty_document)" in caplog.text
    assert f"{path}:4: skipped row (non_utf8" in caplog.text
    assert f"{path}:5: skipped row (bad_record" in caplog.text
    assert (f"{path}: kept 2 rows, skipped 4 (bad_record: expected id, document, label 0/1: 2, empty_document: 1, "
            f"non_utf8: invalid UTF-8 byte 0xff at byte 2: 1)") in caplog.text


def test_local_corpus_selected_by_env(tmp_path, monkeypatch):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"text": "하나"}\n{"text": "둘"}\n', encoding="utf-8")
    monkeypatch.setenv("T5K_PRETRAIN_FILES", str(tmp_path / "*.jsonl"))
    assert corpora.pretraining_files() == [path]
    monkeypatch.delenv("T5K_PRETRAIN_FILES")
    assert corpora.pretraining_files() == list(corpora.PROSE_FILES.values())


# ----------------------------------------------------------------------------------------------------------
# ko_span_corruption
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [{"inputs": 512, "targets": 114}, SMALL])
def test_span_corruption_fills_the_lengths(lengths):
    ds = t5k_tasks.get_dataset("ko_span_corruption", lengths, seed=0)
    sentinel0 = seqio.get_mixture_or_task("ko_span_corruption").output_features["targets"].vocabulary.vocab_size - 1
    for ex in ds.take(6).as_numpy_iterator():
        assert len(ex["inputs"]) == lengths["inputs"] and ex["inputs"][-1] == 1
        assert len(ex["targets"]) <= lengths["targets"] and ex["targets"][0] == sentinel0
    batch = next(t5k_tasks.get_batches("ko_span_corruption", lengths, batch_size=2, seed=0))
    assert batch["encoder_input_tokens"].shape == (2, lengths["inputs"])
    assert batch["decoder_target_tokens"].shape == (2, lengths["targets"])
    assert (batch["encoder_segment_ids"] == 1).all()


def test_validation_split_is_held_out_and_finite():
    source = seqio.get_mixture_or_task("ko_span_corruption").source
    train = {d.text for d in source.documents()["train"]}
    validation = {d.text for d in source.documents()["validation"]}
    assert validation and not train & validation
    assert 0.01 < len(validation) / (len(train) + len(validation)) < 0.04
    n = sum(1 for _ in t5k_tasks.get_dataset("ko_span_corruption", SMALL, split="validation").as_numpy_iterator())
    assert n > 10


# ----------------------------------------------------------------------------------------------------------
# Determinism and resume
# ----------------------------------------------------------------------------------------------------------


def _take(name, n, read_ahead=True, **kwargs):
    """The first n batches (4 rows each). read_ahead=False turns tf.data autotuning off: the same batches, with
    less work done ahead (for on-the-fly tokenization, fewer documents analysed that the test never reads)."""
    ds = t5k_tasks.get_batches(name, kwargs.pop("lengths", SMALL), batch_size=4, as_numpy=False, **kwargs)
    if not read_ahead:
        options = tf.data.Options()
        options.autotune.enabled = False
        ds = ds.with_options(options)
    it = ds.as_numpy_iterator()
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def span_run():
    """ko_span_corruption, seed 3: the first 6 batches (shared by the determinism and CLI tests)."""
    return _take("ko_span_corruption", 6, seed=3)


def _same(a, b):
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_span_corruption_determinism_and_resume(span_run):
    run1 = span_run
    run2 = _take("ko_span_corruption", 6, seed=3)
    assert _same(run1, run2)
    assert all(b1["encoder_input_tokens"].tobytes() == b2["encoder_input_tokens"].tobytes() for b1, b2 in zip(run1, run2))
    assert "ko_span_corruption" in t5k_tasks.FIXED_LENGTH_TASKS  # resume skips chunks, before corruption
    assert _same(_take("ko_span_corruption", 3, seed=3, start_step=3), run1[3:])
    other = _take("ko_span_corruption", 2, seed=4)
    assert not np.array_equal(other[0]["encoder_input_tokens"], run1[0]["encoder_input_tokens"])
    # On-the-fly tokenization of the raw text gives the very same batches as the token cache.
    assert _same(_take("ko_span_corruption_from_text", 2, read_ahead=False, seed=3), run1[:2])


def test_endless_stream_crosses_epochs_with_new_orders():
    task = seqio.get_mixture_or_task("ko_span_corruption_fairytale")
    n = task.num_input_examples("train")
    ids = list(corpora.index_stream(n, True, 5).take(3 * n).as_numpy_iterator())
    epochs = [ids[k * n:(k + 1) * n] for k in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs) and epochs[0] != epochs[1]
    assert ids == list(corpora.index_stream(n, True, 5).take(3 * n).as_numpy_iterator())


def test_packed_dialog_task_determinism_and_resume():
    kwargs = dict(lengths={"inputs": 256, "targets": 64}, seed=1)
    run = _take("ko_dialog_partial_masking", 4, **kwargs)
    assert _same(run, _take("ko_dialog_partial_masking", 4, **kwargs))
    assert _same(_take("ko_dialog_partial_masking", 2, start_step=2, **kwargs), run[2:])
    assert run[0]["encoder_segment_ids"].shape == (4, 256)
    assert not _same(_take("ko_dialog_partial_masking", 1, lengths=kwargs["lengths"], seed=2), run[:1])


# ----------------------------------------------------------------------------------------------------------
# Mixtures
# ----------------------------------------------------------------------------------------------------------


def _register_toy_tasks():
    sizes = {"toy_a": 30, "toy_b": 300, "toy_c": 3000}
    for k, (name, n) in enumerate(sizes.items()):
        if name not in seqio.TaskRegistry.names():
            def mark(ds, k=k):  # targets = [k]: which task an example came from
                return ds.map(lambda ex: {"targets": tf.fill([1], k)})

            seqio.TaskRegistry.add(
                name, source=corpora.RecordSource(lambda split, n=n: [{"i": i} for i in range(n)]),
                preprocessors=[mark], output_features=t5k_tasks.pretraining.LM_FEATURES,
                shuffle_buffer_size=None, metric_fns=[], task_cls=t5k_tasks.pipeline.T5kTask)
    return sizes


@pytest.mark.parametrize("kind", ["equal", "proportional", "temperature"])
def test_mixture_proportions_match_rate_functions(kind):
    from scipy.stats import chisquare

    sizes = _register_toy_tasks()
    rate = {"equal": mixtures.equal_rate, "proportional": mixtures.examples_proportional(1000),
            "temperature": mixtures.temperature(2.0)}[kind]
    expected = {"equal": [1, 1, 1], "proportional": [30, 300, 1000],
                "temperature": [30 ** 0.5, 300 ** 0.5, 3000 ** 0.5]}[kind]
    tasks = [seqio.get_mixture_or_task(n) for n in sizes]
    assert [rate(t) for t in tasks] == pytest.approx(expected)
    name = f"toy_mix_{kind}"
    if name not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(name, list(sizes), default_rate=rate)
    draws = 3000
    ds = seqio.get_mixture_or_task(name).get_dataset(None, "train", seed=7, log_mixing_proportions=False)
    counts = np.zeros(3)
    for ex in ds.take(draws).as_numpy_iterator():
        counts[int(ex["targets"][0])] += 1
    probs = np.array(expected) / sum(expected)
    assert chisquare(counts, probs * draws).pvalue > 0.01


def test_registered_mixture_rates():
    mix = seqio.get_mixture_or_task("ko_pretrain")
    rates = {t.name: mix.get_rate(t) for t in mix.tasks}
    assert rates == {"ko_span_corruption_wikinews": 0.5, "ko_span_corruption_book_review": 0.3,
                     "ko_span_corruption_fairytale": 0.2}
    batch = next(t5k_tasks.get_batches("ko_pretrain", SMALL, batch_size=2, seed=0))
    assert batch["encoder_input_tokens"].shape == (2, 128)


# ----------------------------------------------------------------------------------------------------------
# Train subsets (low-data runs)
# ----------------------------------------------------------------------------------------------------------


def _register_numbered_task(n=300):
    """`toy_numbered`: a RecordSource of n records whose targets are [record number], in both splits."""
    if "toy_numbered" not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            "toy_numbered", source=corpora.RecordSource(lambda split: [{"i": i} for i in range(n)]),
            preprocessors=[lambda ds: ds.map(lambda ex: {"targets": tf.reshape(tf.cast(ex["i"], tf.int32), [1])})],
            output_features=t5k_tasks.pretraining.LM_FEATURES, shuffle_buffer_size=None, metric_fns=[],
            task_cls=t5k_tasks.pipeline.T5kTask)
    return n


def _numbers(count, **kwargs):
    ds = t5k_tasks.get_dataset("toy_numbered", {"targets": 4}, **kwargs)
    return [int(ex["targets"][0]) for ex in ds.take(count).as_numpy_iterator()]


def test_train_subset_is_fixed_by_its_seed_nested_and_shard_independent():
    n = _register_numbered_task()
    subset = corpora.subset_indices(n, 10, 0)
    assert len(subset) == 10 and len(set(subset)) == 10 and list(subset) == sorted(subset)
    run = _numbers(40, seed=1, train_examples=10)
    epochs = [run[k * 10:(k + 1) * 10] for k in range(4)]
    assert all(sorted(e) == list(subset) for e in epochs)  # every epoch is a permutation of the subset
    assert len({tuple(e) for e in epochs}) > 1
    other_seed = _numbers(10, seed=2, train_examples=10)  # the training seed orders, it does not choose
    assert sorted(other_seed) == list(subset) and other_seed != epochs[0]
    assert set(_numbers(10, seed=1, train_examples=10, subset_seed=1)) != set(subset)
    assert set(subset) < set(corpora.subset_indices(n, 100, 0))  # nested across sizes
    shards = [_numbers(5 * 3, seed=1, train_examples=10, shard_index=i, num_shards=2) for i in range(2)]
    assert set(shards[0]) | set(shards[1]) == set(subset) and not set(shards[0]) & set(shards[1])
    assert sorted(_numbers(n, seed=1, train_examples=10 * n)) == list(range(n))  # larger than the split: all
    assert sorted(_numbers(n, split="validation", train_examples=10)) == list(range(n))  # other splits whole
    with corpora.train_subset(10):
        assert seqio.get_mixture_or_task("toy_numbered").num_input_examples("train") == 10
        assert seqio.get_mixture_or_task("toy_numbered").num_input_examples("validation") == n


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_train_subset_of_a_bad_size_is_an_error(bad):
    _register_numbered_task()
    with pytest.raises(ValueError, match="train_examples: expected a positive number"):
        t5k_tasks.get_dataset("toy_numbered", {"targets": 4}, train_examples=bad)


def test_train_subset_of_a_source_that_cannot_subset_is_an_error():
    name = "toy_function_source"
    if name not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(
            lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensors({"targets": [5]}), splits=["train"]),
            preprocessors=[], output_features=t5k_tasks.pretraining.LM_FEATURES, metric_fns=[])
    with pytest.raises(ValueError, match=f"train_examples: task '{name}' reads a FunctionDataSource"):
        t5k_tasks.get_dataset(name, {"targets": 4}, train_examples=5)


def _served_items(source, **kwargs):
    with corpora.train_subset(3, subset_seed=4):
        ds = source.get_dataset("train", shuffle=True, seed=0, **kwargs)
    return list(ds.take(6).as_numpy_iterator())


def test_every_source_kind_serves_the_subset():
    """Documents (token cache and raw text), sessions and records: two epochs of a 3-item subset are exactly the
    chosen items of the split."""
    prose = seqio.get_mixture_or_task("ko_span_corruption_fairytale").source
    documents = prose.documents()["train"]
    chosen = corpora.subset_indices(len(documents), 3, 4)
    tokens, offsets = prose.tokens("train")
    want = sorted(tokens[offsets[i]:offsets[i + 1]].tobytes() for i in chosen)
    got = [ex["targets"].tobytes() for ex in _served_items(prose)]
    assert sorted(got[:3]) == want and sorted(got[3:]) == want
    raw = seqio.get_mixture_or_task("ko_span_corruption_from_text").source
    raw_documents = raw.documents()["train"]
    got = [ex["text"].decode() for ex in _served_items(raw)]
    assert sorted(got[:3]) == sorted(raw_documents[i].text for i in corpora.subset_indices(len(raw_documents), 3, 4))

    dialog = seqio.get_mixture_or_task("ko_dialog_partial_masking").source
    sessions = dialog.sessions()["train"]
    chosen = corpora.subset_indices(len(sessions), 3, 4)
    vocab = t5k_tasks.pretraining.VOCAB
    want = sorted(tuple(t for _, t in sessions[i].turns) for i in chosen)
    got = [tuple(vocab.decode(list(u)) for u in ex["turn_tokens"]) for ex in _served_items(dialog)]
    assert sorted(got[:3]) == want and sorted(got[3:]) == want

    titles = seqio.get_mixture_or_task("wikinews_title").source
    records = titles.records("train")
    want = sorted(records[i]["targets"] for i in corpora.subset_indices(len(records), 3, 4))
    got = [ex["targets"].decode() for ex in _served_items(titles)]
    assert sorted(got[:3]) == want and sorted(got[3:]) == want


def test_lengths_for_features_the_task_lacks_are_a_named_error():
    with pytest.raises(ValueError, match="names inputs, which 'ko_lm' examples lack \\(they have targets\\)"):
        t5k_tasks.get_batches("ko_lm", {"inputs": 64, "targets": 16}, 2, model_type="decoder")
    assert next(t5k_tasks.get_batches("ko_lm", {"targets": 16}, 2, model_type="decoder"))["decoder_target_tokens"].shape \
        == (2, 16)


def test_gin_binding_caps_the_training_batches():
    """`t5k_tasks.get_dataset.train_examples` (what a low-data `t5k train` run binds) reaches get_batches."""
    import gin

    n = _register_numbered_task()
    gin.parse_config("t5k_tasks.get_dataset.train_examples = 7\nt5k_tasks.get_dataset.subset_seed = 2")
    try:
        batches = t5k_tasks.get_batches("toy_numbered", {"targets": 4}, batch_size=7, model_type="decoder",
                                        pack=False)
        seen = {int(t) for _ in range(3) for t in next(batches)["decoder_target_tokens"][:, 0]}
    finally:
        gin.clear_config()
    assert seen == set(corpora.subset_indices(n, 7, 2))


# ----------------------------------------------------------------------------------------------------------
# Feature conversion
# ----------------------------------------------------------------------------------------------------------


def test_feature_converters_emit_the_model_arguments():
    from t5k.models.decoder_only import DecoderOnly
    from t5k.models.encoder_decoder import EncoderDecoder

    examples = [{"inputs": [5, 6, 1], "targets": [7, 1]}, {"inputs": [8, 1], "targets": [9, 10, 1]}]
    ds = tf.data.Dataset.from_generator(
        lambda: iter(examples), output_signature={k: tf.TensorSpec([None], tf.int32) for k in ("inputs", "targets")})
    lengths = {"inputs": 6, "targets": 6}
    batch = next(feature_converters.get_feature_converter("encoder_decoder", pack=True)(ds, lengths)
                 .as_numpy_iterator())
    np.testing.assert_array_equal(batch["encoder_input_tokens"], [5, 6, 1, 8, 1, 0])
    np.testing.assert_array_equal(batch["encoder_segment_ids"], [1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(batch["encoder_positions"], [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(batch["decoder_target_tokens"], [7, 1, 9, 10, 1, 0])
    np.testing.assert_array_equal(batch["decoder_input_tokens"], [0, 7, 0, 9, 10, 0])
    np.testing.assert_array_equal(batch["decoder_segment_ids"], [1, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(batch["decoder_positions"], [0, 1, 0, 1, 2, 0])
    kwargs = feature_converters.model_kwargs(batch, "encoder_decoder")
    assert set(kwargs) <= set(inspect.signature(EncoderDecoder.__call__).parameters)
    assert len(kwargs) == 6
    unpacked = next(feature_converters.get_feature_converter("encoder_decoder", pack=False)(ds, lengths)
                    .as_numpy_iterator())
    assert "encoder_segment_ids" not in unpacked

    prefix = next(feature_converters.get_feature_converter("prefix_lm", pack=True)(ds, {"inputs": 4, "targets": 4})
                  .as_numpy_iterator())
    np.testing.assert_array_equal(prefix["decoder_causal_attention"][:5], [1, 1, 1, 1, 0])
    kwargs = feature_converters.model_kwargs(prefix, "prefix_lm")
    assert set(kwargs) == set(feature_converters.MODEL_KWARGS["prefix_lm"])
    assert set(kwargs) <= set(inspect.signature(DecoderOnly.__call__).parameters)
    lm = next(t5k_tasks.get_batches("ko_lm", {"targets": 64}, batch_size=2, model_type="decoder"))
    assert set(feature_converters.model_kwargs(lm, "decoder")) == set(feature_converters.MODEL_KWARGS["decoder"])
    assert lm["decoder_target_tokens"].shape == (2, 64) and (lm["decoder_target_tokens"][:, -1] == 1).all()


# ----------------------------------------------------------------------------------------------------------
# Objectives and downstream tasks
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ko_prefix_lm", "ko_bert_mlm", "ko_deshuffle", "ko_iid_replace_span",
                                  "ko_iid_drop_tokens", "ko_ul2", "ko_dialog_next_utterance",
                                  "ko_dialog_utterance_order", "ko_dialog_single_masking",
                                  "ko_dialog_multiple_masking", "ko_dialog_partial_masking_curriculum",
                                  "ko_dialog_response", "ko_dialog_infilling", "ko_dialog_summarization",
                                  "wikinews_title"])
def test_embedded_tasks_produce_examples(name):
    ex = next(t5k_tasks.get_dataset(name, SMALL, seed=0).as_numpy_iterator())
    assert 1 < len(ex["inputs"]) <= 128 and 1 < len(ex["targets"]) <= 32


@pytest.mark.parametrize("name", ["ko_dialog_utterance_order", "ko_dialog_single_masking",
                                  "ko_dialog_multiple_masking", "ko_dialog_partial_masking"])
def test_dialog_sessions_longer_than_the_lengths_are_windowed_not_trimmed(name):
    """With 96 inputs most validation sessions (up to 389 tokens) are longer than the inputs. seqio used to trim
    them from the end: the inputs lost trailing sentinels that the targets still filled, and shuffled turns no
    longer matched the targets' turns. Whole-turn windows that fit keep every example consistent, and no example is
    cut. (Targets of 192 hold every masking target here; order reconstruction's windows fit the smaller length.)"""
    eos = 1
    vocab = seqio.get_mixture_or_task(name).output_features["targets"].vocabulary
    sentinels = lambda ids: [i for i in ids if i >= vocab.vocab_size - vocab.extra_ids]  # noqa: E731
    examples = list(t5k_tasks.get_dataset(name, {"inputs": 96, "targets": 192}, split="validation").as_numpy_iterator())
    assert len(examples) > 46  # the 46 sessions, cut into more windows
    for ex in examples:
        inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
        assert inputs[-1] == eos and eos not in inputs[:-1] and targets[-1] == eos and eos not in targets[:-1]
        if name == "ko_dialog_utterance_order":
            assert sorted(inputs) == sorted(targets)  # the same turns, shuffled
        else:
            # Every span of the targets has its sentinel in the inputs, in order (the targets close with one more
            # sentinel unless the session ends inside a span).
            masked, filled = sentinels(inputs), sentinels(targets)
            assert masked == filled[:len(masked)] and len(filled) - len(masked) in (0, 1)


def _dialog_examples(name, inputs):
    return list(t5k_tasks.get_dataset(name, {"inputs": inputs, "targets": 64}, split="validation").as_numpy_iterator())


def test_dialog_response_contexts_keep_their_latest_turns():
    """A context longer than the inputs keeps its prefix, its latest turns and the next speaker's tag it ends with
    (seqio would cut its end), starting at a speaker tag unless the last turn alone is too long."""
    vocab, eos = t5k_tasks.pretraining.VOCAB, 1
    cut, full = _dialog_examples("ko_dialog_response", 64), _dialog_examples("ko_dialog_response", 4096)
    assert len(cut) == len(full)
    shortened = at_tag = 0
    for short, whole in zip(cut, full):
        text, context = vocab.decode(short["inputs"][:-1].tolist()), vocab.decode(whole["inputs"][:-1].tolist())
        assert short["inputs"][-1] == eos and len(short["inputs"]) <= 64
        assert short["targets"].tolist() == whole["targets"].tolist()
        if len(whole["inputs"]) <= 64:
            assert text == context
            continue
        shortened += 1
        rest = text[len("대화 응답:"):]
        assert text.startswith("대화 응답:") and context.endswith(rest) and rest.rstrip().endswith((" A:", " B:"))
        at_tag += rest.startswith((" A: ", " B: "))
    assert shortened >= 10 and at_tag >= 0.8 * shortened


def test_dialog_infilling_contexts_keep_the_hidden_turn():
    """Every in-filling context keeps its sentinel: the hidden turn lies past the 64th id in some full contexts,
    where seqio's cut at the end dropped it and left a target with no gap to fill."""
    sentinel = t5k_tasks.pretraining.VOCAB.encode("<extra_id_0>")[0]
    cut, full = _dialog_examples("ko_dialog_infilling", 64), _dialog_examples("ko_dialog_infilling", 4096)
    assert any(whole["inputs"].tolist().index(sentinel) >= 63 for whole in full)
    for short, whole in zip(cut, full):
        assert sentinel in short["inputs"].tolist() and len(short["inputs"]) <= 64
        assert short["targets"].tolist() == whole["targets"].tolist()
    with pytest.raises(ValueError, match="anchor '<extra_id_0><extra_id_1>' encodes to .* expected a single id"):
        dialog_preprocessors.fit_context(None, {"inputs": 64}, t5k_tasks.pretraining.OUTPUT_FEATURES, "대화 빈칸:",
                                         (" A: ", " B: "), anchor="<extra_id_0><extra_id_1>")


def _perfect_score(name):
    task = seqio.get_mixture_or_task(name)
    ds = t5k_tasks.get_dataset(name, {"inputs": 512, "targets": 64}, split="validation")
    vocab = task.output_features["targets"].vocabulary
    examples = list(ds.take(20).as_numpy_iterator())
    targets = [task.postprocess_fn(vocab.decode(list(ex["targets"])), example=ex, is_target=True) for ex in examples]
    predictions = [task.postprocess_fn(vocab.decode(list(ex["targets"])), example=ex, is_target=False)
                   for ex in examples]
    out = {}
    for fn in task.metric_fns:
        out.update(fn(targets, predictions))
    return out


@needs_shared
@pytest.mark.parametrize("name", ["nsmc", "klue_nli", "kornli", "klue_sts", "korsts", "korquad", "sae4k",
                                  "ko_en_translation", "en_ko_translation", "petitions_title"])
def test_downstream_tasks_and_their_metrics(name):
    out = _perfect_score(name)
    assert out, name
    for key, value in out.items():
        if key in ("pearson", "spearman"):
            assert value > 0.95, (key, value)
        elif key.startswith("bleu"):
            assert value > 90, (key, value)
        elif name != "korquad" or key == "f1":  # a few KorQuAD answers are cut at 64 target tokens? none expected
            assert value > 95, (key, value)


def test_wikinews_title_task_uses_the_summary_prefix():
    ex = next(t5k_tasks.get_dataset("wikinews_title", SMALL, split="validation").as_numpy_iterator())
    vocab = t5k_tasks.pretraining.VOCAB
    assert vocab.decode(list(ex["inputs"])).startswith("요약: ")
    assert _perfect_score("wikinews_title")["rouge1"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def test_cli_list_and_show(capsys, span_run):
    from t5k import cli

    assert cli.main(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    assert "ko_span_corruption" in out and "ko_pretrain_temperature" in out and "korquad" in out
    assert "ko_salient_span" in out
    assert cli.main(["tasks", "show", "ko_span_corruption", "-n", "2", "--inputs", "128", "--targets", "32",
                     "--seed", "3", "--step", "1", "--batch_size", "4", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["example_index"] for r in lines] == [4, 5] and all(r["step"] == 1 for r in lines)
    assert "<extra_id_0>" in lines[0]["inputs"] and len(lines[0]["inputs_ids"]) == 128
    batch = span_run[1]
    assert lines[0]["inputs_ids"] == batch["encoder_input_tokens"][0].tolist()
    assert cli.main(["tasks", "show", "no_such_task"]) == 2


def test_cli_show_marks_features_that_may_have_been_trimmed(capsys, span_run):
    """A feature at its length is marked, unless the task's examples are cut to fill their lengths (span
    corruption's inputs are exactly 128 ids by design)."""
    from t5k import cli

    assert cli.main(["tasks", "show", "ko_prefix_lm", "-n", "1", "--inputs", "64", "--targets", "8"]) == 0
    assert "targets (8 ids, the --targets length: trimmed if longer): " in capsys.readouterr().out
    for name in ("ko_span_corruption", "ko_pretrain"):
        assert cli.main(["tasks", "show", name, "-n", "1", "--inputs", "128", "--targets", "32"]) == 0
        out = capsys.readouterr().out
        assert "inputs (128 ids): " in out and "trimmed" not in out, out


def test_cli_show_prints_the_train_subset_stream(capsys):
    from t5k import cli

    assert cli.main(["tasks", "show", "wikinews_title", "--train_examples", "2", "--subset_seed", "5", "-n", "6",
                     "--json", "--inputs", "64", "--targets", "64"]) == 0
    shown = [json.loads(line)["targets"] for line in capsys.readouterr().out.splitlines()]
    records = seqio.get_mixture_or_task("wikinews_title").source.records("train")
    assert len(shown) == 6
    assert set(shown) == {records[i]["targets"] for i in corpora.subset_indices(len(records), 2, 5)}
    assert cli.main(["tasks", "show", "wikinews_title", "--train_examples", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "t5k tasks: train_examples: expected a positive number of examples (or None for all), got 0"]


@pytest.mark.parametrize("argv, message", [
    (["-n", "-1"], "argument -n: expected an integer >= 1, got -1"),  # take(-1) would print the endless stream
    (["--step", "-1"], "argument --step: expected an integer >= 0, got -1"),
    (["--batch_size", "0", "--step", "3"], "argument --batch_size: expected an integer >= 1, got 0"),
    (["--inputs", "0"], "argument --inputs: expected an integer >= 1, got 0"),
])
def test_cli_show_rejects_bad_counts(capsys, argv, message):
    from t5k import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["tasks", "show", "ko_span_corruption"] + argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_cli_show_errors_are_one_line(capsys, monkeypatch, tmp_path):
    from t5k import cli

    assert cli.main(["tasks", "show", "nsmc", "--split", "test"]) == 2
    assert capsys.readouterr().err.splitlines() == ["t5k tasks: split 'test' not in ('train', 'validation')"]
    monkeypatch.setenv("T5K_DATA_DIR", str(tmp_path))  # a machine without the downstream data sets
    assert cli.main(["tasks", "show", "korquad", "-n", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"t5k tasks: {tmp_path}/korquad_v1/") and "not found" in err[0]


def test_mixture_starts_at_the_mixed_stream_index():
    """start_index of a mixture skips examples of the mixed stream (not of every task before mixing)."""
    def inputs(start, n):
        ds = t5k_tasks.get_dataset("ko_pretrain", SMALL, seed=2, start_index=start, examples_per_step=4)
        return [ex["inputs"].tolist() for ex in ds.take(n).as_numpy_iterator()]

    assert inputs(8, 4) == inputs(0, 12)[8:]


def test_ul2_chunks_leave_room_for_the_mode_token():
    """S (prefix LM) examples carry a whole chunk: mode ids + prefix fit the inputs length, nothing trimmed."""
    from t5k_tasks import pretraining

    features = seqio.get_mixture_or_task("ko_ul2").output_features
    s2s = pretraining.ul2_mode_tokens(features)["[S2S]"]
    lengths = {"inputs": 64, "targets": 64}
    chunk = 64 - 1 - pretraining.longest_mode_token(features)
    assert len(s2s) >= 4  # plain text in the shipped vocabulary: chunks really are shorter
    examples = t5k_tasks.get_dataset("ko_ul2", lengths, seed=1).take(60).as_numpy_iterator()
    s_examples = [e for e in examples if e["inputs"][:len(s2s)].tolist() == s2s]
    assert len(s_examples) >= 3
    for e in s_examples:  # inputs: mode + prefix + EOS; targets: the rest of the chunk + EOS
        assert len(e["inputs"]) - len(s2s) - 1 + len(e["targets"]) - 1 == chunk


def test_shards_number_their_examples_globally_and_draw_their_own_masks():
    """Host k of n gets example indices k, k + n, ...: no two hosts share a corruption seed, and with the global
    batch as examples_per_step every host's j-th batch is step j (the curriculum's step)."""
    def shard(index, start=0):
        ds = t5k_tasks.get_dataset("ko_span_corruption", SMALL, seed=3, start_index=start, examples_per_step=8,
                                   shard_index=index, num_shards=2)
        return list(ds.take(6).as_numpy_iterator())

    first, second = shard(0), shard(1)
    assert [int(e["example_index"]) for e in first] == [0, 2, 4, 6, 8, 10]
    assert [int(e["example_index"]) for e in second] == [1, 3, 5, 7, 9, 11]
    assert [int(e["step"]) for e in first] == [0, 0, 0, 0, 1, 1] == [int(e["step"]) for e in second]
    sentinel_positions = [[np.flatnonzero(e["inputs"] >= 51100).tolist() for e in run] for run in (first, second)]
    assert all(a != b for a, b in zip(*sentinel_positions))  # each host its own masks
    resumed = shard(1, start=4)  # this host's examples 4, 5, ...
    assert [int(e["example_index"]) for e in resumed[:2]] == [9, 11]
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(resumed[:2], second[4:]))


@pytest.mark.parametrize("shard_index, num_shards", [(-1, 2), (3, 3), (0, 0)])
def test_shard_outside_the_shard_count_is_an_error(shard_index, num_shards):
    with pytest.raises(ValueError, match=f"shard_index {shard_index} is not in \\[0, num_shards = {num_shards}\\)"):
        t5k_tasks.get_batches("nsmc" if SHARED.exists() else "wikinews_title", SMALL, batch_size=4, pack=False,
                              shard_index=shard_index, num_shards=num_shards)


def test_tensorflow_is_kept_off_the_gpus(monkeypatch, caplog):
    """Importing t5k_tasks hides the GPUs from TensorFlow (it would reserve their memory on its first op); a
    process where TensorFlow already initialised its devices gets a warning, not a failure."""
    from t5k_tasks import pipeline

    calls = []
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda devices, kind: calls.append((devices, kind)))
    pipeline.keep_tensorflow_on_the_host()
    assert calls == [([], "GPU")]

    def initialised(devices, kind):
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    monkeypatch.setattr(tf.config, "set_visible_devices", initialised)
    with caplog.at_level(logging.WARNING, logger="t5k_tasks.pipeline"):
        pipeline.keep_tensorflow_on_the_host()
    assert "already initialised its devices" in caplog.text
    assert tf.config.get_visible_devices("GPU") == []
