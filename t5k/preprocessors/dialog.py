"""Dialog objectives on sessions (DialogCT5): next utterance prediction, utterance order reconstruction,
single / multiple / partial utterance masking, with a corruption-rate curriculum.

Session representation (one tf.data example per session)::

    turn_tokens  RaggedTensor int32 [turns, (tokens)]   already tokenized utterances
    speakers     int32 [turns]                           0 for the first speaker, 1 for the second, ...

built from {"turns": [{"speaker", "text"}]} by `session_features` / `sessions_dataset`. A session is rendered
as one token sequence, every utterance preceded by its speaker's tag::

    A: 안녕 B: 응 안녕 A: 뭐해      (speaker_tags = [ids("A:"), ids("B:")], passed in as token-id sequences)

A tag's id sequence must never occur inside an utterance (reserved/special tokens are the safe choice),
otherwise a rendered session cannot be parsed back. Masked spans become sentinels `<M0>`, `<M1>`, ... which are
the vocabulary's `<extra_id_0>`, `<extra_id_1>`, ... (vocab_size - 1, vocab_size - 2, ...), as in T5.

Every objective keeps the session recoverable from (inputs, targets): fill the sentinels in the inputs with the
spans that follow the same sentinels in the targets (or read the targets, for order reconstruction), then split
at the tags. Randomness and the curriculum step come from `example_index` / `step` (see curriculum.py), so the
determinism contract of denoise.py holds here too.

The downstream dialog tasks render sessions as text; `fit_context` cuts a long rendered context at a speaker tag
around what its target depends on (the latest turns, or the hidden turn), where seqio would cut its end.

Bad input is filtered, not fatal (counted in a `DropCounter`): empty utterances are removed from their session
("empty_turn", counted per turn), then sessions with fewer than two turns ("too_few_turns") or with more speakers
than tags ("too_many_speakers") are dropped.
"""

from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from t5k.preprocessors.curriculum import INDEX_KEY, STEP_KEY, constant_rate
from t5k.preprocessors.denoise import (
    AUTOTUNE,
    DropCounter,
    sentinel_pair,
    example_seed,
    filter_with_count,
    plain_graph,
    random_spans_noise_mask,
    sentinel_count,
    subseed,
    with_index,
)

SESSION_KEYS = ("turn_tokens", "speakers")
RateFn = Callable[[tf.Tensor], tf.Tensor]


# ----------------------------------------------------------------------------------------------------------
# Sessions: Python side, cleaning, rendering
# ----------------------------------------------------------------------------------------------------------


def session_features(session: dict, encode: Callable[[str], Sequence[int]]) -> dict:
    """{"turns": [{"speaker", "text"}]} -> {"turn_tokens": [[ids]], "speakers": [index]}.

    Speakers are numbered by first appearance: the first to speak is 0 (tag A:), the next new one 1 (B:), ...
    """
    index: dict = {}
    speakers = [index.setdefault(turn["speaker"], len(index)) for turn in session["turns"]]
    return {"turn_tokens": [list(encode(turn["text"])) for turn in session["turns"]], "speakers": speakers}


def sessions_dataset(sessions, encode: Callable[[str], Sequence[int]]) -> tf.data.Dataset:
    """A tf.data dataset of session features from an iterable of session dicts (re-iterable for a re-run)."""

    def generate():
        for session in sessions:
            features = session_features(session, encode)
            turns = features["turn_tokens"]
            values = np.array([t for turn in turns for t in turn], np.int32)
            yield {
                "turn_tokens": tf.RaggedTensor.from_row_lengths(values, np.array([len(t) for t in turns], np.int64)),
                "speakers": np.array(features["speakers"], np.int32),
            }

    signature = {
        "turn_tokens": tf.RaggedTensorSpec([None, None], tf.int32, ragged_rank=1),
        "speakers": tf.TensorSpec([None], tf.int32),
    }
    return tf.data.Dataset.from_generator(generate, output_signature=signature)


