"""Corpora: where the files are, robust readers, the token cache, and seqio data sources.

Files
    Embedded (committed, so a fresh clone works): ``tasks/data/prose/*.txt.gz`` (boddari wikinews, book_review01,
    fairytale01; blank-line separated documents), ``tasks/data/prose/wikinews.csv.gz`` (date, source, title, body)
    and ``tasks/data/dialog/*_sessions.jsonl.gz`` (HG-TODS, XPersona-ko). Attribution: ``tasks/NOTICE.md``.
    Local corpora: ``shared_data_dir()`` (env ``T5K_DATA_DIR``, else ``../shared/data`` beside the checkout) for the
    downstream sets; ``T5K_PRETRAIN_FILES`` (or gin ``pretraining_files``) replaces the embedded prose.

Bad input never crashes a reader and never changes data silently: empty documents, whitespace-only lines, invalid
JSON lines, non-UTF-8 bytes, over-long documents, one-turn sessions and empty utterances are skipped, each logged as
``t5k_tasks: FILE:LINE: skipped <what> (<reason>)`` (the first 20 per file) plus one summary line per file with the
counts, and recorded in ``SKIPPED[file]`` (a Counter by reason) for programs and tests.

Sources emit examples in a seeded, index-addressable order: ``shuffle=False`` is one pass in file order;
``shuffle=True`` is an endless stream of epochs, epoch e being the permutation of the split drawn from
``(seed, e)`` (pure TF, so two runs agree byte for byte). Splits: a document / session / record goes to
``validation`` when ``crc32(key) % VALIDATION_MODULUS == 0`` (about 2 %), else to ``train``, so adding or editing
one document never moves another.

Low-data training: inside ``train_subset(k, subset_seed)`` (what ``t5k_tasks.get_dataset.train_examples`` sets) a
source's train split is a fixed subset of ``k`` of its items, the first ``k`` of a permutation drawn from
``(subset_seed, split size)``, served in file order and sharded like the full split. The subset does not depend on
the training seed (which still orders the epochs over it) nor on the number of shards, and the subsets of one
``subset_seed`` are nested (the 100 examples of ``k=100`` are among the 1,000 of ``k=1000``), so a data-efficiency
curve compares runs on growing shares of the same data. Other splits are never subset.
"""

import collections
import contextlib
import csv
import dataclasses
import functools
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import gin
import numpy as np
import seqio
import tensorflow as tf

from t5k import vocab

log = logging.getLogger("t5k_tasks")

PACKAGE_DIR = Path(__file__).resolve().parent
EMBEDDED_DIR = PACKAGE_DIR / "data"
PROSE_FILES = {
    "wikinews": EMBEDDED_DIR / "prose" / "wikinews.txt.gz",
    "book_review": EMBEDDED_DIR / "prose" / "book_review01.txt.gz",
    "fairytale": EMBEDDED_DIR / "prose" / "fairytale01.txt.gz",
}
WIKINEWS_CSV = EMBEDDED_DIR / "prose" / "wikinews.csv.gz"
SESSION_FILES = {
    "hg_tods": EMBEDDED_DIR / "dialog" / "hg_tods_sessions.jsonl.gz",
    "xpersona_ko": EMBEDDED_DIR / "dialog" / "xpersona_ko_sessions.jsonl.gz",
}
VALIDATION_MODULUS = 50  # ~2 % of the documents / sessions / records are held out
MAX_DOCUMENT_CHARS = 200_000  # longer "documents" are dumps or concatenation accidents: skipped, counted
MAX_LOGGED_PER_FILE = 20
SPLITS = ("train", "validation")

# file -> Counter(reason -> count); filled by the readers, read by tests and the CLI.
SKIPPED: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


class DataMissingError(FileNotFoundError):
    """A task's files are not there (e.g. the downstream sets outside a checkout with ../shared/data)."""


def shared_data_dir() -> Path:
    """The directory of the local (not embedded) data sets: env T5K_DATA_DIR, else ../shared/data."""
    env = os.environ.get("T5K_DATA_DIR")
    if env:
        return Path(env)
    return PACKAGE_DIR.parent.parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    path = shared_data_dir() / relative
    if not path.exists():
        raise DataMissingError(f"{path} not found: set T5K_DATA_DIR to the folder holding {relative.split('/')[0]}/")
    return path


