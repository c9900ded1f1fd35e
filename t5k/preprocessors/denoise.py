"""Denoising objectives on token ids: span corruption, the T5 objective family, UL2, salient span masking.

All preprocessors here follow the seqio signature ``fn(dataset, sequence_length, output_features, ...)`` and
are pure TF graph ops (no py_function), so they run under ``num_parallel_calls=AUTOTUNE``. They read
``features["targets"]`` (int32 [length], the raw token ids of a chunk) and write ``inputs`` / ``targets``;
EOS is appended later by the feature converter, as in T5.

Sentinels come from the top of the vocabulary down: ``<extra_id_0>`` = vocab_size - 1, ``<extra_id_1>`` =
vocab_size - 2, ... (``sentinel_id``); the vocabulary is only asked for ``vocab_size``.

Determinism contract: the randomness of an example is drawn with ``tf.random.stateless_*`` ops from
``example_seed(seed, example_index)``, where ``example_index`` is the example's position in the stream
(see ``curriculum.add_example_index``; it is attached automatically, counting from 0, when missing). So an
example's corruption depends on (seed, index, tokens) only: two runs agree byte for byte, a run resumed at step
s agrees with one that went straight through, and a different seed gives different examples.

Bad input is filtered, not fatal: sequences shorter than ``MIN_LENGTH`` (empty documents, empty token
sequences) and, for salient span masking, sequences without a salient token are dropped; pass a
``DropCounter`` to count them by reason.
"""

import dataclasses
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from t5k.preprocessors.curriculum import INDEX_KEY

AUTOTUNE = tf.data.AUTOTUNE
# Our map/filter functions have no tensor-dependent Python control flow: skip autograph's slow source conversion.
plain_graph = tf.autograph.experimental.do_not_convert
MIN_LENGTH = 2  # one noise and one non-noise token at least

# An objective maps (tokens int32 [L], seed int64 [2]) to {"inputs": int32 [?], "targets": int32 [?]}.
TokenObjective = Callable[[tf.Tensor, tf.Tensor], Mapping[str, tf.Tensor]]


# ----------------------------------------------------------------------------------------------------------
# Seeds, counting of dropped examples, the shared map
# ----------------------------------------------------------------------------------------------------------


def example_seed(seed: int, index) -> tf.Tensor:
    """The stateless seed (int64 [2]) of the example at stream position `index` under base `seed`."""
    base = tf.constant([seed, 0x5EED], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


def subseed(seed: tf.Tensor, k: int) -> tf.Tensor:
    """An independent seed for the k-th random decision of one example."""
    return tf.random.experimental.stateless_fold_in(seed, k)


class DropCounter:
    """Counts examples dropped by the filters, by reason (a tf.Variable per reason, read with `counts()`).

    Create it outside any traced function (variables are made eagerly on first use of a reason).
    """

    def __init__(self):
        self._vars: dict = {}

    def variable(self, reason: str) -> tf.Variable:
        if reason not in self._vars:
            self._vars[reason] = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"dropped_{reason}")
        return self._vars[reason]

    def counts(self) -> dict:
        return {reason: int(v.numpy()) for reason, v in self._vars.items()}


def filter_with_count(dataset: tf.data.Dataset, keep_fn, reason: str, counter: Optional[DropCounter]):
    """`dataset.filter(keep_fn)` that also adds the number of dropped examples to `counter[reason]`."""
    keep_fn = plain_graph(keep_fn)
    if counter is None:
        return dataset.filter(keep_fn)
    dropped = counter.variable(reason)

    def keep_and_count(features):
        keep = keep_fn(features)
        with tf.control_dependencies([dropped.assign_add(tf.cast(tf.logical_not(keep), tf.int64))]):
            return tf.identity(keep)

    return dataset.filter(plain_graph(keep_and_count))


