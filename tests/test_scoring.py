"""Scoring: summed token log-probs equal an independent full forward + numpy log_softmax (padded batches,
both architectures); rank classification and perplexity on a model whose next-token distribution is set by hand."""

import jax
import numpy as np
import pytest

from t5k import scoring
from t5k import trainer
from t5k.models import DecoderOnly, EncoderDecoder, TransformerConfig, abstract_params

TINY = dict(vocab_size=40, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=1, num_decoder_layers=2,
            dtype="float32", relative_attention_num_buckets=8, relative_attention_max_distance=16)


# Tiny programs that run once: compiled without LLVM's expensive passes.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
        "xla_cpu_use_fusion_emitters": False}


def _init(model, seed=3):
    """Random parameters of the model's shapes, drawn by numpy (compiling `model.init` costs seconds)."""
    rng = np.random.default_rng(seed)
    shapes = trainer.unbox_values(abstract_params(model))
    return jax.tree_util.tree_map(lambda x: (0.5 * rng.standard_normal(x.shape)).astype(np.float32), shapes)


def _np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _pairs(seed, count=5):
    rng = np.random.default_rng(seed)
    contexts = [rng.integers(2, 40, rng.integers(1, 9)).tolist() for _ in range(count)]
    continuations = [rng.integers(2, 40, rng.integers(1, 7)).tolist() for _ in range(count)]
    return contexts, continuations


def _padded(rows, length):
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _forward(model, params, *arrays):
    """The plain model call on one batch (padded to lengths no bucket uses, 11 and 13)."""
    jitted = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    return np.asarray(jitted.lower(params, *arrays).compile(compiler_options=FAST)(params, *arrays))


def _reference_encoder_decoder(model, params, contexts, continuations):
    """Summed target log-probs by hand: numpy log_softmax of the logits, picked position by position."""
    logits = _forward(model, params, _padded(contexts, 13), _padded([[0] + t[:-1] for t in continuations], 11))
    log_probs = _np_log_softmax(logits)
    return [sum(log_probs[row, i, t] for i, t in enumerate(continuation))
            for row, continuation in enumerate(continuations)]