@gin.configurable(module="t5k_tasks")
def pretraining_files(files: Optional[Sequence[str]] = None) -> List[Path]:
    """Prose files of the `ko_*` pre-training tasks: gin `pretraining_files.files`, else env T5K_PRETRAIN_FILES
    (os.pathsep-separated globs), else the embedded corpus. `.txt[.gz]`: blank-line separated documents;
    `.jsonl[.gz]`: one document per line in the field "text" (or "content")."""
    if files is None and os.environ.get("T5K_PRETRAIN_FILES"):
        files = os.environ["T5K_PRETRAIN_FILES"].split(os.pathsep)
    if not files:
        return list(PROSE_FILES.values())
    out = []
    for pattern in files:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise DataMissingError(f"pretraining file pattern {pattern!r} matches nothing")
        out += [Path(m) for m in matches]
    return out


# ----------------------------------------------------------------------------------------------------------
# Skips
# ----------------------------------------------------------------------------------------------------------


class SkipLog:
    """Counts and logs the records a reader skips in one file."""

    def __init__(self, path):
        self.path = str(path)
        self.counts: collections.Counter = collections.Counter()
        SKIPPED[self.path].clear()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def skip(self, line: int, what: str, reason: str) -> None:
        self.counts[reason] += 1
        SKIPPED[self.path][reason] += 1
        if self.total <= MAX_LOGGED_PER_FILE:
            log.warning("t5k_tasks: %s:%d: skipped %s (%s)", self.path, line, what, reason)

    def close(self, kept: int, unit: str) -> None:
        if self.counts:
            detail = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items()))
            log.warning("t5k_tasks: %s: kept %d %s, skipped %d (%s)", self.path, kept, unit, self.total, detail)


def _open_binary(path) -> io.BufferedIOBase:
    path = str(path)
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _lines(path) -> Iterator[Tuple[int, bytes]]:
    """(1-based line number, raw line without the newline)."""
    with _open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield number, raw.rstrip(b"\r\n")


def _decode(raw: bytes) -> Tuple[Optional[str], str]:
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 byte 0x{raw[e.start]:02x} at byte {e.start}"


# ----------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    file: str
    line: int  # first line of the document

    @property
    def key(self) -> str:
        return self.text


def read_text_documents(path, max_chars: int = MAX_DOCUMENT_CHARS) -> List[Document]:
    """Blank-line separated documents (title line + paragraphs). Lines inside a document are joined by "\\n".

    Skipped: a whitespace-only line (treated as the document break it stands for), a document with a non-UTF-8
    line (the whole document: dropping only the line would change it silently), a document over `max_chars`.
    """
    skips, docs = SkipLog(path), []
    lines: List[str] = []
    start, bad = 0, ""

    def flush():
        nonlocal lines, bad
        if lines or bad:
            text = "\n".join(lines)
            if bad:
                skips.skip(start, "document", bad)
            elif len(text) > max_chars:
                skips.skip(start, "document", f"too_long: {len(text)} > {max_chars} characters")
            else:
                docs.append(Document(text, str(path), start))
        lines, bad = [], ""

    for number, raw in _lines(path):
        text, error = _decode(raw)
        if text is None:
            if not (lines or bad):
                start = number
            bad = bad or f"non_utf8: line {number}: {error}"
            continue
        if not text.strip():
            if text:
                skips.skip(number, "whitespace-only line", "whitespace_line")
            flush()
            continue
        if not (lines or bad):
            start = number
        lines.append(text)
    flush()
    skips.close(len(docs), "documents")
    return docs


def read_jsonl(path, what: str = "record", unit: Optional[str] = None) -> Iterator[Tuple[int, dict, SkipLog]]:
    """(line, object, skips) for each valid JSON object line; invalid lines are skipped and counted.

    With `unit` (e.g. "rows"), the file's summary line is logged when the iteration ends; a yielded object counts
    as kept unless the caller skips it (one `skips.skip` call for that line) before asking for the next one."""
    skips = SkipLog(path)
    kept = 0
    for number, raw in _lines(path):
        text, error = _decode(raw)
        if text is None:
            skips.skip(number, what, f"non_utf8: {error}")
            continue
        if not text.strip():
            skips.skip(number, "whitespace-only line" if text else "empty line", "blank_line")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            skips.skip(number, what, f"invalid_json: {e.msg} (column {e.colno})")
            continue
        if not isinstance(obj, dict):
            skips.skip(number, what, "invalid_json: not an object")
            continue
        before = skips.total
        yield number, obj, skips
        kept += skips.total == before
    if unit:
        skips.close(kept, unit)