def with_index(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Attaches `example_index` = position (from 0) unless the examples already carry one."""
    if INDEX_KEY in dataset.element_spec:
        return dataset
    return dataset.enumerate().map(plain_graph(lambda i, ex: {**ex, INDEX_KEY: i}), num_parallel_calls=AUTOTUNE)


def apply_objective(
    dataset: tf.data.Dataset,
    objective: TokenObjective,
    seed: int,
    counter: Optional[DropCounter] = None,
    key: str = "targets",
    extra_keys: Sequence[str] = (),
) -> tf.data.Dataset:
    """Filters too-short sequences (counted as "too_short"), then maps `objective` over `features[key]`.

    The objective is called as objective(tokens, seed, *[features[k] for k in extra_keys]).

    Other features pass through unchanged (`example_index` included), so a later step can still read them.
    """
    dataset = with_index(dataset)
    dataset = filter_with_count(dataset, lambda ex: tf.size(ex[key]) >= MIN_LENGTH, "too_short", counter)

    def corrupt(features):
        out = dict(features)
        extras = [features[k] for k in extra_keys]
        out.update(objective(tf.cast(features[key], tf.int32), example_seed(seed, features[INDEX_KEY]), *extras))
        return out

    return dataset.map(plain_graph(corrupt), num_parallel_calls=AUTOTUNE)


def _vocab_size(output_features) -> int:
    return output_features["targets"].vocabulary.vocab_size


def sentinel_count(output_features) -> Optional[int]:
    """The vocabulary's sentinel count (seqio's `extra_ids`), the most noise spans a sentinel objective may use;
    None (not checked) for a vocabulary that declares none, e.g. a test's pass-through vocabulary."""
    return getattr(output_features["targets"].vocabulary, "extra_ids", None) or None


# ----------------------------------------------------------------------------------------------------------
# Noise masks
# ----------------------------------------------------------------------------------------------------------


def random_segmentation(num_items, num_segments, seed) -> tf.Tensor:
    """Random partition of `num_items` items into `num_segments` non-empty segments: int32 [num_segments].

    Cut points are a uniformly random subset of size num_segments - 1 of the num_items - 1 gaps, so every
    composition is equally likely. Requires 1 <= num_segments <= num_items.
    """
    # is_cut[i] == 1: a new segment starts at item i + 1.                       [num_items - 1]
    is_cut = tf.concat([tf.ones([num_segments - 1], tf.int32), tf.zeros([num_items - num_segments], tf.int32)], 0)
    is_cut = tf.random.experimental.stateless_shuffle(is_cut, seed)
    segment_id = tf.cumsum(tf.concat([[0], is_cut], 0))  # [num_items]
    return tf.math.unsorted_segment_sum(tf.ones_like(segment_id), segment_id, num_segments)


def span_counts(length, noise_density, mean_noise_span_length):
    """(num_noise_tokens, num_noise_spans) for a sequence of `length` >= 2, as int32 tensors.

    num_noise = round(L * density) clipped to [1, L - 1]; num_spans = max(1, round(num_noise / mean)). The
    extra clip of num_spans to the non-noise count only bites for densities near 1 (every noise span needs a
    non-noise span before it); for the T5/UL2 settings it never changes anything.
    """
    length_f = tf.cast(length, tf.float32)
    num_noise = tf.cast(tf.round(length_f * noise_density), tf.int32)
    num_noise = tf.clip_by_value(num_noise, 1, length - 1)
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
    num_spans = tf.clip_by_value(num_spans, 1, length - num_noise)
    return num_noise, num_spans


def random_spans_noise_mask(length, noise_density, mean_noise_span_length, seed, random_roll: bool = False):
    """T5's span noise mask: bool [length], about `noise_density` noise in spans of mean length `mean`.

    Noise and non-noise lengths are random segmentations; spans alternate starting with non-noise, so the
    last token is always noise. With `random_roll` the mask is rotated by a random offset, so either end may be
    noise (used inside dialogs, where always hiding the last token would leak a pattern).

    Example (L=10, density 0.3, mean 1.5: 3 noise tokens in 2 spans): [0 0 1 0 0 0 0 0 1 1].
    """
    orig_length = length
    length = tf.maximum(length, MIN_LENGTH)
    num_noise, num_spans = span_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = random_segmentation(num_noise, num_spans, subseed(seed, 0))  # [num_spans]
    nonnoise_lengths = random_segmentation(length - num_noise, num_spans, subseed(seed, 1))  # [num_spans]
    interleaved = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [2 * num_spans])
    span_starts = tf.cumsum(interleaved)[:-1]  # [2 * num_spans - 1]
    start_indicator = tf.math.unsorted_segment_sum(tf.ones_like(span_starts), span_starts, length)  # [L]
    is_noise = tf.equal(tf.math.floormod(tf.cumsum(start_indicator), 2), 1)
    if random_roll:
        shift = tf.random.stateless_uniform([], subseed(seed, 2), 0, length, dtype=tf.int32)
        is_noise = tf.roll(is_noise, shift, axis=0)
    return is_noise[:orig_length]


