"""t5k.vocab: exact round trips, the id layout, tf == python, defined errors, training artifacts, CLI and gin."""

import collections
import gzip
import io
import json
import pickle
import unicodedata
from pathlib import Path

import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import t5k_tasks
from t5k import checkpoints, cli, decoding, evaluation, model_loading, morph, records, train, vocab
from t5k_tasks import corpora, pretraining
from tiny_models import ENCODER_DECODER, model_gin

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
SEED = "마감이 잘 안돼서 옆부분이 안맞은게 불편했고 흰색이라 어쩔 수 없긴 하지만 때도 잘타요!"
EXAMPLES = [
    SEED, "", " ", "ㅋㅋㅋㅋ ㅎㅎ ㅠㅠ", "漢字 한자 混用", "Hello, world! abc_def", "0123 456.78 1,000원",
    "😀👍🏽 이모지 🇰🇷", "한국어English혼합日本語テキスト", "   leading", "trailing   ", "a  b   c    d",
    "탭\t구분\t\t값", "줄\n바꿈\n\n\r\n", unicodedata.normalize("NFD", "정규화 안 된 한글 café"),
    "제어\x00문자\x07\x1b[0m\x7f", "\u200b폭 없는\u00a0공백\u3000전각", "𠀀𪚥 확장 한자", "<extra_id_0>의 <pad></s><unk>",
    "<extra_id_100> <extra_id_01> <extra_id_", "A: 안녕하세요\nB: 네 반가워요",
]