def read_jsonl_documents(path, fields: Sequence[str] = ("text", "content"),
                         max_chars: int = MAX_DOCUMENT_CHARS) -> List[Document]:
    docs, skips = [], None
    for number, obj, skips in read_jsonl(path, "document"):
        text = next((obj[f] for f in fields if isinstance(obj.get(f), str)), None)
        if text is None:
            skips.skip(number, "document", f"no text field ({'/'.join(fields)})")
        elif not text.strip():
            skips.skip(number, "document", "empty_document")
        elif len(text) > max_chars:
            skips.skip(number, "document", f"too_long: {len(text)} > {max_chars} characters")
        else:
            docs.append(Document(text, str(path), number))
    if skips is not None:
        skips.close(len(docs), "documents")
    return docs


def read_documents(path, max_chars: int = MAX_DOCUMENT_CHARS) -> List[Document]:
    name = str(path)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl_documents(path, max_chars=max_chars)
    return read_text_documents(path, max_chars)


@dataclasses.dataclass(frozen=True)
class Session:
    id: str
    turns: Tuple[Tuple[str, str], ...]  # (speaker, text)
    file: str
    line: int
    extra: Mapping = dataclasses.field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        return self.id


def read_sessions(path, max_chars: int = MAX_DOCUMENT_CHARS) -> List[Session]:
    """`{"id", "turns": [{"speaker", "text"}], ...}` lines. Empty utterances are removed (counted per utterance,
    "empty_utterance"); sessions left with fewer than two turns are skipped ("too_few_turns")."""
    sessions, skips = [], None
    for number, obj, skips in read_jsonl(path, "session"):
        turns = obj.get("turns")
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            skips.skip(number, "session", "bad_record: no list of turns")
            continue
        kept = []
        for k, turn in enumerate(turns):
            text, speaker = turn.get("text"), turn.get("speaker")
            if not isinstance(text, str) or not text.strip():
                skips.skip(number, f"utterance {k}", "empty_utterance")
            elif speaker is None:
                skips.skip(number, f"utterance {k}", "bad_record: no speaker")
            else:
                kept.append((str(speaker), text))
        if len(kept) < 2:
            skips.skip(number, "session", f"too_few_turns: {len(kept)}")
            continue
        if sum(len(t) for _, t in kept) > max_chars:
            skips.skip(number, "session", "too_long")
            continue
        extra = {k: v for k, v in obj.items() if k not in ("turns",)}
        sessions.append(Session(str(obj.get("id", f"{path}:{number}")), tuple(kept), str(path), number, extra))
    if skips is not None:
        skips.close(len(sessions), "sessions")
    return sessions


def read_tsv(path, header: bool = True, unit: str = "rows") -> Iterator[Tuple[int, List[str], SkipLog]]:
    """Rows of a TSV file without quoting (KorSTS/KorNLI contain literal quotes); non-UTF-8 lines skipped.

    The file's summary line is logged when the iteration ends; a yielded row counts as kept unless the caller
    skips it (one `skips.skip` call for that line) before asking for the next one."""
    skips = SkipLog(path)
    kept = 0
    for number, raw in _lines(path):
        if header and number == 1:
            continue
        text, error = _decode(raw)
        if text is None:
            skips.skip(number, "row", f"non_utf8: {error}")
            continue
        if not text.strip():
            continue
        before = skips.total
        yield number, text.split("\t"), skips
        kept += skips.total == before
    skips.close(kept, unit)


def read_csv_records(path) -> List[Tuple[int, dict]]:
    with _open_binary(path) as f:
        text = f.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    return [(reader.line_num, row) for row in reader]


# ----------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------


def split_of(key: str) -> str:
    return "validation" if zlib.crc32(key.encode("utf-8")) % VALIDATION_MODULUS == 0 else "train"


