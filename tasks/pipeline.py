"""Shared preprocessors of the t5k tasks, and `get_batches`: deterministic, resumable model batches.

Every task pipeline is ``source -> [tokenize] -> [chunk] -> index_examples -> objective -> append_eos_after_trim``.

* `index_examples` attaches ``example_index`` / ``step`` (t5k.preprocessors.curriculum) right after the source's
  seeded order, so every objective's randomness is a function of (seed, index) only.
* The seed: `seqio.Task.get_dataset(seed=K)` hands K to the source (document order) and, through seqio's
  ``map_seed_manager``, to the preprocessors wrapped by `seeded` (corruption), salted by the task name so tasks
  of a mixture draw independent masks. ``seed=None`` means 0: the pipelines are always deterministic.
* Resume: `get_batches(..., start_step=s)` returns exactly the batches s, s+1, ... of a run from step 0. Tasks whose
  examples each fill one packed row (span corruption over concatenated documents: `FIXED_LENGTH_TASKS`) resume
  in O(tokens): the chunk stream is skipped before any corruption. Others replay the pipeline up to step s.
"""

import contextlib
import logging
import zlib
from typing import Mapping, Optional, Sequence

import gin
import seqio
import tensorflow as tf

from t5k.feature_converters import get_feature_converter
from t5k.preprocessors import curriculum, denoise
from t5k_tasks import corpora

AUTOTUNE = tf.data.AUTOTUNE
plain_graph = tf.autograph.experimental.do_not_convert
FIXED_LENGTH_TASKS = set()  # names of tasks whose examples each fill exactly one (packed) row

_INDEX_CONTEXT = {"start_index": 0, "examples_per_step": 1, "shard_index": 0, "num_shards": 1}
_log = logging.getLogger(__name__)


def keep_tensorflow_on_the_host() -> None:
    """Hides the GPUs from TensorFlow, which here runs only the input pipeline, on the host's CPUs.

    On its first op TensorFlow claims every GPU it sees and reserves most of each one's memory, leaving JAX too
    little (t5x and MaxText hide them the same way). Called when `t5k_tasks` is imported, before any op. Once
    TensorFlow has initialised its devices they cannot be hidden: that is logged as a warning.
    """
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:
        _log.warning("TensorFlow had already initialised its devices, so it may hold GPU memory JAX needs: %s", e)


@contextlib.contextmanager
def index_context(start_index: int = 0, examples_per_step: int = 1, shard_index: int = 0, num_shards: int = 1):
    """Within it, `index_examples` starts this shard's stream at `start_index` (skipping the examples before it)
    and numbers the examples globally across the `num_shards` hosts (`curriculum.add_example_index`), with
    ``step = example_index // examples_per_step`` (the global batch). Read when the pipeline is built."""
    old = dict(_INDEX_CONTEXT)
    _INDEX_CONTEXT.update(start_index=int(start_index), examples_per_step=int(examples_per_step),
                          shard_index=int(shard_index), num_shards=int(num_shards))
    try:
        yield
    finally:
        _INDEX_CONTEXT.update(old)


def index_examples(dataset, sequence_length=None, output_features=None):
    del sequence_length, output_features
    context = dict(_INDEX_CONTEXT)
    start = context.pop("start_index")
    if start:
        dataset = dataset.skip(start)
    return curriculum.add_example_index(dataset, start_index=start, **context)


def map_seed() -> int:
    """The seed seqio's Task.get_dataset(seed=...) is building with (0 when None)."""
    seed = getattr(seqio.utils, "_NEXT_MAP_SEED", None)
    return 0 if seed is None else int(seed)


def seeded(preprocessor, salt: str = "", **kwargs):
    """A seqio preprocessor calling `preprocessor(ds, sequence_length, output_features, seed=..., **kwargs)` with
    the get_dataset seed mixed with crc32(salt)."""
    salt_value = zlib.crc32(salt.encode()) if salt else 0

    def apply(dataset, sequence_length, output_features):
        seed = (map_seed() * 1_000_003 + salt_value) % (2 ** 31)
        return preprocessor(dataset, sequence_length, output_features, seed=seed, **kwargs)

    apply.__name__ = getattr(preprocessor, "__name__", "seeded")
    return apply