def iid_noise_mask(length, noise_density, seed) -> tf.Tensor:
    """Each token independently noise with probability `noise_density`: bool [length]."""
    return tf.random.stateless_uniform([length], seed) < noise_density


def raw_length_for_inputs(inputs_length: int = 512, noise_density: float = 0.15, mean_noise_span_length: float = 3.0):
    """Largest raw chunk length whose span-corrupted inputs (with one EOS) fit `inputs_length`.

    Returns (raw_length, targets_length), targets counting one sentinel per span and one EOS. With the T5
    defaults: 568 raw tokens -> 483 kept + 28 sentinels + EOS = 512 inputs, 85 noise + 28 sentinels + EOS = 114.
    """

    def lengths(raw):
        # `span_counts`'s arithmetic exactly: float32 products, round half to even (L * 0.15 in float32 is not
        # L * 0.15 in float64: for L = 190 it rounds to 29, not 28).
        num_noise = int(np.clip(np.round(np.float32(raw) * np.float32(noise_density)), 1, raw - 1))
        num_spans = int(np.clip(np.round(np.float32(num_noise) / np.float32(mean_noise_span_length)), 1,
                                raw - num_noise))
        return raw - num_noise + num_spans + 1, num_noise + num_spans + 1

    raw = MIN_LENGTH
    while lengths(raw + 1)[0] <= inputs_length:
        raw += 1
    return raw, lengths(raw)[1]


# ----------------------------------------------------------------------------------------------------------
# Masks to inputs / targets
# ----------------------------------------------------------------------------------------------------------


def sentinel_id(vocab_size: int, k) -> tf.Tensor:
    """`<extra_id_k>`: the k-th sentinel from the top of the vocabulary."""
    return vocab_size - 1 - k


def noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size: int) -> tf.Tensor:
    """Replaces each noise span by one sentinel, numbered in order: int32 [?].

    tokens [a b c d e], mask [0 1 1 0 1] -> [a <extra_id_0> d <extra_id_1>].
    """
    prev_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
    first_noise = tf.logical_and(noise_mask, tf.logical_not(prev_is_noise))
    later_noise = tf.logical_and(noise_mask, prev_is_noise)
    sentinels = sentinel_id(vocab_size, tf.cumsum(tf.cast(first_noise, tf.int32)) - 1)
    tokens = tf.where(first_noise, sentinels, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(later_noise))


def noise_spans_after_sentinels(tokens, noise_mask, vocab_size: int) -> tf.Tensor:
    """The targets twin: each noise span k preceded by sentinel k, plus a final sentinel when the sequence
    ends with non-noise. tokens [a b c d e], mask [0 1 1 0 1] -> [<extra_id_0> b c <extra_id_1> e];
    mask [0 1 0 0 1 0]-like endings give the seed's `<X> 너의 <Y> 초대해줘서 <Z>`.

    This equals T5's nonnoise_span_to_unique_sentinel whenever the mask starts with non-noise (always so for
    `random_spans_noise_mask` without roll); for masks starting with noise (rolled, salient, dialog) T5's would
    pair sentinel k with noise span k + 1, while here sentinel k always announces noise span k.
    """
    prev_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
    first_noise = tf.logical_and(noise_mask, tf.logical_not(prev_is_noise))
    num_spans = tf.reduce_sum(tf.cast(first_noise, tf.int32))
    sentinels = sentinel_id(vocab_size, tf.cumsum(tf.cast(first_noise, tf.int32)) - 1)
    pairs = tf.stack([sentinels, tokens], axis=1)  # [L, 2]: (sentinel, token) per position
    keep = tf.logical_and(noise_mask[:, None], tf.stack([first_noise, tf.ones_like(first_noise)], axis=1))
    ends_clean = tf.logical_not(noise_mask[-1:])  # [1]
    final = tf.boolean_mask(tf.reshape(sentinel_id(vocab_size, num_spans), [1]), ends_clean)
    return tf.concat([tf.boolean_mask(pairs, keep), final], 0)