def by_split(items: Iterable, key: Callable = lambda x: x.key) -> Dict[str, list]:
    out = {s: [] for s in SPLITS}
    for item in items:
        out[split_of(key(item))].append(item)
    return out


# ----------------------------------------------------------------------------------------------------------
# Token cache
# ----------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("T5K_CACHE_DIR", os.path.expanduser("~/.cache/t5k/tokens")))


# id(vocabulary) -> (vocabulary, fingerprint); holding the vocabulary keeps its id from being reused.
_FINGERPRINTS: Dict[int, Tuple[seqio.Vocabulary, str]] = {}


def vocab_fingerprint(vocabulary: seqio.Vocabulary) -> str:
    """sha1 of the vocabulary's type, files and extra ids: the token caches' key. Computed once per vocabulary
    object, by identity (seqio.SentencePieceVocabulary is unhashable)."""
    vocabulary = vocab.resolve(vocabulary)
    known = _FINGERPRINTS.get(id(vocabulary))
    if known is None:
        known = _FINGERPRINTS[id(vocabulary)] = (vocabulary, _fingerprint(vocabulary))
    return known[1]


def _fingerprint(vocabulary: seqio.Vocabulary) -> str:
    h = hashlib.sha1(type(vocabulary).__name__.encode())
    path = getattr(vocabulary, "path", None)
    if path and os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            with open(os.path.join(path, name), "rb") as f:
                h.update(name.encode() + f.read())
    elif hasattr(vocabulary, "sp_model"):
        h.update(vocabulary.sp_model)
    else:
        h.update(str(vocabulary).encode())
    h.update(str(vocabulary.extra_ids).encode())
    return h.hexdigest()[:16]


def encode_texts(vocabulary: seqio.Vocabulary, texts: Sequence[str], batch: int = 256) -> List[List[int]]:
    if hasattr(vocabulary, "encode_batch"):
        out = []
        for i in range(0, len(texts), batch):
            out += vocabulary.encode_batch(texts[i:i + batch])
        return out
    return [vocabulary.encode(t) for t in texts]


def _cached_arrays(name: str, texts: Sequence[str], vocabulary: seqio.Vocabulary, build: Callable[[], dict],
                   definition: str = "") -> dict:
    """`build()` (a dict of numpy arrays), stored on disk and reused while the texts, the vocabulary files and
    `definition` (what `build` computes, when more than tokens) stay the same."""
    h = hashlib.sha1(definition.encode("utf-8"))
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    path = cache_dir() / f"{name}-{vocab_fingerprint(vocabulary)}-{h.hexdigest()[:16]}.npz"
    if path.exists():
        with np.load(path) as z:
            return dict(z)
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def _flatten(rows: Sequence[Sequence[int]], dtype) -> Tuple[np.ndarray, np.ndarray]:
    """(flat values, int64 offsets [n+1]) of ragged rows."""
    offsets = np.zeros(len(rows) + 1, np.int64)
    offsets[1:] = np.cumsum([len(x) for x in rows])
    return np.fromiter((t for x in rows for t in x), dtype, count=int(offsets[-1])), offsets


def tokenize_to_cache(name: str, texts: Sequence[str], vocabulary: seqio.Vocabulary) -> Tuple[np.ndarray, np.ndarray]:
    """(flat int32 tokens, int64 offsets [n+1]) of `texts`, from the on-disk cache when the same texts were
    tokenized by the same vocabulary before (key: sha1 of the texts and of the vocabulary files)."""

    def build():
        tokens, offsets = _flatten(encode_texts(vocabulary, list(texts)), np.int32)
        return {"tokens": tokens, "offsets": offsets}

    arrays = _cached_arrays(name, texts, vocabulary, build)
    return arrays["tokens"], arrays["offsets"]


def salient_to_cache(name: str, texts: Sequence[str], vocabulary: seqio.Vocabulary):
    """(flat int32 tokens, int32 0/1 salient flags, int64 offsets [n+1]) of `texts` (`t5k.salient`), cached
    like `tokenize_to_cache` (the key also covers `salient.DEFINITION` and the analyser version)."""
    from t5k import morph, salient

    def build():
        rows = salient.salient_tokens(vocabulary, list(texts))
        tokens, offsets = _flatten([ids for ids, _ in rows], np.int32)
        flags, _ = _flatten([f for _, f in rows], np.int32)
        return {"tokens": tokens, "salient": flags, "offsets": offsets}

    arrays = _cached_arrays(name, texts, vocabulary, build, f"{salient.DEFINITION} {morph.analyser_version()}")
    return arrays["tokens"], arrays["salient"], arrays["offsets"]