def tokenize_batched(dataset, output_features, keys=("inputs", "targets"), text_key: Optional[str] = None,
                     batch_size: int = 64, keep_text: bool = False):
    """Tokenizes string features in batches (one analyser call and one Rust call per batch instead of one per
    example). `text_key` (e.g. "text") is encoded into "targets". Strings keep their value under
    "<key>_pretokenized" when `keep_text`."""
    sources = {"targets": text_key} if text_key else {k: k for k in keys if k in dataset.element_spec}

    def encode(batch):
        out = dict(batch)
        for key, src in sources.items():
            if keep_text:
                out[f"{key}_pretokenized"] = batch[src]
            out[key] = output_features[key].vocabulary.encode_tf(batch[src])
            if src != key:
                del out[src]
        return out

    return dataset.batch(batch_size).map(plain_graph(encode), num_parallel_calls=AUTOTUNE).unbatch()


def concat_and_split(dataset, sequence_length, output_features=None, length_key: Optional[str] = None,
                     noise_density: float = 0.15, mean_noise_span_length: float = 3.0, docs_per_block: int = 32,
                     keys: Sequence[str] = ("targets",), reserve: int = 0):
    """Concatenates the documents' `targets` in stream order and cuts the result into chunks (T5's reduce_concat
    + split): of the raw length that span corruption turns into exactly ``sequence_length["inputs"]`` (568 for
    512), or of ``sequence_length[length_key] - 1 - reserve`` (room for EOS, and for `reserve` ids the objective
    adds, e.g. UL2's mode tokens) when `length_key` is given. An endless stream gives only full chunks; a finite
    one ends with the remainder (never dropped). Further `keys` aligned with `targets` (e.g. "salient_mask": one
    int per token) are concatenated and cut the same way."""
    del output_features
    if length_key:
        raw = sequence_length[length_key] - 1 - reserve
    else:
        raw, _ = denoise.raw_length_for_inputs(sequence_length["inputs"], noise_density, mean_noise_span_length)
    width = len(keys)

    def columns(ex):  # int32 [length, width]: the aligned features side by side
        return {"t": tf.stack([tf.cast(ex[k], tf.int32) for k in keys], axis=1), "end": False}

    blocks = dataset.map(plain_graph(columns)).ragged_batch(docs_per_block)
    end = {"t": tf.RaggedTensor.from_row_lengths(tf.zeros([0, width], tf.int32), tf.zeros([0], tf.int64)),
           "end": tf.constant([True])}
    blocks = blocks.concatenate(tf.data.Dataset.from_tensors(end))

    def cut(carry, block):
        flat = tf.concat([carry, block["t"].flat_values], 0)  # [tokens, width]
        total = tf.shape(flat)[0]
        n = total // raw
        rest = total - n * raw
        flush_rest = tf.reshape(tf.reduce_any(block["end"]) & (rest > 0), [1])
        lengths = tf.concat([tf.fill([n], raw), tf.boolean_mask(tf.reshape(rest, [1]), flush_rest)], 0)
        used = tf.reduce_sum(lengths)
        chunks = tf.RaggedTensor.from_row_lengths(flat[:used], tf.cast(lengths, tf.int64))
        return flat[used:], chunks

    chunks = blocks.scan(tf.zeros([0, width], tf.int32), plain_graph(cut))
    return chunks.unbatch().map(plain_graph(lambda c: {k: c[:, j] for j, k in enumerate(keys)}))


def rename(dataset, mapping: Mapping[str, str]):
    return dataset.map(lambda ex: {mapping.get(k, k): v for k, v in ex.items()})


