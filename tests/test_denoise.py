"""Denoising preprocessors: exact small cases, statistics over >= 10k sequences, reconstruction, determinism."""

import numpy as np
import pytest
import seqio
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from t5k.preprocessors import curriculum
from t5k.preprocessors import denoise as dn

V = 32_100
SENTINEL_FLOOR = V - 1000  # test tokens stay below this; sentinels are above
OUTPUT_FEATURES = {"targets": seqio.Feature(seqio.PassThroughVocabulary(size=V))}
MODES = {"[NLU]": [5], "[NLG]": [6], "[S2S]": [7]}
N = 10_000


# ----------------------------------------------------------------------------------------------------------
# Helpers: sources, collection, the inverse of sentinel corruption
# ----------------------------------------------------------------------------------------------------------


def token_source(n, min_len, max_len, key=0):
    """n sequences of random ids in [10, SENTINEL_FLOOR), lengths uniform in [min_len, max_len]."""

    def make(i):
        seed = tf.stack([i, tf.constant(key, tf.int64)])
        length = tf.random.stateless_uniform([], seed, min_len, max_len + 1, dtype=tf.int32)
        return {"targets": tf.random.stateless_uniform([length], seed + 1, 10, SENTINEL_FLOOR, dtype=tf.int32)}

    return tf.data.Dataset.range(n).map(make, num_parallel_calls=tf.data.AUTOTUNE)


def source_tokens(n, min_len, max_len, key=0):
    return [ex["targets"] for ex in collect(token_source(n, min_len, max_len, key))]


def collect(ds, keys=("targets", "inputs", "example_index")):
    """Runs a dataset in batches of 1024 and returns a list of per-example dicts of numpy arrays."""
    keys = [k for k in keys if k in ds.element_spec]
    ds = ds.map(lambda ex: {k: ex[k] for k in keys})
    pads = {k: tf.constant(-1, ds.element_spec[k].dtype) for k in keys}
    out = []
    for batch in ds.padded_batch(1024, padding_values=pads).as_numpy_iterator():
        for i in range(len(batch[keys[0]])):
            out.append({k: (v[i][v[i] != -1] if v.ndim == 2 else v[i]) for k, v in batch.items()})
    return out


def is_sentinel(x):
    return x >= SENTINEL_FLOOR


def sentinel_ids(x):
    return x[is_sentinel(x)]


def assert_sentinels_in_order(x):
    found = sentinel_ids(x)
    assert_equal(found, V - 1 - np.arange(len(found)))


def merge_mask(inputs, targets):
    """The noise mask (bool per original token) implied by a sentinel-corrupted example: each sentinel in the
    inputs stands for as many tokens as follow the same sentinel in the targets."""
    cuts = np.flatnonzero(is_sentinel(targets))
    span_length = np.zeros(1000, np.int64)
    span_length[V - 1 - targets[cuts]] = np.diff(np.append(cuts, len(targets))) - 1
    noise = is_sentinel(inputs)
    repeats = np.ones(len(inputs), np.int64)
    repeats[noise] = span_length[V - 1 - inputs[noise]]
    return np.repeat(noise, repeats)


def merge_sentinels(inputs, targets):
    """Inverse of sentinel corruption: the original tokens (given sentinels in order in both, checked apart)."""
    mask = merge_mask(inputs, targets)
    out = np.empty(len(mask), inputs.dtype)
    out[~mask] = inputs[~is_sentinel(inputs)]
    out[mask] = targets[~is_sentinel(targets)]
    return out


def assert_equal(a, b):
    assert len(a) == len(b) and (a == b).all(), (a, b)


def noise_runs(inputs, targets):
    """(noise tokens, noise spans) of a sentinel-corrupted example: one sentinel per span in the inputs."""
    spans = len(sentinel_ids(inputs))
    return len(targets) - len(sentinel_ids(targets)), spans


# ----------------------------------------------------------------------------------------------------------
# Exact small cases
# ----------------------------------------------------------------------------------------------------------


def test_raw_length_helper_gives_568_for_512():
    assert dn.raw_length_for_inputs(512, 0.15, 3.0) == (568, 114)
    # 568 tokens: 85 noise in 28 spans -> inputs 483 + 28 + EOS = 512, targets 85 + 28 + EOS = 114.
    assert dn.raw_length_for_inputs(512, 0.15, 3.0)[0] + 1 > 568  # 569 would not fit
    assert dn.span_counts(568, 0.15, 3.0) == (85, 28)
    assert [int(x) for x in dn.span_counts(569, 0.15, 3.0)] == [85, 28]  # 484 + 28 + 1 = 513 > 512