# ----------------------------------------------------------------------------------------------------------
# Index streams (the seeded epoch order shared by every source)
# ----------------------------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch) -> tf.Tensor:
    base = tf.constant([seed, 0xD0C5], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))


def index_stream(n: int, shuffle: bool, seed: Optional[int]) -> tf.data.Dataset:
    """int64 item indices: 0..n-1 once (shuffle=False), or endless epochs, each a permutation drawn from
    (seed, epoch)."""
    if n == 0:
        return tf.data.Dataset.range(0)
    if not shuffle:
        return tf.data.Dataset.range(n)
    seed = 0 if seed is None else int(seed)

    def epoch(e):
        return tf.data.Dataset.from_tensor_slices(
            tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), _epoch_seed(seed, e)))

    return tf.data.Dataset.counter().flat_map(epoch)


_SUBSET = {"train_examples": None, "subset_seed": 0}


@contextlib.contextmanager
def train_subset(train_examples: Optional[int], subset_seed: int = 0):
    """Within it, sources serve `train_examples` items of their train split (None: all); see the module doc.
    Read when a pipeline is built."""
    if train_examples is not None and (isinstance(train_examples, bool) or int(train_examples) != train_examples
                                       or train_examples < 1):
        raise ValueError(f"train_examples: expected a positive number of examples (or None for all), "
                         f"got {train_examples!r}")
    old = dict(_SUBSET)
    _SUBSET.update(train_examples=None if train_examples is None else int(train_examples),
                   subset_seed=int(subset_seed))
    try:
        yield
    finally:
        _SUBSET.update(old)


def subset_indices(n: int, k: int, subset_seed: int) -> np.ndarray:
    """The items (sorted int64 indices into 0..n-1) of a train subset of size k: the first k of a seeded permutation,
    so the subsets of one seed are nested. k >= n: all of them."""
    if k >= n:
        return np.arange(n, dtype=np.int64)
    order = np.random.default_rng([int(subset_seed), 0x5B5E7, n]).permutation(n)
    return np.sort(order[:k]).astype(np.int64)


def _served(split: str, n: int, shard_info) -> np.ndarray:
    """Indices (into the split's n items) that a source serves: the train subset when one is set, then this
    shard's share."""
    k = _SUBSET["train_examples"]
    items = subset_indices(n, k, _SUBSET["subset_seed"]) if split == "train" and k is not None \
        else np.arange(n, dtype=np.int64)
    return items if shard_info is None else items[shard_info.index::shard_info.num_shards]


# ----------------------------------------------------------------------------------------------------------
# seqio data sources
# ----------------------------------------------------------------------------------------------------------


class IndexedSource(seqio.DataSource):
    """A split of in-memory items served through `index_stream` (seeded epochs, train subsets; see the module
    doc). The base of every t5k source."""

    def __init__(self, splits=SPLITS):
        super().__init__(splits=splits, num_input_examples=None, caching_permitted=False,
                         performs_internal_shuffling=True)
        self._by_vocabulary = {}

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return [split]

    def num_input_examples(self, split: str) -> int:
        """The split's size, or the train subset's inside `train_subset` (what examples-proportional mixing
        rates see)."""
        n, k = self._count(split), _SUBSET["train_examples"]
        return min(n, k) if split == "train" and k is not None else n

    def _count(self, split: str) -> int:
        raise NotImplementedError

    def _per_vocabulary(self, vocabulary: seqio.Vocabulary, compute: Callable[[str, seqio.Vocabulary], Any],
                        split: str):
        """`compute(split, v)` for the vocabulary `v` behind `vocabulary` now (a GinVocabulary follows gin), once
        per split and vocabulary: a task's arrays always match the vocabulary its pipeline is built with."""
        concrete = vocab.resolve(vocabulary)
        key = (compute.__name__, split, vocab_fingerprint(concrete))
        if key not in self._by_vocabulary:
            self._by_vocabulary[key] = compute(split, concrete)
        return self._by_vocabulary[key]


