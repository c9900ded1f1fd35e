"""Morpheme-aware pre-tokenizer: cut text into pieces before BPE runs inside each piece.

Two stages, both pure cuts of the original string (every piece is a substring, pieces concatenate back to
the input, nothing is normalised away):

1. `PIECE_PATTERN` splits at whitespace and at script-class changes (letters / digits / other symbols), with a
   single leading ASCII space kept on the word that follows it (GPT-2 style, so a space costs no token of its
   own). Every character belongs to exactly one of the alternatives, so the matches tile the text.
2. Letter runs that contain Hangul are cut again at the morpheme start offsets reported by the Kiwi analyser
   (kiwipiepy): `마감이` -> `마감|이`. Kiwi may restore lemmas (`안돼서` -> 되/어서); only the start offsets
   are used, so restored forms never leak into the pieces.

Each eojeol (letter run) is analysed on its own and the result cached: eojeols repeat heavily (Zipf), so after a
few megabytes almost every lookup hits the cache and Kiwi leaves the hot path. Below the in-process cache sits an
optional read-only *lexicon* (run -> cut offsets, saved with a vocabulary: `write_lexicon` / `read_lexicon`), so a
fresh process starts primed with the frequent runs of the vocabulary's training text. A run's cuts are a pure
function of (run, analyser version), so a lexicon recorded with the installed analyser gives exactly what Kiwi would;
one recorded with another version is ignored (with a warning) and Kiwi analyses live. Analysing eojeols out of sentence
context changes few boundaries (docs/vocab.md measures it) and makes the split of a word independent of its
neighbours, which BPE likes. Runs longer than `MAX_ANALYSED_CHARS` are left whole: the analyser's cost grows
with length and such runs are not words.
"""

import collections
import functools
import gzip
import logging
import os
import re
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

# letters (incl. Hangul, Hanja, jamo, Latin) | digits | any other non-space symbols (incl. "_") | whitespace
PIECE_PATTERN = r" ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"
_PIECE_RE = re.compile(PIECE_PATTERN)
_HANGUL_RE = re.compile("[\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff]")
MAX_ANALYSED_CHARS = 64
# Bounded eojeol -> cut-offsets cache. Replaced by an empty one when full rather than LRU-evicted: a dict hit
# costs ~50 ns, LRU bookkeeping would triple that, and a Zipfian vocabulary refills the cache in seconds.
_CACHE_LIMIT = 1 << 20

LEXICON_FORMAT = "t5k-lexicon/1"

_kiwi_lock = threading.Lock()
_log = logging.getLogger(__name__)


class LexiconError(ValueError):
    """A lexicon file that cannot be read; the message names the file and line."""


ANALYSER_THREADS_ENV = "T5K_KIWI_THREADS"


@functools.cache
def analyser_threads() -> int:
    """Kiwi's worker threads in this process, from the environment variable T5K_KIWI_THREADS (read once).

    -1 (default): one worker per core, so a process tokenizing alone (the tf.data input pipeline, `t5k vocab`)
    analyses a batch of runs on every core. 0: no workers, each run is analysed in the calling thread. Use 0 in the
    workers of a process pool that already covers the cores (`bench/vocab.py`'s 2-process cases): one pool of
    Kiwi threads per process would put two threads on every core, and handing each batch to them and back costs
    ~8% of a new-text stream's throughput on 2 cores. Kiwi holds the GIL while it analyses, so 0 gives a process
    one core whatever its Python threads do. The cuts are the same either way.
    """
    value = os.environ.get(ANALYSER_THREADS_ENV, "-1")
    try:
        threads = int(value)
    except ValueError:
        threads = None
    if threads is None or threads < -1:
        raise ValueError(f"{ANALYSER_THREADS_ENV}={value!r}: expected -1 (one Kiwi worker per core), 0 (the "
                         f"calling thread) or a number of workers")
    return threads


@functools.cache
def _kiwi():
    """The Kiwi analyser, loaded once per process (it takes ~2 s and ~0.5 GB)."""
    from kiwipiepy import Kiwi

    with _kiwi_lock, warnings.catch_warnings():
        # kiwipiepy >= 0.21 warns that 0 no longer means "every core"; 0 (no workers) is what is asked for here.
        warnings.simplefilter("ignore", DeprecationWarning)
        return Kiwi(num_workers=analyser_threads())


