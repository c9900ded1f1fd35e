"""Vocabularies for t5k: morpheme-aware byte-level BPE (HyperCLOVA-style) as a `seqio.Vocabulary`.

Variants (the tokenizer ablation; docs/vocab.md has the measurements):
  morph_bbpe     pieces cut at whitespace, script changes and Kiwi morpheme starts; byte-level BPE inside (default)
  bbpe           same without the morpheme cuts (plain byte-level BPE)
  char_bpe       morpheme-cut pieces, BPE over characters; unseen characters become <unk> (not lossless)
  sentencepiece  SentencePiece unigram through `seqio.SentencePieceVocabulary` (normalises NFKC: not lossless)

Id layout (all variants): 0 <pad>, 1 </s>, 2 <unk>, then the learned pieces, then `extra_ids` sentinels at the
top of the id space in T5 order (`<extra_id_0>` = vocab_size - 1). A vocabulary is a directory holding the model
(`tokenizer.json` or `spm.model`) and `meta.json` (variant, sizes, analyser and library versions, training
inputs and command); the morpheme variants also hold `lexicon.tsv.gz`, the morpheme cuts of the training text's
frequent letter runs (t5k.morph lexicon), so that a fresh process does not have to analyse them again.
"""

import argparse
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Union

import gin
import numpy as np
import seqio
import tensorflow as tf

from t5k import files, morph

_log = logging.getLogger(__name__)

VARIANTS = ("morph_bbpe", "bbpe", "char_bpe", "sentencepiece")
SPECIALS = ("<pad>", "</s>", "<unk>")
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
DEFAULT_EXTRA_IDS = 100
# sentencepiece trains on a random sample of at most this many lines (34 MB / 275k lines train in ~6 min on 2 cores)
DEFAULT_SPM_SENTENCES = 2_000_000
MORPH_VARIANTS = ("morph_bbpe", "char_bpe")
LEXICON_FILE = "lexicon.tsv.gz"
# Runs seen at least this often in the training text go into the lexicon (docs/vocab.md "Lexicon": size vs hit rate)
DEFAULT_LEXICON_MIN_COUNT = 2
DEFAULT_DIR = Path(__file__).resolve().parent / "data" / "vocab" / "morph_bbpe_51200"
FORMAT = "t5k-vocab/1"
_SENTINEL_RE = re.compile(r"<extra_id_(0|[1-9][0-9]{0,5})>")
_UNK_TEXT = "\ufffd"
# Id cache bounds: pieces longer than this are encoded each time (not words); a full cache is replaced.
_MAX_CACHED_CHARS = morph.MAX_ANALYSED_CHARS
_ID_CACHE_LIMIT = 1 << 19


class VocabularyError(ValueError):
    """Bad input or a bad vocabulary artifact; the message says what and where."""


