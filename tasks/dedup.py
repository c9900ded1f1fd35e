"""Near-duplicate removal (HyperCLOVA's corpus: "문서 내용이 유사한 경우에는 중복 제거", so that training does not lean
towards what is repeated): MinHash signatures of character shingles, bucketed by LSH bands.

A document is the set of its character `shingle`-grams after whitespace is collapsed (character n-grams suit
Korean, where one word carries its particles and endings). Its signature holds, for each of `num_perm` hash
functions `h_i(x) = (a_i x + b_i) mod p` over the shingles' CRC32 values, the smallest value: two documents agree
on one signature entry with probability equal to their Jaccard similarity, so the share of agreeing entries
estimates it (standard deviation sqrt(J(1 - J) / num_perm), 0.035 at J = 0.8 with 128 functions).

LSH: the signature is cut into `bands` bands of `num_perm / bands` rows. Documents that agree on a whole band
share a bucket and become candidates; a candidate whose estimated similarity to a kept document reaches
`threshold` is a near duplicate. With 32 bands of 4 rows a pair at J = 0.8 becomes a candidate with probability
1 - (1 - 0.8^4)^32 > 0.9999, and one at 0.3 is compared in 23% of cases, then rejected by its estimate.

Everything is deterministic (seeded coefficients, CRC32): the same corpus keeps the same documents on any machine.
"""

import re
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np

PRIME = (1 << 32) + 15  # the smallest prime above 2^32: the hash values of 32-bit CRCs stay distinct


def shingles(text: str, size: int = 5) -> List[int]:
    """CRC32 values of the distinct character `size`-grams of `text` (whitespace collapsed to one space)."""
    text = re.sub(r"\s+", " ", text).strip()
    grams = {text[i:i + size] for i in range(max(len(text) - size + 1, 1))}
    return sorted(zlib.crc32(g.encode("utf-8")) for g in grams)


def jaccard(a: str, b: str, size: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (what the signatures estimate)."""
    sa, sb = set(shingles(a, size)), set(shingles(b, size))
    return len(sa & sb) / max(len(sa | sb), 1)


class MinHasher:
    """`num_perm` seeded hash functions; `signature(text)` is a `[num_perm]` uint64 array."""

    def __init__(self, num_perm: int = 128, shingle: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        # a, b < 2^31 and x < 2^32 keep a·x + b below 2^64: exact in uint64.
        self.a = rng.integers(1, 1 << 31, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 31, num_perm, dtype=np.uint64)
        self.shingle = shingle

    def signature(self, text: str) -> np.ndarray:
        x = np.asarray(shingles(text, self.shingle), np.uint64)  # [shingles]
        return ((self.a[:, None] * x[None, :] + self.b[:, None]) % np.uint64(PRIME)).min(axis=1)  # [num_perm]


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


class NearDuplicateFilter:
    """Keeps the first of every group of near-duplicate documents, in the order they are offered."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, bands: int = 32, shingle: int = 5,
                 seed: int = 0):
        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold {threshold}; expected in (0, 1]")
        if bands < 1 or num_perm % bands:
            raise ValueError(f"{bands} bands do not divide num_perm = {num_perm}")
        self.threshold, self.bands = threshold, bands
        self.hasher = MinHasher(num_perm, shingle, seed)
        self.signatures: List[np.ndarray] = []
        self.buckets: List[Dict[bytes, List[int]]] = [{} for _ in range(bands)]

    def check(self, text: str) -> Optional[Tuple[int, float]]:
        """None, and `text` is kept; or (index of the kept document it duplicates, estimated similarity)."""
        signature = self.hasher.signature(text)
        keys = [band.tobytes() for band in np.split(signature, self.bands)]
        candidates = {i for band, key in enumerate(keys) for i in self.buckets[band].get(key, ())}
        for i in sorted(candidates):
            similarity = estimated_jaccard(signature, self.signatures[i])
            if similarity >= self.threshold:
                return i, similarity
        index = len(self.signatures)
        self.signatures.append(signature)
        for band, key in enumerate(keys):
            self.buckets[band].setdefault(key, []).append(index)
        return None