def sentinel_pair(tokens, noise_mask, vocab_size, num_sentinels: Optional[int] = None):
    """{"inputs", "targets"} of a sentinel-corrupting objective, given its noise mask.

    With `num_sentinels` (the vocabulary's extra_ids), a mask needing more sentinels than that (one per noise
    span, one more when the sequence ends with non-noise) fails the pipeline with an InvalidArgumentError
    instead of numbering spans with ordinary token ids below the sentinel range.
    """
    if num_sentinels is not None:
        first_noise = tf.logical_and(noise_mask, tf.logical_not(tf.pad(noise_mask[:-1], [[1, 0]])))
        needed = tf.reduce_sum(tf.cast(first_noise, tf.int32)) + tf.cast(tf.logical_not(noise_mask[-1]), tf.int32)
        check = tf.debugging.assert_less_equal(
            needed, num_sentinels, message=f"a noise mask needs more sentinels than the vocabulary's {num_sentinels} "
            "extra_ids: use shorter inputs, longer noise spans or a vocabulary with more extra_ids")
        with tf.control_dependencies([check]):
            tokens = tf.identity(tokens)
    return {
        "inputs": noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size),
        "targets": noise_spans_after_sentinels(tokens, noise_mask, vocab_size),
    }


# ----------------------------------------------------------------------------------------------------------
# Token objectives: (tokens int32 [L], seed [2]) -> {"inputs", "targets"}
# ----------------------------------------------------------------------------------------------------------


def span_corruption_objective(vocab_size: int, noise_density=0.15, mean_noise_span_length=3.0,
                              num_sentinels: Optional[int] = None) -> TokenObjective:
    """T5 span corruption.

    tokens  지난 주 너의 파티에 초대해줘서 고마워     mask [0 0 1 0 1 0]
    inputs  지난 주 <X> 파티에 <Y> 고마워               (X = <extra_id_0>, Y = <extra_id_1>, Z = <extra_id_2>)
    targets <X> 너의 <Y> 초대해줘서 <Z>
    (random masks end in noise, so the final <Z> appears with hand-made masks like this one, not in pre-training.)
    """

    def objective(tokens, seed):
        mask = random_spans_noise_mask(tf.size(tokens), noise_density, mean_noise_span_length, seed)
        return sentinel_pair(tokens, mask, vocab_size, num_sentinels)

    return objective


def prefix_lm_objective(_vocab_size: int = 0) -> TokenObjective:
    """Prefix LM: a uniform split point in [1, L - 1]; inputs = the prefix, targets = the rest.

    tokens [a b c d e] -> inputs [a b], targets [c d e].
    """

    def objective(tokens, seed):
        split = tf.random.stateless_uniform([], seed, 1, tf.size(tokens), dtype=tf.int32)
        return {"inputs": tokens[:split], "targets": tokens[split:]}

    return objective


def bert_mlm_objective(vocab_size: int, noise_density=0.15, mask_fraction=0.8, random_fraction=0.1,
                       num_reserved_tokens: int = 3) -> TokenObjective:
    """BERT-style MLM as in T5: pick `noise_density` of the tokens i.i.d.; of those 80% become the mask token
    (<extra_id_0>), 10% a uniform random token in [num_reserved_tokens, vocab_size - 1), 10% stay. targets =
    the original sequence.

    tokens [a b c d e] -> inputs [a <extra_id_0> c q e] (b masked, d replaced by q), targets [a b c d e].
    """

    def objective(tokens, seed):
        length = tf.size(tokens)
        noise = iid_noise_mask(length, noise_density, subseed(seed, 0))
        choice = tf.random.stateless_uniform([length], subseed(seed, 1))
        random_tokens = tf.random.stateless_uniform(
            [length], subseed(seed, 2), num_reserved_tokens, vocab_size - 1, dtype=tf.int32)
        to_mask = tf.logical_and(noise, choice < mask_fraction)
        to_random = tf.logical_and(noise, (choice >= mask_fraction) & (choice < mask_fraction + random_fraction))
        inputs = tf.where(to_mask, sentinel_id(vocab_size, 0), tf.where(to_random, random_tokens, tokens))
        return {"inputs": inputs, "targets": tokens}

    return objective