@functools.cache
def analyser_version() -> str:
    from importlib.metadata import version

    return f"kiwipiepy {version('kiwipiepy')} (kiwipiepy-model {version('kiwipiepy_model')})"


def pieces_by_pattern(text: str) -> List[str]:
    """Stage 1 only: whitespace / script-class pieces (the plain `bbpe` variant)."""
    return _PIECE_RE.findall(text)


def _cuts(tokens, length: int) -> tuple:
    """Cut offsets from analyser tokens: a morpheme start, unless it lies inside an earlier morpheme's span.

    Kiwi reports a coda fused into a syllable (어쩌+ᆯ in `어쩔`, 되+어서 in `돼서`) with overlapping spans;
    cutting there would split the syllable's stem from its own spelling (`어|쩔`), so such starts are skipped.
    """
    cuts, end = [], 0
    for t in tokens:
        if t.start >= end and 0 < t.start < length:
            cuts.append(t.start)
        end = max(end, t.start + t.len)
    return tuple(cuts)


def is_analysed(run: str) -> bool:
    """Whether the splitter asks the analyser about this letter run (it contains Hangul and is not too long)."""
    return len(run) <= MAX_ANALYSED_CHARS and _HANGUL_RE.search(run) is not None


def _tokenize_runs(runs: Sequence[str]) -> list:
    """Kiwi's tokens for each run, each run analysed on its own: in one batch for Kiwi's worker threads, or one
    call per run in this thread when it has none (`analyser_threads() == 0`; its batch call needs workers)."""
    if not runs:
        return []
    kiwi = _kiwi()
    if len(runs) == 1 or analyser_threads() == 0:
        return [kiwi.tokenize(run) for run in runs]
    return kiwi.tokenize(runs)


def analyse_runs(runs: Sequence[str]) -> Dict[str, tuple]:
    """Cut offsets of each analysed run (`is_analysed`), each run analysed on its own, in one Kiwi batch."""
    analysed = [r for r in runs if is_analysed(r)]
    return {run: _cuts(tokens, len(run)) for run, tokens in zip(analysed, _tokenize_runs(analysed))}


class MorphSplitter:
    """Stage 1 + stage 2.

    Cuts of a letter run come from, in order: the in-process cache, the lexicon (if given and recorded with the
    installed analyser; loaded on the first cache miss), Kiwi. `lexicon` is a `Lexicon` or the path of a lexicon
    file.

    Thread-safe (tf.data calls it from several threads): a call works on the cache dict it started with, and a
    full cache is swapped for a new one instead of being cleared under another thread's feet, so the split of a
    text never depends on what other threads are doing. The lexicon is a separate read-only dict: it outlives
    every cache swap.
    """

    def __init__(self, lexicon: Union["Lexicon", str, Path, None] = None):
        self._cache = {}
        self._lexicon_source = lexicon
        self._lexicon_entries: Optional[Dict[str, tuple]] = None
        self._lexicon_lock = threading.Lock()

    def lexicon_entries(self) -> Dict[str, tuple]:
        """The lexicon's run -> cuts map, loaded on first use; empty without a usable lexicon."""
        if self._lexicon_entries is None:
            with self._lexicon_lock:
                if self._lexicon_entries is None:
                    self._lexicon_entries = _usable_entries(self._lexicon_source)
        return self._lexicon_entries

    def _analyse(self, cache: dict, runs: Sequence[str]) -> None:
        """Add `runs` (distinct letter runs not cached yet) to `cache`: from the lexicon, the rest in one Kiwi batch."""
        lexicon = self.lexicon_entries()
        found = dict.fromkeys(runs, ())
        unknown = []
        for run in runs:
            cuts = lexicon.get(run)
            if cuts is None:
                unknown.append(run)
            else:
                found[run] = cuts
        found.update(analyse_runs(unknown))
        cache.update(found)
        if len(cache) > _CACHE_LIMIT:
            self._cache = {}

    def _cached(self, runs: Iterable[str]) -> dict:
        """The cache dict this call works on, holding every one of `runs` (letter runs without leading space)."""
        cache = self._cache
        missing = list({r for r in runs if r not in cache})
        if missing:
            self._analyse(cache, missing)
        return cache

    def cuts(self, runs: Sequence[str]) -> List[tuple]:
        """Cut offsets of each letter run (no leading space), through the cache and the lexicon like `split_runs`."""
        cache = self._cached(runs)
        return [cache[r] for r in runs]

    def split_runs(self, runs: Sequence[str]) -> List[List[str]]:
        """Stage 2 only: each stage-1 piece (a `pieces_by_pattern` match) cut at its morpheme starts.

        A piece's cuts depend on the piece alone, so callers may cache per piece (BPEVocabulary caches ids).
        """
        cache = self._cached(r for r in (p.lstrip(" ") for p in runs) if r[:1].isalpha())
        out = []
        for p in runs:
            cuts = cache.get(p[1:] if p[:1] == " " else p, ())
            if not cuts:
                out.append([p])
                continue
            shift = 1 if p[:1] == " " else 0
            pieces, prev = [], 0
            for c in cuts:
                pieces.append(p[prev : c + shift])
                prev = c + shift
            pieces.append(p[prev:])
            out.append(pieces)
        return out

    def split_batch(self, texts: Iterable[str]) -> List[List[str]]:
        stage1 = [_PIECE_RE.findall(t) for t in texts]
        cut = iter(self.split_runs([p for ps in stage1 for p in ps]))
        return [[q for _ in ps for q in next(cut)] for ps in stage1]

    def split(self, text: str) -> List[str]:
        return self.split_batch([text])[0]


