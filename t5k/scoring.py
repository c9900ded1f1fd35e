"""Scoring given text with a model: per-sequence log-likelihoods, rank classification, perplexity.

The unit is a (context, continuation) pair of token-id lists; only the continuation's tokens are scored.

* Encoder-decoder: the context is the encoder input, the continuation is the decoder target (decoder input =
  the target shifted right behind T5's BOS id 0), exactly the layout `t5k train` learns from.
* Decoder-only: one sequence `context + continuation`, shifted right behind id 0 as seqio's
  DecoderFeatureConverter does; the loss weights are 1 on the continuation's positions only. A prefix LM
  (`TransformerConfig.prefix_lm`) also gets `decoder_causal_attention` on id 0 and the context, seqio's PrefixLM
  layout: the context attends to itself bidirectionally, as in training.

Batches are right-padded to a length bucket (a power of two, at least 8) and to a fixed number of rows, so a
whole evaluation compiles a handful of programs. Padding never changes a score: the decoder is causal after the
context, padded encoder keys are masked, and padded positions carry weight 0.

Rank classification (HyperCLOVA's multiple-choice scoring) scores every candidate completion of a prompt and
returns both the argmax of the summed log-likelihood and of the length-normalised (per-token) one: the sum
prefers short candidates, the mean removes that bias, and which is better depends on the task.
"""

import dataclasses
import functools
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from t5k import trainer
from t5k.models import EncoderDecoder

TokenIds = Sequence[int]
MIN_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class Scores:
    """Per-pair results: `log_likelihood[i]` = sum of the continuation's token log-probs (natural log),
    `num_tokens[i]` = how many tokens were scored."""

    log_likelihood: np.ndarray  # [pairs] float64
    num_tokens: np.ndarray  # [pairs] int64

    @property
    def mean_log_likelihood(self) -> np.ndarray:
        """Length-normalised score: log-likelihood per scored token (`[pairs]`)."""
        return self.log_likelihood / np.maximum(self.num_tokens, 1)


@dataclasses.dataclass(frozen=True)
class RankResult:
    """Rank classification of one prompt over its candidates."""

    best_by_sum: int  # argmax of the summed log-likelihood
    best_by_mean: int  # argmax of the per-token log-likelihood
    log_likelihoods: Tuple[float, ...]  # [candidates]
    num_tokens: Tuple[int, ...]  # [candidates]


