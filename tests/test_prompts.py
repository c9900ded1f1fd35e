"""P-tuning's virtual tokens: with the token embeddings of real ids as their embeddings, a P-tuned model computes
what the plain model computes with those ids in front (logits; cached greedy and beam decoding), for every
position scheme and the prefix LM; the MLP encoder's parameters; training moves the prompt alone; bad settings are
named errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5k import decoding, partitioning
from t5k.models import DecoderOnly, EncoderDecoder, TransformerConfig, dummy_inputs, prompts
from tiny_models import train_subset

BASE = TransformerConfig(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=24, num_encoder_layers=0,
                         num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                         mlp_activations=("gelu",), norm="layer", use_bias=True, position_embedding="absolute",
                         max_length=40, scale_attention_logits=True, tie_embeddings=True, dtype="float32")
VIRTUAL_IDS = np.array([5, 9, 3], np.int32)  # the ids whose embeddings the virtual tokens take


def _params(model, seed=0):
    return nn.unbox(model.init(jax.random.PRNGKey(seed), *dummy_inputs(model, 2, 8))["params"])


def _as_real_ids(config):
    """(plain model, its params, P-tuned model, its params) where the virtual tokens are VIRTUAL_IDS' embeddings."""
    plain = DecoderOnly(config)
    tuned = DecoderOnly(config.replace(prompt_length=len(VIRTUAL_IDS), prompt_encoder="none"))
    params = _params(plain)
    tuned_params = dict(params, prompt={"embedding": params["token_embedder"]["embedding"][VIRTUAL_IDS]})
    return plain, params, tuned, tuned_params


@pytest.mark.parametrize("position_embedding", ["absolute", "rotary", "relative"])
@pytest.mark.parametrize("prefix_lm", [False, True], ids=["causal", "prefix_lm"])
def test_virtual_tokens_compute_what_their_ids_compute_in_front(position_embedding, prefix_lm):
    plain, params, tuned, tuned_params = _as_real_ids(BASE.replace(position_embedding=position_embedding))
    tokens = np.random.default_rng(0).integers(2, 64, (3, 10)).astype(np.int32)
    with_ids = np.concatenate([np.broadcast_to(VIRTUAL_IDS, (3, 3)), tokens], axis=1)
    kwargs, plain_kwargs = {}, {}
    if prefix_lm:
        prefix = (np.arange(10)[None] < np.array([[4], [6], [1]])).astype(np.int32)
        kwargs["decoder_causal_attention"] = prefix
        plain_kwargs["decoder_causal_attention"] = np.concatenate([np.ones((3, 3), np.int32), prefix], axis=1)
    logits = tuned.apply({"params": tuned_params}, tokens, **kwargs)
    assert logits.shape == (3, 10, 64)
    expected = plain.apply({"params": params}, with_ids, **plain_kwargs)[:, 3:]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, prefix_lm", [("greedy", True), ("beam", False)],
                         ids=["greedy_prefix_lm", "beam_causal"])
def test_cached_decoding_reads_the_virtual_tokens_once(method, prefix_lm):
    """The prefill writes the virtual tokens' keys and values; the steps find them in the cache."""
    config = BASE.replace(position_embedding="rotary", prefix_lm=prefix_lm)
    plain, params, tuned, tuned_params = _as_real_ids(config)
    rng = np.random.default_rng(1)
    lengths = [5, 2, 4]
    prompt = np.zeros((3, 5), np.int32)
    with_ids = np.zeros((3, 8), np.int32)
    for row, n in enumerate(lengths):
        prompt[row, :n] = rng.integers(2, 64, n)
        with_ids[row, :3 + n] = np.concatenate([VIRTUAL_IDS, prompt[row, :n]])
    decode = decoding.DecodeConfig(method=method, num_beams=2, max_new_tokens=6)
    got = decoding.generate(tuned, tuned_params, {"prompt_tokens": prompt}, decode)
    want = decoding.generate(plain, params, {"prompt_tokens": with_ids}, decode)
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_the_mlp_encoder_computes_the_virtual_tokens():
    config = BASE.replace(prompt_length=4, prompt_encoder="mlp", prompt_encoder_hidden=12)
    model = DecoderOnly(config)
    params = _params(model)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, params["prompt"])
    assert shapes == {"embedding": (4, 16), "mlp_in": {"kernel": (16, 12), "bias": (12,)},
                      "mlp_out": {"kernel": (12, 16), "bias": (16,)}}
    # The prompt is relu(E @ W1 + b1) @ W2 + b2, whatever the table E: set W2 = 0 and it is b2 alone.
    moved = jax.tree_util.tree_map(lambda x: x, params)
    moved["prompt"]["mlp_out"]["kernel"] = jnp.zeros((12, 16))
    moved["prompt"]["mlp_out"]["bias"] = params["token_embedder"]["embedding"][7]
    tokens = np.random.default_rng(2).integers(2, 64, (2, 6)).astype(np.int32)
    plain = DecoderOnly(BASE)
    plain_params = {k: v for k, v in params.items() if k != "prompt"}
    expected = plain.apply({"params": plain_params}, np.concatenate([np.full((2, 4), 7, np.int32), tokens], 1))[:, 4:]
    np.testing.assert_allclose(model.apply({"params": moved}, tokens), expected, rtol=1e-5, atol=1e-5)


def test_training_moves_the_prompt_alone():
    tokens = np.random.default_rng(0).integers(2, 64, (4, 9)).astype(np.int32)
    batch = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
             "decoder_loss_weights": np.ones((4, 8), np.float32)}
    mesh = partitioning.create_mesh(devices=jax.devices()[:2])
    before, after, history, _ = train_subset(DecoderOnly(BASE.replace(prompt_length=4)), prompts.PARAMS_PATTERN, batch,
                                             mesh, steps=6)
    flat_before = dict(jax.tree_util.tree_leaves_with_path(before))
    for path, value in jax.tree_util.tree_leaves_with_path(after):
        moved = not np.array_equal(value, flat_before[path])
        assert moved == (path[0].key == "prompt"), jax.tree_util.keystr(path)
    assert history[-1]["loss"] < history[0]["loss"], [h["loss"] for h in history]


def test_bad_prompt_settings_are_named_errors():
    tuned = DecoderOnly(BASE.replace(prompt_length=2))
    params = _params(tuned)
    tokens = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"needs unpacked batches: .*\(train.pack = False\)"):
        tuned.apply({"params": params}, tokens, decoder_segment_ids=tokens, decoder_positions=jnp.zeros_like(tokens))
    with pytest.raises(ValueError, match="implemented for decoder-only models"):
        _params(EncoderDecoder(BASE.replace(num_encoder_layers=1, prompt_length=2)))
    with pytest.raises(ValueError, match=r"TransformerConfig.prompt_encoder = 'lstm'; expected one of \('none', 'mlp'\)"):
        TransformerConfig(prompt_encoder="lstm")
    with pytest.raises(ValueError, match="TransformerConfig.prompt_length = -1; expected 0 or more"):
        TransformerConfig(prompt_length=-1)
    with pytest.raises(ValueError, match=r"sequence length 44 exceeds the position table \(max_length=40\)"):
        DecoderOnly(BASE.replace(prompt_length=4)).init(jax.random.PRNGKey(0), jnp.ones((1, 40), jnp.int32))