def deshuffle_objective(_vocab_size: int = 0) -> TokenObjective:
    """Deshuffling: inputs = a random permutation of the tokens, targets = the tokens in order.

    tokens [a b c d e] -> inputs [d a e c b], targets [a b c d e].
    """

    def objective(tokens, seed):
        return {"inputs": tf.random.experimental.stateless_shuffle(tokens, seed), "targets": tokens}

    return objective


def iid_replace_span_objective(vocab_size: int, noise_density=0.15,
                               num_sentinels: Optional[int] = None) -> TokenObjective:
    """i.i.d. noise, replace spans: like span corruption, but each token is noise independently, so runs of
    adjacent noise tokens (mean length 1 / (1 - density)) share a sentinel.

    tokens [a b c d e], mask [0 1 1 0 0] -> inputs [a <extra_id_0> d e], targets [<extra_id_0> b c <extra_id_1>].
    """

    def objective(tokens, seed):
        return sentinel_pair(tokens, iid_noise_mask(tf.size(tokens), noise_density, seed), vocab_size, num_sentinels)

    return objective


def iid_drop_tokens_objective(_vocab_size: int = 0, noise_density=0.15) -> TokenObjective:
    """i.i.d. noise, drop tokens: the noise tokens are removed from the inputs and are the targets.

    tokens [a b c d e], mask [0 1 0 1 0] -> inputs [a c e], targets [b d]. The positions are not in the
    example (that is the objective); they are `iid_noise_mask(L, density, example_seed(seed, index))`.
    """

    def objective(tokens, seed):
        noise = iid_noise_mask(tf.size(tokens), noise_density, seed)
        return {"inputs": tf.boolean_mask(tokens, tf.logical_not(noise)), "targets": tf.boolean_mask(tokens, noise)}

    return objective