def length_bucket(length: int) -> int:
    """The padded length for a sequence of `length` tokens: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, int(length) - 1).bit_length())


def _is_encoder_decoder(model) -> bool:
    return isinstance(model, EncoderDecoder)


def _max_decoder_only_length(model) -> Optional[int]:
    config = model.config
    return config.max_length if config.position_embedding == "absolute" else None


def _check_pair(model, index: int, context: TokenIds, continuation: TokenIds) -> None:
    if len(continuation) == 0:
        raise ValueError(f"scoring pair {index}: the continuation is empty (nothing to score)")
    if _is_encoder_decoder(model):
        if len(context) == 0:
            raise ValueError(f"scoring pair {index}: an encoder-decoder needs a non-empty context (encoder input)")
        return
    limit = _max_decoder_only_length(model)
    total = len(context) + len(continuation)
    if limit is not None and total > limit:
        raise ValueError(f"scoring pair {index}: context {len(context)} + continuation {len(continuation)} = "
                         f"{total} tokens exceed the model's position table (max_length={limit})")


def _pad_rows(rows: Sequence[TokenIds], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _shift_right(targets: np.ndarray) -> np.ndarray:
    """`[batch, length]` targets -> decoder inputs: BOS id 0 then the targets without their last column."""
    return np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)


def make_batch(model, contexts: Sequence[TokenIds], continuations: Sequence[TokenIds]) -> Dict[str, np.ndarray]:
    """The padded model batch of some (context, continuation) pairs, with `decoder_loss_weights` marking the
    continuation tokens. Lengths are rounded up to `length_bucket`."""
    if _is_encoder_decoder(model):
        encoder = _pad_rows(contexts, length_bucket(max(len(c) for c in contexts)))
        targets = _pad_rows(continuations, length_bucket(max(len(c) for c in continuations)))
        return {"encoder_input_tokens": encoder, "decoder_input_tokens": _shift_right(targets),
                "decoder_target_tokens": targets, "decoder_loss_weights": (targets > 0).astype(np.float32)}
    sequences = [list(c) + list(t) for c, t in zip(contexts, continuations)]
    length = length_bucket(max(len(s) for s in sequences))
    limit = _max_decoder_only_length(model)
    length = min(length, limit) if limit else length
    targets = _pad_rows(sequences, length)
    weights = np.zeros(targets.shape, np.float32)
    for i, (context, continuation) in enumerate(zip(contexts, continuations)):
        weights[i, len(context): len(context) + len(continuation)] = 1.0
    batch = {"decoder_input_tokens": _shift_right(targets), "decoder_target_tokens": targets,
             "decoder_loss_weights": weights}
    if model.config.prefix_lm:
        # Decoder input position p holds target p-1: positions 0..len(context) are id 0 and the context.
        context_lengths = np.asarray([len(c) for c in contexts])
        batch["decoder_causal_attention"] = (np.arange(length)[None, :] <= context_lengths[:, None]).astype(np.int32)
    return batch


@functools.partial(jax.jit, static_argnums=0)
def _score_batch(model, params, batch):
    """Summed continuation log-probs and scored-token counts of one padded batch: `[rows]`, `[rows]`."""
    logits = model.apply({"params": params}, **trainer.model_inputs(model, batch))  # [rows, len, vocab]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets = batch["decoder_target_tokens"]
    token_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [rows, len]
    weights = batch["decoder_loss_weights"]
    return jnp.sum(token_log_probs * weights, axis=-1), jnp.sum(weights, axis=-1)


def score(model, params, contexts: Sequence[TokenIds], continuations: Sequence[TokenIds],
          batch_size: int = 8) -> Scores:
    """Log-likelihood of each continuation given its context (token ids; see the module docstring).

    Pairs are scored `batch_size` rows at a time, sorted by length so that similar lengths share a bucket; the
    last batch is padded with dummy rows (so every batch has the same row count, which a mesh's data axis must
    divide). Raises ValueError naming the pair for an empty continuation or a decoder-only sequence longer than
    the position table.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"score: {len(contexts)} contexts but {len(continuations)} continuations")
    for i, (context, continuation) in enumerate(zip(contexts, continuations)):
        _check_pair(model, i, context, continuation)
    count = len(contexts)
    log_likelihood, num_tokens = np.zeros(count, np.float64), np.zeros(count, np.int64)
    order = sorted(range(count), key=lambda i: len(contexts[i]) + len(continuations[i]))
    for start in range(0, count, batch_size):
        rows = order[start: start + batch_size]
        padded = rows + [rows[0]] * (batch_size - len(rows))  # dummy rows repeat a real one; results dropped
        batch = make_batch(model, [contexts[i] for i in padded], [continuations[i] for i in padded])
        sums, counts = jax.device_get(_score_batch(model, params, batch))
        log_likelihood[rows] = np.asarray(sums[: len(rows)], np.float64)
        num_tokens[rows] = np.rint(counts[: len(rows)]).astype(np.int64)
    return Scores(log_likelihood, num_tokens)


def encode_pairs(vocabulary, contexts: Sequence[str], continuations: Sequence[str], continuation_eos: bool,
                 context_eos: bool = False) -> Tuple[List[List[int]], List[List[int]]]:
    """Text pairs -> token-id pairs. Context and continuation are encoded separately (so the scored tokens are
    exactly the continuation's own encoding); `continuation_eos` appends EOS to the continuation, as seqio's
    `add_eos` targets of an encoder-decoder task have it, and `context_eos` to the context, as its inputs have it."""
    eos = [vocabulary.eos_id]
    encoded_contexts = [list(vocabulary.encode(c)) + eos * context_eos if c else [] for c in contexts]
    encoded_continuations = [list(vocabulary.encode(t)) + eos * continuation_eos for t in continuations]
    return encoded_contexts, encoded_continuations


