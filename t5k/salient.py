"""Salient tokens for salient span masking: which tokens of a text are proper nouns, numbers and dates.

Definition, over the pieces of the morph_bbpe pre-tokenizer (`t5k.morph`; a piece keeps its leading space):

* proper noun: a piece of a Hangul letter run whose morpheme the analyser tags ``NNP``. The run is analysed on its
  own, by the same analysis that cut it into pieces (`morph.piece_tags`), so ``김철수가`` -> ``김철수`` | ``가`` and
  exactly the piece ``김철수`` is salient;
* number: a digit run (what the analyser tags ``SN``; the pre-tokenizer never sends digits to it), together with
  a single ``.`` ``,`` ``:`` ``-`` or ``/`` standing between two digit runs: ``3,000``, ``2024.03.01``, ``10:30``;
* date: a number directly followed (no space) by a piece that is exactly ``년``, ``월`` or ``일``: ``2024년``,
  ``3월``, ``15일부터`` -> ``15일``. The unit must be a piece of its own (the analyser cut the run after it).
  Durations written the same way (``2년 전``) are flagged too: the analyser does not tell them apart.

Not salient: Latin and Hanja runs (not analysed), numerals written in Hangul (``NR``: 하나, 삼), units other than
년/월/일 (``3,000원`` flags ``3,000``). Adjacent salient pieces form one span (``2024년 3월``).

Alignment: byte-level BPE never merges across pieces, so each token lies inside one piece and takes its flag.
Tokens are placed in the text by their bytes (every id of a lossless vocabulary stands for a byte string, and the
ids' bytes concatenate to the text), so the flags align with the very ids `vocab.encode` produces; a token is
salient when its first byte lies in a salient piece.
"""

from typing import Dict, List, Sequence, Tuple

import numpy as np

from t5k import morph

PROPER_NOUN_TAG = "NNP"
NUMBER_JOINERS = frozenset(".,:-/")
DATE_UNITS = frozenset({"년", "월", "일"})
# Part of the token cache key: change it whenever the definition above changes.
DEFINITION = f"salient/1 {PROPER_NOUN_TAG} digits joiners={''.join(sorted(NUMBER_JOINERS))} units=년월일"


def _kind(piece: str) -> str:
    """'letters' | 'digits' | 'symbols' | 'space' for a stage-1 piece (see morph.PIECE_PATTERN)."""
    core = piece[1:] if piece[:1] == " " and len(piece) > 1 else piece
    if core[:1].isdecimal():
        return "digits"
    if core[:1].isalpha():
        return "letters"
    return "space" if core.isspace() else "symbols"


def _letter_core(piece: str) -> Tuple[int, str]:
    """(length of the leading space, letter run) of a letters piece."""
    shift = 1 if piece[:1] == " " else 0
    return shift, piece[shift:]


def salient_char_spans(text: str, tags: Dict[str, tuple]) -> List[Tuple[int, int]]:
    """[(start, end)] character spans of the salient pieces of `text`, adjacent ones merged.

    `tags` maps every letter run of `text` to its `morph.piece_tags` entry.
    "2024년에 김철수가" -> [(0, 5), (6, 10)]: "2024년" and " 김철수" (spans keep their leading space)."""
    stage1 = morph.pieces_by_pattern(text)
    kinds = [_kind(p) for p in stage1]
    spans: List[List[int]] = []
    pos = 0

    def mark(start: int, end: int) -> None:
        if spans and spans[-1][1] == start:
            spans[-1][1] = end
        else:
            spans.append([start, end])

    for i, (piece, kind) in enumerate(zip(stage1, kinds)):
        end = pos + len(piece)
        previous_digits = i > 0 and kinds[i - 1] == "digits"
        if kind == "digits":
            mark(pos, end)
        elif kind == "symbols" and piece in NUMBER_JOINERS and previous_digits and i + 1 < len(stage1) \
                and kinds[i + 1] == "digits" and stage1[i + 1][:1] != " ":
            mark(pos, end)
        elif kind == "letters":
            shift, run = _letter_core(piece)
            offsets = tags[run]
            for k, (offset, tag) in enumerate(offsets):
                sub_start = pos + (0 if k == 0 else shift + offset)
                sub_end = pos + shift + (offsets[k + 1][0] if k + 1 < len(offsets) else len(run))
                is_unit = k == 0 and shift == 0 and previous_digits and run[:sub_end - pos] in DATE_UNITS
                if tag == PROPER_NOUN_TAG or is_unit:
                    mark(sub_start, sub_end)
        pos = end
    return [(a, b) for a, b in spans]


def _token_flags(text: str, spans: List[Tuple[int, int]], ids: Sequence[int], id_bytes: Sequence[bytes],
                 where: str) -> List[int]:
    """0/1 per id: whether the token's first byte lies in a salient character span of `text`."""
    encoded = text.encode("utf-8")
    byte_salient = np.zeros(len(encoded) + 1, np.int8)
    for start, end in spans:
        byte_salient[len(text[:start].encode("utf-8")):len(text[:end].encode("utf-8"))] = 1
    lengths = np.fromiter((len(id_bytes[i]) for i in ids), np.int64, count=len(ids))
    if int(lengths.sum()) != len(encoded):
        raise ValueError(f"{where}: the token bytes do not spell the text ({int(lengths.sum())} bytes for "
                         f"{len(encoded)}); salient flags need a lossless vocabulary")
    starts = np.cumsum(lengths) - lengths
    return byte_salient[starts].astype(np.int32).tolist()


def salient_tokens(vocabulary, texts: Sequence[str], batch: int = 256) -> List[Tuple[List[int], List[int]]]:
    """(ids, 0/1 salient flag per id) of each text; ids are exactly `vocabulary.encode_batch(texts)`.

    `vocabulary` must be a morph_bbpe `t5k.vocab.BPEVocabulary` (its pieces are cut at morpheme starts, which is
    what puts every token inside one morpheme). Each distinct letter run is analysed once per call."""
    variant = getattr(vocabulary, "variant", None)
    if variant != "morph_bbpe":
        raise ValueError(f"salient tokens need a morph_bbpe vocabulary (tokens cut at morpheme starts), got "
                         f"{variant or type(vocabulary).__name__}")
    tags: Dict[str, tuple] = {}
    out = []
    for first in range(0, len(texts), batch):
        chunk = list(texts[first:first + batch])
        runs = {_letter_core(p)[1] for t in chunk for p in morph.pieces_by_pattern(t) if _kind(p) == "letters"}
        missing = [r for r in runs if r not in tags]
        tags.update(zip(missing, morph.piece_tags(missing)))
        for n, (text, ids) in enumerate(zip(chunk, vocabulary.encode_batch(chunk))):
            flags = _token_flags(text, salient_char_spans(text, tags), ids, vocabulary.id_bytes,
                                 f"text {first + n}")
            out.append((ids, flags))
    return out