# ----------------------------------------------------------------------------------------------------------
# UL2 mixture of denoisers
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser: span corruption at (rate, mean_span), or prefix LM when mean_span is None."""

    mode: str
    rate: float = 0.0
    mean_span: Optional[float] = None


UL2_DENOISERS = (
    Denoiser("[NLU]", 0.15, 3.0), Denoiser("[NLU]", 0.15, 8.0),  # R
    Denoiser("[NLG]", 0.5, 3.0), Denoiser("[NLG]", 0.5, 8.0),  # X
    Denoiser("[NLG]", 0.15, 64.0), Denoiser("[NLG]", 0.5, 64.0),  # X
    Denoiser("[S2S]"),  # S
)


def ul2_objective(vocab_size: int, mode_tokens: Mapping[str, Sequence[int]],
                  denoisers: Sequence[Denoiser] = UL2_DENOISERS, num_sentinels: Optional[int] = None) -> TokenObjective:
    """UL2: one denoiser drawn uniformly per example; its mode token ids are prepended to the inputs.

    `mode_tokens` maps each mode ("[NLU]", "[NLG]", "[S2S]") to its token ids in the real vocabulary.
    tokens [a b c d e f], X (0.5, 3) with mask [0 0 1 1 1 0]
      -> inputs [<[NLG]> a b <extra_id_0> f], targets [<extra_id_0> c d e <extra_id_1>]
    tokens [a b c d e f], S with split 2 -> inputs [<[S2S]> a b], targets [c d e f]
    """
    missing = {d.mode for d in denoisers} - set(mode_tokens)
    if missing:
        raise ValueError(f"mode_tokens lacks {sorted(missing)}")
    branches = [
        prefix_lm_objective() if d.mean_span is None
        else span_corruption_objective(vocab_size, d.rate, d.mean_span, num_sentinels)
        for d in denoisers
    ]
    modes = [tf.constant(list(mode_tokens[d.mode]), tf.int32) for d in denoisers]

    def objective(tokens, seed):
        which = tf.random.stateless_uniform([], subseed(seed, 0), 0, len(denoisers), dtype=tf.int32)

        def run(i):
            out = branches[i](tokens, subseed(seed, 1))
            return tf.concat([modes[i], out["inputs"]], 0), out["targets"]

        inputs, targets = tf.switch_case(which, [lambda i=i: run(i) for i in range(len(denoisers))])
        return {"inputs": inputs, "targets": targets}

    return objective


# ----------------------------------------------------------------------------------------------------------
# Salient span masking
# ----------------------------------------------------------------------------------------------------------


def salient_span_objective(vocab_size: int, max_spans: Optional[int] = None, max_target_tokens: Optional[int] = None,
                           num_sentinels: Optional[int] = None):
    """Masks salient spans (runs of `salient_mask` tokens) with sentinels; `max_spans` picks that many at random
    (REALM masks one), None masks all. `max_target_tokens` then keeps only spans whose targets fit: the spans are
    visited in a random order and kept while the targets (each span + its sentinel, + the final sentinel) fit.
    Takes (tokens, seed, salient [L] 0/1).

    tokens 김철수 가 2024 년 에 왔다, salient [1 0 1 1 0 0]
      -> inputs [<extra_id_0> 가 <extra_id_1> 에 왔다], targets [<extra_id_0> 김철수 <extra_id_1> 2024 년 <extra_id_2>]
    """

    def objective(tokens, seed, salient):
        salient = tf.cast(salient, tf.bool)
        if max_spans is not None:
            salient = _keep_random_spans(salient, max_spans, seed)
        if max_target_tokens is not None:
            salient = _keep_spans_that_fit(salient, max_target_tokens, subseed(seed, 1))
        return sentinel_pair(tokens, salient, vocab_size, num_sentinels)

    return objective


def _spans(mask):
    """(span index of each token [L] (-1 before the first span), number of spans) of the runs of True in `mask`."""
    starts = tf.logical_and(mask, tf.logical_not(tf.pad(mask[:-1], [[1, 0]])))
    return tf.cumsum(tf.cast(starts, tf.int32)) - 1, tf.reduce_sum(tf.cast(starts, tf.int32))


def _keep_random_spans(mask, max_spans: int, seed):
    """Keeps `max_spans` uniformly chosen runs of True in `mask` (bool [L]) and clears the others."""
    span_of_token, num_spans = _spans(mask)
    scores = tf.random.stateless_uniform([num_spans], seed)
    rank = tf.argsort(tf.argsort(scores))  # [num_spans], a random ranking
    keep_span = rank < max_spans
    return tf.logical_and(mask, tf.gather(keep_span, tf.maximum(span_of_token, 0)))


def _keep_spans_that_fit(mask, budget: int, seed):
    """Keeps the runs of True in `mask` (bool [L]) of the longest prefix of a random span order whose targets,
    sum(span length + 1 sentinel) + 1 final sentinel, fit in `budget` tokens."""
    span_of_token, num_spans = _spans(mask)
    lengths = tf.math.unsorted_segment_sum(tf.cast(mask, tf.int32), tf.maximum(span_of_token, 0), num_spans)
    order = tf.argsort(tf.random.stateless_uniform([num_spans], seed))  # [num_spans] span ids, random order
    fits = tf.cumsum(tf.gather(lengths, order) + 1) + 1 <= budget
    keep_span = tf.scatter_nd(order[:, None], fits, [num_spans])
    return tf.logical_and(mask, tf.gather(keep_span, tf.maximum(span_of_token, 0)))


# ----------------------------------------------------------------------------------------------------------
# seqio-style preprocessors
# ----------------------------------------------------------------------------------------------------------


def split_to_raw_length(dataset, sequence_length, output_features=None, noise_density=0.15,
                        mean_noise_span_length=3.0):
    """Cuts `targets` into chunks of the raw length that span corruption turns into `sequence_length["inputs"]`
    (568 for 512). Other features are dropped (a chunk is a new example); the last chunk may be shorter.
    """
    del output_features
    raw, _ = raw_length_for_inputs(sequence_length["inputs"], noise_density, mean_noise_span_length)

    def chunks(features):
        tokens = features["targets"]
        n = tf.size(tokens, out_type=tf.int64)
        num_full = n // raw
        row_lengths = tf.concat([tf.fill([num_full], tf.constant(raw, tf.int64)), tf.reshape(n % raw, [1])], 0)
        row_lengths = tf.boolean_mask(row_lengths, row_lengths > 0)
        return tf.data.Dataset.from_tensor_slices({"targets": tf.RaggedTensor.from_row_lengths(tokens, row_lengths)})

    return dataset.flat_map(plain_graph(chunks))


def span_corruption(dataset, sequence_length, output_features, seed: int = 0, noise_density=0.15,
                    mean_noise_span_length=3.0, counter: Optional[DropCounter] = None):
    """T5 span corruption (see `span_corruption_objective`); chunk first with `split_to_raw_length`."""
    del sequence_length
    objective = span_corruption_objective(_vocab_size(output_features), noise_density, mean_noise_span_length,
                                          sentinel_count(output_features))
    return apply_objective(dataset, objective, seed, counter)


def prefix_lm(dataset, sequence_length, output_features, seed: int = 0, counter: Optional[DropCounter] = None):
    del sequence_length, output_features
    return apply_objective(dataset, prefix_lm_objective(), seed, counter)


def bert_mlm(dataset, sequence_length, output_features, seed: int = 0, noise_density=0.15,
             counter: Optional[DropCounter] = None):
    del sequence_length
    return apply_objective(dataset, bert_mlm_objective(_vocab_size(output_features), noise_density), seed, counter)


def deshuffle(dataset, sequence_length, output_features, seed: int = 0, counter: Optional[DropCounter] = None):
    del sequence_length, output_features
    return apply_objective(dataset, deshuffle_objective(), seed, counter)


def iid_replace_span(dataset, sequence_length, output_features, seed: int = 0, noise_density=0.15,
                     counter: Optional[DropCounter] = None):
    del sequence_length
    objective = iid_replace_span_objective(_vocab_size(output_features), noise_density, sentinel_count(output_features))
    return apply_objective(dataset, objective, seed, counter)


def iid_drop_tokens(dataset, sequence_length, output_features, seed: int = 0, noise_density=0.15,
                    counter: Optional[DropCounter] = None):
    del sequence_length, output_features
    return apply_objective(dataset, iid_drop_tokens_objective(noise_density=noise_density), seed, counter)


def ul2(dataset, sequence_length, output_features, mode_tokens: Mapping[str, Sequence[int]], seed: int = 0,
        denoisers: Sequence[Denoiser] = UL2_DENOISERS, counter: Optional[DropCounter] = None):
    del sequence_length
    objective = ul2_objective(_vocab_size(output_features), mode_tokens, denoisers, sentinel_count(output_features))
    return apply_objective(dataset, objective, seed, counter)


def salient_span_masking(dataset, sequence_length, output_features, seed: int = 0, max_spans: Optional[int] = None,
                         counter: Optional[DropCounter] = None):
    """Reads `targets` and `salient_mask` (same length; see `t5k.salient`). Sequences without a salient token are
    dropped, counted as "no_salient_span". With `sequence_length`, spans are kept only while the targets fit
    ``sequence_length["targets"]`` with EOS (see `salient_span_objective`), so no target is ever trimmed."""
    budget = sequence_length["targets"] - 1 if sequence_length else None
    objective = salient_span_objective(_vocab_size(output_features), max_spans, budget, sentinel_count(output_features))
    dataset = filter_with_count(
        dataset, lambda ex: tf.reduce_any(tf.cast(ex["salient_mask"], tf.bool)), "no_salient_span", counter)
    return apply_objective(dataset, objective, seed, counter, extra_keys=("salient_mask",))