class DocumentSource(IndexedSource):
    """Documents of prose files. `tokenized=True`: {"targets": int32 ids} from the token cache (tokenized once per
    corpus and vocabulary); False: {"text": str} for on-the-fly tokenization."""

    def __init__(self, files_fn: Callable[[], Sequence[Path]], vocabulary: Optional[seqio.Vocabulary] = None,
                 tokenized: bool = True, name: str = "prose"):
        super().__init__()
        self._files_fn, self._vocabulary, self._tokenized, self._name = files_fn, vocabulary, tokenized, name

    @functools.lru_cache(maxsize=None)
    def documents(self) -> Dict[str, List[Document]]:
        """The usable documents by split; DataMissingError if the files hold none (each was skipped and logged),
        or none fell in the train split (the endless train stream would have nothing to repeat)."""
        files = list(self._files_fn())
        docs = [d for f in files for d in read_documents(f)]
        split = by_split(docs)
        if not split["train"]:
            named = ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            raise DataMissingError(
                f"{named}: {len(docs)} usable document(s), none in the train split (the log lines above name the "
                f"skipped ones). A .txt file holds documents separated by blank lines, each at most "
                f"{MAX_DOCUMENT_CHARS:,} characters; .jsonl one document per line")
        return split

    def tokens(self, split: str) -> Tuple[np.ndarray, np.ndarray]:
        return self._per_vocabulary(self._vocabulary, self._tokenize, split)

    def _tokenize(self, split: str, vocabulary: seqio.Vocabulary) -> Tuple[np.ndarray, np.ndarray]:
        texts = [d.text for d in self.documents()[split]]
        return tokenize_to_cache(f"{self._name}-{split}", texts, vocabulary)

    def _count(self, split):
        return len(self.documents()[split])

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, *, sequence_length=None,
                    use_cached=False, num_epochs=1):
        del sequence_length, use_cached, num_epochs
        if self._tokenized:
            tokens, offsets = self.tokens(split)
            docs = _served(split, len(offsets) - 1, shard_info)
            tokens_t, offsets_t, docs_t = tf.constant(tokens), tf.constant(offsets), tf.constant(docs)

            def lookup(i):
                d = docs_t[i]
                return {"targets": tokens_t[offsets_t[d]:offsets_t[d + 1]]}

            return index_stream(len(docs), shuffle, seed).map(lookup, num_parallel_calls=tf.data.AUTOTUNE)
        documents = self.documents()[split]
        texts = [documents[i].text for i in _served(split, len(documents), shard_info)]
        texts_t = tf.constant(texts if texts else [""], tf.string)
        return index_stream(len(texts), shuffle, seed).map(lambda i: {"text": texts_t[i]})


class SalientDocumentSource(DocumentSource):
    """Documents as {"targets": int32 ids, "salient_mask": int32 0/1 per id} (proper nouns, numbers, dates; see
    `t5k.salient`), computed once per corpus and vocabulary through the token cache. Needs a morph_bbpe
    vocabulary."""

    def __init__(self, files_fn: Callable[[], Sequence[Path]], vocabulary: seqio.Vocabulary, name: str = "prose"):
        super().__init__(files_fn, vocabulary, tokenized=True, name=f"{name}_salient")

    def salient(self, split: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._per_vocabulary(self._vocabulary, self._find_salient, split)

    def _find_salient(self, split: str, vocabulary: seqio.Vocabulary) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        texts = [d.text for d in self.documents()[split]]
        return salient_to_cache(f"{self._name}-{split}", texts, vocabulary)

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, *, sequence_length=None,
                    use_cached=False, num_epochs=1):
        del sequence_length, use_cached, num_epochs
        tokens, flags, offsets = self.salient(split)
        docs = _served(split, len(offsets) - 1, shard_info)
        tokens_t, flags_t, offsets_t, docs_t = (tf.constant(a) for a in (tokens, flags, offsets, docs))

        def lookup(i):
            d = docs_t[i]
            start, end = offsets_t[d], offsets_t[d + 1]
            return {"targets": tokens_t[start:end], "salient_mask": flags_t[start:end]}

        return index_stream(len(docs), shuffle, seed).map(lookup, num_parallel_calls=tf.data.AUTOTUNE)