def piece_tags(runs: Sequence[str]) -> List[tuple]:
    """For each letter run, ((offset, tag), ...) of the pieces `MorphSplitter` cuts it into: offset 0 and every
    cut, each with the analyser's tag of the morpheme that starts there (the run analysed on its own, exactly as
    the splitter analyses it). Runs the splitter leaves whole (no Hangul, too long) give ((0, None),)."""
    analysed = [r for r in dict.fromkeys(runs) if is_analysed(r)]
    found = {}
    for run, tokens in zip(analysed, _tokenize_runs(analysed)):
        tag_at = {}
        for t in tokens:
            tag_at.setdefault(t.start, t.tag)
        found[run] = tuple((c, tag_at[c]) for c in (0, *_cuts(tokens, len(run))))
    return [found.get(r, ((0, None),)) for r in runs]


def sentence_cuts(text: str) -> tuple:
    """Cut offsets of `text` analysed in full sentence context (to measure what per-eojeol analysis changes)."""
    return _cuts(_kiwi().tokenize(text), len(text))


# ---------------------------------------------------------------------------------------------------------------
# Lexicon: saved run -> cuts, a read-only layer under the in-process cache
#
# File: gzip'd UTF-8 text. Line 1 `#t5k-lexicon/1<TAB>ANALYSER_VERSION`, then one line per run, sorted:
# `RUN<TAB>CUT,CUT` (no cuts: nothing after the tab). Runs are letters only, so they never hold a tab or newline.
class Lexicon:
    """Letter run -> cut offsets, as `analyser` (an `analyser_version()` string) cut them."""

    def __init__(self, entries: Dict[str, tuple], analyser: str, path: Optional[str] = None):
        self.entries, self.analyser, self.path = entries, analyser, path

    def __len__(self) -> int:
        return len(self.entries)


def write_lexicon(path: Union[str, Path], entries: Dict[str, tuple], analyser: Optional[str] = None) -> Path:
    """Write `entries` (run -> cuts) to `path` atomically (temp file + rename); deterministic bytes."""
    path = Path(path)
    lines = [f"#{LEXICON_FORMAT}\t{analyser or analyser_version()}\n"]
    lines += [f"{run}\t{','.join(map(str, entries[run]))}\n" for run in sorted(entries)]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write("".join(lines).encode("utf-8"))
        os.chmod(tmp, 0o644)  # mkstemp creates it private; the lexicon is part of a shareable artifact
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


_CUTS_RE = re.compile(r"(?:[1-9][0-9]*(?:,[1-9][0-9]*)*)?")