def _bytes_to_unicode() -> dict:
    """The byte <-> printable-character map of byte-level BPE (the one HF `ByteLevel` uses).

    Printable Latin-1 bytes stand for themselves; the others are shifted to code points 256+ so that every
    token is a printable string.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = (b for b in range(256) if b not in keep)
    mapping = {b: chr(b) for b in keep}
    mapping.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return mapping


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}
# str.translate table: the Latin-1 character of each byte -> its byte-level character
_BYTE_LEVEL_TABLE = _bytes_to_unicode()


def read_meta(path: Union[str, Path]) -> dict:
    meta_file = Path(path) / "meta.json"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VocabularyError(f"{meta_file}: not a t5k vocabulary directory ({e})") from e
    if meta.get("format") != FORMAT or meta.get("variant") not in VARIANTS:
        raise VocabularyError(f"{meta_file}: unknown format {meta.get('format')!r} / variant {meta.get('variant')!r}")
    model_file = Path(path) / ("spm.model" if meta["variant"] == "sentencepiece" else "tokenizer.json")
    if not model_file.is_file():
        raise VocabularyError(f"{model_file}: missing; a {meta['variant']} vocabulary directory holds it beside "
                              f"meta.json")
    return meta


def as_text(s: Union[str, bytes], where: str = "input") -> str:
    """`s` as str; non-UTF-8 bytes raise VocabularyError naming the byte offset."""
    if isinstance(s, str):
        return s
    s = bytes(s)
    try:
        return s.decode("utf-8")
    except UnicodeDecodeError as e:
        raise VocabularyError(f"{where}: invalid UTF-8 byte {s[e.start]:#04x} at byte offset {e.start}") from None


class BPEVocabulary(seqio.Vocabulary):
    """A morph_bbpe / bbpe / char_bpe vocabulary directory as a seqio.Vocabulary.

    Encoding: the text is split at literal sentinels (`<extra_id_3>` -> its id when 3 < extra_ids), the rest is
    pre-tokenized into pieces (t5k.morph) and BPE-encoded inside the pieces by HF `tokenizers`. Decoding needs no
    tokenizer at all: every id maps to its bytes (pad/eos to nothing, unk to U+FFFD, sentinels to their literal
    text), the bytes are joined and decoded as UTF-8 with replacement of incomplete sequences. The same table
    drives `_decode_tf` in pure TensorFlow, so decoding in tf.data needs no Python.
    """

    def __init__(self, path: Union[str, Path], extra_ids: Optional[int] = None, use_lexicon: bool = True):
        """`use_lexicon=False` ignores the artifact's lexicon (same ids, every run analysed live: for benchmarks)."""
        self.path = str(Path(path).resolve())
        self.meta = read_meta(path)
        if self.meta["variant"] == "sentencepiece":
            raise VocabularyError(f"{path}: a sentencepiece vocabulary; load it with get_vocabulary()")
        super().__init__(self.meta["extra_ids"] if extra_ids is None else extra_ids)
        self.use_lexicon = use_lexicon
        self._byte_level = self.meta["variant"] != "char_bpe"
        lexicon = self.meta.get("lexicon")
        lexicon_path = os.path.join(self.path, lexicon["file"]) if lexicon and use_lexicon else None
        self._splitter = morph.MorphSplitter(lexicon_path) if self.meta["variant"] != "bbpe" else None
        self._ids_cache = {}  # stage-1 piece -> tuple of ids (see encode_batch)
        self._piece_ids = {}  # morpheme piece -> tuple of ids (see _encode_runs)

    @functools.cached_property
    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(os.path.join(self.path, "tokenizer.json"))

    @functools.cached_property
    def id_bytes(self) -> List[bytes]:
        """Bytes of every id in [0, vocab_size)."""
        table = [b""] * self.vocab_size
        for token, i in self.tokenizer.get_vocab(with_added_tokens=False).items():
            table[i] = bytes(_BYTE_OF_CHAR[c] for c in token) if self._byte_level else token.encode("utf-8")
        table[PAD_ID] = table[EOS_ID] = b""
        table[UNK_ID] = _UNK_TEXT.encode("utf-8")
        for n in range(self.extra_ids):
            table[self.vocab_size - 1 - n] = f"<extra_id_{n}>".encode("ascii")
        return table

    @functools.cached_property
    def _np_table(self) -> np.ndarray:
        return np.array(self.id_bytes, dtype=object)

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def _base_vocab_size(self) -> int:
        return self.meta["base_vocab_size"]

    @property
    def variant(self) -> str:
        return self.meta["variant"]

    # ---- Python encoding ----
    def _segments(self, text: str) -> List[Union[str, int]]:
        """`text` split into text segments and sentinel ids."""
        if not self.extra_ids or "<extra_id_" not in text:
            return [text]
        out, start = [], 0
        for m in _SENTINEL_RE.finditer(text):
            n = int(m.group(1))
            if n < self.extra_ids:
                out += [text[start : m.start()], self.vocab_size - 1 - n]
                start = m.end()
        return out + [text[start:]]

    def pieces(self, texts: Sequence[str]) -> List[List[str]]:
        """The pre-tokenizer's pieces of each text (BPE never merges across them)."""
        if self._splitter is None:
            return [morph.pieces_by_pattern(t) for t in texts]
        return self._splitter.split_batch(texts)

    def _encode_runs(self, runs: Sequence[str]) -> List[tuple]:
        """Ids of each stage-1 piece: cut into morpheme pieces, BPE inside each piece.

        BPE never merges across pieces (they are pre-tokenized words), so a stage-1 piece's ids are the
        concatenation of its morpheme pieces' ids. Morpheme pieces repeat far more than stage-1 pieces (particles,
        endings, stems), so each distinct one is BPE'd once, by the BPE model directly (`model.tokenize` on its
        byte-level form: what `Tokenizer.encode(..., is_pretokenized=True)` does per word, without building an
        `Encoding` per text); on new text this halves the BPE cost.
        """
        if self._splitter is None:
            pieces = [[r] for r in runs]
        else:
            pieces = self._splitter.split_runs(runs)
        cache = self._piece_ids
        new = {q for ps in pieces for q in ps if q not in cache}
        tokenize = self.tokenizer.model.tokenize
        fresh = {q: tuple(t.id for t in tokenize(self._model_text(q))) if q else () for q in new}
        out = [tuple(i for q in ps for i in (fresh[q] if q in fresh else cache[q])) for ps in pieces]
        if len(cache) > _ID_CACHE_LIMIT:  # swapped, not cleared, like the id cache (see encode_batch)
            cache = self._piece_ids = {}
        cache.update((q, ids) for q, ids in fresh.items() if len(q) <= _MAX_CACHED_CHARS)
        return out

    def _model_text(self, piece: str) -> str:
        """`piece` as the BPE model sees it: its UTF-8 bytes as byte-level characters (char_bpe: itself).
        A lone surrogate raises UnicodeEncodeError."""
        if not self._byte_level:
            piece.encode("utf-8")
            return piece
        return piece.encode("utf-8").decode("latin-1").translate(_BYTE_LEVEL_TABLE)

    def encode_batch(self, texts: Iterable[Union[str, bytes]]) -> List[List[int]]:
        """Encode many texts at once: the fast path.

        Ids are cached per stage-1 piece (≈ eojeol with its leading space): its morpheme cuts and BPE depend on
        the piece alone, so a text's ids are the concatenation of its pieces' ids, and warm text costs one regex
        pass and one dict lookup per piece. Unseen pieces go through one analyser batch and one Rust call. The
        cache follows the splitter's rules (bounded, swapped when full, each call keeps the dict it started with).
        """
        plans = [self._segments(as_text(t, f"text {i}")) for i, t in enumerate(texts)]
        runs = [morph.pieces_by_pattern(seg) for plan in plans for seg in plan if isinstance(seg, str)]
        cache = self._ids_cache
        missing = list({r for rs in runs for r in rs if r not in cache})
        try:
            fresh = dict(zip(missing, self._encode_runs(missing))) if missing else {}
        except (TypeError, UnicodeEncodeError):  # a str with lone surrogates: not encodable as UTF-8
            for i, plan in enumerate(plans):
                for seg in plan:
                    for j, c in enumerate(seg if isinstance(seg, str) else ""):
                        if 0xD800 <= ord(c) <= 0xDFFF:
                            raise VocabularyError(
                                f"text {i}: lone surrogate U+{ord(c):04X} at character {j}: not Unicode text") from None
            raise
        cache.update((r, ids) for r, ids in fresh.items() if len(r) <= _MAX_CACHED_CHARS)
        if len(cache) > _ID_CACHE_LIMIT:
            self._ids_cache = {}
        get = cache.get
        encoded = iter(runs)
        out = []
        for plan in plans:
            ids = []
            for seg in plan:
                if isinstance(seg, str):
                    for r in next(encoded):
                        ids.extend(get(r) or fresh[r])
                else:
                    ids.append(seg)
            out.append(ids)
        return out

    def _encode(self, s: Union[str, bytes]) -> List[int]:
        return self.encode_batch([s])[0]

    # ---- Python decoding ----
    def _clean(self, ids) -> List[int]:
        """ids as ints, truncated after the first EOS; ids outside [0, vocab_size) become unk."""
        if isinstance(ids, (tf.Tensor, np.ndarray)):
            ids = np.asarray(ids).tolist()
        ids = [int(i) if 0 <= i < self.vocab_size else UNK_ID for i in ids]
        return ids[: ids.index(EOS_ID) + 1] if EOS_ID in ids else ids

    def decode(self, ids) -> str:
        """Like seqio's decode (stops at EOS), but sentinels decode to their literal text, not unk."""
        return self._decode(self._clean(ids))

    def _decode(self, ids) -> str:
        table = self.id_bytes
        return b"".join([table[i] for i in self._clean(ids)]).decode("utf-8", "replace")

    def id_to_piece(self, i: int) -> str:
        """Readable form of one id: its text, with bytes that are not a whole character shown as <0xNN>."""
        raw = self.id_bytes[i] if 0 <= i < self.vocab_size else _UNK_TEXT.encode()
        text = raw.decode("utf-8", "backslashreplace")
        return re.sub(r"\\x([0-9a-f]{2})", lambda m: f"<0x{m.group(1).upper()}>", text)

    # ---- TensorFlow ----
    def _np_encode_one(self, s) -> np.ndarray:
        return np.asarray(self._encode(s.item() if isinstance(s, np.ndarray) else s), dtype=np.int32)

    def _np_encode_many(self, batch: np.ndarray):
        ids = self.encode_batch(list(batch))
        flat = np.fromiter((i for x in ids for i in x), dtype=np.int32)
        return flat, np.asarray([len(x) for x in ids], dtype=np.int64)

    def _encode_tf(self, s):
        """Rank 0 string -> int32 [None]; rank 1 [batch] -> RaggedTensor int32 [batch, None] (as seqio expects)."""
        s = tf.convert_to_tensor(s, dtype=tf.string)
        if s.shape.rank == 0:
            ids = tf.numpy_function(self._np_encode_one, [s], tf.int32, stateful=False)
            ids.set_shape([None])
            return ids
        if s.shape.rank == 1:
            flat, lengths = tf.numpy_function(self._np_encode_many, [s], [tf.int32, tf.int64], stateful=False)
            flat.set_shape([None])
            lengths.set_shape(s.shape)
            return tf.RaggedTensor.from_row_lengths(flat, lengths, validate=False)
        raise VocabularyError(f"encode_tf takes a string scalar or vector, got shape {s.shape}")

    def decode_tf(self, ids):
        """Stops at the first EOS like seqio's, but keeps sentinels (seqio would turn them into unk)."""
        if isinstance(ids, tf.RaggedTensor):
            ids = ids.to_tensor(PAD_ID)  # pad decodes to nothing
        ids = tf.convert_to_tensor(ids)
        after_eos = tf.cumsum(tf.cast(tf.equal(ids, EOS_ID), tf.int32), exclusive=True, axis=-1)
        return self._decode_tf(tf.where(after_eos > 0, tf.zeros_like(ids), ids))

    def _decode_tf(self, ids):
        ids = tf.cast(ids, tf.int32)
        valid = tf.logical_and(ids >= 0, ids < self.vocab_size)
        table = tf.constant(self._np_table, dtype=tf.string)  # one constant per graph: tensors can't be shared
        pieces = tf.gather(table, tf.where(valid, ids, UNK_ID))
        joined = tf.strings.reduce_join(pieces, axis=-1)
        return tf.strings.unicode_transcode(joined, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)

    def __eq__(self, other):
        if not isinstance(other, BPEVocabulary):
            return NotImplemented  # lets a GinVocabulary on the right compare what it resolves to
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def _key(self):
        return self.path, self.extra_ids, self.use_lexicon

    def __getstate__(self):
        return {"path": self.path, "extra_ids": self.extra_ids, "use_lexicon": self.use_lexicon}

    def __setstate__(self, state):
        self.__init__(state["path"], state["extra_ids"], state.get("use_lexicon", True))

    def __str__(self):
        return f"BPEVocabulary(variant={self.variant}, path={self.path}, vocab_size={self.vocab_size})"