def clean_sessions(dataset: tf.data.Dataset, num_speaker_tags: int, counter: Optional[DropCounter] = None):
    """Removes empty utterances, then drops sessions with < 2 turns or with more speakers than tags."""
    empty_turns = counter.variable("empty_turn") if counter is not None else None

    def drop_empty_turns(features):
        nonempty = features["turn_tokens"].row_lengths() > 0  # [turns]
        out = dict(features)
        out["turn_tokens"] = tf.ragged.boolean_mask(features["turn_tokens"], nonempty)
        out["speakers"] = tf.boolean_mask(features["speakers"], nonempty)
        if empty_turns is None:
            return out
        num_empty = tf.reduce_sum(tf.cast(tf.logical_not(nonempty), tf.int64))
        with tf.control_dependencies([empty_turns.assign_add(num_empty)]):
            out["speakers"] = tf.identity(out["speakers"])
        return out

    dataset = dataset.map(plain_graph(drop_empty_turns), num_parallel_calls=AUTOTUNE)
    dataset = filter_with_count(dataset, lambda ex: tf.size(ex["speakers"]) >= 2, "too_few_turns", counter)
    return filter_with_count(
        dataset, lambda ex: tf.reduce_max(ex["speakers"]) < num_speaker_tags, "too_many_speakers", counter)


def _window_ids(lengths: tf.Tensor, max_length: int) -> tf.Tensor:
    """Greedy windows of consecutive turns: int64 [turns], the window of each turn, -1 for a turn that fits none.

    A turn joins the current window while the window's total stays <= max_length, else it opens the next one. A turn
    longer than max_length on its own gets -1 and closes the window before it. Window ids run 0, 1, ... without gaps.

    lengths [4, 3, 2, 9, 5, 5], max_length 8 -> [0, 0, 1, -1, 2, 3]
    """
    lengths = tf.cast(lengths, tf.int64)
    full = tf.constant(max_length + 1, tf.int64)  # "used" of a window that takes nothing more

    def step(state, length):
        window, used = state[0], state[1]
        opens = used + length > max_length
        next_window = window + tf.cast(opens, tf.int64)
        next_used = tf.where(opens, length, used + length)
        fits = length <= max_length
        new_state = tf.where(fits, tf.stack([next_window, next_used]), tf.stack([window, full]))
        output = tf.where(fits, next_window, tf.constant(-1, tf.int64))
        return new_state, output

    initial = (tf.stack([tf.constant(-1, tf.int64), full]), tf.constant(0, tf.int64))
    _, ids = tf.scan(lambda carry, length: step(carry[0], length), lengths, initializer=initial)
    return ids


