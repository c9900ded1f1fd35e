"""How the training step reaches tf.data, and corruption-rate schedules as functions of that step.

The step is not read from the trainer at run time (tf.data runs ahead of the trainer, in parallel and
prefetched). Instead every example carries its position in the training stream::

    example_index = start_index + position       # int64, attached by `add_example_index`
    step          = example_index // examples_per_step

so an example's step is a pure function of where it sits in the stream. Resuming at step s therefore only
needs the stream to be re-positioned, not any state to be restored:

    add_example_index(ds, B).skip(s * B)              # straight through, then skip, or
    add_example_index(ds.skip(s * B), B, start_index=s * B)

give the same (index, step) pairs, and since every preprocessor draws its randomness from
(seed, example_index) only, the same examples. Put the skip *before* the corrupting map so a resume does not
pay for corrupting the skipped examples.

The schedules below are TF functions of an int64 step tensor, gin-configurable, so an objective takes
``rate_fn=@linear_rate`` with ``linear_rate.r0 = 0.1`` etc. in a gin file.
"""

import math

import gin
import tensorflow as tf

INDEX_KEY = "example_index"
STEP_KEY = "step"


def add_example_index(dataset: tf.data.Dataset, examples_per_step: int, start_index: int = 0,
                      shard_index: int = 0, num_shards: int = 1) -> tf.data.Dataset:
    """Adds `example_index` (position in the global stream) and `step` (= index // examples_per_step).

    Apply it to the stream in its final training order (after any seeded shuffle), because `step` means
    "the global step whose batch contains this example". `examples_per_step` is the global batch size.
    On one of `num_shards` hosts, `dataset` is this host's stream and `start_index` counts its examples; the
    k-th of them gets the global index ``k * num_shards + shard_index``: hosts never share an index (so never
    a corruption seed), and with `examples_per_step` rows per global batch each host's k-th batch is step k.
    """
    if examples_per_step < 1:
        raise ValueError(f"examples_per_step must be >= 1, got {examples_per_step}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is not in [0, num_shards = {num_shards})")

    def attach(position, features):
        features = dict(features)
        index = position * num_shards + shard_index
        features[INDEX_KEY] = index
        features[STEP_KEY] = index // examples_per_step
        return features

    attach = tf.autograph.experimental.do_not_convert(attach)  # plain graph code: skip autograph's conversion
    return dataset.enumerate(start=start_index).map(attach, num_parallel_calls=tf.data.AUTOTUNE)


def _progress(step, num_steps: int) -> tf.Tensor:
    """Fraction of the schedule done, float32 in [0, 1]."""
    t = tf.cast(step, tf.float32) / float(max(num_steps, 1))
    return tf.clip_by_value(t, 0.0, 1.0)


@gin.configurable
def constant_rate(step, rate: float = 0.15) -> tf.Tensor:
    """The same rate at every step (no curriculum)."""
    del step
    return tf.constant(rate, tf.float32)


@gin.configurable
def linear_rate(step, r0: float = 0.1, r1: float = 0.5, num_steps: int = 10_000) -> tf.Tensor:
    """r0 at step 0, straight line to r1 at `num_steps`, r1 afterwards."""
    return r0 + (r1 - r0) * _progress(step, num_steps)


@gin.configurable
def step_rate(step, r0: float = 0.1, r1: float = 0.5, num_steps: int = 10_000, num_stages: int = 4) -> tf.Tensor:
    """Staircase: `num_stages` equal increments from r0 to r1, the last one landing at `num_steps`.

    E.g. r0=0.1, r1=0.5, 4 stages over 1000 steps: 0.1 on [0, 250), 0.2 on [250, 500), 0.3 on [500, 750),
    0.4 on [750, 1000), 0.5 from step 1000 on.
    """
    stage = tf.floor(_progress(step, num_steps) * num_stages)
    return r0 + (r1 - r0) * stage / num_stages


@gin.configurable
def cosine_rate(step, r0: float = 0.1, r1: float = 0.5, num_steps: int = 10_000) -> tf.Tensor:
    """Half-cosine from r0 to r1: slow start and slow finish; r0 + (r1 - r0) * (1 - cos(pi t)) / 2."""
    t = _progress(step, num_steps)
    return r0 + (r1 - r0) * 0.5 * (1.0 - tf.cos(math.pi * t))