@pytest.mark.parametrize("density, mean", [(0.15, 3.0), (0.5, 3.0), (0.15, 8.0), (0.5, 32.0)])
def test_raw_length_helper_gives_exactly_the_masks_lengths(density, mean):
    """For every inputs length, the helper's (raw, targets) are what the mask makes of `raw` tokens, and raw + 1
    would overflow: its rounding is span_counts' float32 rounding (L = 190 at 0.15: 29 noise, not 28)."""
    lengths = range(8, 1200, 7) if density == 0.15 and mean == 3.0 else range(16, 1200, 61)
    for inputs_length in [172, 316, *lengths]:
        raw, targets = dn.raw_length_for_inputs(inputs_length, density, mean)
        for length, fits in ((raw, True), (raw + 1, False)):
            noise, spans = (int(x) for x in dn.span_counts(length, density, mean))
            assert (length - noise + spans + 1 <= inputs_length) == fits, (inputs_length, length)
        noise, spans = (int(x) for x in dn.span_counts(raw, density, mean))
        assert targets == noise + spans + 1, (inputs_length, raw)


def test_seed_example_with_a_hand_mask():
    # 지난 주 너의 파티에 초대해줘서 고마워 -> 지난 주 <X> 파티에 <Y> 고마워 / <X> 너의 <Y> 초대해줘서 <Z>
    tokens = tf.constant([11, 12, 13, 14, 15, 16])
    mask = tf.constant([False, False, True, False, True, False])
    x, y, z = V - 1, V - 2, V - 3
    out = dn.sentinel_pair(tokens, mask, V)
    np.testing.assert_array_equal(out["inputs"], [11, 12, x, 14, y, 16])
    np.testing.assert_array_equal(out["targets"], [x, 13, y, 15, z])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40))
def test_sentinel_round_trip_for_any_mask(mask):
    tokens = np.arange(10, 10 + len(mask), dtype=np.int32)
    out = dn.sentinel_pair(tf.constant(tokens), tf.constant(mask), V)
    inputs, targets = out["inputs"].numpy(), out["targets"].numpy()
    assert_sentinels_in_order(inputs)
    assert_sentinels_in_order(targets)
    assert_equal(merge_sentinels(inputs, targets), tokens)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n), st.integers(0, 2**31))))
def test_random_segmentation_is_a_partition(args):
    n, k, seed = args
    lengths = dn.random_segmentation(n, k, tf.constant([seed, 1], tf.int64)).numpy()
    assert len(lengths) == k and lengths.sum() == n and lengths.min() >= 1


def test_split_to_raw_length():
    ds = tf.data.Dataset.from_tensors({"targets": tf.range(1200, dtype=tf.int32)})
    chunks = [ex["targets"] for ex in dn.split_to_raw_length(ds, {"inputs": 512}).as_numpy_iterator()]
    assert [len(c) for c in chunks] == [568, 568, 64]
    np.testing.assert_array_equal(np.concatenate(chunks), np.arange(1200))


# ----------------------------------------------------------------------------------------------------------
# Span corruption statistics (>= 10k sequences)
# ----------------------------------------------------------------------------------------------------------


def test_span_corruption_statistics_and_reconstruction():
    originals = source_tokens(N, 200, 568)  # lengths vary, so the rates are statistics, not one rounding
    examples = collect(dn.span_corruption(token_source(N, 200, 568), None, OUTPUT_FEATURES, seed=3))
    assert len(examples) == N
    noise = spans = total = 0
    first_half = second_half = half_total = 0
    for ex, orig in zip(examples, originals):
        inputs, targets = ex["inputs"], ex["targets"]
        assert_sentinels_in_order(inputs)
        assert_sentinels_in_order(targets)
        assert_equal(merge_sentinels(inputs, targets), orig)
        n, s = noise_runs(inputs, targets)
        assert len(sentinel_ids(targets)) == s  # random masks end in noise: no trailing sentinel
        noise, spans, total = noise + n, spans + s, total + len(orig)
        mask = merge_mask(inputs, targets)
        h = len(mask) // 2
        first_half, second_half, half_total = first_half + mask[:h].sum(), second_half + mask[h:2 * h].sum(), half_total + h
    assert abs(noise / total - 0.15) < 0.005, noise / total
    assert abs(noise / spans - 3.0) < 0.1, noise / spans
    # noise is spread over the sequence, not piled at one end
    assert abs(first_half / half_total - 0.15) < 0.01 and abs(second_half / half_total - 0.15) < 0.01