class T5kTask(seqio.Task):
    """A seqio.Task that never wraps its source in `ds.cache()`: t5k sources are in memory already, and with
    shuffle=True they are endless (seeded epochs), which seqio's automatic in-memory cache would grow forever."""

    def get_dataset(self, *args, **kwargs):
        kwargs["try_in_mem_cache"] = False
        return super().get_dataset(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Batches for the trainer
# ----------------------------------------------------------------------------------------------------------


@gin.configurable(module="t5k_tasks")
def get_dataset(mixture_or_task_name: str, sequence_length: Mapping[str, int], split: str = "train",
                seed: int = 0, shuffle: Optional[bool] = None, start_index: int = 0, examples_per_step: int = 1,
                shard_index: int = 0, num_shards: int = 1, num_epochs: Optional[int] = None,
                train_examples: Optional[int] = None, subset_seed: int = 0) -> tf.data.Dataset:
    """Task-level examples (before feature conversion), starting at `start_index` of this shard's seeded stream.

    shuffle=None: True for "train" (endless seeded epochs), False otherwise (one pass in file order).
    `train_examples` (low-data training; gin: ``t5k_tasks.get_dataset.train_examples = 1000``, which `get_batches`
    and so `t5k train` follow): the train split of each task is a fixed subset of that many examples drawn by
    `subset_seed` (`corpora.train_subset`: independent of `seed` and of sharding, nested across sizes); epochs
    repeat it. Other splits are whole. A task whose source cannot be subset is an error, never silently whole.
    For a mixture, `start_index` counts examples of the mixed stream (each task's `example_index` counts its own).
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is not in [0, num_shards = {num_shards})")
    if start_index < 0 or examples_per_step < 1:
        raise ValueError(f"expected start_index >= 0 and examples_per_step >= 1, got {start_index} and "
                         f"{examples_per_step}")
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    shuffle = split == "train" if shuffle is None else shuffle
    shard_info = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
    if train_examples is not None and split == "train":
        _check_subsettable(provider)
    # A task skips to start_index inside its own pipeline (index_examples); a mixture skips after sampling.
    skip_mixed = start_index if isinstance(provider, seqio.Mixture) else 0
    with index_context(start_index - skip_mixed, examples_per_step, shard_index, num_shards), \
            corpora.train_subset(train_examples, subset_seed):
        ds = provider.get_dataset(dict(sequence_length), split=split, shuffle=shuffle, seed=seed,
                                  shard_info=shard_info, num_epochs=num_epochs if shuffle else 1)
    return ds.skip(skip_mixed) if skip_mixed else ds


def _check_subsettable(provider) -> None:
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    for task in tasks:
        if not isinstance(task.source, corpora.IndexedSource):
            raise ValueError(f"train_examples: task {task.name!r} reads a {type(task.source).__name__}, which "
                             f"cannot serve a train subset (only the t5k_tasks sources, corpora.IndexedSource, can)")


@gin.configurable(module="t5k_tasks")
def get_batches(mixture_or_task_name: str, sequence_length: Mapping[str, int], batch_size: int,
                split: str = "train", seed: int = 0, start_step: int = 0, model_type: str = "encoder_decoder",
                pack: bool = True, shuffle: Optional[bool] = None, examples_per_step: Optional[int] = None,
                shard_index: int = 0, num_shards: int = 1, as_numpy: bool = True):
    """Model batches (dicts of numpy arrays, `batch_size` rows) for steps start_step, start_step + 1, ...

    Same (name, lengths, batch_size, split, seed, model_type, pack) -> byte-identical batches in every run, and
    `start_step=s` yields exactly what a run from 0 yields from its s-th batch on. `batch_size` is this host's
    batch (global batch / num_shards). `examples_per_step` (for step-dependent curricula; default the global
    batch, batch_size * num_shards) defines ``step = example_index // examples_per_step``; example indices are
    global (`curriculum.add_example_index`), so hosts draw different corruptions. The train split is endless; other splits are one pass
    (last batch dropped if shorter). Returns a numpy iterator, or the tf.data.Dataset with as_numpy=False.
    """
    shuffle = split == "train" if shuffle is None else shuffle
    fast = mixture_or_task_name in FIXED_LENGTH_TASKS and shuffle
    ds = get_dataset(mixture_or_task_name, sequence_length, split, seed, shuffle,
                     start_index=start_step * batch_size if fast else 0,
                     examples_per_step=examples_per_step or batch_size * num_shards,
                     shard_index=shard_index, num_shards=num_shards)
    ds = ds.map(lambda ex: {k: v for k, v in ex.items() if k in ("inputs", "targets")})
    absent = sorted(set(sequence_length) - set(ds.element_spec))
    if absent:
        raise ValueError(f"sequence_length {dict(sequence_length)} names {', '.join(absent)}, which "
                         f"{mixture_or_task_name!r} examples lack (they have {', '.join(sorted(ds.element_spec))}): "
                         "give lengths for the task's features only")
    converter = get_feature_converter(model_type, pack)
    ds = converter(ds, dict(sequence_length))
    ds = ds.batch(batch_size, drop_remainder=True)
    if start_step and not fast:
        ds = ds.skip(start_step)
    ds = ds.prefetch(AUTOTUNE)
    return ds.as_numpy_iterator() if as_numpy else ds
