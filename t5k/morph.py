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
few megabytes almost every lookup hits the cache and Kiwi leaves the hot path. Analysing eojeols out of sentence
context changes few boundaries (docs/vocab.md measures it) and makes the split of a word independent of its
neighbours, which BPE likes. Runs longer than `MAX_ANALYSED_CHARS` are left whole: the analyser's cost grows
with length and such runs are not words.
"""

import functools
import re
import threading
from typing import Iterable, List, Sequence

# letters (incl. Hangul, Hanja, jamo, Latin) | digits | any other non-space symbols (incl. "_") | whitespace
PIECE_PATTERN = r" ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"
_PIECE_RE = re.compile(PIECE_PATTERN)
_HANGUL_RE = re.compile("[\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff]")
MAX_ANALYSED_CHARS = 64
# Bounded eojeol -> cut-offsets cache. Replaced by an empty one when full rather than LRU-evicted: a dict hit
# costs ~50 ns, LRU bookkeeping would triple that, and a Zipfian vocabulary refills the cache in seconds.
_CACHE_LIMIT = 1 << 20

_kiwi_lock = threading.Lock()


@functools.cache
def _kiwi():
    """The Kiwi analyser, loaded once per process (it takes ~2 s and ~0.5 GB)."""
    from kiwipiepy import Kiwi

    with _kiwi_lock:
        return Kiwi(num_workers=-1)


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


class MorphSplitter:
    """Stage 1 + stage 2.

    Thread-safe (tf.data calls it from several threads): a call works on the cache dict it started with, and a
    full cache is swapped for a new one instead of being cleared under another thread's feet, so the split of a
    text never depends on what other threads are doing.
    """

    def __init__(self):
        self._cache = {}

    def _analyse(self, cache: dict, runs: Sequence[str]) -> None:
        """Add `runs` (distinct letter runs not cached yet) to `cache`, in one multi-threaded Kiwi batch."""
        hangul = [r for r in runs if len(r) <= MAX_ANALYSED_CHARS and _HANGUL_RE.search(r)]
        found = dict.fromkeys(runs, ())
        if hangul:
            kiwi = _kiwi()
            results = kiwi.tokenize(hangul) if len(hangul) > 1 else [kiwi.tokenize(hangul[0])]
            for run, tokens in zip(hangul, results):
                found[run] = _cuts(tokens, len(run))
        cache.update(found)
        if len(cache) > _CACHE_LIMIT:
            self._cache = {}

    def split_runs(self, runs: Sequence[str]) -> List[List[str]]:
        """Stage 2 only: each stage-1 piece (a `pieces_by_pattern` match) cut at its morpheme starts.

        A piece's cuts depend on the piece alone, so callers may cache per piece (BPEVocabulary caches ids).
        """
        cache = self._cache
        missing = {p.lstrip(" ") for p in runs if p.lstrip(" ") not in cache}
        missing = [r for r in missing if r[:1].isalpha()]
        if missing:
            self._analyse(cache, missing)
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
    analysed = [r for r in dict.fromkeys(runs) if len(r) <= MAX_ANALYSED_CHARS and _HANGUL_RE.search(r)]
    found = {}
    if analysed:
        kiwi = _kiwi()
        results = kiwi.tokenize(analysed) if len(analysed) > 1 else [kiwi.tokenize(analysed[0])]
        for run, tokens in zip(analysed, results):
            tag_at = {}
            for t in tokens:
                tag_at.setdefault(t.start, t.tag)
            found[run] = tuple((c, tag_at[c]) for c in (0, *_cuts(tokens, len(run))))
    return [found.get(r, ((0, None),)) for r in runs]


def sentence_cuts(text: str) -> tuple:
    """Cut offsets of `text` analysed in full sentence context (to measure what per-eojeol analysis changes)."""
    return _cuts(_kiwi().tokenize(text), len(text))