def test_span_corruption_at_the_t5_length():
    examples = collect(dn.span_corruption(token_source(200, 568, 568), None, OUTPUT_FEATURES, seed=0))
    # + EOS (appended by the feature converter) gives exactly 512 / 114.
    assert {(len(ex["inputs"]) + 1, len(ex["targets"]) + 1) for ex in examples} == {(512, 114)}


# ----------------------------------------------------------------------------------------------------------
# The T5 objective family: reconstruction + statistics, 10k sequences each
# ----------------------------------------------------------------------------------------------------------


def run_objective(preprocessor, n=4000, min_len=64, max_len=192, **kwargs):
    originals = source_tokens(n, min_len, max_len)
    examples = collect(preprocessor(token_source(n, min_len, max_len), None, OUTPUT_FEATURES, **kwargs))
    assert len(examples) == n
    return examples, originals


def test_iid_replace_span():
    examples, originals = run_objective(dn.iid_replace_span, seed=1)
    noise = spans = total = 0
    for ex, orig in zip(examples, originals):
        assert_sentinels_in_order(ex["inputs"])
        assert_equal(merge_sentinels(ex["inputs"], ex["targets"]), orig)
        n, s = noise_runs(ex["inputs"], ex["targets"])
        noise, spans, total = noise + n, spans + s, total + len(orig)
    assert abs(noise / total - 0.15) < 0.005
    assert abs(noise / spans - 1 / 0.85) < 0.02  # runs of i.i.d. noise: geometric, mean 1 / (1 - p)


def test_iid_drop_tokens():
    n = 4000
    originals = source_tokens(n, 64, 192)
    ds = dn.iid_drop_tokens(token_source(n, 64, 192), None, OUTPUT_FEATURES, seed=2)
    # The positions are deliberately not in the example; they are a pure function of (seed, index, length).
    ds = ds.map(lambda ex: {**ex, "mask": tf.cast(dn.iid_noise_mask(
        tf.size(ex["inputs"]) + tf.size(ex["targets"]), 0.15, dn.example_seed(2, ex["example_index"])), tf.int32)})
    dropped = total = 0
    for ex, orig in zip(collect(ds, keys=("inputs", "targets", "mask")), originals):
        mask = ex["mask"].astype(bool)
        rebuilt = np.empty_like(orig)
        rebuilt[~mask], rebuilt[mask] = ex["inputs"], ex["targets"]
        assert_equal(rebuilt, orig)
        dropped, total = dropped + len(ex["targets"]), total + len(orig)
    assert abs(dropped / total - 0.15) < 0.005


def test_bert_mlm_15_percent_80_10_10():
    examples, originals = run_objective(dn.bert_mlm, seed=4)
    masked = replaced = total = 0
    for ex, orig in zip(examples, originals):
        assert_equal(ex["targets"], orig)
        is_mask = ex["inputs"] == V - 1
        changed = (ex["inputs"] != orig) & ~is_mask
        masked, replaced, total = masked + is_mask.sum(), replaced + changed.sum(), total + len(orig)
        assert ex["inputs"][changed].min(initial=3) >= 3
    assert abs(masked / total - 0.15 * 0.8) < 0.004
    assert abs(replaced / total - 0.15 * 0.1) < 0.002  # the other 1.5% are selected but kept (not observable)


def test_deshuffle():
    examples, originals = run_objective(dn.deshuffle, seed=5)
    fixed = total = 0
    for ex, orig in zip(examples, originals):
        assert_equal(ex["targets"], orig)
        assert_equal(np.sort(ex["inputs"]), np.sort(orig))
        fixed, total = fixed + (ex["inputs"] == orig).sum(), total + len(orig)
    assert fixed / total < 0.02  # a uniform permutation keeps ~1 of L tokens in place


