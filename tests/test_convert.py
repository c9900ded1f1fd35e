"""HF transformers <-> t5k weight conversion: logits parity with PyTorch float32, exact round trips, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from t5k import convert  # noqa: E402
from t5k.models.decoder_only import DecoderOnly  # noqa: E402
from t5k.models.encoder_decoder import EncoderDecoder  # noqa: E402
from t5k.models.stack import stack_layer_params  # noqa: E402

torch.set_grad_enabled(False)
transformers.logging.set_verbosity_error()

TOL = 1e-4  # max abs logits difference, float32 on both sides
VOCAB = 96


def _padded_tokens(rng, lengths, total, first_zero=False):
    """Random ids in [1, VOCAB) with zeros after each row's length (and a leading 0 if `first_zero`)."""
    tokens = rng.integers(1, VOCAB, size=(len(lengths), total))
    tokens[np.arange(total)[None, :] >= np.asarray(lengths)[:, None]] = 0
    if first_zero:
        tokens[:, 0] = 0
    return tokens.astype(np.int32)


def _perturb_norms(model):
    """HF initialises norm scales to 1; randomise them (and biases) so that their mapping is really tested."""
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "norm" in name or "ln_" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen) if name.endswith("weight")
                    else 0.2 * torch.randn(p.shape, generator=gen))


def _tree_equal(a, b):
    fa, fb = convert._flatten(a), convert._flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype == np.float32, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def _assert_matches_model_tree(model, params, *args):
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), *args)["params"]))
    expected = {k: v.shape for k, v in convert._flatten(shapes).items()}
    got = {k: v.shape for k, v in convert._flatten(params).items()}
    assert got == expected


# ----------------------------------------------------------------------------------------------------------
# T5


def _hf_t5(feed_forward_proj="gated-gelu", tied=False, num_layers=2, num_decoder_layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=num_layers,
        num_decoder_layers=num_decoder_layers, relative_attention_num_buckets=32,
        relative_attention_max_distance=40, dropout_rate=0.0, feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=tied, decoder_start_token_id=0, pad_token_id=0,
    )
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    if not tied:
        # transformers 5 ties lm_head to shared in every fresh T5; a T5.1.1 head is its own parameter.
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 0.3)
        model.config.tie_word_embeddings = False
        assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert model.config.scale_decoder_outputs == tied  # no d_model**-0.5 rescale in the untied (T5.1.1) case
    _perturb_norms(model)
    return model


def _t5_batch(seed=0):
    rng = np.random.default_rng(seed)
    enc = _padded_tokens(rng, [45, 38, 20, 7], 45)  # > 16 apart: log-spaced buckets and the max-distance cap
    dec = _padded_tokens(rng, [27, 27, 19, 5], 27, first_zero=True)  # 0 = T5's BOS, padding at the end
    return enc, dec


def _hf_t5_logits(model, enc, dec):
    out = model(
        input_ids=torch.from_numpy(enc).long(), attention_mask=torch.from_numpy(enc > 0).long(),
        decoder_input_ids=torch.from_numpy(dec).long(),
    )
    return out.logits.numpy()


def _t5k_t5_logits(config, params, enc, dec):
    return np.asarray(jax.jit(EncoderDecoder(config).apply)({"params": params}, jnp.asarray(enc), jnp.asarray(dec)))


@pytest.mark.parametrize("kind", ["t5.1.1", "t5.1.0"])
def test_t5_logits_match_transformers(kind):
    tied = kind == "t5.1.0"
    hf = _hf_t5("relu" if tied else "gated-gelu", tied=tied, num_layers=2, num_decoder_layers=3 if not tied else 2)
    config = convert.t5_config_from_hf(hf.config, dtype="float32")
    assert config.tie_embeddings == tied
    assert config.mlp_activations == (("relu",) if tied else ("gelu", "linear"))
    assert config.relative_attention_max_distance == 40
    params = convert.t5_params_from_hf(hf.state_dict(), config)
    enc, dec = _t5_batch()
    _assert_matches_model_tree(EncoderDecoder(config), params, jnp.asarray(enc), jnp.asarray(dec))

    ref = _hf_t5_logits(hf, enc, dec)
    got = _t5k_t5_logits(config, params, enc, dec)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(ref).max() > 1.0  # a non-trivial comparison
    diff = np.abs(got - ref)
    assert diff[dec > 0].max() <= TOL and diff.max() <= TOL, diff.max()