def _sample_lines(n=400):
    """Real sentences: reviews + dialogue + news from shared/data, or the examples when it is absent."""
    if not DATA.exists():
        return [e for e in EXAMPLES if e] * 20
    with gzip.open(DATA / "nsmc/ratings_test.txt.gz", "rt", encoding="utf-8") as f:
        reviews = [line.split("\t")[1] for _, line in zip(range(n // 2 + 1), f)][1:]
    with gzip.open(DATA / "hg_tods/sessions.jsonl.gz", "rt", encoding="utf-8") as f:
        turns = [t["text"] for line in f for t in json.loads(line)["turns"]][: n // 4]
    news = (DATA / "boddari/wikinews.txt").read_text(encoding="utf-8").splitlines()[: n // 4]
    return reviews + turns + news


@pytest.fixture(scope="module")
def lines():
    return _sample_lines()


@pytest.fixture(scope="module")
def shipped():
    return vocab.default_vocabulary()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lines):
    """Tiny vocabularies of every variant, trained on the sample text."""
    root = tmp_path_factory.mktemp("vocabs")
    text = root / "train.txt"
    text.write_text("\n".join(lines * 3) + "\n", encoding="utf-8")
    out = {}
    for variant, size in (("morph_bbpe", 1024), ("bbpe", 1024), ("char_bpe", 1024), ("sentencepiece", 1300)):
        path = vocab.train([text], size, variant, root / variant, extra_ids=100, min_frequency=1)
        out[variant] = vocab.get_vocabulary(variant, str(path), None)
    return out


def _lossless(shipped, trained):
    return [shipped, trained["morph_bbpe"], trained["bbpe"]]


# ---- the pre-tokenizer ------------------------------------------------------------------------------------------
def test_seed_sentence_morpheme_pieces(shipped):
    pieces = shipped.pieces([SEED])[0]
    assert "".join(pieces) == SEED
    assert pieces[:2] == ["마감", "이"]
    assert pieces[pieces.index("부분") + 1] == "이"
    assert " 어쩔" in pieces  # a coda fused into the stem's syllable is not a boundary


@given(st.text(max_size=200))
@settings(max_examples=150, deadline=None)
def test_pieces_tile_the_text(text):
    assert "".join(morph.MorphSplitter().split(text)) == text
    assert "".join(morph.pieces_by_pattern(text)) == text


# ---- exact round trip ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", EXAMPLES)
def test_round_trip_examples(shipped, trained, text):
    for v in _lossless(shipped, trained):
        assert v.decode(v.encode(text)) == text, v


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=120))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_round_trip_arbitrary_unicode(shipped, trained, text):
    for v in _lossless(shipped, trained):
        ids = v.encode(text)
        assert v.decode(ids) == text
        assert all(3 <= i < v.vocab_size for i in ids) or "<extra_id_" in text


def test_real_sentences_round_trip_and_batch_equals_single(shipped, lines):
    batch = shipped.encode_batch(lines)
    assert batch == [shipped.encode(s) for s in lines]
    assert [shipped.decode(x) for x in batch] == lines


def test_piece_id_cache_equals_uncached_tokenizer(shipped, trained, lines, monkeypatch):
    """encode_batch caches ids per stage-1 piece and BPEs each distinct morpheme piece once (BPE model directly,
    cached too); HF tokenizers on each whole text's pieces is the reference.

    Checked cold (empty caches), warm (every piece cached), one text at a time, with runs too long to cache, and
    with caches so small that they are swapped out mid-stream.
    """
    texts = lines + [e for e in EXAMPLES if e and "<extra_id_" not in e] + ["가나다라" * 40, "x" * 300 + " 마감이"]
    references = {}
    for v in (shipped, trained["bbpe"], trained["char_bpe"]):
        fresh = vocab.BPEVocabulary(v.path)
        reference = references[v.path] = [
            fresh.tokenizer.encode(p, is_pretokenized=True, add_special_tokens=False).ids for p in fresh.pieces(texts)]
        assert fresh.encode_batch(texts) == reference
        assert fresh.encode_batch(texts) == reference
        assert [fresh.encode(t) for t in texts[-30:]] == reference[-30:]
        assert "가나다라" * 40 not in fresh._ids_cache and "가나다라" * 40 not in fresh._piece_ids
        assert " 마감" in fresh._piece_ids or v.variant == "bbpe"  # morpheme pieces are cached for reuse
    monkeypatch.setattr(vocab, "_ID_CACHE_LIMIT", 50)
    small = vocab.BPEVocabulary(shipped.path)
    got = [ids for i in range(0, len(texts), 16) for ids in small.encode_batch(texts[i : i + 16])]
    assert got == references[shipped.path]
    assert len(small._ids_cache) <= 50 + 16 * max(len(morph.pieces_by_pattern(t)) for t in texts)
    assert len(small._piece_ids) <= 50 + 16 * max(len(p) for p in small.pieces(texts))


# ---- id layout ----------------------------------------------------------------------------------------------------
def test_special_and_sentinel_ids(shipped):
    assert (shipped.pad_id, shipped.eos_id, shipped.unk_id) == (0, 1, 2)
    assert shipped.vocab_size == 51200 and shipped.extra_ids == 100 and shipped.vocab_size % 128 == 0
    assert shipped.encode("<extra_id_0>") == [51199]
    assert shipped.encode("<extra_id_99>") == [51100]
    assert shipped.decode([51199, 51100]) == "<extra_id_0><extra_id_99>"
    ids = shipped.encode("지난 주 <extra_id_0> 파티에 <extra_id_1> 고마워")
    assert 51199 in ids and 51198 in ids
    # Out-of-range sentinel numbers and literal specials stay text; specials are never produced from text.
    for text in ("<extra_id_100>", "<pad></s><unk>", "<extra_id_01>"):
        ids = shipped.encode(text)
        assert not {0, 1, 2} & set(ids) and max(ids) < shipped._base_vocab_size
        assert shipped.decode(ids) == text


def test_decode_stops_at_eos_and_maps_invalid_ids_to_unk(shipped):
    ids = shipped.encode("안녕")
    assert shipped.decode([0] + ids + [1] + ids) == "안녕"
    assert shipped.decode([-5, 10**9]) == "\ufffd\ufffd"


def test_sentencepiece_and_char_bpe_layout(trained):
    sp, cb = trained["sentencepiece"], trained["char_bpe"]
    assert (sp.pad_id, sp.eos_id, sp.unk_id, sp.vocab_size) == (0, 1, 2, 1300)
    assert sp.tokenizer.piece_to_id("▁<extra_id_0>") == 1299
    assert cb.encode("\U0001F996") == [2]  # an unseen character is <unk>: char_bpe is not lossless
    assert cb.decode(cb.encode("마감이 잘")) == "마감이 잘"


# ---- TensorFlow ---------------------------------------------------------------------------------------------------
def test_encode_tf_decode_tf_match_python_in_tf_data(shipped, lines):
    expected = shipped.encode_batch(lines)
    ds = tf.data.Dataset.from_tensor_slices(lines)
    single = ds.map(shipped.encode_tf, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    assert single.element_spec.shape.as_list() == [None]
    assert [x.numpy().tolist() for x in single] == expected
    batched = ds.batch(32).map(shipped.encode_tf, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    assert batched.element_spec.shape.as_list() == [None, None]
    got = [row for b in batched for row in b.to_list()]
    assert got == expected
    decoded = single.map(shipped.decode_tf, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    assert [x.numpy().decode("utf-8") for x in decoded] == lines
    assert [x.decode("utf-8") for b in batched.map(shipped.decode_tf) for x in b.numpy()] == lines


@given(st.lists(st.integers(-3, 51300), max_size=30))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_decode_tf_matches_python_on_any_ids(shipped, ids):
    """Arbitrary ids include partial UTF-8 byte tokens: both paths replace them the same way."""
    got = shipped.decode_tf(tf.constant(ids, tf.int32)).numpy().decode("utf-8") if ids else ""
    assert got == shipped.decode(ids)


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_non_utf8_bytes_raise_named_error(shipped):
    with pytest.raises(vocab.VocabularyError, match="invalid UTF-8 byte 0xff at byte offset 3"):
        shipped.encode(b"abc\xffdef")
    with pytest.raises(vocab.VocabularyError, match="invalid UTF-8 byte 0xea at byte offset 0"):
        shipped.encode_tf(tf.constant(b"\xea\xb0"))  # eager: the Python exception itself
    ds = tf.data.Dataset.from_tensor_slices([b"ok", b"\xea\xb0"]).map(shipped.encode_tf)
    with pytest.raises(tf.errors.InvalidArgumentError, match="invalid UTF-8 byte 0xea"):
        list(ds)  # in a pipeline: a failed op naming the cause, never a silently dropped example
    with pytest.raises(vocab.VocabularyError, match="lone surrogate U\\+D800"):
        shipped.encode("a\ud800")


def test_empty_and_bytes_input(shipped):
    assert shipped.encode("") == [] and shipped.decode([]) == ""
    assert shipped.encode("마감이".encode()) == shipped.encode("마감이")
    assert shipped.encode_tf(tf.constant([""])).to_list() == [[]]


@pytest.mark.parametrize("unit", ["마감이 잘 안돼서 불편했어요! ", "가나다라마바사아자차카타파하"])
def test_one_megabyte_line(shipped, unit):
    text = unit * (1_000_000 // len(unit.encode()))
    ids = shipped.encode(text)
    assert shipped.decode(ids) == text and len(ids) > len(text) // 20


def test_training_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("좋은 줄\n".encode() + b"\xed\x9f\n")
    with pytest.raises(vocab.VocabularyError, match=r"bad.txt:2: invalid UTF-8 byte 0xed at byte offset 0"):
        vocab.train([bad], 1024, "bbpe", tmp_path / "out")
    with pytest.raises(vocab.VocabularyError, match="no such file"):
        vocab.train([tmp_path / "missing.txt"], 1024, "bbpe", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt"]  # nothing half-written left


def test_training_refuses_too_small_corpus_and_foreign_dirs(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("가나다\n", encoding="utf-8")
    with pytest.raises(vocab.VocabularyError, match="supports only"):
        vocab.train([small], 4096, "bbpe", tmp_path / "out")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    with pytest.raises(vocab.VocabularyError, match="refusing to overwrite"):
        vocab.train([small], 400, "bbpe", tmp_path / "foreign", min_frequency=1)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(vocab.VocabularyError, match="a_file exists and is not a directory"):
        vocab.train([small], 400, "bbpe", tmp_path / "a_file", min_frequency=1)
    with pytest.raises(vocab.VocabularyError, match="extra_ids must be 0 or more, got -5"):
        vocab.train([small], 400, "bbpe", tmp_path / "out", extra_ids=-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_killed_trainings_leftovers_are_cleaned_and_its_artifact_restored(tmp_path, capsys):
    """SIGKILL skips `train`'s cleanup: the next training into the same --out removes the work directories, and
    moves back the previous artifact that a kill between the two renames of `_publish` left in `.OUT.old-*/v`.
    An --out under a file is one line from the CLI (an OSError), not a traceback."""
    from t5k import cli

    out = tmp_path / "v"
    (tmp_path / ".v.tmp-killed").mkdir()
    (tmp_path / ".v.tmp-killed" / "tokenizer.json").write_text("{\"half")
    (tmp_path / ".v.old-killed" / "v").mkdir(parents=True)
    (tmp_path / ".v.old-killed" / "v" / "meta.json").write_text("{}")
    small = tmp_path / "small.txt"
    small.write_text("가나다\n", encoding="utf-8")
    with pytest.raises(vocab.VocabularyError, match="supports only"):  # fails after the cleanup
        vocab.train([small], 4096, "bbpe", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt", "v"]
    assert (out / "meta.json").read_text() == "{}"
    (tmp_path / "a_file").write_text("x")
    assert cli.main(["vocab", "train", "--input", str(small), "--vocab_size", "400", "--variant", "bbpe",
                     "--out", str(tmp_path / "a_file" / "v")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("t5k vocab: ") and "a_file" in err[0], err


def test_char_bpe_alphabet_larger_than_the_size_asks_for_a_larger_size(tmp_path):
    """char_bpe keeps every character as a base piece, so too small a size means *more* ids are needed."""
    text = tmp_path / "chars.txt"
    text.write_text("".join(chr(0xAC00 + i) for i in range(500)) + "\n", encoding="utf-8")
    with pytest.raises(vocab.VocabularyError, match="500 distinct characters and the 3 specials need 503 base "
                                                     "pieces, more than 300: use a --vocab_size of at least 603"):
        vocab.train([text], 400, "char_bpe", tmp_path / "out", min_frequency=1)


def test_published_directory_is_readable_like_any_new_directory(tmp_path, lines):
    text = tmp_path / "train.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = vocab.train([text], 400, "bbpe", tmp_path / "v", min_frequency=1)
    (tmp_path / "plain").mkdir()
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_directory_without_its_model_file_is_a_named_error(tmp_path):
    for variant, model_file in (("bbpe", "tokenizer.json"), ("sentencepiece", "spm.model")):
        (tmp_path / variant).mkdir()
        (tmp_path / variant / "meta.json").write_text(json.dumps({"format": vocab.FORMAT, "variant": variant}))
        with pytest.raises(vocab.VocabularyError, match=f"{variant}/{model_file}: missing"):
            vocab.get_vocabulary(variant, str(tmp_path / variant), None)


def test_sentencepiece_sampling_options(tmp_path, lines, capsys):
    """--spm_sentences really bounds what sentencepiece sees: too small a sample cannot fill the vocabulary."""
    text = tmp_path / "train.txt"
    text.write_text("\n".join(lines * 3) + "\n", encoding="utf-8")
    with pytest.raises(vocab.VocabularyError, match="spm_sentences must be 0 .* or more than 100, got 20"):
        vocab.train([text], 1300, "sentencepiece", tmp_path / "sp", spm_sentences=20)
    with pytest.raises(vocab.VocabularyError, match="1200 base pieces .* at most 101 sampled lines: .*Vocabulary size"):
        vocab.train([text], 1300, "sentencepiece", tmp_path / "sp", spm_sentences=101)
    status = cli.main(["vocab", "train", "--input", str(text), "--vocab_size", "1300", "--variant", "sentencepiece",
                       "--spm_sentences", "1000", "--threads", "1", "--out", str(tmp_path / "sp")])
    training = vocab.read_meta(tmp_path / "sp")["training"]
    assert status == 0 and (training["spm_sentences"], training["threads"]) == (1000, 1), capsys.readouterr()


# ---- artifacts, gin, CLI, pickling ------------------------------------------------------------------------------
def test_shipped_artifact_is_self_describing(shipped):
    meta = vocab.read_meta(vocab.DEFAULT_DIR)
    assert meta["variant"] == "morph_bbpe" and meta["base_vocab_size"] == 51100
    assert "kiwipiepy" in meta["analyser"] and meta["training"]["command"].startswith("t5k vocab train")
    assert sum(f.stat().st_size for f in vocab.DEFAULT_DIR.iterdir()) < 4_000_000


def test_gin_selects_variant(trained):
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(
            [str(REPO / "gin/vocab/bbpe.gin")], [f"VOCAB_DIR = '{trained['bbpe'].path}'"])
        assert vocab.get_vocabulary() == trained["bbpe"]
        # The registered tasks follow gin; a task of one's own fixed to another vocabulary is refused, never ignored.
        vocab.check_tasks_follow_gin(t5k_tasks.pretraining.VOCAB, "task 'ko_span_corruption'")
        vocab.check_tasks_follow_gin(trained["bbpe"], "a task of one's own")
        with pytest.raises(vocab.VocabularyError, match="but a task of one's own tokenizes with BPEVocabulary"
                                                        r"\(variant=morph_bbpe"):
            vocab.check_tasks_follow_gin(vocab.default_vocabulary(), "a task of one's own")
        gin.clear_config()
        gin.parse_config_files_and_bindings([str(REPO / "gin/vocab/morph_bbpe.gin")], [])
        assert vocab.get_vocabulary() is vocab.default_vocabulary()
        vocab.check_tasks_follow_gin(t5k_tasks.pretraining.VOCAB, "task 'ko_span_corruption'")
        gin.clear_config()
        gin.parse_config_files_and_bindings([str(REPO / "gin/vocab/char_bpe.gin")], [])
        with pytest.raises(vocab.VocabularyError, match="no shipped char_bpe vocabulary"):
            vocab.get_vocabulary()
    finally:
        gin.clear_config()


@pytest.fixture
def bbpe_by_gin(trained):
    """gin/vocab/bbpe.gin pointing at the small trained bbpe vocabulary (1024 ids, no morpheme cuts)."""
    gin.clear_config()
    gin.parse_config_files_and_bindings([str(REPO / "gin/vocab/bbpe.gin")], [f"VOCAB_DIR = '{trained['bbpe'].path}'"],
                                        finalize_config=False)  # tests add the rest of a run's bindings
    assert vocab.get_vocabulary() == trained["bbpe"]
    yield vocab.get_vocabulary()
    gin.clear_config()


def _examples(name, n, lengths, split="train"):
    return list(t5k_tasks.get_dataset(name, lengths, split=split, seed=3).take(n).as_numpy_iterator())


def test_registered_tasks_follow_the_gin_vocabulary(bbpe_by_gin):
    """Under gin/vocab/bbpe.gin every registered task tokenizes with bbpe (token cache, on-the-fly tokenization,
    UL2 mode tokens, speaker tags, text tasks); clearing the binding brings the shipped vocabulary back."""
    bbpe, lengths = bbpe_by_gin, {"inputs": 96, "targets": 96}
    for name in ("ko_span_corruption", "ko_ul2", "ko_lm", "ko_dialog_next_utterance", "wikinews_title", "ko_pretrain"):
        assert vocab.resolve(seqio.get_mixture_or_task(name).output_features["targets"].vocabulary) is bbpe
    assert vocab.resolve(pickle.loads(pickle.dumps(pretraining.VOCAB))) is bbpe  # a view, pickled as such
    with pytest.raises(AttributeError, match="set '_ids_cache' on t5k.vocab.resolve"):
        pretraining.VOCAB._ids_cache = {}  # would shadow the resolved vocabulary's cache, silently
    # The token cache: ko_lm's validation chunks hold exactly the characters of the validation documents.
    chunks = _examples("ko_lm", -1, lengths, "validation")
    assert max(int(e["targets"].max()) for e in chunks) < bbpe.vocab_size
    text = bbpe.decode([int(t) for e in chunks for t in e["targets"][:-1]])
    documents = [d.text for d in pretraining.PROSE.documents()["validation"]]
    assert collections.Counter(text) == collections.Counter("".join(documents))
    cached = corpora.cache_dir() / f"prose-validation-{corpora.vocab_fingerprint(bbpe)}-"
    assert list(cached.parent.glob(cached.name + "*.npz"))
    # On-the-fly tokenization (encode_tf in tf.data) gives the cached path's batches, byte for byte.
    from_cache, from_text = _examples("ko_span_corruption", 4, lengths), _examples("ko_span_corruption_from_text", 4,
                                                                                   lengths)
    assert all((a["inputs"] == b["inputs"]).all() and (a["targets"] == b["targets"]).all()
               for a, b in zip(from_cache, from_text))
    assert bbpe.vocab_size - 1 in from_cache[0]["inputs"]  # <extra_id_0> of bbpe
    # Ids derived from the vocabulary are bbpe's: UL2 mode tokens and chunk room, speaker tags.
    s2s = bbpe.encode("[S2S]")
    ul2 = [e for e in _examples("ko_ul2", 40, lengths) if e["inputs"][:len(s2s)].tolist() == s2s]
    room = 96 - 1 - max(len(bbpe.encode(m)) for m in pretraining.UL2_MODES)
    assert ul2 and all(len(e["inputs"]) - len(s2s) - 1 + len(e["targets"]) - 1 == room for e in ul2)
    dialog = _examples("ko_dialog_next_utterance", 3, {"inputs": 128, "targets": 64})
    assert all(e["inputs"][:len(bbpe.encode(" A: "))].tolist() == bbpe.encode(" A: ") for e in dialog)
    assert " B: " in bbpe.decode(dialog[-1]["inputs"].tolist())
    title = _examples("wikinews_title", 1, {"inputs": 64, "targets": 64})[0]
    assert bbpe.decode(title["inputs"].tolist()).startswith("요약: ")

    gin.clear_config()
    assert vocab.resolve(pretraining.VOCAB) is vocab.default_vocabulary()
    tag = vocab.default_vocabulary().encode(" A: ")
    assert _examples("ko_dialog_next_utterance", 1, {"inputs": 128, "targets": 64})[0]["inputs"][:len(tag)].tolist() \
        == tag != bbpe.encode(" A: ")


def test_training_and_serving_with_a_gin_selected_vocabulary(bbpe_by_gin, trained, tmp_path):
    """t5k train on ko_span_corruption with bbpe and a model of its size; load_model serves it with bbpe. A model
    with fewer rows than the vocabulary has ids is refused before anything is built, and so is a checkpoint under
    another vocabulary than the one recorded with it."""
    run = """
train.mixture_or_task_name = 'ko_span_corruption'
train.task_feature_lengths = {'inputs': 64, 'targets': 16}
train.batch_size = 8
train.train_steps = 2
train.log_every = 1
train.checkpoint_every = 2
train.peak_flops_per_s = 1e9
"""
    gin.parse_config(model_gin(**{**ENCODER_DECODER, "vocab_size": 512}) + run)
    with pytest.raises(vocab.VocabularyError, match="has 1024 ids, but the model's TransformerConfig.vocab_size is "
                                                    "512: set VOCAB_SIZE"):
        train.train(str(tmp_path / "small"))
    assert not (tmp_path / "small").exists()
    gin.parse_config("TransformerConfig.vocab_size = 1024")
    # Records left by a run that failed before its first checkpoint do not bind the next run to their vocabulary.
    records.write(str(tmp_path / "run" / "checkpoints"), vocab.default_vocabulary(), model_loading.build_model())
    last = train.train(str(tmp_path / "run"))
    assert np.isfinite(last["loss"])
    loaded = model_loading.load_model(str(tmp_path / "run"))
    embedding = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(loaded.params)
                 if "token_embedder" in jax.tree_util.keystr(path)]
    assert loaded.vocabulary is bbpe_by_gin and [e.shape[0] for e in embedding] == [1024]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2", "model.json",
                                                                                    "vocabulary.json"]
    gin.parse_config("TransformerConfig.scale_attention_logits = True")  # same shapes, another function
    with pytest.raises(checkpoints.CheckpointMismatchError, match="scale_attention_logits: False -> True"):
        model_loading.load_model(str(tmp_path / "run"))
    gin.parse_config("TransformerConfig.scale_attention_logits = False")
    record = json.loads((tmp_path / "run" / "checkpoints" / records.VOCABULARY_FILE).read_text())
    assert record["variant"] == "bbpe" and record["fingerprint"] == vocab.model_fingerprint(bbpe_by_gin)
    # A task of one's own fixed to the shipped vocabulary is not scored with the model's bbpe.
    features = {k: seqio.Feature(vocab.default_vocabulary()) for k in ("inputs", "targets")}
    source = seqio.FunctionDataSource(lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(
        {"inputs": ["하나"], "targets": ["둘"]}), splits=["validation"])
    seqio.TaskRegistry.add("t5k_test_fixed_vocabulary", source=source, output_features=features,
                           preprocessors=[seqio.preprocessors.tokenize], metric_fns=[])
    try:
        with pytest.raises(vocab.VocabularyError, match="task 't5k_test_fixed_vocabulary' tokenizes with "
                                                        r"BPEVocabulary\(variant=morph_bbpe.*the model's vocabulary "
                                                        r"is BPEVocabulary\(variant=bbpe"):
            evaluation.evaluate_task(loaded, "t5k_test_fixed_vocabulary", {"inputs": 8, "targets": 8}, "validation",
                                     1, 1, decoding.DecodeConfig(), None, 0)
    finally:
        seqio.TaskRegistry.remove("t5k_test_fixed_vocabulary")

    # Another vocabulary of the same size cannot serve, resume or fine-tune the checkpoint: its ids mean other text.
    gin.parse_config(f"t5k.vocab.get_vocabulary.variant = 'morph_bbpe'\nVOCAB_DIR = '{trained['morph_bbpe'].path}'")
    assert vocab.get_vocabulary().vocab_size == 1024
    trained_with = r"was trained with BPEVocabulary\(variant=bbpe.*vocabulary.json\), but this run uses " \
                   r"BPEVocabulary\(variant=morph_bbpe"
    with pytest.raises(vocab.VocabularyError, match="checkpoint .*run " + trained_with):
        model_loading.load_model(str(tmp_path / "run"))
    with pytest.raises(vocab.VocabularyError, match="model_dir .*run " + trained_with):
        train.train(str(tmp_path / "run"))
    gin.parse_config(f"train.init_checkpoint = '{tmp_path / 'run'}'")
    with pytest.raises(vocab.VocabularyError, match="train.init_checkpoint .*run " + trained_with):
        train.train(str(tmp_path / "finetune"))
    assert not (tmp_path / "finetune").exists()


def test_tasks_show_takes_the_vocabulary_from_a_gin_file(trained, capsys):
    bbpe = trained["bbpe"]
    argv = ["tasks", "show", "ko_span_corruption", "-n", "1", "--inputs", "64", "--targets", "16", "--json",
            "--gin_file=gin/vocab/bbpe.gin", f"--gin.VOCAB_DIR='{bbpe.path}'"]
    try:
        assert cli.main(argv) == 0
    finally:
        gin.clear_config()
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["inputs"] == bbpe.decode(record["inputs_ids"]) and bbpe.vocab_size - 1 in record["inputs_ids"]
    assert max(record["inputs_ids"]) < bbpe.vocab_size


def test_stop_strings_under_a_vocabulary_without_per_id_bytes_are_named_errors(trained):
    """SentencePiece decodes through its own model, not per-id bytes: a line asking for stop strings gets an error
    record (the run goes on), and generate refuses them in one line instead of failing on an unhashable key."""
    from t5k import infer

    sp = trained["sentencepiece"]
    request = infer.parse_request(1, '{"prompt": "안녕하세요"}', sp, "p.jsonl", decoding.DecodeConfig(), lambda c: 99)
    assert request.prompt == "안녕하세요"
    with pytest.raises(infer.InputError, match='p.jsonl:2: field "stop": stop strings need .*SentencePieceVocabulary '
                                               'has none'):
        infer.parse_request(2, '{"prompt": "안녕", "stop": ["다"]}', sp, "p.jsonl", decoding.DecodeConfig(),
                            lambda c: 99)
    gin.clear_config()
    gin.parse_config_files_and_bindings([str(REPO / "gin/vocab/sentencepiece.gin")], [f"VOCAB_DIR = '{Path(sp.sentencepiece_model_file).parent}'"])
    try:
        with pytest.raises(TypeError, match="SentencePieceVocabulary has none"):
            decoding._stop_tables(("다",), pretraining.VOCAB)
    finally:
        gin.clear_config()


def _cli(monkeypatch, capsys, argv, stdin: bytes):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    status = cli.main(argv)
    return status, capsys.readouterr()


def test_cli_encode_decode_pieces(monkeypatch, capsys, shipped):
    text = "마감이 잘 안돼서\n<extra_id_0> ㅋㅋ\n"
    status, out = _cli(monkeypatch, capsys, ["vocab", "encode"], text.encode())
    assert status == 0
    assert out.out.splitlines() == [" ".join(map(str, shipped.encode(t))) for t in text.splitlines()]
    status, back = _cli(monkeypatch, capsys, ["vocab", "decode"], out.out.encode())
    assert status == 0 and back.out == text
    status, pieces = _cli(monkeypatch, capsys, ["vocab", "encode", "--pieces"], SEED.encode())
    assert pieces.out.split()[:2] == ["마감", "이"]
    status, err = _cli(monkeypatch, capsys, ["vocab", "encode"], b"ok\n\xff\n")
    assert status == 2 and "stdin:2: invalid UTF-8" in err.err


def test_pickle_round_trip(shipped):
    clone = pickle.loads(pickle.dumps(shipped))
    assert clone == shipped and clone.encode(SEED) == shipped.encode(SEED)