def test_prefix_lm():
    examples, originals = run_objective(dn.prefix_lm, seed=6)
    fractions = []
    for ex, orig in zip(examples, originals):
        assert_equal(np.concatenate([ex["inputs"], ex["targets"]]), orig)
        assert len(ex["inputs"]) >= 1 and len(ex["targets"]) >= 1
        fractions.append(len(ex["inputs"]) / len(orig))
    assert abs(np.mean(fractions) - 0.5) < 0.01 and abs(np.std(fractions) - 12 ** -0.5) < 0.01  # uniform split


def test_ul2_mixture_per_denoiser():
    n = 5000
    examples, originals = run_objective(dn.ul2, n, min_len=568, max_len=568, seed=7, mode_tokens=MODES)
    counts = {}
    for ex, orig in zip(examples, originals):
        mode, inputs, targets = int(ex["inputs"][0]), ex["inputs"][1:], ex["targets"]
        if mode == MODES["[S2S]"][0]:
            assert_equal(np.concatenate([inputs, targets]), orig)
            key = ("[S2S]",)
        else:
            assert_sentinels_in_order(inputs)
            assert_equal(merge_sentinels(inputs, targets), orig)
            key = ({5: "[NLU]", 6: "[NLG]"}[mode],) + noise_runs(inputs, targets)
        counts[key] = counts.get(key, 0) + 1
    # At L = 568 each (rate, mean span) gives its own (noise tokens, spans): 85 = round(0.15 * 568), 284 = 0.5 * 568,
    # spans = round(noise / mean span). The denoiser of an example is identified by them.
    expected = {("[NLU]", 85, 28), ("[NLU]", 85, 11), ("[NLG]", 284, 95), ("[NLG]", 284, 36),
                ("[NLG]", 85, 1), ("[NLG]", 284, 4), ("[S2S]",)}
    assert set(counts) == expected
    for key, c in counts.items():
        assert abs(c / n - 1 / 7) < 0.02, (key, c)  # 4 standard deviations


# ----------------------------------------------------------------------------------------------------------
# Salient span masking
# ----------------------------------------------------------------------------------------------------------


def salient_source(rows):
    def ragged(key):
        return tf.RaggedTensor.from_row_lengths(np.concatenate([r[key] for r in rows]), [len(r[key]) for r in rows])

    return tf.data.Dataset.from_tensor_slices({"targets": ragged("targets"), "salient_mask": ragged("salient_mask")})


def test_salient_span_masking_masks_exactly_the_salient_spans():
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(2000):
        length = int(rng.integers(2, 60))
        rows.append({"targets": rng.integers(10, SENTINEL_FLOOR, length).astype(np.int32),
                     "salient_mask": (rng.random(length) < 0.2).astype(np.int32)})
    counter = dn.DropCounter()
    examples = collect(dn.salient_span_masking(salient_source(rows), None, OUTPUT_FEATURES, seed=1, counter=counter))
    kept = [r for r in rows if r["salient_mask"].any()]
    assert len(examples) == len(kept) and counter.counts()["no_salient_span"] == len(rows) - len(kept)
    for ex, row in zip(examples, kept):
        assert_equal(merge_sentinels(ex["inputs"], ex["targets"]), row["targets"])
        assert_equal(merge_mask(ex["inputs"], ex["targets"]), row["salient_mask"].astype(bool))

    one = collect(dn.salient_span_masking(salient_source(kept), None, OUTPUT_FEATURES, seed=1, max_spans=1))
    for ex, row in zip(one, kept):
        assert len(sentinel_ids(ex["inputs"])) == 1
        mask = merge_mask(ex["inputs"], ex["targets"])
        assert (mask <= row["salient_mask"].astype(bool)).all()
        assert_equal(merge_sentinels(ex["inputs"], ex["targets"]), row["targets"])