def _reference_decoder_only(model, params, contexts, continuations):
    sequences = [c + t for c, t in zip(contexts, continuations)]
    log_probs = _np_log_softmax(_forward(model, params, _padded([[0] + s[:-1] for s in sequences], 19)))
    return [sum(log_probs[row, len(context) + i, t] for i, t in enumerate(continuation))
            for row, (context, continuation) in enumerate(zip(contexts, continuations))]


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_scores_equal_independent_log_softmax(architecture):
    if architecture == "encoder_decoder":
        model, reference = EncoderDecoder(TransformerConfig(**TINY)), _reference_encoder_decoder
    else:
        config = TransformerConfig(**{**TINY, "position_embedding": "absolute", "max_length": 32, "norm": "layer",
                                      "use_bias": True, "tie_embeddings": True, "scale_attention_logits": True})
        model, reference = DecoderOnly(config), _reference_decoder_only
    params = _init(model)
    contexts, continuations = _pairs(seed=1)
    # batch_size 4 over 5 pairs: two batches, the second padded with dummy rows; lengths padded to buckets.
    scores = scoring.score(model, params, contexts, continuations, batch_size=4)
    expected = reference(model, params, contexts, continuations)
    np.testing.assert_allclose(scores.log_likelihood, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(scores.num_tokens, [len(t) for t in continuations])
    assert np.all(scores.log_likelihood < 0)


def test_prefix_lm_scores_read_the_context_bidirectionally():
    """A prefix LM scores with seqio's PrefixLM mask (id 0 and the context attend to each other), equal to an
    independent forward with that `decoder_causal_attention`; the causal reading of the same weights differs."""
    causal_model = DecoderOnly(TransformerConfig(**{**TINY, "num_encoder_layers": 0}))
    prefix_model = DecoderOnly(TransformerConfig(**{**TINY, "num_encoder_layers": 0, "prefix_lm": True}))
    params = _init(prefix_model)
    contexts, continuations = _pairs(seed=2)
    sequences = [c + t for c, t in zip(contexts, continuations)]
    inputs = _padded([[0] + s[:-1] for s in sequences], 19)
    prefix = (np.arange(19)[None, :] <= np.array([len(c) for c in contexts])[:, None]).astype(np.int32)
    jitted = jax.jit(lambda p, x, c: prefix_model.apply({"params": p}, x, decoder_causal_attention=c))
    log_probs = _np_log_softmax(jitted.lower(params, inputs, prefix).compile(compiler_options=FAST)(params, inputs, prefix))
    expected = [sum(log_probs[row, len(context) + i, t] for i, t in enumerate(continuation))
                for row, (context, continuation) in enumerate(zip(contexts, continuations))]
    scores = scoring.score(prefix_model, params, contexts, continuations, batch_size=4)
    np.testing.assert_allclose(scores.log_likelihood, expected, rtol=1e-5, atol=1e-5)
    causal = scoring.score(causal_model, params, contexts, continuations, batch_size=4)
    np.testing.assert_allclose(causal.log_likelihood, _reference_decoder_only(causal_model, params, contexts, continuations),
                               rtol=1e-5, atol=1e-5)
    multi_token_contexts = [i for i, c in enumerate(contexts) if len(c) > 1]
    assert multi_token_contexts and not np.allclose(scores.log_likelihood[multi_token_contexts],
                                                    causal.log_likelihood[multi_token_contexts], atol=1e-3)


# ---- a decoder-only model whose next-token distribution is P at every position, whatever the input


P = np.full(16, 0.01)
P[[2, 3, 4, 5]] = [0.5, 0.2, 0.1, 0.08]  # 'a', 'b', 'c', 'd'; the other 12 ids share the rest
P /= P.sum()


class CharVocab:
    """'a' -> 2, 'b' -> 3, ...: one id per character, so scored token counts are visible by eye."""

    eos_id = 1

    def encode(self, text):
        return [ord(ch) - ord("a") + 2 for ch in text]


@pytest.fixture(scope="module")
def unigram_model():
    """Final LayerNorm scale 0 and bias log P make the last hidden state log P at every position; tied identity
    embeddings turn it into logits log P, so log p(token) = log P[token] everywhere."""
    config = TransformerConfig(vocab_size=16, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_decoder_layers=1,
                               dtype="float32", norm="layer", use_bias=True, position_embedding="absolute",
                               max_length=32, tie_embeddings=True, scale_attention_logits=True)
    model = DecoderOnly(config)
    params = jax.tree_util.tree_map(np.asarray, _init(model))
    params["token_embedder"]["embedding"] = np.eye(16, dtype=np.float32)
    params["final_norm"]["scale"] = np.zeros(16, np.float32)
    params["final_norm"]["bias"] = np.log(P).astype(np.float32)
    return model, params


def test_rank_classification_sum_and_mean_pick_the_hand_computed_answers(unigram_model):
    model, params = unigram_model
    # "aaaa": 4·log 0.5 ≈ -2.77 (mean -0.69);  "b": log 0.2 ≈ -1.61;  "cd": log 0.1 + log 0.08 ≈ -4.83.
    # The sum prefers the single likely token "b", the per-token mean prefers the run of the likeliest "a".
    candidates = ["aaaa", "b", "cd"]
    (result,) = scoring.rank_classify(model, params, CharVocab(), ["dc"], [candidates])
    expected = [4 * np.log(P[2]), np.log(P[3]), np.log(P[4]) + np.log(P[5])]
    np.testing.assert_allclose(result.log_likelihoods, expected, rtol=1e-5)
    assert result.num_tokens == (4, 1, 2)
    assert (result.best_by_sum, result.best_by_mean) == (1, 0)
    # Several prompts, each with its own candidates, come back in order.
    results = scoring.rank_classify(model, params, CharVocab(), ["a", "bb"], [["cc", "a"], ["d", "c", "b"]])
    assert [(r.best_by_sum, r.best_by_mean) for r in results] == [(1, 1), (2, 2)]


def test_perplexity_of_a_known_distribution(unigram_model):
    model, params = unigram_model
    texts = ["ab", "aab"]  # scored with their EOS (id 1)
    ids = [2, 3, 1, 2, 2, 3, 1]
    expected = np.exp(-np.mean(np.log(P[ids])))
    assert scoring.text_perplexity(model, params, CharVocab(), texts) == pytest.approx(expected, rel=1e-5)


def test_bad_pairs_are_named(unigram_model):
    model, params = unigram_model
    with pytest.raises(ValueError, match="pair 1: the continuation is empty"):
        scoring.score(model, params, [[2], [2]], [[3], []])
    with pytest.raises(ValueError, match=r"pair 0: context 30 \+ continuation 5 = 35 tokens exceed .*max_length=32"):
        scoring.score(model, params, [[2] * 30], [[3] * 5])
    assert [scoring.length_bucket(n) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 32]


def test_encoder_decoder_text_scores_read_the_task_layout():
    """On text, an encoder-decoder's context is its encoder input with EOS, as its tasks and generate_text
    write it (and as `t5k eval` scores task ids), and its continuation ends with EOS like the task targets."""
    model = EncoderDecoder(TransformerConfig(**TINY))
    params = _init(model)
    from_text = scoring.score_texts(model, params, CharVocab(), ["dcb", "a"], ["ab", "c"])
    from_ids = scoring.score(model, params, [[5, 4, 3, 1], [2, 1]], [[2, 3, 1], [4, 1]])
    np.testing.assert_allclose(from_text.log_likelihood, from_ids.log_likelihood, rtol=1e-6)
    without_eos = scoring.score(model, params, [[5, 4, 3], [2]], [[2, 3, 1], [4, 1]])
    assert not np.allclose(from_text.log_likelihood, without_eos.log_likelihood, rtol=1e-6)