def split_long_sessions(dataset: tf.data.Dataset, max_length: int, speaker_tags: Sequence[Sequence[int]],
                        counter: Optional[DropCounter] = None) -> tf.data.Dataset:
    """Cuts every session whose rendered length (tags + utterances, see `render`) exceeds `max_length` into
    windows of consecutive whole turns that each fit, so that no objective's output is trimmed by seqio.

    Why: seqio trims a feature longer than its length from the end. For a session longer than the inputs, that
    drops the session's last turns from the inputs but not from the targets: partial masking loses trailing
    sentinels whose spans the targets still hold, and order reconstruction has targets that are not the inputs'
    turns. Whole-turn windows keep every example exactly recoverable. Masking objectives write one sentinel per
    masked span (at least one token), so their inputs never exceed the rendered window; pass the smaller of the
    inputs and targets lengths, less one for EOS, for objectives whose targets hold the whole session (order
    reconstruction).

    Windows are greedy from the first turn (a turn opens a new window when it would not fit the current one) and
    keep the session's speaker numbering, so each renders exactly as its stretch of the whole session. A session
    that fits passes unchanged. A turn longer than `max_length` on its own fits no window: it is removed and
    counted ("turn_too_long"); each session cut into several windows is counted once ("session_split"). Windows
    left with fewer than two turns are dropped later by `clean_sessions` ("too_few_turns"). Apply before the
    example index is attached (`add_example_index`, `session_prefixes`), so that each window is an example of
    its own, with its own index and seed.

    speaker tags [[3, 4], [5, 4]], turns [[11 12 13] [14] [15 16 17 18] [19]], speakers [0 1 0 1], max_length 9
      rendered lengths [5, 3, 6, 3] -> windows turns [[11 12 13] [14]], speakers [0 1]
                                      and turns [[15 16 17 18] [19]], speakers [0 1]
    """
    if max_length < 1:
        raise ValueError(f"split_long_sessions: max_length = {max_length}; expected >= 1")
    tag_lengths = tf.constant([len(tag) for tag in speaker_tags], tf.int64)
    last_tag = len(speaker_tags) - 1
    split_sessions = counter.variable("session_split") if counter is not None else None
    long_turns = counter.variable("turn_too_long") if counter is not None else None

    def windows(features):
        """One session -> its windows as a batch: turn_tokens ragged [windows, (turns), (tokens)], speakers ragged
        [windows, (turns)], every other feature repeated per window (unbatched below)."""
        turn_tokens, speakers = features["turn_tokens"], features["speakers"]
        # A speaker beyond the tags is dropped later ("too_many_speakers"); the last tag's length stands in.
        lengths = tf.cast(turn_tokens.row_lengths(), tf.int64) + tf.gather(tag_lengths, tf.minimum(speakers, last_tag))
        ids = tf.cond(tf.reduce_sum(lengths) <= max_length,  # nearly every session: one window, no scan
                      lambda: tf.zeros_like(lengths), lambda: _window_ids(lengths, max_length))  # [turns]
        # At least one window: a session with no turn that fits goes on empty, to be counted by `clean_sessions`.
        num_windows = tf.maximum(tf.reduce_max(tf.concat([ids, [-1]], 0)) + 1, 1)
        kept = ids >= 0
        turns_per_window = tf.math.bincount(tf.boolean_mask(ids, kept), minlength=num_windows, dtype=tf.int64)
        updates = []
        if counter is not None:
            updates = [split_sessions.assign_add(tf.cast(num_windows > 1, tf.int64)),
                       long_turns.assign_add(tf.reduce_sum(tf.cast(tf.logical_not(kept), tf.int64)))]
        with tf.control_dependencies(updates):
            turns_per_window = tf.identity(turns_per_window)
        out = {k: tf.repeat(v[None], num_windows, axis=0) for k, v in features.items() if k not in SESSION_KEYS}
        out["turn_tokens"] = tf.RaggedTensor.from_row_lengths(
            tf.ragged.boolean_mask(turn_tokens.with_row_splits_dtype(tf.int64), kept), turns_per_window)
        out["speakers"] = tf.RaggedTensor.from_row_lengths(tf.boolean_mask(speakers, kept), turns_per_window)
        return out

    return dataset.map(plain_graph(windows), num_parallel_calls=AUTOTUNE).unbatch()


def session_prefixes(dataset: tf.data.Dataset, min_turns: int = 2) -> tf.data.Dataset:
    """Expands each session into its prefixes of min_turns .. all turns (so next utterance prediction, which
    predicts the last turn, trains on every position). Apply before `add_example_index`."""

    def prefixes(features):
        num_turns = tf.cast(tf.size(features["speakers"]), tf.int64)
        ks = tf.data.Dataset.range(min_turns, num_turns + 1)
        return ks.map(plain_graph(lambda k: {"turn_tokens": features["turn_tokens"][:k],
                                             "speakers": features["speakers"][:k]}))

    return dataset.flat_map(plain_graph(prefixes))


def render(turn_tokens: tf.RaggedTensor, speakers, tags: tf.RaggedTensor):
    """Flattens a session: tokens int32 [N] (tag + utterance per turn), is_tag bool [N], turn int32 [N].

    turn_tokens [[11 12] [13]], speakers [0 1], tags [[3 4] [5 4]]
      -> tokens [3 4 11 12 5 4 13], is_tag [1 1 0 0 1 1 0], turn [0 0 0 0 1 1 1]
    """
    turn_tokens = turn_tokens.with_row_splits_dtype(tf.int64)
    turn_tags = tf.gather(tags.with_row_splits_dtype(tf.int64), speakers)  # ragged [turns, (tag)]
    pieces = tf.concat([turn_tags, turn_tokens], axis=1)  # ragged [turns, (tag + utterance)]
    is_tag = tf.concat([tf.ones_like(turn_tags, tf.bool), tf.zeros_like(turn_tokens, tf.bool)], axis=1)
    return pieces.flat_values, is_tag.flat_values, tf.cast(pieces.value_rowids(), tf.int32)


def speaker_tags_tensor(speaker_tags: Sequence[Sequence[int]]) -> tf.RaggedTensor:
    """Speaker tag ids as a RaggedTensor [speakers, (tag tokens)], the `tags` argument of `render`."""
    values = np.array([t for tag in speaker_tags for t in tag], np.int32)
    return tf.RaggedTensor.from_row_lengths(values, np.array([len(tag) for tag in speaker_tags], np.int64))


