"""Adversarial evaluation (HyperCLOVA seed): a discriminator learns to tell a generator's continuations of real
documents from the documents' own; its held-out accuracy measures generation quality across generator sizes
(0.5: indistinguishable, 1.0: always told apart).

    t5k adversarial --gin_file=gin/models/hyperclova_137m.gin --checkpoint=runs/pretrain_lm --out=adv.json
                    [--input docs.txt.gz ...] [--prompt_tokens 32] [--continuation_tokens 32] [--max_documents 400]

The protocol:
1. A document's first `prompt_tokens` ids are the prompt, the next `continuation_tokens` its real continuation
   (shorter documents are left out).
2. The generator continues every prompt with gin's `DecodeConfig` (`max_new_tokens` set to
   `continuation_tokens`; top-p sampling is the usual choice for this test).
3. A pair's two continuations are cut at EOS and then to the shorter one's length, so that length is no cue.
4. Documents are split 80/20 (seeded) into training and test pairs; both members of a pair stay on one side.
5. The discriminator (`DiscriminatorConfig`) is a logistic regression over TF-IDF weighted token uni- and
   bigrams, the detector Solaiman et al. (2019) trained on GPT-2 output. It is fitted on the training
   continuations, half of them real, and its accuracy on the test continuations is reported with a 95% Wilson
   interval.

Input documents default to the embedded news (`t5k_tasks.corpora.PROSE_FILES['wikinews']`); to compare sizes,
run each generator on the same `--input`, `--seed` and settings.
"""

import argparse
import dataclasses
import json
import math
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from t5k.models import EncoderDecoder

FEATURES = 1 << 18  # hashed n-gram buckets
EOS = 1


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """Logistic regression over TF-IDF weighted token uni- and bigrams (hashed into `FEATURES` buckets), with an L2
    penalty, trained full-batch with Adam for `steps` steps: Solaiman et al. (2019)'s detector of GPT-2 output.
    Bigrams let it see order as well as word choice; it learns from a few hundred continuations in seconds."""

    steps: int = 300
    learning_rate: float = 0.1
    l2: float = 1e-4
    seed: int = 0


def split_documents(token_rows: Sequence[Sequence[int]], prompt_tokens: int, continuation_tokens: int
                    ) -> Tuple[List[List[int]], List[List[int]]]:
    """(prompts, real continuations) of the documents long enough for both."""
    kept = [list(row) for row in token_rows if len(row) >= prompt_tokens + continuation_tokens]
    return [row[:prompt_tokens] for row in kept], [row[prompt_tokens:prompt_tokens + continuation_tokens]
                                                   for row in kept]


def generate_continuations(model, params, prompts: Sequence[Sequence[int]], decode_config, seed: int = 0,
                           batch_size: int = 32, rows_multiple: int = 1) -> List[List[int]]:
    """The generator's continuation of each prompt (ids before its first EOS), row i sampled with seed + i.
    Each call's rows are padded (by repeating its first prompt) to a multiple of `rows_multiple`, the mesh's
    data axis."""
    from t5k import decoding

    params = decoding.params_for_decoding(model, params)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        n = len(chunk)
        chunk += [chunk[0]] * (-n % rows_multiple)
        rows = [list(p) + [EOS] if isinstance(model, EncoderDecoder) else [0] + list(p) for p in chunk]
        batch = decoding.batch_from_ids(model, rows, decode_config)
        seeds = np.arange(start, start + len(chunk), dtype=np.uint32) + np.uint32(seed)
        tokens = np.asarray(decoding.generate(model, params, batch, decode_config, seeds).tokens)[:, 0]
        out += [_before_eos(row) for row in tokens.tolist()[:n]]
    return out


def _before_eos(ids: Sequence[int]) -> List[int]:
    ids = list(ids)
    return ids[: ids.index(EOS)] if EOS in ids else [i for i in ids if i != 0]


def paired(real: Sequence[Sequence[int]], generated: Sequence[Sequence[int]]) -> List[Tuple[List[int], List[int]]]:
    """Each pair cut at EOS and to its shorter member's length; pairs with an empty member are dropped."""
    pairs = []
    for r, g in zip(real, generated):
        r, g = _before_eos(r), _before_eos(g)
        n = min(len(r), len(g))
        if n:
            pairs.append((r[:n], g[:n]))
    return pairs


def evaluate(pairs: Sequence[Tuple[Sequence[int], Sequence[int]]], config: DiscriminatorConfig = DiscriminatorConfig(),
             test_fraction: float = 0.2) -> Dict[str, float]:
    """Trains the discriminator on a seeded share of the pairs and scores it on the others."""
    if len(pairs) < 10:
        raise ValueError(f"adversarial evaluation needs at least 10 pairs of continuations, got {len(pairs)}")
    order = np.random.default_rng(config.seed).permutation(len(pairs))
    n_test = max(1, int(round(test_fraction * len(pairs))))
    test, train = [pairs[i] for i in order[:n_test]], [pairs[i] for i in order[n_test:]]
    train_rows, train_labels = _labelled(train)
    test_rows, test_labels = _labelled(test)
    idf = inverse_document_frequencies(train_rows)
    weights, bias = _fit(ngram_features(train_rows, idf), train_labels, config)
    predicted = _scores(ngram_features(test_rows, idf), weights, bias) > 0
    correct = int(np.sum(predicted == test_labels.astype(bool)))
    low, high = wilson_interval(correct, len(test_rows))
    return {"accuracy": correct / len(test_rows), "ci95_low": low, "ci95_high": high,
            "test_continuations": len(test_rows), "train_continuations": len(train_rows),
            "continuation_tokens_mean": float(np.mean([len(r) for r, _ in pairs]))}