class SessionSource(IndexedSource):
    """Dialogue sessions as {"turn_tokens": ragged int32 [turns, (tokens)], "speakers": int32 [turns]} (speakers
    numbered by first appearance), tokenized once through the token cache."""

    def __init__(self, files_fn: Callable[[], Sequence[Path]], vocabulary: seqio.Vocabulary, name: str = "dialog"):
        super().__init__()
        self._files_fn, self._vocabulary, self._name = files_fn, vocabulary, name

    @functools.lru_cache(maxsize=None)
    def sessions(self) -> Dict[str, List[Session]]:
        return by_split([s for f in self._files_fn() for s in read_sessions(f)])

    def arrays(self, split: str):
        return self._per_vocabulary(self._vocabulary, self._arrays, split)

    def _arrays(self, split: str, vocabulary: seqio.Vocabulary):
        sessions = self.sessions()[split]
        texts = [t for s in sessions for _, t in s.turns]
        tokens, utt_offsets = tokenize_to_cache(f"{self._name}-{split}", texts, vocabulary)
        turn_offsets = np.zeros(len(sessions) + 1, np.int64)
        turn_offsets[1:] = np.cumsum([len(s.turns) for s in sessions])
        speakers = []
        for s in sessions:
            index: dict = {}
            speakers += [index.setdefault(sp, len(index)) for sp, _ in s.turns]
        return tokens, utt_offsets, turn_offsets, np.array(speakers, np.int32)

    def _count(self, split):
        return len(self.sessions()[split])

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, *, sequence_length=None,
                    use_cached=False, num_epochs=1):
        del sequence_length, use_cached, num_epochs
        tokens, utt_offsets, turn_offsets, speakers = self.arrays(split)
        chosen = _served(split, len(turn_offsets) - 1, shard_info)
        tokens_t, utt_t = tf.constant(tokens), tf.constant(utt_offsets)
        turn_t, speakers_t, chosen_t = tf.constant(turn_offsets), tf.constant(speakers), tf.constant(chosen)

        def lookup(i):
            s = chosen_t[i]
            t0, t1 = turn_t[s], turn_t[s + 1]
            splits = utt_t[t0:t1 + 1]
            values = tokens_t[splits[0]:splits[-1]]
            return {"turn_tokens": tf.RaggedTensor.from_row_splits(values, splits - splits[0], validate=False),
                    "speakers": speakers_t[t0:t1]}

        return index_stream(len(chosen), shuffle, seed).map(lookup, num_parallel_calls=tf.data.AUTOTUNE)


class RecordSource(IndexedSource):
    """Text records (dicts of str / float / int) produced by `records_fn(split)`, e.g. {"inputs", "targets"}.

    Records are read lazily (on first use), so tasks over absent local data register fine and fail only when
    used, with a DataMissingError naming the file."""

    def __init__(self, records_fn: Callable[[str], List[dict]], splits=SPLITS):
        super().__init__(splits=splits)
        self._records_fn = records_fn

    @functools.lru_cache(maxsize=None)
    def records(self, split: str) -> List[dict]:
        if split not in self.splits:
            raise ValueError(f"split {split!r} not in {self.splits}")
        return self._records_fn(split)

    def _count(self, split):
        return len(self.records(split))

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, *, sequence_length=None,
                    use_cached=False, num_epochs=1):
        del sequence_length, use_cached, num_epochs
        all_records = self.records(split)
        records = [all_records[i] for i in _served(split, len(all_records), shard_info)]
        if not records:
            raise ValueError(f"split {split!r} has no records")
        columns = {}
        for key, value in records[0].items():
            values = [r[key] for r in records]
            if isinstance(value, str):
                columns[key] = tf.constant(values, tf.string)
            elif isinstance(value, float):
                columns[key] = tf.constant(values, tf.float32)
            else:
                columns[key] = tf.constant(values, tf.int64)
        return index_stream(len(records), shuffle, seed).map(
            lambda i: {k: v[i] for k, v in columns.items()}, num_parallel_calls=tf.data.AUTOTUNE)