@functools.cache
def _load(path: str, extra_ids: Optional[int]) -> seqio.Vocabulary:
    meta = read_meta(path)
    if meta["variant"] == "sentencepiece":
        return seqio.SentencePieceVocabulary(
            os.path.join(path, "spm.model"), meta["extra_ids"] if extra_ids is None else extra_ids)
    return BPEVocabulary(path, extra_ids)


@gin.configurable(module="t5k.vocab")
def get_vocabulary(variant: str = "morph_bbpe", path: Optional[str] = None,
                   extra_ids: Optional[int] = DEFAULT_EXTRA_IDS) -> seqio.Vocabulary:
    """The vocabulary for `variant`, loaded once per process.

    `path` defaults to the shipped morph_bbpe vocabulary; other variants have no shipped artifact and need the
    directory written by `t5k vocab train`. `extra_ids=None` takes the count recorded in the artifact.
    """
    if variant not in VARIANTS:
        raise VocabularyError(f"unknown vocabulary variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if path is None:
        if variant != "morph_bbpe":
            raise VocabularyError(f"no shipped {variant} vocabulary: train one with `t5k vocab train --variant "
                                  f"{variant} ...` and bind get_vocabulary.path (gin macro VOCAB_DIR)")
        path = DEFAULT_DIR
    vocab = _load(str(Path(path).resolve()), extra_ids)
    found = getattr(vocab, "variant", "sentencepiece")
    if found != variant:
        raise VocabularyError(f"{path} holds a {found} vocabulary, not {variant}")
    return vocab


def default_vocabulary() -> seqio.Vocabulary:
    """The shipped morph_bbpe vocabulary with 100 sentinels: what `get_vocabulary()`, and so the registered
    t5k_tasks, `t5k eval` and `t5k infer`, use when gin selects no other."""
    return get_vocabulary("morph_bbpe", None, DEFAULT_EXTRA_IDS)


class GinVocabulary(seqio.Vocabulary):
    """Whatever `get_vocabulary()` returns under the gin bindings in force *when it is used*.

    seqio tasks hold a vocabulary in their output features from the moment they are registered, and `t5k_tasks`
    registers its tasks when imported: before a command has parsed its gin files. A task holding a concrete
    vocabulary would therefore ignore `gin/vocab/*.gin`. The registered tasks hold this proxy instead; every call
    resolves `get_vocabulary()` (a cached load: a dict lookup after the first) and forwards to the result, so
    `--gin_file=gin/vocab/bbpe.gin` switches every registered task, its token cache (keyed by the resolved
    vocabulary's files) and `t5k eval`/`infer` to the bbpe artifact. Equality is the resolved vocabulary's, but
    seqio's SentencePieceVocabulary answers `False` to any other type, so `sp == proxy` is False while
    `proxy == sp` is True: compare through `resolve()` where either side may be one.

    Ids computed from the vocabulary at registration time would go stale in the same way, so the tasks derive
    them (UL2 mode tokens, speaker tags) from their output features when the pipeline is built.
    """

    def __init__(self):  # no state: seqio's __init__ would only store extra_ids, which is forwarded
        pass

    def __setattr__(self, name, value):
        raise AttributeError(f"GinVocabulary forwards to get_vocabulary() and holds nothing: set {name!r} on "
                             "t5k.vocab.resolve(vocabulary)")

    @staticmethod
    def resolve() -> seqio.Vocabulary:
        return get_vocabulary()

    # Everything seqio and t5k call on a vocabulary, forwarded (abstract in seqio.Vocabulary, so not left to
    # __getattr__, which only sees names the class lacks).
    extra_ids, vocab_size, _base_vocab_size, bos_id, pad_id, eos_id, unk_id = (
        property(functools.partial(lambda self, name: getattr(self.resolve(), name), name=name))
        for name in ("extra_ids", "vocab_size", "_base_vocab_size", "bos_id", "pad_id", "eos_id", "unk_id"))
    encode, decode, encode_tf, decode_tf, _encode, _decode, _encode_tf, _decode_tf = (
        functools.partialmethod(lambda self, arg, name: getattr(self.resolve(), name)(arg), name=name)
        for name in ("encode", "decode", "encode_tf", "decode_tf", "_encode", "_decode", "_encode_tf", "_decode_tf"))

    def __getattr__(self, name):  # encode_batch, pieces, variant, path, id_bytes, sp_model, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __eq__(self, other):
        return resolve(self) == resolve(other)

    def __hash__(self):
        return hash(self.resolve())

    def __str__(self):
        return f"GinVocabulary({self.resolve()})"

    __repr__ = __str__


def resolve(vocabulary: seqio.Vocabulary) -> seqio.Vocabulary:
    """The concrete vocabulary behind `vocabulary` (itself unless it is a GinVocabulary)."""
    return vocabulary.resolve() if isinstance(vocabulary, GinVocabulary) else vocabulary


def check_tasks_follow_gin(task_vocabulary: seqio.Vocabulary, task: str) -> None:
    """Raises VocabularyError when gin binds `get_vocabulary` (gin/vocab/*.gin) to another vocabulary than the one
    `task` tokenizes with. The registered t5k_tasks follow gin (GinVocabulary); a task of one's own registered
    with a concrete vocabulary does not, and the binding would otherwise be ignored silently."""
    chosen = get_vocabulary()
    if chosen != resolve(task_vocabulary):
        raise VocabularyError(f"gin selects {chosen}, but {task} tokenizes with {resolve(task_vocabulary)}: "
                              "bind get_vocabulary to that vocabulary, or register the task with "
                              "t5k.vocab.GinVocabulary() to follow gin (docs/vocab.md)")


def model_fingerprint(vocabulary: seqio.Vocabulary) -> str:
    """sha1 of what decides the ids: the variant, the BPE model (tokenizer.json) or the SentencePiece model, and the
    sentinel count. Not the lexicon (saved analyses: same ids) or the training metadata, so a copied or re-lexiconed
    artifact keeps its fingerprint."""
    concrete = resolve(vocabulary)
    h = hashlib.sha1(type(concrete).__name__.encode())
    if isinstance(concrete, BPEVocabulary):
        h.update(concrete.variant.encode())
        with open(os.path.join(concrete.path, "tokenizer.json"), "rb") as f:
            h.update(f.read())
    elif hasattr(concrete, "sp_model"):
        h.update(concrete.sp_model)
    else:  # another kind (a test's pass-through ids): its size is all that is known across processes
        h.update(str(concrete.vocab_size).encode())
    h.update(str(concrete.extra_ids).encode())
    return h.hexdigest()[:16]


def describe(vocabulary: seqio.Vocabulary) -> dict:
    """The vocabulary as a checkpoint records it (t5k.records): its description, variant, size and fingerprint."""
    concrete = resolve(vocabulary)
    variant = getattr(concrete, "variant", "sentencepiece" if hasattr(concrete, "sp_model") else type(concrete).__name__)
    return {"vocabulary": str(concrete), "variant": variant,
            "vocab_size": concrete.vocab_size, "extra_ids": concrete.extra_ids,
            "fingerprint": model_fingerprint(concrete)}


def check_fits_model(vocabulary: seqio.Vocabulary, model_vocab_size: int) -> None:
    """Raises VocabularyError when `vocabulary` has ids the model's embedding has no row for (JAX would clamp
    them to the last row silently). A smaller vocabulary is fine: the spare rows are never used."""
    if vocabulary.vocab_size > model_vocab_size:
        raise VocabularyError(f"{resolve(vocabulary)} has {vocabulary.vocab_size} ids, but the model's "
                              f"TransformerConfig.vocab_size is {model_vocab_size}: set VOCAB_SIZE (gin) to at "
                              f"least {vocabulary.vocab_size}")


# ---------------------------------------------------------------------------------------------------------------
# Training
def read_lines(files: Sequence[Union[str, Path]], progress: bool = False) -> Iterator[str]:
    """Lines (without the newline) of text files, plain or .gz; bad UTF-8 names the file, line and byte."""
    import gzip

    from tqdm import tqdm

    total = sum(os.path.getsize(f) for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=not progress) as bar:
        for f in files:
            opener = gzip.open if str(f).endswith(".gz") else open
            with opener(f, "rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    bar.update(len(raw))
                    yield as_text(raw.rstrip(b"\n"), f"{f}:{lineno}")


def _batches(lines: Iterable[str], size: int = 2048) -> Iterator[List[str]]:
    batch = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _train_bpe(lines: Iterable[str], variant: str, base_size: int, min_frequency: int, progress: bool):
    """(tokenizer spec, base pieces, the splitter that cut the text: its cache holds the training text's cuts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    byte_level = variant != "char_bpe"
    tok = Tokenizer(models.BPE(unk_token=None if byte_level else SPECIALS[UNK_ID]))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=base_size, min_frequency=min_frequency, special_tokens=list(SPECIALS), show_progress=progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [])
    splitter = morph.MorphSplitter() if variant != "bbpe" else None

    def pieces():
        for batch in _batches(lines):
            if splitter is None:
                yield [p for line in batch for p in morph.pieces_by_pattern(line)]
            else:
                yield [p for ps in splitter.split_batch(batch) for p in ps]

    tok.train_from_iterator(pieces(), trainer=trainer)
    spec = json.loads(tok.to_str())
    # Specials stay in the model's vocabulary (ids 0-2, never produced by merges) but are not "added tokens":
    # added tokens are matched in raw text, and a literal "</s>" in a document must stay text.
    spec["added_tokens"] = []
    merged = {a + b for a, b in (m if isinstance(m, list) else m.split(" ") for m in spec["model"]["merges"])}
    if merged & set(SPECIALS) or [spec["model"]["vocab"].get(s) for s in SPECIALS] != [0, 1, 2]:
        raise VocabularyError("special tokens collided with learned pieces")
    return json.dumps(spec, ensure_ascii=False), len(spec["model"]["vocab"]), splitter


def _train_sentencepiece(lines: Iterable[str], base_size: int, tmp: str, max_sentences: int,
                         threads: int) -> int:
    """Unigram SentencePiece; it trains on a random sample of at most `max_sentences` lines (its own reservoir
    sampling: `input_sentence_size` + `shuffle_input_sentence`), with `threads` EM threads.

    Sampling bounds the memory and the EM cost (each EM step runs the lattice over every sampled line); the
    seed-piece suffix array is the other large cost and grows with the sampled text.
    """
    import sentencepiece as spm

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(line for line in lines if line), model_prefix=os.path.join(tmp, "spm"),
            vocab_size=base_size, model_type="unigram", pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            character_coverage=0.9995, input_sentence_size=max_sentences, shuffle_input_sentence=True,
            num_threads=threads, max_sentence_length=1 << 16, minloglevel=2)
    except RuntimeError as e:  # e.g. fewer pieces than required characters, or "Vocabulary size too high"
        raise VocabularyError(f"sentencepiece training failed for {base_size} base pieces (vocab_size minus "
                              f"extra_ids) on at most {max_sentences or 'all'} sampled lines: {e}") from None
    os.remove(os.path.join(tmp, "spm.vocab"))
    return spm.SentencePieceProcessor(model_file=os.path.join(tmp, "spm.model")).get_piece_size()


def _chmod_like_a_new_directory(path: str) -> None:
    """mkdtemp creates 0700; a published vocabulary gets the mode `mkdir` would give it (0777 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _publish(tmp: str, out: Path) -> None:
    """Move the finished artifact into place (an old artifact or empty dir at `out` is replaced)."""
    if out.exists():
        old = tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-")
        os.replace(out, os.path.join(old, "v"))
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def _clean_up_after_a_killed_run(out: Path) -> None:
    """Removes what a `vocab train` into `out` left when it was killed (SIGKILL skips its `finally`): its work
    directories `.OUT.tmp-*`, and `.OUT.old-*`. An `.OUT.old-*/v` while `out` is missing is the previous artifact
    of a run killed between `_publish`'s two renames: it is moved back to `out` first. (So two trainings into one
    `out` at the same time are not supported.)"""
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if (old / "v").is_dir() and not out.exists():
            os.replace(old / "v", out)
            _log.warning("t5k vocab: restored %s from %s, left by a killed run", out, old)
        shutil.rmtree(old, ignore_errors=True)
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def train(inputs: Sequence[Union[str, Path]], vocab_size: int, variant: str, out: Union[str, Path],
          extra_ids: int = DEFAULT_EXTRA_IDS, min_frequency: int = 2, progress: bool = False,
          command: Optional[str] = None, spm_sentences: int = DEFAULT_SPM_SENTENCES,
          threads: Optional[int] = None, lexicon_min_count: int = DEFAULT_LEXICON_MIN_COUNT) -> Path:
    """Train a vocabulary of `vocab_size` ids in all (`extra_ids` of them sentinels) and write it to `out`.

    `spm_sentences` and `threads` apply to the sentencepiece variant only (at most that many lines sampled at
    random; EM threads, default all cores). BPE variants always read every line. The morpheme variants also
    save the lexicon of the runs seen at least `lexicon_min_count` times (0: no lexicon).
    """
    if variant not in VARIANTS:
        raise VocabularyError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if extra_ids < 0:
        raise VocabularyError(f"extra_ids must be 0 or more, got {extra_ids}")
    base_size = vocab_size - extra_ids
    if base_size <= len(SPECIALS) + 256:
        raise VocabularyError(f"vocab_size {vocab_size} leaves no room for pieces after {extra_ids} extra_ids")
    if lexicon_min_count < 0:
        raise VocabularyError(f"lexicon_min_count must be 0 (no lexicon) or more, got {lexicon_min_count}")
    if 0 < spm_sentences <= 100 or spm_sentences < 0:  # sentencepiece's own lower bound on a sample
        raise VocabularyError(f"spm_sentences must be 0 (every line) or more than 100, got {spm_sentences}")
    threads = threads or os.cpu_count() or 1
    for f in inputs:
        if not os.path.isfile(f):
            raise VocabularyError(f"{f}: no such file")
    out = Path(out).resolve()
    _clean_up_after_a_killed_run(out)
    if out.exists() and not out.is_dir():
        raise VocabularyError(f"{out} exists and is not a directory; refusing to overwrite it")
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").exists():
        raise VocabularyError(f"{out} exists and is not a vocabulary directory; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    _chmod_like_a_new_directory(tmp)
    try:
        start = time.time()
        lines = read_lines(inputs, progress)
        if variant == "sentencepiece":
            got = _train_sentencepiece(lines, base_size, tmp, spm_sentences, threads)
        else:
            spec, got, splitter = _train_bpe(lines, variant, base_size, min_frequency, progress)
            Path(tmp, "tokenizer.json").write_text(spec, encoding="utf-8")
        if got < base_size:
            raise VocabularyError(f"the input supports only {got} base pieces at min_frequency={min_frequency}, "
                                  f"not {base_size}: use a smaller --vocab_size or more text")
        if got > base_size:  # char_bpe: every character of the input is a base piece, whatever the size asked
            raise VocabularyError(f"the input's {got - len(SPECIALS)} distinct characters and the {len(SPECIALS)} "
                                  f"specials need {got} base pieces, more than {base_size}: use a --vocab_size of "
                                  f"at least {got + extra_ids}")
        meta = {
            "format": FORMAT, "variant": variant, "vocab_size": vocab_size, "base_vocab_size": base_size,
            "extra_ids": extra_ids, "specials": dict(zip(SPECIALS, (PAD_ID, EOS_ID, UNK_ID))),
            "lossless": variant in ("morph_bbpe", "bbpe"),
            "pretokenizer": {"pattern": morph.PIECE_PATTERN, "morphemes": variant in ("morph_bbpe", "char_bpe"),
                             "max_analysed_chars": morph.MAX_ANALYSED_CHARS},
            "analyser": morph.analyser_version() if variant in ("morph_bbpe", "char_bpe") else None,
            "versions": {p: version(p) for p in ("tokenizers", "sentencepiece", "seqio")},
            "training": {"inputs": [{"name": Path(f).name, "bytes": os.path.getsize(f)} for f in inputs],
                         "min_frequency": min_frequency, "seconds": round(time.time() - start, 1),
                         **({"spm_sentences": spm_sentences, "threads": threads}
                            if variant == "sentencepiece" else {}),
                         "command": command},
        }
        if variant in MORPH_VARIANTS and lexicon_min_count:
            meta["lexicon"] = _write_lexicon(Path(tmp), inputs, lexicon_min_count, splitter, progress, command)
        _write_meta(Path(tmp), meta)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_meta(directory: Path, meta: dict) -> None:
    files.write_text(directory / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def _write_lexicon(directory: Path, inputs: Sequence[Union[str, Path]], min_count: int,
                   splitter: Optional[morph.MorphSplitter], progress: bool, command: Optional[str]) -> dict:
    """Count the letter runs of `inputs`, analyse those seen >= `min_count` times, save them as the directory's
    lexicon; returns its meta.json entry."""
    start = time.time()
    counts = morph.count_runs(read_lines(inputs, progress))
    entries = morph.build_lexicon(counts, min_count, splitter, progress)
    morph.write_lexicon(directory / LEXICON_FILE, entries)
    return {"file": LEXICON_FILE, "runs": len(entries), "min_count": min_count,
            "analyser": morph.analyser_version(), "bytes": (directory / LEXICON_FILE).stat().st_size,
            "inputs": [{"name": Path(f).name, "bytes": os.path.getsize(f)} for f in inputs],
            "distinct_runs_in_inputs": len(counts), "seconds": round(time.time() - start, 1), "command": command}


def add_lexicon(path: Union[str, Path], inputs: Sequence[Union[str, Path]],
                min_count: int = DEFAULT_LEXICON_MIN_COUNT, progress: bool = False,
                command: Optional[str] = None) -> Path:
    """Add (or replace) the lexicon of an existing morph_bbpe / char_bpe artifact, computed from `inputs` (use the
    vocabulary's own training text); the tokenizer is not touched. Every run is analysed live."""
    path = Path(path).resolve()
    meta = read_meta(path)
    if meta["variant"] not in MORPH_VARIANTS:
        raise VocabularyError(f"{path}: a {meta['variant']} vocabulary has no morpheme cuts, so no lexicon")
    if min_count < 1:
        raise VocabularyError(f"min_count must be at least 1, got {min_count}")
    for f in inputs:
        if not os.path.isfile(f):
            raise VocabularyError(f"{f}: no such file")
    meta["lexicon"] = _write_lexicon(path, inputs, min_count, None, progress, command)
    _write_meta(path, meta)
    return path / LEXICON_FILE


# ---------------------------------------------------------------------------------------------------------------
# CLI: t5k vocab train | lexicon | encode | decode
def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    tr = sub.add_parser("train", help="train a vocabulary on text files (one document or sentence per line)")
    tr.add_argument("--input", nargs="+", required=True, help="text files, plain or .gz, UTF-8")
    tr.add_argument("--vocab_size", type=int, required=True, help="total ids, extra_ids included (e.g. 51200)")
    tr.add_argument("--variant", choices=VARIANTS, default="morph_bbpe")
    tr.add_argument("--extra_ids", type=int, default=DEFAULT_EXTRA_IDS)
    tr.add_argument("--min_frequency", type=int, default=2)
    tr.add_argument("--spm_sentences", type=int, default=DEFAULT_SPM_SENTENCES,
                    help="sentencepiece: train on a random sample of at most N lines (0 = all)")
    tr.add_argument("--threads", type=int, default=None, help="sentencepiece: EM threads (default: all cores)")
    tr.add_argument("--lexicon_min_count", type=int, default=DEFAULT_LEXICON_MIN_COUNT,
                    help="morph_bbpe/char_bpe: save the cuts of letter runs seen at least N times (0 = no lexicon)")
    tr.add_argument("--out", required=True, help="output directory (written atomically)")
    lx = sub.add_parser("lexicon", help="add or replace the lexicon (saved morpheme cuts) of a morph_bbpe/char_bpe "
                                        "vocabulary, from its training text; the tokenizer is not touched")
    lx.add_argument("--vocab", required=True, help="vocabulary directory")
    lx.add_argument("--input", nargs="+", required=True, help="the vocabulary's training text files, plain or .gz")
    lx.add_argument("--min_count", type=int, default=DEFAULT_LEXICON_MIN_COUNT,
                    help="keep letter runs seen at least N times")
    for name, what in (("encode", "text lines on stdin -> space-separated ids"),
                       ("decode", "space-separated ids on stdin -> text lines")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--vocab", default=None, help="vocabulary directory (default: the shipped morph_bbpe)")
        if name == "encode":
            p.add_argument("--pieces", action="store_true", help="print the pieces instead of ids")


def _load_cli_vocab(path: Optional[str]) -> seqio.Vocabulary:
    if path is None:
        return default_vocabulary()
    return get_vocabulary(read_meta(path)["variant"], path, None)


def _piece(vocab: seqio.Vocabulary, i: int) -> str:
    if isinstance(vocab, BPEVocabulary):
        text = vocab.id_to_piece(i)
    else:
        text = vocab.tokenizer.id_to_piece(i) if i < vocab.tokenizer.get_piece_size() else vocab.decode([i])
    return text.replace(" ", "▁").replace("\n", "\\n").replace("\t", "\\t")


def _encode_cli(vocab: seqio.Vocabulary, show_pieces: bool) -> None:
    lines = (as_text(raw.rstrip(b"\n"), f"stdin:{n}") for n, raw in enumerate(sys.stdin.buffer, 1))
    for batch in _batches(lines, 256):
        ids = vocab.encode_batch(batch) if isinstance(vocab, BPEVocabulary) else [vocab.encode(t) for t in batch]
        for row in ids:
            sys.stdout.write(" ".join(_piece(vocab, i) if show_pieces else str(i) for i in row) + "\n")


def _decode_cli(vocab: seqio.Vocabulary) -> None:
    for n, raw in enumerate(sys.stdin.buffer, 1):
        try:
            ids = [int(x) for x in raw.split()]
        except ValueError:
            raise VocabularyError(f"stdin:{n}: expected space-separated integer ids") from None
        sys.stdout.write(vocab.decode(ids) + "\n")


def run(args: argparse.Namespace, bindings: Sequence[str] = ()) -> int:
    """Entry point of `t5k vocab`; gin `bindings` are not used (the vocabulary is chosen by --vocab)."""
    command = "t5k vocab " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["vocab"] else None
    try:
        if args.action == "train":
            out = train(args.input, args.vocab_size, args.variant, args.out, args.extra_ids,
                        args.min_frequency, progress=True, command=command,
                        spm_sentences=args.spm_sentences, threads=args.threads,
                        lexicon_min_count=args.lexicon_min_count)
            print(f"wrote {out}")
        elif args.action == "lexicon":
            print(f"wrote {add_lexicon(args.vocab, args.input, args.min_count, progress=True, command=command)}")
        elif args.action == "encode":
            _encode_cli(_load_cli_vocab(args.vocab), args.pieces)
        else:
            _decode_cli(_load_cli_vocab(args.vocab))
    except (VocabularyError, morph.LexiconError) as e:
        print(f"t5k vocab: error: {e}", file=sys.stderr)
        return 2
    return 0