def _labelled(pairs) -> Tuple[List[List[int]], np.ndarray]:
    """Both members of every pair, label 1 for the generated one."""
    rows = [list(x) for pair in pairs for x in pair]
    return rows, np.tile([0.0, 1.0], len(pairs)).astype(np.float32)


def _ngrams(row: Sequence[int]) -> np.ndarray:
    """Hashed bucket of each unigram and bigram of `row` (a bigram hashes both ids, so order counts)."""
    ids = np.asarray(row, np.uint64)
    unigrams = ids * np.uint64(0x9E3779B1)
    bigrams = ids[:-1] * np.uint64(0x85EBCA77) + ids[1:] * np.uint64(0xC2B2AE3D) + np.uint64(1)
    return (np.concatenate([unigrams, bigrams]) % np.uint64(FEATURES)).astype(np.int64)


def inverse_document_frequencies(rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Smoothed idf of each bucket over `rows`: log((1 + n) / (1 + df)) + 1."""
    df = np.zeros(FEATURES, np.float64)
    for row in rows:
        df[np.unique(_ngrams(row))] += 1
    return (np.log((1 + len(rows)) / (1 + df)) + 1).astype(np.float32)


def ngram_features(rows: Sequence[Sequence[int]], idf: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse TF-IDF rows as (row index, bucket, value) arrays: sublinear tf (1 + log count), L2-normalised."""
    row_index, buckets, values = [], [], []
    for i, row in enumerate(rows):
        unique, counts = np.unique(_ngrams(row), return_counts=True)
        weight = (1 + np.log(counts)) * idf[unique]
        row_index.append(np.full(len(unique), i))
        buckets.append(unique)
        values.append(weight / max(np.linalg.norm(weight), 1e-12))
    return np.concatenate(row_index), np.concatenate(buckets), np.concatenate(values).astype(np.float32)


def _scores(features, weights, bias, num_rows: Optional[int] = None):
    rows, buckets, values = features
    num_rows = int(rows.max()) + 1 if num_rows is None else num_rows
    return jax.ops.segment_sum(values * weights[buckets], rows, num_segments=num_rows) + bias  # [rows] logits


def _fit(features, labels: np.ndarray, config: DiscriminatorConfig):
    """Full-batch Adam on the mean logistic loss plus `l2 * |w|^2`; (weights [FEATURES], bias)."""
    import optax

    features = tuple(jax.numpy.asarray(x) for x in features)
    labels = jax.numpy.asarray(labels)

    def loss(params):
        logits = _scores(features, params["w"], params["b"], len(labels))
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean() + config.l2 * jax.numpy.sum(params["w"] ** 2)

    tx = optax.adam(config.learning_rate)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = {"w": jax.numpy.zeros(FEATURES, jax.numpy.float32), "b": jax.numpy.zeros((), jax.numpy.float32)}
    state = tx.init(params)
    for _ in range(config.steps):
        params, state = step(params, state)
    return np.asarray(params["w"]), float(params["b"])


def wilson_interval(successes: int, n: int, z: float = 1.96) -> Tuple[float, float]:
    """The Wilson score interval of a binomial proportion (sensible near 0 and 1, unlike the normal one)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# ------------------------------------------------------------------------------------------------ t5k adversarial


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from t5k import gin_utils, model_loading

    gin_utils.add_gin_arguments(parser)  # the generator's model (+ DecodeConfig.*, e.g. top_p)
    model_loading.add_checkpoint_arguments(parser)
    parser.add_argument("--input", nargs="*", default=None, help="document files (default: the embedded news)")
    parser.add_argument("--out", required=True, help="the result as JSON (a Markdown line is printed too)")
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--continuation_tokens", type=int, default=32)
    parser.add_argument("--max_documents", type=int, default=400)
    parser.add_argument("--steps", type=int, default=DiscriminatorConfig.steps, help="discriminator Adam steps")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace, bindings=()) -> int:
    from t5k import cli, decoding, files, gin_utils, model_loading, partitioning
    from t5k_tasks import corpora

    try:
        gin_utils.parse_gin(args.gin_file, bindings, args.gin_search_path)
        loaded = model_loading.load_model(args.checkpoint, args.step, args.num_devices, args.seed)
        paths = args.input or [str(corpora.PROSE_FILES["wikinews"])]
        texts = [doc.text for path in paths for doc in corpora.read_documents(path)][: args.max_documents]
        rows = corpora.encode_texts(loaded.vocabulary, texts)
        prompts, real = split_documents(rows, args.prompt_tokens, args.continuation_tokens)
        decode_config = dataclasses.replace(decoding.DecodeConfig(), max_new_tokens=args.continuation_tokens)
        with partitioning.activate(loaded.mesh, loaded.rules):
            generated = generate_continuations(loaded.model, loaded.params, prompts, decode_config, args.seed,
                                               rows_multiple=loaded.mesh.shape["data"])
        result = evaluate(paired(real, generated), DiscriminatorConfig(steps=args.steps, seed=args.seed))
    except (gin_utils.GinConfigError, ValueError, FileNotFoundError, KeyError) as e:
        print(cli.error_line("adversarial", e), file=sys.stderr)
        return 2
    result = {"generator": loaded.source, "documents": len(prompts), **result}
    files.write_text(args.out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"| {result['generator']} | {result['accuracy']:.3f} ({result['ci95_low']:.3f}–{result['ci95_high']:.3f}) "
          f"| {result['test_continuations']} |")
    print(json.dumps(result, ensure_ascii=False))
    return 0