def test_t5_export_reimport_exact_and_loads_into_transformers():
    hf = _hf_t5()
    config = convert.t5_config_from_hf(hf.config, dtype="float32")
    sd = hf.state_dict()
    params = convert.t5_params_from_hf(sd, config)
    exported = convert.t5_params_to_hf(params, config)
    # Every HF key comes back, bitwise, and re-import gives the same params bitwise.
    assert set(exported) == set(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    _tree_equal(convert.t5_params_from_hf(exported, config), params)

    # A fresh HF model loaded from the export computes the same logits.
    fresh = _hf_t5(seed=5)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    enc, dec = _t5_batch(1)
    np.testing.assert_array_equal(_hf_t5_logits(fresh, enc, dec), _hf_t5_logits(hf, enc, dec))


def test_t5_scanned_import_equals_unrolled():
    hf = _hf_t5()
    config = convert.t5_config_from_hf(hf.config, dtype="float32")
    scan_config = config.replace(scan_layers=True)
    unrolled = convert.t5_params_from_hf(hf.state_dict(), config)
    scanned = convert.t5_params_from_hf(hf.state_dict(), scan_config)
    _tree_equal(scanned, jax.tree_util.tree_map(np.asarray, stack_layer_params(unrolled)))
    enc, dec = _t5_batch()
    np.testing.assert_allclose(
        _t5k_t5_logits(scan_config, scanned, enc, dec), _t5k_t5_logits(config, unrolled, enc, dec), atol=1e-5, rtol=0
    )
    # Export accepts either layout (and boxed params) and gives the same state dict.
    boxed = jax.tree_util.tree_map(lambda x: nn.LogicallyPartitioned(x, ("layers",) + (None,) * (x.ndim - 1)), scanned)
    a, b = convert.t5_params_to_hf(boxed, scan_config), convert.t5_params_to_hf(unrolled, config)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_t5_config_round_trip():
    hf = _hf_t5()
    config = convert.t5_config_from_hf(hf.config.to_dict())  # dicts work too (no transformers needed)
    assert config == convert.t5_config_from_hf(hf.config)
    kwargs = convert.t5_config_to_hf(config)
    assert convert.t5_config_from_hf(transformers.T5Config(**kwargs)) == config
    # transformers 5 never rescales mT5 logits: an untied head. T5.1.0 (tied, relu) rescales: tied.
    assert not convert.t5_config_from_hf(transformers.MT5Config(vocab_size=VOCAB)).tie_embeddings
    assert convert.t5_config_from_hf(transformers.T5Config(vocab_size=VOCAB)).tie_embeddings


def test_t5_bad_state_dicts_raise_clear_errors():
    hf = _hf_t5(num_layers=1, num_decoder_layers=1)
    config = convert.t5_config_from_hf(hf.config)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}

    wrong = dict(sd, **{"encoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((32, 31), np.float32)})
    q_key = r"encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight"
    with pytest.raises(ValueError, match=q_key + r".*expected shape \(32, 32\)"):
        convert.t5_params_from_hf(wrong, config)

    missing = {k: v for k, v in sd.items() if k != "decoder.block.0.layer.2.DenseReluDense.wi_1.weight"}
    with pytest.raises(KeyError, match=r"decoder\.block\.0\.layer\.2\.DenseReluDense\.wi_1\.weight.*\(48, 32\)"):
        convert.t5_params_from_hf(missing, config)

    extra = dict(sd, **{"encoder.block.1.layer.0.layer_norm.weight": np.ones(32, np.float32)})
    with pytest.raises(ValueError, match=r"encoder\.block\.1\.layer\.0\.layer_norm\.weight"):
        convert.t5_params_from_hf(extra, config)
    with pytest.warns(UserWarning, match=r"encoder\.block\.1"):
        convert.t5_params_from_hf(extra, config, strict=False)

    # An untied checkpoint read with a tied config: lm_head differs from shared -> refused, not dropped.
    with pytest.raises(ValueError, match=r"lm_head\.weight.*must equal"):
        convert.t5_params_from_hf(sd, config.replace(tie_embeddings=True))

    params = convert.t5_params_from_hf(sd, config)
    params["decoder"]["final_norm"]["scale"] = np.ones(31, np.float32)
    with pytest.raises(ValueError, match=r"decoder/final_norm/scale.*expected shape \(32,\)"):
        convert.t5_params_to_hf(params, config)
    del params["decoder"]["final_norm"]
    with pytest.raises(KeyError, match=r"decoder/final_norm/scale"):
        convert.t5_params_to_hf(params, config)


# ----------------------------------------------------------------------------------------------------------
# GPT-2


def _hf_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=48, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # GPT-2's std 0.02 init makes every logit ~0: use livelier weights
        p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "wte" in name or "wpe" in name else 0.15))
    _perturb_norms(model)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return model