# ----------------------------------------------------------------------------------------------------------
# Objectives: (turn_tokens, speakers, tags, seed, rate, vocab_size, num_sentinels) -> {"inputs", "targets"}
# (num_sentinels: the vocabulary's extra_ids; a mask needing more sentinels fails, see denoise.sentinel_pair)
# ----------------------------------------------------------------------------------------------------------


def next_utterance(turn_tokens, speakers, tags, seed, rate, vocab_size, num_sentinels=None):
    """Context with the next speaker's tag -> the last utterance.

    A: 안녕 B: 뭐해 A: 밥 먹어  ->  inputs "A: 안녕 B: 뭐해 A:", targets "밥 먹어".
    """
    del seed, rate, vocab_size, num_sentinels
    context, _, _ = render(turn_tokens[:-1], speakers[:-1], tags)
    last_tag = tf.gather(tags, speakers[-1])
    return {"inputs": tf.concat([context, last_tag], 0), "targets": turn_tokens[-1]}


def utterance_order(turn_tokens, speakers, tags, seed, rate, vocab_size, num_sentinels=None):
    """Turns shuffled (each keeps its tag) -> the session in order.

    A: 안녕 B: 뭐해 A: 밥 먹어  ->  inputs "B: 뭐해 A: 밥 먹어 A: 안녕", targets "A: 안녕 B: 뭐해 A: 밥 먹어".
    """
    del rate, vocab_size, num_sentinels
    order = tf.random.experimental.stateless_shuffle(tf.range(tf.size(speakers)), seed)
    shuffled, _, _ = render(tf.gather(turn_tokens, order), tf.gather(speakers, order), tags)
    original, _, _ = render(turn_tokens, speakers, tags)
    return {"inputs": shuffled, "targets": original}


def single_utterance_masking(turn_tokens, speakers, tags, seed, rate, vocab_size, num_sentinels=None):
    """One uniformly chosen utterance -> <M0>; its tag stays.

    A: 안녕 B: 뭐해 A: 밥 먹어  ->  inputs "A: 안녕 B: <M0> A: 밥 먹어", targets "<M0> 뭐해 <M1>".
    """
    del rate
    tokens, is_tag, turn = render(turn_tokens, speakers, tags)
    chosen = tf.random.stateless_uniform([], seed, 0, tf.size(speakers), dtype=tf.int32)
    noise = tf.logical_and(tf.equal(turn, chosen), tf.logical_not(is_tag))
    return sentinel_pair(tokens, noise, vocab_size, num_sentinels)


def multiple_utterance_masking(turn_tokens, speakers, tags, seed, rate, vocab_size, num_sentinels=None):
    """round(rate * turns) utterances, clipped to [1, turns - 1], chosen at random -> <M0>, <M1>, ... in order.

    A: 안녕 B: 뭐해 A: 밥 먹어 B: 맛있어?  (rate 0.5)
      ->  inputs "A: <M0> B: 뭐해 A: <M1> B: 맛있어?", targets "<M0> 안녕 <M1> 밥 먹어 <M2>".
    """
    tokens, is_tag, turn = render(turn_tokens, speakers, tags)
    num_turns = tf.size(speakers)
    num_masked = tf.cast(tf.round(rate * tf.cast(num_turns, tf.float32)), tf.int32)
    num_masked = tf.clip_by_value(num_masked, 1, num_turns - 1)
    rank = tf.argsort(tf.random.stateless_uniform([num_turns], seed))  # a random order of the turns
    masked_turn = tf.scatter_nd(rank[:num_masked, None], tf.ones([num_masked], tf.bool), [num_turns])
    noise = tf.logical_and(tf.gather(masked_turn, turn), tf.logical_not(is_tag))
    return sentinel_pair(tokens, noise, vocab_size, num_sentinels)