def _parse_cuts(field: str, run: str) -> tuple:
    """`1,3` -> (1, 3); ValueError unless non-decreasing offsets inside the run (`_cuts` repeats an offset when
    the analyser reports an empty morpheme there, and the lexicon keeps exactly what `_cuts` gives)."""
    if not _CUTS_RE.fullmatch(field):
        raise ValueError(f"cut offsets {field!r} are not comma-separated positive integers")
    cuts = tuple(map(int, field.split(","))) if field else ()
    if any(b < a for a, b in zip(cuts, cuts[1:])) or (cuts and cuts[-1] >= len(run)):
        raise ValueError(f"cut offsets {field!r} are not non-decreasing offsets inside {run!r} ({len(run)} characters)")
    return cuts


def read_lexicon(path: Union[str, Path]) -> Lexicon:
    """Load a lexicon file; a malformed file raises LexiconError naming the file and line."""
    try:
        with gzip.open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise LexiconError(f"{path}: not a readable gzip'd UTF-8 lexicon ({e})") from None
    lines = text.split("\n")
    header = lines[0].split("\t")
    if len(header) != 2 or header[0] != f"#{LEXICON_FORMAT}":
        raise LexiconError(f"{path}:1: expected the header '#{LEXICON_FORMAT}<TAB>analyser version', "
                           f"got {lines[0][:80]!r}")
    if lines[-1]:
        raise LexiconError(f"{path}:{len(lines)}: the last line is not terminated by a newline (truncated file?)")
    entries, parsed = {}, {}  # parsed: cut field -> tuple, shared by the many runs with the same cuts
    for lineno, line in enumerate(lines[1:-1], 2):
        run, tab, field = line.partition("\t")
        cuts = parsed.get(field)
        try:
            if not tab or not run or "\t" in field:
                raise ValueError("expected RUN<TAB>CUT,CUT...")
            if cuts is None or (cuts and cuts[-1] >= len(run)):
                cuts = parsed[field] = _parse_cuts(field, run)
        except ValueError as e:
            raise LexiconError(f"{path}:{lineno}: {e}: {line[:80]!r}") from None
        entries[run] = cuts
    return Lexicon(entries, header[1], str(path))


_warned_versions = set()


def _usable_entries(source: Union[Lexicon, str, Path, None]) -> Dict[str, tuple]:
    """The entries of `source` when it was recorded with the installed analyser, else {} (warned once per file):
    a lexicon from another analyser version could disagree with live analysis, and ids must not depend on it."""
    if source is None:
        return {}
    lexicon = source if isinstance(source, Lexicon) else read_lexicon(source)
    if lexicon.analyser == analyser_version():
        return lexicon.entries
    key = (lexicon.path, lexicon.analyser)
    if key not in _warned_versions:
        _warned_versions.add(key)
        _log.warning("%s: lexicon recorded with %s, but %s is installed: not used, every run is analysed live "
                     "(rebuild it with `t5k vocab lexicon`)", lexicon.path or "lexicon", lexicon.analyser,
                     analyser_version())
    return {}


def count_runs(lines: Iterable[str]) -> collections.Counter:
    """Occurrences of every analysed letter run (`is_analysed`) in `lines`, as the splitter meets them."""
    counts = collections.Counter()
    for line in lines:
        counts.update(p.lstrip(" ") for p in _PIECE_RE.findall(line) if p.lstrip(" ")[:1].isalpha())
    return collections.Counter({r: n for r, n in counts.items() if is_analysed(r)})


def build_lexicon(counts: collections.Counter, min_count: int, splitter: Optional[MorphSplitter] = None,
                  progress: bool = False, batch: int = 4096) -> Dict[str, tuple]:
    """Cuts of every run counted at least `min_count` times, analysed live (or from `splitter`'s cache, e.g. the
    one that just pre-tokenized the training text; it must not hold a lexicon of another analyser version)."""
    from tqdm import tqdm

    splitter = splitter or MorphSplitter()
    runs = sorted(r for r, n in counts.items() if n >= min_count)
    entries = {}
    with tqdm(total=len(runs), unit="run", desc="analysing runs", disable=not progress) as bar:
        for i in range(0, len(runs), batch):
            chunk = runs[i : i + batch]
            entries.update(zip(chunk, splitter.cuts(chunk)))
            bar.update(len(chunk))
    return entries