def test_salient_span_masking_keeps_the_spans_that_fit_the_targets_length():
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(500):
        length = int(rng.integers(20, 120))
        rows.append({"targets": rng.integers(10, SENTINEL_FLOOR, length).astype(np.int32),
                     "salient_mask": (rng.random(length) < 0.3).astype(np.int32)})
    rows = [r for r in rows if r["salient_mask"].any()]
    examples = collect(dn.salient_span_masking(salient_source(rows), {"targets": 16}, OUTPUT_FEATURES, seed=2))
    assert len(examples) == len(rows)
    masked_fraction = []
    for ex, row in zip(examples, rows):
        assert len(ex["targets"]) <= 15  # room for EOS: nothing is trimmed later
        mask = merge_mask(ex["inputs"], ex["targets"])
        assert (mask <= row["salient_mask"].astype(bool)).all()
        assert_equal(merge_sentinels(ex["inputs"], ex["targets"]), row["targets"])
        masked_fraction.append(mask.sum() / row["salient_mask"].sum())
        salient = row["salient_mask"].astype(bool)
        num_spans = int((salient & ~np.concatenate([[False], salient[:-1]])).sum())
        if salient.sum() + num_spans + 1 <= 15:  # every span fits: every span is masked
            assert_equal(mask, salient)
    assert 0.2 < np.mean(masked_fraction) < 1.0  # long rows lose spans, short rows keep them all


# ----------------------------------------------------------------------------------------------------------
# Determinism, resume, bad input
# ----------------------------------------------------------------------------------------------------------


def pipeline(seed, skip=0, examples_per_step=32, resume_style="skip_after"):
    source = token_source(256, 50, 300)
    if resume_style == "skip_after":
        indexed = curriculum.add_example_index(source, examples_per_step).skip(skip)
    else:  # resume by re-positioning the source and starting the index there
        indexed = curriculum.add_example_index(source.skip(skip), examples_per_step, start_index=skip)
    ds = dn.ul2(indexed, None, OUTPUT_FEATURES, mode_tokens=MODES, seed=seed)
    return [b"".join(v.tobytes() for v in ex.values()) for ex in collect(ds)]


def test_determinism_and_resume():
    first, again = pipeline(seed=11), pipeline(seed=11)
    assert first == again
    s = 3  # resume at step 3 with 32 examples per step
    assert pipeline(seed=11, skip=3 * 32) == first[s * 32:]
    assert pipeline(seed=11, skip=3 * 32, resume_style="restart_index") == first[s * 32:]
    other = pipeline(seed=12)
    assert sum(a != b for a, b in zip(first, other)) > 0.9 * len(first)


def test_bad_input_is_filtered_with_a_count():
    rows = [np.array([], np.int32), np.array([42], np.int32), np.array([42, 43], np.int32), np.arange(10, 30, dtype=np.int32)]
    ds = tf.data.Dataset.from_generator(lambda: ({"targets": r} for r in rows),
                                        output_signature={"targets": tf.TensorSpec([None], tf.int32)})
    for preprocessor in (dn.span_corruption, dn.prefix_lm, dn.bert_mlm, dn.deshuffle, dn.iid_replace_span,
                         dn.iid_drop_tokens):
        counter = dn.DropCounter()
        examples = collect(preprocessor(ds, None, OUTPUT_FEATURES, counter=counter))
        assert len(examples) == 2 and counter.counts() == {"too_short": 2}, preprocessor.__name__
    counter = dn.DropCounter()
    examples = collect(dn.ul2(ds, None, OUTPUT_FEATURES, mode_tokens=MODES, counter=counter))
    assert len(examples) == 2 and counter.counts() == {"too_short": 2}
    short = collect(dn.span_corruption(ds, None, OUTPUT_FEATURES))[0]  # length 2: one kept, one noise token
    np.testing.assert_array_equal(short["inputs"], [42, V - 1])
    np.testing.assert_array_equal(short["targets"], [V - 1, 43])


def test_more_spans_than_sentinels_is_an_error_not_ordinary_ids():
    """Past the vocabulary's extra_ids, span k would be numbered with the ordinary token vocab_size - 1 - k."""
    tokens = tf.range(10, 70, dtype=tf.int32)
    seed = tf.constant([1, 2], tf.int32)
    objective = dn.iid_replace_span_objective(100, noise_density=0.5, num_sentinels=100)
    assert int(tf.reduce_min(objective(tokens, seed)["targets"])) >= 10  # enough sentinels: fine
    with pytest.raises(tf.errors.InvalidArgumentError, match="more sentinels than the vocabulary's 3 extra_ids"):
        dn.iid_replace_span_objective(100, noise_density=0.5, num_sentinels=3)(tokens, seed)
    mask = tf.constant([False, True, False, True, False])  # 2 spans + the final sentinel: 3 needed
    dn.sentinel_pair(tf.range(5), mask, 100, num_sentinels=3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="extra_ids"):
        dn.sentinel_pair(tf.range(5), mask, 100, num_sentinels=2)