def score_texts(model, params, vocabulary, contexts: Sequence[str], continuations: Sequence[str],
                batch_size: int = 8, continuation_eos: Optional[bool] = None) -> Scores:
    """`score` on text. `continuation_eos` defaults to True for encoder-decoders (their targets end with EOS)
    and False for decoder-only models (a continuation inside running text). An encoder-decoder's context is
    its encoder input and ends with EOS, as in its tasks and in `decoding.generate_text`."""
    encoder_decoder = _is_encoder_decoder(model)
    eos = encoder_decoder if continuation_eos is None else continuation_eos
    pairs = encode_pairs(vocabulary, contexts, continuations, eos, context_eos=encoder_decoder)
    return score(model, params, *pairs, batch_size=batch_size)


def rank_classify(model, params, vocabulary, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                  batch_size: int = 8, continuation_eos: Optional[bool] = None) -> List[RankResult]:
    """For each prompt, scores every candidate completion and picks the likeliest (by sum and by mean).

    candidates: one list of candidate texts per prompt (e.g. `[[" 긍정", " 부정"], ...]`).
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"rank_classify: {len(prompts)} prompts but {len(candidates)} candidate lists")
    for i, options in enumerate(candidates):
        if not options:
            raise ValueError(f"rank_classify: prompt {i} has no candidates")
    flat_contexts = [p for p, options in zip(prompts, candidates) for _ in options]
    flat_candidates = [c for options in candidates for c in options]
    scores = score_texts(model, params, vocabulary, flat_contexts, flat_candidates, batch_size, continuation_eos)
    results, start = [], 0
    for options in candidates:
        sums = scores.log_likelihood[start: start + len(options)]
        counts = scores.num_tokens[start: start + len(options)]
        means = sums / np.maximum(counts, 1)
        results.append(RankResult(int(np.argmax(sums)), int(np.argmax(means)),
                                  tuple(float(s) for s in sums), tuple(int(c) for c in counts)))
        start += len(options)
    return results


def perplexity(scores: Scores) -> float:
    """exp(-total log-likelihood / total scored tokens) over all pairs (token-weighted, not a mean of ratios)."""
    total = int(np.sum(scores.num_tokens))
    if total == 0:
        raise ValueError("perplexity: no tokens were scored")
    return float(np.exp(-np.sum(scores.log_likelihood) / total))


def text_perplexity(model, params, vocabulary, texts: Sequence[str], contexts: Optional[Sequence[str]] = None,
                    batch_size: int = 8) -> float:
    """Perplexity of `texts` (decoder-only: each from the start of a sequence; encoder-decoder: given
    `contexts`, which it then requires). EOS is scored too: the model must also know where a text ends."""
    if contexts is None:
        if _is_encoder_decoder(model):
            raise ValueError("text_perplexity: an encoder-decoder needs `contexts` (the encoder inputs)")
        contexts = [""] * len(texts)
    return perplexity(score_texts(model, params, vocabulary, contexts, texts, batch_size, continuation_eos=True))


def task_perplexity(model, params, task_name: str, sequence_length: Dict[str, int], split: str = "validation",
                    max_examples: Optional[int] = None, batch_size: int = 8) -> Tuple[float, int]:
    """(perplexity, examples) of a seqio task's targets given its inputs (decoder-only: inputs, if the task has
    any, are the context), over the first `max_examples` of `split` in file order."""
    from t5k_tasks import pipeline

    dataset = pipeline.get_dataset(task_name, sequence_length, split=split, shuffle=False)
    contexts, continuations = [], []
    for example in dataset.as_numpy_iterator():
        if max_examples is not None and len(continuations) >= max_examples:
            break
        contexts.append([int(t) for t in example.get("inputs", [])])
        continuations.append([int(t) for t in example["targets"]])
    if not continuations:
        raise ValueError(f"task_perplexity: task {task_name!r} has no {split!r} examples")
    return perplexity(score(model, params, contexts, continuations, batch_size)), len(continuations)
