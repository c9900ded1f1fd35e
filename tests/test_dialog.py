"""Dialog preprocessors: the session is recoverable from every objective, per-objective statistics, the
corruption-rate curriculum, determinism across a resume, and bad sessions."""

import functools

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5k.preprocessors import curriculum
from t5k.preprocessors import denoise as dn
from t5k.preprocessors import dialog as dl
from test_denoise import OUTPUT_FEATURES, SENTINEL_FLOOR, V, assert_equal, is_sentinel, merge_sentinels

TAGS = [[3, 4], [5, 4]]  # "A:", "B:" as reserved ids; utterance tokens are >= 10
N = 3000
OBJECTIVES = [dl.next_utterance, dl.utterance_order, dl.single_utterance_masking,
              dl.multiple_utterance_masking, dl.partial_utterance_masking]


# ----------------------------------------------------------------------------------------------------------
# Helpers: synthetic sessions, rendering and parsing in numpy
# ----------------------------------------------------------------------------------------------------------


def make_session(session_id):
    """A random session: 2..10 turns of 1..30 tokens, speakers 0/1 (the first one is 0)."""
    seed = tf.stack([tf.cast(session_id, tf.int64), tf.constant(99, tf.int64)])
    num_turns = tf.random.stateless_uniform([], seed, 2, 11, dtype=tf.int32)
    lengths = tf.random.stateless_uniform([num_turns], seed + 1, 1, 31, dtype=tf.int32)
    values = tf.random.stateless_uniform([tf.reduce_sum(lengths)], seed + 2, 10, SENTINEL_FLOOR, dtype=tf.int32)
    speakers = tf.concat([[0], tf.random.stateless_uniform([num_turns - 1], seed + 3, 0, 2, dtype=tf.int32)], 0)
    return {"turn_tokens": tf.RaggedTensor.from_row_lengths(values, lengths), "speakers": speakers}


def session_source(n, start=0):
    return tf.data.Dataset.range(start, start + n).map(make_session, num_parallel_calls=tf.data.AUTOTUNE)


def originals(n, start=0):
    """The rendered sessions in numpy, with their turn counts."""
    ds = session_source(n, start).map(lambda s: {"rendered": dl.render(s["turn_tokens"], s["speakers"], dl.speaker_tags_tensor(TAGS))[0],
                                          "turns": tf.size(s["speakers"])})
    return [(ex["rendered"], int(ex["turns"])) for ex in collect(ds, ("rendered", "turns"))]


def collect(ds, keys=("inputs", "targets", "example_index")):
    keys = [k for k in keys if k in ds.element_spec]
    ds = ds.map(lambda ex: {k: ex[k] for k in keys})
    pads = {k: tf.constant(-1, ds.element_spec[k].dtype) for k in keys}
    out = []
    for batch in ds.padded_batch(1024, padding_values=pads).as_numpy_iterator():
        for i in range(len(batch[keys[0]])):
            out.append({k: (v[i][v[i] != -1] if v.ndim == 2 else v[i]) for k, v in batch.items()})
    return out


