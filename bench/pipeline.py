"""Pipeline benchmark: packed, span-corrupted CT5 batches (512/114) in input+target tokens per second per core.

Side by side in one run, on the same embedded prose corpus:

  t5k (a)    ko_span_corruption_from_text: raw text, tokenized on the fly (morph_bbpe, batched encode), three
             times: cold (analyser and lexicon loaded, in-process caches emptied as in a fresh process, the
             vocabulary's saved lexicon under them: only eojeols missing from it go through Kiwi), cold without
             the lexicon (caches emptied again, lexicon off: every distinct eojeol goes through Kiwi once, as
             before lexicons) and warm (seed 1, after every eojeol of the corpus went through the analyser, untimed: the
             steady state of a long run). The embedded corpus is part of the vocabulary's training text (less the
             held-out lines), so the lexicon covers it well: `lexicon_hit_rate` in the JSON says how well.
  t5k (b)    ko_span_corruption: from the pre-tokenized token cache
  seqio (a)  a plain seqio.Task: seqio.SentencePieceVocabulary (unigram, 32k, trained here on the same text),
             seqio.preprocessors.tokenize, per-document split into 568-token chunks, a straightforward span
             corruption (seqio.map_over_dataset), append_eos_after_trim
  seqio (b)  the same task over documents tokenized beforehand (held in memory)

Every path ends in seqio.EncDecFeatureConverter(pack=True) and .batch(B). Tokens counted = non-padding
encoder input tokens + decoder target tokens. Per core = divided by the CPU cores this process may use; per CPU
second = divided by the CPU time the process spent (all threads), which the other jobs of a shared machine disturb
less than wall time; whole pass = per CPU second from building the pipeline to its last batch (see `measure`).
Usage: python bench/pipeline.py [--batch_size 32] [--batches 40] [--warmup 3]. Last line: one JSON object.
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import t5k_tasks  # noqa: E402
from t5k import morph, vocab  # noqa: E402
from t5k_tasks import corpora  # noqa: E402

LENGTHS = {"inputs": 512, "targets": 114}
RAW = 568


def _tokens(batch) -> int:
    return int((batch["encoder_input_tokens"] != 0).sum() + (batch["decoder_target_tokens"] != 0).sum())


def measure(make, batches: int, warmup: int) -> dict:
    """Steady state: wall and CPU time of `batches` batches after `warmup` ones. Whole pass: CPU time from building
    the pipeline to its last batch, over all its tokens; it also holds the work tf.data did ahead during the
    warm-up (for a cold analyser cache that is where many first-seen eojeols are analysed)."""
    whole_cpu_start = time.process_time()
    iterator, warm_tokens = make(), 0
    for _ in range(warmup):
        warm_tokens += _tokens(next(iterator))
    tokens, start, cpu_start = 0, time.perf_counter(), time.process_time()
    for _ in range(batches):
        tokens += _tokens(next(iterator))
    end_cpu = time.process_time()
    seconds, cpu_seconds = time.perf_counter() - start, end_cpu - cpu_start
    cores = len(os.sched_getaffinity(0))
    return {"tokens_per_s": tokens / seconds, "tokens_per_s_per_core": tokens / seconds / cores, "tokens": tokens,
            "seconds": seconds, "tokens_per_cpu_s": tokens / cpu_seconds,
            "whole_pass_tokens_per_cpu_s": (tokens + warm_tokens) / (end_cpu - whole_cpu_start)}


# ----------------------------------------------------------------------------------------------------------
# The seqio baseline
# ----------------------------------------------------------------------------------------------------------


def train_sentencepiece(texts, out_dir: str) -> str:
    import sentencepiece as spm

    model = os.path.join(out_dir, "spm.model")
    if not os.path.exists(model):
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
            for t in texts:
                f.write(t.replace("\n", " ") + "\n")
        spm.SentencePieceTrainer.train(input=f.name, model_prefix=os.path.join(out_dir, "spm"), vocab_size=32000,
                                       model_type="unigram", character_coverage=0.9995, pad_id=0, eos_id=1,
                                       unk_id=2, bos_id=-1, max_sentence_length=100000, num_threads=2,
                                       input_sentence_size=200000, shuffle_input_sentence=True,
                                       minloglevel=2)
        os.unlink(f.name)
    return model


def split_documents(dataset):
    """Each document cut into 568-token pieces (the last one shorter)."""

    def chunks(ex):
        tokens = ex["targets"]
        n = tf.size(tokens)
        lengths = tf.concat([tf.fill([n // RAW], RAW), tf.boolean_mask([n % RAW], [n % RAW > 0])], 0)
        return tf.data.Dataset.from_tensor_slices({"targets": tf.RaggedTensor.from_row_lengths(tokens, lengths)})

    return dataset.flat_map(chunks).filter(lambda ex: tf.size(ex["targets"]) >= 2)


@seqio.map_over_dataset(num_seeds=1)
def simple_span_corruption(features, seed, output_features):
    """Straightforward T5 span corruption (density 0.15, mean span 3), one example at a time."""
    vocab_size = output_features["targets"].vocabulary.vocab_size
    tokens = features["targets"]
    length = tf.size(tokens)
    num_noise = tf.clip_by_value(tf.cast(tf.round(tf.cast(length, tf.float32) * 0.15), tf.int32), 1, length - 1)
    num_spans = tf.maximum(1, tf.cast(tf.round(tf.cast(num_noise, tf.float32) / 3.0), tf.int32))
    seeds = tf.random.experimental.stateless_split(seed, 2)

    def segment(n, k, s):
        starts = tf.random.experimental.stateless_shuffle(
            tf.concat([tf.ones([k - 1], tf.int32), tf.zeros([n - k], tf.int32)], 0), s)
        ids = tf.cumsum(tf.concat([[0], starts], 0))
        return tf.math.segment_sum(tf.ones_like(ids), ids)

    noise = segment(num_noise, num_spans, seeds[0])
    clean = segment(length - num_noise, num_spans, seeds[1])
    bounds = tf.cumsum(tf.reshape(tf.stack([clean, noise], 1), [-1]))[:-1]
    is_noise = tf.math.floormod(tf.cumsum(tf.scatter_nd(bounds[:, None], tf.ones_like(bounds), [length])), 2) == 1

    def sentinelize(mask):  # each run of `mask` -> one sentinel (T5's noise_span_to_unique_sentinel)
        previous = tf.concat([[False], mask[:-1]], 0)
        first = mask & ~previous
        sentinel = vocab_size - tf.cumsum(tf.cast(first, tf.int32))
        return tf.boolean_mask(tf.where(first, sentinel, tokens), ~(mask & previous))

    inputs, targets = sentinelize(is_noise), sentinelize(~is_noise)
    return {"inputs": inputs, "targets": targets}


def seqio_baseline_tasks(texts, vocabulary):
    features = {"inputs": seqio.Feature(vocabulary, add_eos=True), "targets": seqio.Feature(vocabulary, add_eos=True)}
    texts_t = tf.constant(texts)

    def text_source(split, shuffle_files, seed=None):
        ds = tf.data.Dataset.from_tensor_slices({"targets": texts_t})
        return ds.shuffle(len(texts), seed=seed) if shuffle_files else ds

    tokenized = [np.array(vocabulary.encode(t), np.int32) for t in texts]
    values = tf.constant(np.concatenate(tokenized))
    splits = tf.constant(np.concatenate([[0], np.cumsum([len(t) for t in tokenized])]).astype(np.int64))

    def token_source(split, shuffle_files, seed=None):
        ragged = tf.RaggedTensor.from_row_splits(values, splits)
        ds = tf.data.Dataset.from_tensor_slices({"targets": ragged})
        return ds.shuffle(len(texts), seed=seed) if shuffle_files else ds

    common = [split_documents, simple_span_corruption, seqio.preprocessors.append_eos_after_trim]
    for name, fn, pre in (("bench_seqio_text", text_source, [seqio.preprocessors.tokenize]),
                          ("bench_seqio_tokens", token_source, [])):
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(fn, splits=["train"]),
                               preprocessors=pre + common, output_features=features, metric_fns=[],
                               shuffle_buffer_size=1000)  # seqio default


def seqio_batches(name, batch_size, seed=0):
    ds = seqio.get_mixture_or_task(name).get_dataset(LENGTHS, "train", shuffle=True, seed=seed, num_epochs=None,
                                                     try_in_mem_cache=False)
    ds = seqio.EncDecFeatureConverter(pack=True)(ds, LENGTHS).batch(batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def warm(texts, make):
    """`make()` after every eojeol of `texts` went through the analyser (untimed): the state of a long run."""
    corpora.encode_texts(t5k_tasks.pretraining.VOCAB, texts)
    return make()


def cold(make, lexicon: Optional[morph.Lexicon]):
    """`make()` with the vocabulary's in-process caches emptied, as in a fresh process, over `lexicon` (loaded
    beforehand, untimed) or none (a cold start as before lexicons). Building the token cache for (b), or an earlier
    run, may have filled the caches."""
    vocabulary = vocab.resolve(t5k_tasks.pretraining.VOCAB)  # the BPEVocabulary behind the tasks' GinVocabulary
    gc.collect()  # the previous run's tf.data iterator (and its prefetch threads) must be gone
    vocabulary._splitter = morph.MorphSplitter(lexicon)
    vocabulary._ids_cache = {}
    vocabulary._piece_ids = {}
    return make()


def lexicon_hit_rate(texts, entries) -> dict:
    """Share of the corpus's analysed letter runs (occurrences, distinct runs) the lexicon holds."""
    counts = morph.count_runs(texts)
    hits = {r: n for r, n in counts.items() if r in entries}
    return {"occurrences": round(sum(hits.values()) / sum(counts.values()), 4),
            "distinct": round(len(hits) / len(counts), 4), "distinct_runs": len(counts)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)

    source = seqio.get_mixture_or_task("ko_span_corruption").source
    texts = [d.text for d in source.documents()["train"]]
    source.tokens("train")  # build the token cache before timing (b)
    spm_dir = os.path.join(os.path.expanduser("~/.cache/t5k/bench_spm"), corpora.vocab_fingerprint(
        t5k_tasks.pretraining.VOCAB) + f"-{len(texts)}")
    spm_vocab = seqio.SentencePieceVocabulary(train_sentencepiece(texts, spm_dir), extra_ids=100)
    seqio_baseline_tasks(texts, spm_vocab)

    vocabulary = t5k_tasks.pretraining.VOCAB
    lexicon = morph.read_lexicon(os.path.join(vocabulary.path, vocabulary.meta["lexicon"]["file"]))
    results = {}
    runs = {
        "t5k_a_raw_text": lambda: cold(lambda: t5k_tasks.get_batches(
            "ko_span_corruption_from_text", LENGTHS, args.batch_size), lexicon),
        "t5k_a_raw_text_nolex": lambda: cold(lambda: t5k_tasks.get_batches(
            "ko_span_corruption_from_text", LENGTHS, args.batch_size), None),
        "t5k_a_raw_text_warm": lambda: warm(texts, lambda: t5k_tasks.get_batches(
            "ko_span_corruption_from_text", LENGTHS, args.batch_size, seed=1)),
        "t5k_b_token_cache": lambda: t5k_tasks.get_batches("ko_span_corruption", LENGTHS, args.batch_size),
        "seqio_a_raw_text": lambda: seqio_batches("bench_seqio_text", args.batch_size),
        "seqio_b_pretokenized": lambda: seqio_batches("bench_seqio_tokens", args.batch_size),
    }
    # load the tokenizer and the analyser (seconds) once per process, before timing
    vocabulary.encode("시작")
    morph._kiwi().tokenize("시작")  # Kiwi finishes loading on its first call; the lexicon knows "시작"
    print(f"{'tokens/s:':<22} {'wall':>10} {'per core':>10} {'per CPU s':>10} {'whole pass':>12}", flush=True)
    for name, make in runs.items():
        results[name] = measure(make, args.batches, args.warmup)
        r = results[name]
        print(f"{name:<22} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s_per_core']:>10,.0f} "
              f"{r['tokens_per_cpu_s']:>10,.0f} {r['whole_pass_tokens_per_cpu_s']:>12,.0f}   "
              f"{r['tokens']:,} tokens in {r['seconds']:.1f} s", flush=True)
    per_core = {k: round(v["tokens_per_s_per_core"]) for k, v in results.items()}
    per_cpu_s = {k: round(v["tokens_per_cpu_s"]) for k, v in results.items()}
    whole = {k: round(v["whole_pass_tokens_per_cpu_s"]) for k, v in results.items()}
    summary = {
        "benchmark": "packed span-corrupted ct5 batches 512/114",
        "batch_size": args.batch_size, "batches": args.batches, "cores": len(os.sched_getaffinity(0)),
        "tokens_per_s_per_core": per_core, "tokens_per_cpu_s": per_cpu_s, "whole_pass_tokens_per_cpu_s": whole,
        # Headline: whole-pass CPU (the stable figure on a shared machine; for a cold analyser cache the only
        # honest one, since tf.data analyses many eojeols ahead during the warm-up). Then steady-state wall.
        "ratio_a_cold_whole_pass_cpu": round(whole["t5k_a_raw_text"] / whole["seqio_a_raw_text"], 3),
        "ratio_a_cold_nolex_whole_pass_cpu": round(whole["t5k_a_raw_text_nolex"] / whole["seqio_a_raw_text"], 3),
        "ratio_a_warm_whole_pass_cpu": round(whole["t5k_a_raw_text_warm"] / whole["seqio_a_raw_text"], 3),
        "ratio_b_whole_pass_cpu": round(whole["t5k_b_token_cache"] / whole["seqio_b_pretokenized"], 3),
        "ratio_a_cold_steady_wall": round(per_core["t5k_a_raw_text"] / per_core["seqio_a_raw_text"], 3),
        "ratio_a_cold_nolex_steady_wall": round(per_core["t5k_a_raw_text_nolex"] / per_core["seqio_a_raw_text"], 3),
        "ratio_a_warm_steady_wall": round(per_core["t5k_a_raw_text_warm"] / per_core["seqio_a_raw_text"], 3),
        "ratio_b_steady_wall": round(per_core["t5k_b_token_cache"] / per_core["seqio_b_pretokenized"], 3),
        "target_b_50k_per_core_met": per_core["t5k_b_token_cache"] >= 50_000,
        "lexicon_hit_rate": lexicon_hit_rate(texts, lexicon.entries),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