def make_partial_utterance_masking(mean_noise_span_length: float = 3.0):
    """Spans inside utterances -> <M0>, <M1>, ...; the speaker tags stay visible.

    The T5 span mask (rate, mean span length) is drawn over the utterance tokens of the whole session (rolled
    at random, so the session's end is not always masked) and then laid out around the tags; a span that runs
    over a turn boundary is cut by the tag into two sentinels.
    A: 지난 주 너의 파티에 B: 초대해줘서 고마워 (mask on 너의, 초대해줘서)
      ->  inputs "A: 지난 주 <M0> 파티에 B: <M1> 고마워", targets "<M0> 너의 <M1> 초대해줘서 <M2>".
    """

    def partial_utterance_masking(turn_tokens, speakers, tags, seed, rate, vocab_size, num_sentinels=None):
        tokens, is_tag, _ = render(turn_tokens, speakers, tags)
        utterance_noise = random_spans_noise_mask(
            tf.size(turn_tokens.flat_values), rate, mean_noise_span_length, seed, random_roll=True)
        positions = tf.where(tf.logical_not(is_tag))  # [utterance tokens, 1]
        noise = tf.scatter_nd(positions, utterance_noise, tf.shape(tokens, out_type=tf.int64))
        return sentinel_pair(tokens, noise, vocab_size, num_sentinels)

    return partial_utterance_masking


partial_utterance_masking = make_partial_utterance_masking()


# ----------------------------------------------------------------------------------------------------------
# seqio-style preprocessor
# ----------------------------------------------------------------------------------------------------------


def dialog_objective(
    dataset: tf.data.Dataset,
    sequence_length,
    output_features,
    objective=partial_utterance_masking,
    speaker_tags: Sequence[Sequence[int]] = (),
    seed: int = 0,
    rate_fn: Optional[RateFn] = None,
    counter: Optional[DropCounter] = None,
) -> tf.data.Dataset:
    """Cleans sessions and maps a dialog `objective` over them; outputs inputs/targets (+ index/step).

    `rate_fn(step)` is the corruption rate (used by multiple and partial utterance masking); a curriculum from
    curriculum.py needs `step` on the examples (`add_example_index`), the constant default (0.15) does not.
    In gin: dialog_objective.objective = @partial_utterance_masking, dialog_objective.rate_fn = @linear_rate.
    """
    del sequence_length
    if not speaker_tags:
        raise ValueError("speaker_tags: token ids of the speaker tags (A:, B:, ...) are required")
    if rate_fn is not None and STEP_KEY not in dataset.element_spec:
        raise ValueError("a rate curriculum needs the step: apply curriculum.add_example_index first")
    rate_fn = rate_fn or constant_rate
    vocab_size, num_sentinels = output_features["targets"].vocabulary.vocab_size, sentinel_count(output_features)
    tags = speaker_tags_tensor(speaker_tags)
    dataset = clean_sessions(with_index(dataset), len(speaker_tags), counter)

    def corrupt(features):
        step = features.get(STEP_KEY, tf.constant(0, tf.int64))
        out = {k: v for k, v in features.items() if k not in SESSION_KEYS}
        out.update(objective(features["turn_tokens"], features["speakers"], tags,
                             subseed(example_seed(seed, features[INDEX_KEY]), 7), rate_fn(step), vocab_size,
                             num_sentinels))
        return out

    return dataset.map(plain_graph(corrupt), num_parallel_calls=AUTOTUNE)


# ----------------------------------------------------------------------------------------------------------
# Downstream: a rendered dialog context cut to its length at a speaker tag
# ----------------------------------------------------------------------------------------------------------


def tag_starts(ids: tf.Tensor, tags: Sequence[Sequence[int]]) -> tf.Tensor:
    """bool [n]: the positions of `ids` [n] where one of the `tags` (id sequences) begins.

    ids [7 3 4 9 5 4 8], tags [[3 4], [5 4]] -> [0 1 0 0 1 0 0]
    """
    n = tf.size(ids)
    found = tf.zeros([n], tf.bool)
    for tag in tags:
        match = tf.ones([n], tf.bool)
        for j, tag_id in enumerate(tag):
            # ids[i + j] at position i, -1 past the end.
            shifted = tf.concat([ids[j:], tf.fill([tf.minimum(j, n)], tf.constant(-1, ids.dtype))], 0)
            match = match & tf.equal(shifted, tag_id)
        found = found | match
    return found