def _gpt2_batch(seed=0):
    rng = np.random.default_rng(seed)
    return _padded_tokens(rng, [40, 33, 12, 3], 40)


def _hf_gpt2_logits(model, tokens):
    out = model(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(tokens > 0).long())
    return out.logits.numpy()


def _t5k_gpt2_logits(config, params, tokens):
    return np.asarray(jax.jit(DecoderOnly(config).apply)({"params": params}, jnp.asarray(tokens)))


def test_gpt2_logits_match_transformers():
    hf = _hf_gpt2()
    config = convert.gpt2_config_from_hf(hf.config, dtype="float32")
    assert config.mlp_activations == ("gelu",) and config.tie_embeddings and config.max_length == 48
    params = convert.gpt2_params_from_hf(hf.state_dict(), config)
    tokens = _gpt2_batch()
    _assert_matches_model_tree(DecoderOnly(config), params, jnp.asarray(tokens))
    ref = _hf_gpt2_logits(hf, tokens)
    got = _t5k_gpt2_logits(config, params, tokens)
    assert np.abs(ref).max() > 1.0
    real = tokens > 0
    assert np.abs(got - ref)[real].max() <= TOL, np.abs(got - ref)[real].max()


def test_gpt2_export_reimport_exact_scanned_and_bare():
    hf = _hf_gpt2()
    config = convert.gpt2_config_from_hf(hf.config, dtype="float32")
    sd = hf.state_dict()
    params = convert.gpt2_params_from_hf(sd, config)
    exported = convert.gpt2_params_to_hf(params, config)
    assert set(exported) == set(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    _tree_equal(convert.gpt2_params_from_hf(exported, config), params)

    # A bare GPT2Model state dict (no `transformer.` prefix, no lm_head) with old mask buffers imports the same.
    bare = {k[len("transformer."):]: v for k, v in exported.items() if k.startswith("transformer.")}
    bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 48, 48), np.float32))
    _tree_equal(convert.gpt2_params_from_hf(bare, config), params)

    scan_config = config.replace(scan_layers=True)
    scanned = convert.gpt2_params_from_hf(sd, scan_config)
    tokens = _gpt2_batch(1)
    np.testing.assert_allclose(
        _t5k_gpt2_logits(scan_config, scanned, tokens), _t5k_gpt2_logits(config, params, tokens), atol=1e-5, rtol=0
    )
    again = convert.gpt2_params_to_hf(scanned, scan_config)
    assert all(np.array_equal(again[k], exported[k]) for k in exported)

    kwargs = convert.gpt2_config_to_hf(config)
    assert convert.gpt2_config_from_hf(transformers.GPT2Config(**kwargs), dtype="float32") == config


def test_gpt2_bad_state_dicts_raise_clear_errors():
    hf = _hf_gpt2()
    config = convert.gpt2_config_from_hf(hf.config)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    wrong = dict(sd, **{"transformer.h.1.attn.c_attn.weight": np.zeros((32, 64), np.float32)})
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.c_attn\.weight.*expected shape \(32, 96\)"):
        convert.gpt2_params_from_hf(wrong, config)
    missing = {k: v for k, v in sd.items() if k != "transformer.ln_f.bias"}
    with pytest.raises(KeyError, match=r"ln_f\.bias.*\(32,\)"):
        convert.gpt2_params_from_hf(missing, config)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        convert.gpt2_config_from_hf(dict(hf.config.to_dict(), scale_attn_by_inverse_layer_idx=True))


def test_npz_params_round_trip_exactly(tmp_path):
    params = {"encoder": {"layers_0": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}},
              "relpos": {"rel_embedding": np.full((2, 4), -1.5, np.float32)}}
    path = str(tmp_path / "params.npz")
    assert convert.save_params_npz(params, path) == 14
    loaded = convert.load_params_npz(path)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