def parse(rendered):
    """Rendered tokens -> [(speaker, utterance tokens)]: the inverse of render (tags are [3|5, 4])."""
    starts = np.flatnonzero(rendered == 4) - 1
    ends = list(starts[1:]) + [len(rendered)]
    return [((rendered[s] - 3) // 2, rendered[s + 2:e]) for s, e in zip(starts, ends)]


def tags_in(tokens):
    return int((tokens == 4).sum())


def run(objective, n=N, **kwargs):
    source = curriculum.add_example_index(session_source(n), examples_per_step=64)
    ds = dl.dialog_objective(source, None, OUTPUT_FEATURES, objective=objective, speaker_tags=TAGS, **kwargs)
    examples = collect(ds)
    assert len(examples) == n
    return examples


# ----------------------------------------------------------------------------------------------------------
# Exact small cases
# ----------------------------------------------------------------------------------------------------------


def test_render_and_parse():
    tokens, is_tag, turn = dl.render(tf.ragged.constant([[11, 12], [13]]), tf.constant([0, 1]), dl.speaker_tags_tensor(TAGS))
    assert_equal(tokens.numpy(), np.array([3, 4, 11, 12, 5, 4, 13]))
    assert_equal(is_tag.numpy(), np.array([1, 1, 0, 0, 1, 1, 0], bool))
    assert_equal(turn.numpy(), np.array([0, 0, 0, 0, 1, 1, 1]))
    assert [(s, list(u)) for s, u in parse(tokens.numpy())] == [(0, [11, 12]), (1, [13])]


def test_seed_example_inside_a_dialog():
    # A: 지난 주 너의 파티에 B: 초대해줘서 고마워 -> A: 지난 주 <M0> 파티에 B: <M1> 고마워 / <M0> 너의 <M1> 초대해줘서 <M2>
    tokens, is_tag, _ = dl.render(tf.ragged.constant([[11, 12, 13, 14], [15, 16]]), tf.constant([0, 1]),
                                  dl.speaker_tags_tensor(TAGS))
    noise = tf.constant([0, 0, 0, 0, 1, 0, 0, 0, 1, 0]) > 0
    out = dn.sentinel_pair(tokens, noise, V)
    m0, m1, m2 = V - 1, V - 2, V - 3
    assert_equal(out["inputs"].numpy(), np.array([3, 4, 11, 12, m0, 14, 5, 4, m1, 16]))
    assert_equal(out["targets"].numpy(), np.array([m0, 13, m1, 15, m2]))


def test_sessions_from_json_like_dicts_and_bad_sessions():
    encode = lambda text: [10 + ord(c) - ord("a") for c in text.split()]  # noqa: E731
    sessions = [
        {"turns": [{"speaker": "u", "text": "a b"}, {"speaker": "v", "text": ""}, {"speaker": "v", "text": "c"},
                   {"speaker": "u", "text": "d e f"}]},  # one empty utterance: removed, session kept
        {"turns": [{"speaker": "u", "text": "a"}]},  # one turn
        {"turns": []},  # no turn
        {"turns": [{"speaker": "u", "text": "a"}, {"speaker": "v", "text": ""}]},  # one turn once cleaned
        {"turns": [{"speaker": "u", "text": "a"}, {"speaker": "v", "text": "b"}, {"speaker": "w", "text": "c"}]},
    ]
    for objective in OBJECTIVES:
        counter = dn.DropCounter()
        ds = dl.dialog_objective(dl.sessions_dataset(sessions, encode), None, OUTPUT_FEATURES, objective=objective,
                                 speaker_tags=TAGS, counter=counter)
        examples = collect(ds)
        assert len(examples) == 1, objective.__name__
        assert counter.counts() == {"empty_turn": 2, "too_few_turns": 3, "too_many_speakers": 1}
        inputs, targets = examples[0]["inputs"], examples[0]["targets"]
        rendered = {dl.next_utterance: lambda: np.concatenate([inputs, targets]),
                    dl.utterance_order: lambda: targets}.get(objective, lambda: merge_sentinels(inputs, targets))()
        assert [(s, list(u)) for s, u in parse(rendered)] == [(0, [10, 11]), (1, [12]), (0, [13, 14, 15])]


def test_a_curriculum_without_the_step_is_refused():
    with pytest.raises(ValueError, match="add_example_index"):
        dl.dialog_objective(session_source(1), None, OUTPUT_FEATURES, speaker_tags=TAGS, rate_fn=curriculum.linear_rate)


# ----------------------------------------------------------------------------------------------------------
# Recovery and statistics per objective
# ----------------------------------------------------------------------------------------------------------


def test_next_utterance_prediction():
    for ex, (orig, turns) in zip(run(dl.next_utterance, seed=1), originals(N)):
        assert_equal(np.concatenate([ex["inputs"], ex["targets"]]), orig)
        assert tags_in(ex["inputs"]) == turns and tags_in(ex["targets"]) == 0  # context + the next speaker's tag


def test_utterance_order_reconstruction():
    changed, expected_changed = 0, 0.0
    for ex, (orig, turns) in zip(run(dl.utterance_order, seed=2), originals(N)):
        assert_equal(ex["targets"], orig)
        key = lambda turn: (turn[0], tuple(turn[1]))  # noqa: E731
        assert sorted(map(key, parse(ex["inputs"]))) == sorted(map(key, parse(orig)))  # same turns, each with its tag
        changed += not np.array_equal(ex["inputs"], orig)
        expected_changed += 1 - 1 / np.prod(np.arange(1, turns + 1))  # a uniform order differs unless identity
    assert abs(changed - expected_changed) / N < 0.02


def test_single_utterance_masking():
    positions = []
    for ex, (orig, turns) in zip(run(dl.single_utterance_masking, seed=3), originals(N)):
        assert_equal(merge_sentinels(ex["inputs"], ex["targets"]), orig)
        assert (ex["inputs"] == V - 1).sum() == 1 and tags_in(ex["inputs"]) == turns
        masked_turn = [i for i, (_, u) in enumerate(parse(ex["inputs"])) if (u == V - 1).any()][0]
        assert len(parse(ex["inputs"])[masked_turn][1]) == 1  # the whole utterance became <M0>
        positions.append(masked_turn / (turns - 1))
    assert abs(np.mean(positions) - 0.5) < 0.02  # uniform over the turns


def test_multiple_utterance_masking():
    half = functools.partial(curriculum.constant_rate, rate=0.5)
    masked_fraction = []
    for ex, (orig, turns) in zip(run(dl.multiple_utterance_masking, seed=4, rate_fn=half), originals(N)):
        assert_equal(merge_sentinels(ex["inputs"], ex["targets"]), orig)
        assert tags_in(ex["inputs"]) == turns
        masked = [u for _, u in parse(ex["inputs"]) if len(u) == 1 and is_sentinel(u[0])]
        assert len(masked) == int(np.clip(np.round(0.5 * turns), 1, turns - 1))
        masked_fraction.append(len(masked) / turns)
    assert abs(np.mean(masked_fraction) - 0.5) < 0.05  # rounding to whole turns on 2..10 turns


def partial_masking_rates(examples, sessions):
    """(noise fraction of utterance tokens, mean noise span length seen in the inputs)."""
    noise = utterance = spans = 0
    for ex, (orig, turns) in zip(examples, sessions):
        assert_equal(merge_sentinels(ex["inputs"], ex["targets"]), orig)
        assert tags_in(ex["inputs"]) == turns  # speakers stay visible
        noise += (~is_sentinel(ex["targets"])).sum()
        spans += is_sentinel(ex["inputs"]).sum()
        utterance += len(orig) - 2 * turns
    return noise / utterance, noise / spans


def test_partial_utterance_masking():
    rate, span = partial_masking_rates(run(dl.partial_utterance_masking, seed=5), originals(N))
    assert abs(rate - 0.15) < 0.005
    assert 2.4 < span < 3.0  # mean 3 over the utterance tokens; a span crossing a tag is cut in two


class SentinelVocabulary(seqio.PassThroughVocabulary):
    """Ids pass through; the top `extra_ids` of them are sentinels (what the dialog objectives read)."""

    def __init__(self, size, extra_ids):
        super().__init__(size)
        self._sentinels = extra_ids

    @property
    def extra_ids(self):
        return self._sentinels


def test_more_spans_than_sentinels_fails_the_dialog_pipeline():
    """A mask needing more sentinels than the vocabulary's extra_ids fails the pipeline instead of numbering spans
    with ordinary ids (a curriculum reaching rate 0.5 on long sessions gets there)."""
    half = functools.partial(curriculum.constant_rate, rate=0.5)

    def corrupt(extra_ids):
        features = {"targets": seqio.Feature(SentinelVocabulary(V, extra_ids))}
        source = curriculum.add_example_index(session_source(50), examples_per_step=1)
        return collect(dl.dialog_objective(source, None, features, objective=dl.partial_utterance_masking,
                                           speaker_tags=TAGS, seed=1, rate_fn=half))

    spans = max(int(is_sentinel(ex["targets"]).sum()) for ex in corrupt(1000))  # spans + the closing sentinel
    assert 8 < spans < 1000
    corrupt(spans)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"more sentinels than the vocabulary.{{1,3}}s {spans - 1} extra_ids"):
        corrupt(spans - 1)


# ----------------------------------------------------------------------------------------------------------
# Sessions longer than the lengths: whole-turn windows
# ----------------------------------------------------------------------------------------------------------


def _turn_lists(turn_tokens, speakers):
    return [(int(s), tuple(int(t) for t in turn if t != -1)) for s, turn in zip(speakers, turn_tokens)]


def windows_of(max_length, n=600):
    """(original turns, [window turns], counts) per session: `split_long_sessions` over n random sessions."""
    sessions = tf.data.Dataset.zip(tf.data.Dataset.range(n), session_source(n)).map(lambda i, s: {**s, "session_id": i})
    counter = dn.DropCounter()
    split = dl.split_long_sessions(sessions, max_length, TAGS, counter)
    dense = lambda ds: ds.map(lambda s: {"id": s["session_id"], "turns": s["turn_tokens"].to_tensor(-1),  # noqa: E731
                                         "speakers": s["speakers"]})
    by_id = {}
    for s in dense(split).as_numpy_iterator():
        by_id.setdefault(int(s["id"]), []).append(_turn_lists(s["turns"], s["speakers"]))
    originals_ = [_turn_lists(s["turns"], s["speakers"]) for s in dense(sessions).as_numpy_iterator()]
    return [(turns, by_id[i]) for i, turns in enumerate(originals_)], counter.counts()


def rendered_length(turns):
    return sum(len(TAGS[s]) + len(u) for s, u in turns)


@pytest.mark.parametrize("max_length", [20, 45, 1000])
def test_long_sessions_become_greedy_whole_turn_windows_that_fit(max_length):
    """Each window fits; the windows of a session are its turns in order, less the turns too long for any window;
    windows are greedy (a window's first turn did not fit the window before it); a session that fits is unchanged
    (speaker numbering included); the counts say how many sessions were cut and turns removed."""
    sessions, counts = windows_of(max_length)
    cut = dropped = 0
    for turns, windows in sessions:
        fitting = [t for t in turns if len(TAGS[t[0]]) + len(t[1]) <= max_length]
        dropped += len(turns) - len(fitting)
        assert [t for w in windows for t in w] == fitting
        assert all(rendered_length(w) <= max_length for w in windows)
        if rendered_length(turns) <= max_length:
            assert windows == [turns]
        cut += len(windows) > 1
        for before, after in zip(windows, windows[1:]):
            between_dropped = turns.index(after[0]) != turns.index(before[-1]) + 1
            assert between_dropped or rendered_length(before + after[:1]) > max_length
    assert counts == {"session_split": cut, "turn_too_long": dropped}
    if max_length == 1000:
        assert cut == dropped == 0
    else:
        assert cut > 50 and (dropped > 50) == (max_length == 20)


def test_window_ids_worked_example():
    assert dl._window_ids(tf.constant([4, 3, 2, 9, 5, 5]), 8).numpy().tolist() == [0, 0, 1, -1, 2, 3]
    assert dl._window_ids(tf.constant([], tf.int64), 8).numpy().tolist() == []
    with pytest.raises(ValueError, match="max_length = 0"):
        dl.split_long_sessions(session_source(1), 0, TAGS)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_windows_keep_every_objective_within_the_length(objective):
    """Windowed sessions through each objective: inputs and targets fit `max_length` (so seqio trims nothing) and the
    window is recovered exactly from them; sessions with no window of two turns are dropped and counted."""
    max_length, n = 40, 400
    counter = dn.DropCounter()
    split = dl.split_long_sessions(session_source(n), max_length, TAGS, counter)
    windows = [r for r in split.map(lambda s: {"rendered": dl.render(s["turn_tokens"], s["speakers"],
                                                                     dl.speaker_tags_tensor(TAGS))[0],
                                               "turns": tf.size(s["speakers"])}).as_numpy_iterator()
               if r["turns"] >= 2]
    ds = dl.dialog_objective(split, None, OUTPUT_FEATURES, objective=objective, speaker_tags=TAGS, seed=3,
                             counter=counter)
    examples = collect(ds)
    assert len(examples) == len(windows) > n
    assert counter.counts()["too_few_turns"] > 0
    for ex, window in zip(examples, windows):
        orig = window["rendered"]
        assert len(ex["inputs"]) <= max_length and len(orig) <= max_length
        if objective is dl.next_utterance:
            assert_equal(np.concatenate([ex["inputs"], ex["targets"]]), orig)
        elif objective is dl.utterance_order:
            assert_equal(ex["targets"], orig)
        else:
            assert_equal(merge_sentinels(ex["inputs"], ex["targets"]), orig)


# ----------------------------------------------------------------------------------------------------------
# Downstream contexts: cut at a speaker tag around the anchor
# ----------------------------------------------------------------------------------------------------------

PREFIX = [7, 8]  # a task prefix ("대화 응답:"); neither a tag nor an utterance id


def reference_context_window(ids, max_length, keep_first, tags, anchor=None):
    """`dl.context_window`'s rule on Python lists, one position at a time."""
    if len(ids) <= max_length:
        return ids
    n, room = len(ids), max_length - keep_first
    starts = [i for i in range(keep_first, n) if any(ids[i:i + len(tag)] == tag for tag in tags)]
    last = n - 1 if anchor is None else anchor
    earliest = n - room if anchor is None else min(max(last - room // 2, keep_first), n - room)
    own_turn = max([i for i in starts if i <= last], default=keep_first)
    later = [i for i in starts if earliest <= i < own_turn]
    start = later[0] if later else earliest
    return ids[:keep_first] + ids[start:start + room]


def test_context_window_worked_examples():
    ids = tf.constant([99, 99, 3, 4, 11, 12, 5, 4, 13, 3, 4], tf.int32)

    def window(max_length, anchor=None):
        return dl.context_window(ids, max_length, 2, TAGS, anchor).numpy().tolist()

    assert window(8) == [99, 99, 5, 4, 13, 3, 4]  # whole turns: the last one and the next speaker's tag
    assert window(6) == [99, 99, 4, 13, 3, 4]  # the last turn does not fit whole: its end is kept
    assert window(7, anchor=4) == [99, 99, 3, 4, 11, 12, 5]
    assert window(11) == ids.numpy().tolist()
    assert dl.tag_starts(tf.constant([7, 3, 4, 9, 5, 4, 8]), TAGS).numpy().tolist() == [0, 1, 0, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="no room after the 2-id prefix"):
        dl.context_window(ids, 2, 2, TAGS)


@pytest.mark.parametrize("max_length", [12, 30, 60])
@pytest.mark.parametrize("anchored", [False, True])
def test_context_window_keeps_the_anchor_and_matches_the_reference(max_length, anchored):
    """Rendered random sessions behind a prefix, cut by `context_window`: the prefix stays, the rest is one
    stretch of the context that holds the anchor (the context's end, or a turn's first utterance id), nothing is
    longer than `max_length`, and the cut is the one the rule in plain Python gives."""
    tags = dl.speaker_tags_tensor(TAGS)
    cut = 0
    sessions = session_source(150).map(
        lambda s: dict(zip(("ids", "is_tag", "turn"), dl.render(s["turn_tokens"], s["speakers"], tags))))
    for i, session in enumerate(sessions.as_numpy_iterator()):
        ids = PREFIX + session["ids"].tolist()
        anchor = None
        if anchored:  # the first utterance id of a turn picked by the session id
            turns = session["turn"]
            hidden = i % (turns.max() + 1)
            anchor = len(PREFIX) + int(np.flatnonzero((turns == hidden) & ~session["is_tag"])[0])
        got = dl.context_window(tf.constant(ids, tf.int32), max_length, len(PREFIX), TAGS, anchor).numpy().tolist()
        assert got == reference_context_window(ids, max_length, len(PREFIX), TAGS, anchor)
        assert len(got) <= max_length and got[:len(PREFIX)] == PREFIX
        body, kept = ids[len(PREFIX):], got[len(PREFIX):]
        offset = next(k for k in range(len(body) - len(kept) + 1) if body[k:k + len(kept)] == kept)
        held = len(body) - 1 if anchor is None else anchor - len(PREFIX)
        assert offset <= held < offset + len(kept)
        cut += len(got) < len(ids)
    assert cut > 30


# ----------------------------------------------------------------------------------------------------------
# Curriculum, determinism, resume
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [curriculum.linear_rate, curriculum.step_rate, curriculum.cosine_rate])
def test_curriculum_rate_observed_in_batches(schedule):
    batch, num_steps = 128, 1000
    rate_fn = functools.partial(schedule, r0=0.1, r1=0.5, num_steps=num_steps)
    for step in (0, num_steps // 2, num_steps):
        # Resume-style positioning: the stream starts at this step's first example, indexed from there.
        first = step * batch
        ids = tf.data.Dataset.range(first, first + batch).map(lambda i: {"id": i})
        ids = curriculum.add_example_index(ids, batch, start_index=first)
        ds = ids.map(lambda ex: {**ex, **make_session(ex["id"])})
        ds = dl.dialog_objective(ds, None, OUTPUT_FEATURES, speaker_tags=TAGS, seed=6, rate_fn=rate_fn)
        observed, _ = partial_masking_rates(collect(ds), originals(batch, start=first))
        expected = float(rate_fn(tf.constant(step, tf.int64)))
        assert abs(observed - expected) < 0.01, (schedule.__name__, step, observed, expected)


def test_schedules():
    for fn in (curriculum.linear_rate, curriculum.step_rate, curriculum.cosine_rate):
        values = [float(fn(tf.constant(s, tf.int64), r0=0.1, r1=0.5, num_steps=1000)) for s in (0, 500, 1000, 5000)]
        assert np.allclose(values, [0.1, 0.3, 0.5, 0.5], atol=1e-6), fn.__name__
    assert float(curriculum.step_rate(tf.constant(499), 0.1, 0.5, 1000, 4)) == pytest.approx(0.2)
    assert float(curriculum.cosine_rate(tf.constant(250), 0.1, 0.5, 1000)) < float(curriculum.linear_rate(tf.constant(250), 0.1, 0.5, 1000))


def dialog_pipeline(seed, skip_steps=0, batch=16, steps=6):
    rate_fn = functools.partial(curriculum.linear_rate, r0=0.1, r1=0.5, num_steps=steps)
    ds = curriculum.add_example_index(session_source(batch * steps), batch).skip(skip_steps * batch)
    ds = dl.dialog_objective(ds, None, OUTPUT_FEATURES, speaker_tags=TAGS, seed=seed, rate_fn=rate_fn)
    return [b"".join(v.tobytes() for v in ex.values()) for ex in collect(ds)]


def test_determinism_and_resume():
    first = dialog_pipeline(seed=7)
    assert first == dialog_pipeline(seed=7)
    assert dialog_pipeline(seed=7, skip_steps=3) == first[3 * 16:]
    other = dialog_pipeline(seed=8)
    assert sum(a != b for a, b in zip(first, other)) > 0.8 * len(first)