def context_window(ids: tf.Tensor, max_length: int, keep_first: int, tags: Sequence[Sequence[int]],
                   anchor=None) -> tf.Tensor:
    """A rendered dialog context `ids` [n] cut to at most `max_length` ids around an anchor, at a speaker tag where
    one allows it, instead of seqio's cut at the end.

    Why: seqio trims a long feature from the end. A response-generation context then loses its latest turns and
    the speaker tag it ends with (the model is asked for the next utterance of a conversation whose end it never
    sees), and an in-filling context may lose the sentinel of the hidden turn (the target fills a gap that is
    not in the inputs).

    The first `keep_first` ids (the task prefix, e.g. "대화 응답:") stay. Of the rest, a window of
    `room = max_length - keep_first` ids is kept:
    - `anchor` None: the window ends where the context ends (the latest turns, and the next speaker's tag the
      context ends with; response generation);
    - `anchor` a position in `ids` (the hidden turn's sentinel): the window holds it, with about half of the room
      before it, moved back or forth where it would reach past the context's start or end.
    The window starts at the earliest position that fits (the earliest start), moved on to the first tag from there
    when that tag begins a turn before the anchor's own turn: the window then holds whole turns, and at least one
    of them before the anchor's turn. When the turn before the anchor's turn does not fit whole, the window starts
    at the earliest start, inside that turn (its end is the context that matters most). A context that fits comes
    back unchanged.

    ids [P P 3 4 11 12 5 4 13 3 4] (tags [3 4], [5 4] at 2, 6 and 9), keep_first 2:
      max_length 8, anchor None -> room 6, earliest start 5, first tag from 5 at 6 -> [P P 5 4 13 3 4]
      max_length 6, anchor None -> room 4, earliest start 7, no tag in 7..8 -> [P P 4 13 3 4]
      max_length 7, anchor 4 (id 11) -> room 5, earliest start 2 (the anchor's own turn) -> [P P 3 4 11 12 5]
    """
    room = max_length - keep_first
    if room < 1:
        raise ValueError(f"context_window: max_length {max_length} leaves no room after the {keep_first}-id prefix")
    n = tf.size(ids)

    def cut():
        positions = tf.range(n)
        starts = tag_starts(ids, tags) & (positions >= keep_first)
        if anchor is None:
            last, earliest = n - 1, n - room
        else:
            last = tf.cast(anchor, n.dtype)
            earliest = tf.clip_by_value(last - room // 2, keep_first, n - room)
        # The anchor's own turn begins at the last tag at or before the anchor.
        anchor_turn = tf.reduce_max(tf.where(starts & (positions <= last), positions, keep_first))
        candidates = starts & (positions >= earliest) & (positions < anchor_turn)
        start = tf.where(tf.reduce_any(candidates), tf.argmax(candidates, output_type=n.dtype), earliest)
        return tf.concat([ids[:keep_first], ids[start:start + room]], 0)

    return tf.cond(n > max_length, cut, lambda: ids)


def fit_context(dataset: tf.data.Dataset, sequence_length, output_features, prefix: str,
                speaker_tags: Sequence[str], anchor: Optional[str] = None, feature: str = "inputs") -> tf.data.Dataset:
    """seqio preprocessor, after tokenization: `context_window` on a rendered dialog context, cut to
    `sequence_length[feature]` less one id for EOS (appended later by `append_eos_after_trim`).

    `prefix`, `speaker_tags` and `anchor` are text, encoded with the feature's vocabulary as they appear inside the
    rendered context: the prefix begins it, a tag follows a space (" A:"). `anchor`: None keeps the latest turns;
    a text of one id (a sentinel, "<extra_id_0>") keeps a window around its first occurrence. Without a length
    for `feature` the dataset passes unchanged.
    """
    length = (sequence_length or {}).get(feature)
    if length is None:
        return dataset
    vocabulary = output_features[feature].vocabulary
    keep_first = len(vocabulary.encode(prefix))
    tags = [vocabulary.encode(" " + tag.strip()) for tag in speaker_tags]
    anchor_id = None
    if anchor is not None:
        anchor_ids = vocabulary.encode(anchor)
        if len(anchor_ids) != 1:
            raise ValueError(f"fit_context: anchor {anchor!r} encodes to {anchor_ids}; expected a single id")
        anchor_id = anchor_ids[0]

    def fit(features):
        ids = features[feature]
        position = None if anchor_id is None else tf.argmax(tf.cast(tf.equal(ids, anchor_id), tf.int32),
                                                             output_type=tf.int32)
        return {**features, feature: context_window(ids, length - 1, keep_first, tags, position)}

    return dataset.map(plain_graph(fit), num_parallel_calls=AUTOTUNE)
