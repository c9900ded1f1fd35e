"""Cached decoding: equals uncached full-forward greedy, beam/top-k/temperature limits equal greedy, stop
strings end generation exactly, per-row seeds, and greedy/beam outputs equal `transformers` `generate`."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5k import convert, decoding, stop_strings
from t5k.models import DecoderOnly, EncoderDecoder, TransformerConfig

VOCAB = 64
TINY = dict(vocab_size=VOCAB, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=1,
            num_decoder_layers=2, dtype="float32")
GPT = dict(TINY, num_encoder_layers=0, norm="layer", norm_epsilon=1e-5, use_bias=True, mlp_activations=("gelu",),
           position_embedding="absolute", max_length=32, scale_attention_logits=True, tie_embeddings=True)
N = 8  # new tokens


def _livelier(params, seed):
    """Random params with larger weights than the init (so that tokens and EOS vary along a sequence)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _init(model, *inputs):
    return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *inputs)["params"])


@functools.lru_cache(maxsize=None)
def _encoder_decoder(scan: bool):
    model = EncoderDecoder(TransformerConfig(**TINY, scan_layers=scan))
    dummy = jnp.ones((1, 4), jnp.int32)
    return model, _init(model, dummy, dummy)


@functools.lru_cache(maxsize=None)
def _decoder_only():
    """Scanned layers and rotary positions (the unrolled GPT-2 layout is covered by the transformers test)."""
    model = DecoderOnly(TransformerConfig(**dict(GPT, scan_layers=True, position_embedding="rotary")))
    return model, _livelier(_init(model, jnp.ones((1, 4), jnp.int32)), 2)


def _truncate_after(tokens: np.ndarray, stop: int) -> np.ndarray:
    """Rows cut after their first `stop` id, 0s after (what a run that stops on `stop` produces)."""
    out = tokens.copy()
    for row in out:
        hits = np.flatnonzero(row == stop)
        if hits.size:
            row[hits[0] + 1:] = 0
    return out


def _encoder_batch():
    rng = np.random.default_rng(0)
    enc = rng.integers(2, VOCAB, (3, 11)).astype(np.int32)
    enc[1, 6:] = 0
    enc[2, 2:] = 0
    return enc


def _prompts():
    """Right-padded prompts of lengths 5, 2, 7 (ids >= 2: no pad, no EOS inside)."""
    rng = np.random.default_rng(1)
    lengths = np.array([5, 2, 7])
    prompt = rng.integers(2, VOCAB, (3, 7)).astype(np.int32)
    prompt[np.arange(7)[None] >= lengths[:, None]] = 0
    return prompt, lengths


def _uncached_decoder_only_greedy(model, params, prompt, length, n, eos=1):
    """Reference: one prompt alone, unpadded, a full forward pass over the growing sequence per new token."""
    apply = jax.jit(model.apply)
    seq = list(prompt[:length])
    out = []
    for _ in range(n):
        buffer = np.zeros((1, len(prompt) + n), np.int32)  # fixed width: one compilation; causal, so 0s after are inert
        buffer[0, : len(seq)] = seq
        token = int(np.argmax(np.asarray(apply({"params": params}, jnp.asarray(buffer)))[0, len(seq) - 1]))
        out.append(token)
        seq.append(token)
        if token == eos:
            break
    return out + [0] * (n - len(out))


def _greedy(model, params, batch, stop_token_ids=(1,)):
    config = decoding.DecodeConfig(max_new_tokens=N, stop_token_ids=stop_token_ids)
    return np.asarray(decoding.generate(model, params, batch, config).tokens[:, 0])


def _free_running_uncached(model, params, enc):
    """Uncached greedy decoding without a stop id (the reference every encoder-decoder test shares)."""
    return np.asarray(decoding.greedy_decode_uncached(model, params, jnp.asarray(enc), N, eos_id=-1))


def _stop_id(free):
    """A stop id that occurs mid-sequence in this model's output, so that early stopping is exercised."""
    return int(free[0, 3])


@pytest.mark.parametrize("scan", [False, True])
def test_cached_greedy_equals_uncached_encoder_decoder(scan):
    model, params = _encoder_decoder(scan)
    enc = _encoder_batch()
    free = _free_running_uncached(model, params, enc)
    ref = _truncate_after(free, _stop_id(free))
    got = _greedy(model, params, {"encoder_input_tokens": enc}, stop_token_ids=(_stop_id(free),))
    np.testing.assert_array_equal(got, ref)
    assert len({tuple(r) for r in ref}) == 3 and (ref == 0).any()


def test_cached_greedy_equals_uncached_shared_encoder_decoder():
    """The T5 paper's "encoder-decoder, shared" row: one stack of layers serves the encoder (uncached) and the
    cached decoder; cached greedy equals uncached greedy."""
    model = EncoderDecoder(TransformerConfig(**dict(TINY, num_encoder_layers=2, shared_encoder_decoder=True)))
    dummy = jnp.ones((1, 4), jnp.int32)
    params = _livelier(_init(model, dummy, dummy), 4)
    assert "layers_0" in params and "layers_0" not in params["decoder"]  # one shared stack
    enc = _encoder_batch()
    ref = _free_running_uncached(model, params, enc)
    np.testing.assert_array_equal(_greedy(model, params, {"encoder_input_tokens": enc}, stop_token_ids=()), ref)
    assert len({tuple(r) for r in ref}) > 1


def test_cached_greedy_equals_uncached_with_run_time_logit_scaling():
    """An encoder-decoder that scales attention logits at run time (GPT-style) decodes the same with the cache:
    the cached cross-attention step applies the scaling too."""
    model = EncoderDecoder(TransformerConfig(**TINY, scale_attention_logits=True))
    dummy = jnp.ones((1, 4), jnp.int32)
    params = _init(model, dummy, dummy)
    enc = _encoder_batch()
    ref = _free_running_uncached(model, params, enc)
    np.testing.assert_array_equal(_greedy(model, params, {"encoder_input_tokens": enc}, stop_token_ids=()), ref)
    assert len({tuple(r) for r in ref}) > 1


def test_bfloat16_decoding_casts_weights_once_and_keeps_the_outputs():
    """With a bfloat16 compute dtype, generate() casts kernels/embeddings to bfloat16 before its loop (half the
    bytes per step); the layers cast them anyway, so greedy outputs equal uncached bf16 decoding."""
    _, params = _encoder_decoder(False)
    model = EncoderDecoder(TransformerConfig(**dict(TINY, dtype="bfloat16")))
    cast = decoding.params_for_decoding(model, params)
    assert cast["decoder"]["layers_0"]["mlp"]["wo"]["kernel"].dtype == jnp.bfloat16
    assert cast["token_embedder"]["embedding"].dtype == jnp.bfloat16
    assert cast["decoder"]["final_norm"]["scale"].dtype == jnp.float32
    enc = _encoder_batch()
    ref = np.asarray(decoding.greedy_decode_uncached(model, params, jnp.asarray(enc), N, eos_id=-1))
    np.testing.assert_array_equal(_greedy(model, params, {"encoder_input_tokens": enc}, stop_token_ids=()), ref)
    np.testing.assert_array_equal(_greedy(model, cast, {"encoder_input_tokens": enc}, stop_token_ids=()), ref)


def test_cached_greedy_equals_uncached_decoder_only_padded():
    model, params = _decoder_only()
    prompt, lengths = _prompts()
    got = _greedy(model, params, {"prompt_tokens": prompt, "prompt_lengths": lengths})
    ref = np.array([_uncached_decoder_only_greedy(model, params, p, n, N) for p, n in zip(prompt, lengths)])
    np.testing.assert_array_equal(got, ref)
    assert len({tuple(r) for r in ref}) == 3


def _uncached_prefix_lm_greedy(model, params, prompt, length, n, eos=1):
    """Reference for a prefix LM: full forward passes with seqio's PrefixLM mask on the prompt."""
    apply = jax.jit(lambda p, x, c: model.apply({"params": p}, x, decoder_causal_attention=c))
    width = len(prompt) + n
    prefix = (np.arange(width) < length).astype(np.int32)[None]
    seq, out = list(prompt[:length]), []
    for _ in range(n):
        buffer = np.zeros((1, width), np.int32)
        buffer[0, : len(seq)] = seq
        token = int(np.argmax(np.asarray(apply(params, jnp.asarray(buffer), jnp.asarray(prefix)))[0, len(seq) - 1]))
        out.append(token)
        seq.append(token)
        if token == eos:
            break
    return out + [0] * (n - len(out))


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_prefix_lm_decoding_reads_the_prompt_bidirectionally(method):
    """`prefix_lm=True`: the cached prefill lets the prompt attend to itself (T5.1.1 block, relative positions),
    so cached greedy equals uncached greedy under the PrefixLM mask, and beam width 1 equals it too; the same
    weights read causally decode differently."""
    config = dict(TINY, num_encoder_layers=0, prefix_lm=True)
    model = DecoderOnly(TransformerConfig(**config))
    params = _livelier(_init(model, jnp.ones((1, 4), jnp.int32)), 5)
    prompt, lengths = _prompts()
    batch = {"prompt_tokens": prompt, "prompt_lengths": lengths}
    ref = np.array([_uncached_prefix_lm_greedy(model, params, p, n, N) for p, n in zip(prompt, lengths)])
    decode_config = decoding.DecodeConfig(method=method, num_beams=1, max_new_tokens=N)
    np.testing.assert_array_equal(np.asarray(decoding.generate(model, params, batch, decode_config).tokens[:, 0]), ref)
    causal = DecoderOnly(TransformerConfig(**dict(config, prefix_lm=False)))
    assert not np.array_equal(_greedy(causal, params, batch), ref)


def test_prefix_lm_is_refused_for_an_encoder_decoder():
    with pytest.raises(ValueError, match="prefix_lm is for decoder-only"):
        _init(EncoderDecoder(TransformerConfig(**TINY, prefix_lm=True)), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))


def test_prompt_lengths_default_to_the_last_nonzero_id():
    model, params = _decoder_only()
    prompt, lengths = _prompts()
    np.testing.assert_array_equal(_greedy(model, params, {"prompt_tokens": prompt}),
                                  _greedy(model, params, {"prompt_tokens": prompt, "prompt_lengths": lengths}))


def test_limits_equal_greedy():
    """Beam width 1, top-k = 1 and temperature -> 0 all reproduce greedy decoding."""
    model, params = _encoder_decoder(False)
    enc = _encoder_batch()
    free = _free_running_uncached(model, params, enc)
    greedy = _truncate_after(free, _stop_id(free))
    base = decoding.DecodeConfig(max_new_tokens=N, stop_token_ids=(_stop_id(free),))
    for config in (base.replace(method="beam", num_beams=1), base.replace(method="sample", top_k=1),
                   base.replace(method="sample", temperature=1e-4), base.replace(method="sample", temperature=1e-20),
                   base.replace(method="sample", temperature=1e-37, top_p=0.9)):  # no underflow to id 0
        out = decoding.generate(model, params, {"encoder_input_tokens": enc}, config, seeds=[3, 4, 5])
        np.testing.assert_array_equal(np.asarray(out.tokens[:, 0]), greedy, err_msg=str(config))


def test_sampling_per_row_seeds_do_not_depend_on_the_batch():
    model, params = _decoder_only()
    prompt, lengths = _prompts()
    config = decoding.DecodeConfig(method="sample", max_new_tokens=N, num_samples=2, top_p=0.9, top_k=20,
                                   repetition_penalty=1.3)
    together = decoding.generate(model, params, {"prompt_tokens": prompt, "prompt_lengths": lengths}, config,
                                 seeds=[7, 8, 9])
    # Prompt 2 again, now first, next to other prompts and other seeds (same shapes: one compilation).
    others = np.random.default_rng(5).integers(2, VOCAB, (2, 7)).astype(np.int32)
    mixed = decoding.generate(
        model, params, {"prompt_tokens": np.concatenate([prompt[2:], others]), "prompt_lengths": np.array([7, 3, 6])},
        config, seeds=[9, 1, 2])
    tokens = np.asarray(together.tokens)
    np.testing.assert_array_equal(tokens[2], np.asarray(mixed.tokens)[0])
    np.testing.assert_allclose(np.asarray(together.scores)[2], np.asarray(mixed.scores)[0], rtol=1e-5)
    assert not np.array_equal(tokens[2, 0], tokens[2, 1])  # the two samples of a row differ


def test_a_huge_temperature_keeps_the_masks():
    """min_new_tokens masks the stop ids with NEG_INF; scaling by 1/temperature must not bring them back."""
    model, params = _decoder_only()
    prompt, lengths = _prompts()
    config = decoding.DecodeConfig(method="sample", max_new_tokens=N, min_new_tokens=N, temperature=1e30,
                                   stop_token_ids=tuple(range(VOCAB // 2)))
    out = decoding.generate(model, params, {"prompt_tokens": prompt, "prompt_lengths": lengths}, config,
                            seeds=[1, 2, 3])
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (3, 1, N) and (tokens >= VOCAB // 2).all(), tokens  # uniform over the allowed half


@pytest.mark.parametrize("field, value", [("temperature", math.inf), ("repetition_penalty", 1e-300),
                                          ("repetition_penalty", 1e39)])
def test_decode_settings_outside_float32_are_refused(field, value):
    with pytest.raises(ValueError, match=f"DecodeConfig.{field} = "):
        decoding.DecodeConfig(**{field: value})


def test_a_lone_prompt_samples_what_it_samples_inside_a_batch():
    """XLA:CPU multiplies a single row by a matrix-vector kernel that sums in another order than the matrix kernel
    of two or more rows; near-uniform distributions (a wide vocabulary, high temperature) turn those last bits
    into other ids. A one-prompt batch must sample what the prompt samples as a row of a batch."""
    model = DecoderOnly(TransformerConfig(**dict(GPT, vocab_size=51200, d_model=64, head_dim=16, d_ff=128)))
    params = _init(model, jnp.ones((1, 4), jnp.int32))
    prompt, lengths = _prompts()
    config = decoding.DecodeConfig(method="sample", max_new_tokens=6, temperature=5.0)
    for seed in range(8):
        alone = decoding.generate(model, params, {"prompt_tokens": prompt[:1], "prompt_lengths": lengths[:1]},
                                  config, seeds=[seed])
        batched = decoding.generate(model, params, {"prompt_tokens": prompt[:2], "prompt_lengths": lengths[:2]},
                                    config, seeds=[seed, 99])
        np.testing.assert_array_equal(np.asarray(alone.tokens)[0], np.asarray(batched.tokens)[0], err_msg=seed)
        assert np.asarray(alone.scores)[0] == np.asarray(batched.scores)[0], seed


class _ByteVocab:
    """A vocabulary whose ids decode to fixed byte strings (the `id_bytes` protocol of t5k's vocabularies)."""

    eos_id = 1

    def __init__(self):
        letters = "abcdefgh"
        table = [b"", b""] + [(letters[i % 8] * (1 + i % 3)).encode() + (b" " if i % 5 == 0 else b"")
                              for i in range(2, VOCAB)]
        self.id_bytes = table

    def decode(self, ids):
        ids = list(ids)
        ids = ids[: ids.index(1)] if 1 in ids else ids
        return b"".join(self.id_bytes[i] for i in ids).decode()


def test_stop_string_automaton_matches_brute_force():
    vocab = _ByteVocab()
    strings = ("cab", "b b", "hhhh", "g")
    tables = stop_strings.StopStringTables.build(strings, vocab.id_bytes)
    next_state, completes = np.asarray(tables.next_state), np.asarray(tables.completes)
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.integers(2, VOCAB, 12)
        state, first = 0, None
        for t, i in enumerate(ids):
            if completes[state, i] and first is None:
                first = t
            state = next_state[state, i]
        text, expected = b"", None
        for t, i in enumerate(ids):
            text += vocab.id_bytes[i]
            if any(s.encode() in text for s in strings):
                expected = t
                break
        assert first == expected, (ids, first, expected)


def _first_stop(pieces, stop: bytes):
    """Index of the token on which the concatenated pieces first contain `stop` (None if never)."""
    return next((t for t in range(len(pieces)) if stop in b"".join(pieces[: t + 1])), None)


def test_stop_string_ends_generation_exactly_there():
    model, params = _encoder_decoder(False)
    vocab = _ByteVocab()
    enc = _encoder_batch()
    free = _free_running_uncached(model, params, enc)
    pieces = [[vocab.id_bytes[i] for i in row] for row in free]
    # A stop string from the middle of row 0's token 2 to the middle of its token 4.
    text = b"".join(pieces[0])
    start = len(b"".join(pieces[0][:2])) + len(pieces[0][2]) - 1
    stop = text[start: len(b"".join(pieces[0][:4])) + 1]
    config = decoding.DecodeConfig(max_new_tokens=N, stop_token_ids=(), stop_strings=(stop.decode(),))
    out = decoding.generate(model, params, {"encoder_input_tokens": enc}, config, vocabulary=vocab)
    tokens = np.asarray(out.tokens)[:, 0]
    texts = decoding.decode_outputs(vocab, out.tokens, config)
    assert _first_stop(pieces[0], stop) == 4
    for row in range(3):  # every row stops exactly on the token that completes the string, if any
        last = _first_stop(pieces[row], stop)
        last = N - 1 if last is None else last
        np.testing.assert_array_equal(tokens[row, : last + 1], free[row, : last + 1])
        assert (tokens[row, last + 1:] == 0).all()
        row_text = b"".join(pieces[row][: last + 1])
        cut = row_text.find(stop)
        assert texts[row] == [(row_text if cut < 0 else row_text[:cut]).decode()]


def test_text_ends_before_the_first_stop_id_with_or_without_stop_strings():
    """A non-EOS stop id (here the newline piece) ends the text the same way whether stop strings are set or not."""
    from t5k.vocab import default_vocabulary

    vocabulary = default_vocabulary()
    ids = vocabulary.encode("안녕하세요.\n다음")
    newline = vocabulary.encode("\n")
    assert len(newline) == 1 and newline[0] in ids
    tokens = np.zeros((1, 1, 12), np.int32)
    tokens[0, 0, :len(ids)] = ids
    config = decoding.DecodeConfig(stop_token_ids=(1, newline[0]))
    assert decoding.decode_outputs(vocabulary, tokens, config) == [["안녕하세요."]]
    assert decoding.decode_outputs(vocabulary, tokens, config.replace(stop_strings=("QQQ",))) == [["안녕하세요."]]


def test_bad_inputs_raise_named_errors():
    model = DecoderOnly(TransformerConfig(**GPT))  # absolute positions, a table of 32
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]))
    params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    with pytest.raises(ValueError, match=r"prompt rows \[1\]"):
        decoding.generate(model, params, {"prompt_tokens": np.array([[3, 4], [0, 0]])}, decoding.DecodeConfig())
    with pytest.raises(ValueError, match="DecodeConfig.top_p"):
        decoding.DecodeConfig(top_p=0.0)
    with pytest.raises(ValueError, match="DecodeConfig.top_k = 1.5; expected an integer"):
        decoding.DecodeConfig(top_k=1.5)
    with pytest.raises(ValueError, match="DecodeConfig.max_new_tokens = 6.0; expected an integer"):
        decoding.DecodeConfig(max_new_tokens=6.0)
    with pytest.raises(ValueError, match=r"stop_strings\[0\]"):
        decoding.DecodeConfig(stop_strings=("",))
    with pytest.raises(ValueError, match="exceeds the position table"):
        decoding.generate(model, params, {"prompt_tokens": np.ones((1, 30), np.int32)},
                          decoding.DecodeConfig(max_new_tokens=4))


def test_prompt_batches_leave_room_for_the_new_tokens():
    """A decoder-only batch with learned positions is never padded past max_length - max_new_tokens + 1, whatever
    the bucketing: 19-token prompts fit a table of 32 with 8 new tokens, the next power of two (32) would not."""
    from t5k import infer, model_loading, scoring

    model = DecoderOnly(TransformerConfig(**GPT))
    params = _livelier(_init(model, jnp.ones((1, 4), jnp.int32)), 3)
    config = decoding.DecodeConfig(max_new_tokens=8, min_new_tokens=8)
    rows = [[0] + list(range(2, 20)), [0, 5, 6]]
    batch = decoding.batch_from_ids(model, rows, config, scoring.length_bucket)
    assert batch["prompt_tokens"].shape == (2, 25) and batch["prompt_lengths"].tolist() == [19, 3]
    tokens = np.asarray(decoding.generate(model, params, batch, config).tokens[:, 0])
    for got, row in zip(tokens, rows):  # as each prompt alone, unpadded
        alone = decoding.generate(model, params, {"prompt_tokens": np.array([row], np.int32)}, config)
        np.testing.assert_array_equal(got, np.asarray(alone.tokens)[0, 0])
    with pytest.raises(ValueError, match=r"prompts \[0\]: longer than 25 tokens"):
        decoding.batch_from_ids(model, [[0] + list(range(2, 28))], config)
    # t5k infer: new tokens that leave no room for any prompt are named as such, not as a prompt too long.
    loaded = model_loading.LoadedModel(model, params, None, None, None, "test")
    assert infer.max_prompt_tokens(loaded, config, 512) == 24
    with pytest.raises(infer.InputError, match="max_new_tokens 40 leaves no room for a prompt: the model's "
                                               "max_length is 32"):
        infer.max_prompt_tokens(loaded, decoding.DecodeConfig(max_new_tokens=40), 512)


# ----------------------------------------------------------------------------------------------------------
# Parity with transformers `generate` on imported weights.

try:
    import torch
    import transformers
except ImportError:  # the [hf] extra is optional
    torch = transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs torch and transformers")

# transformers' beam search divides by length ** alpha ('hf' form); early_stopping takes the same values.
HF_BEAM = dict(num_beams=3, length_penalty=0.7, early_stopping=False)
T5K_BEAM = dict(method="beam", num_beams=3, length_penalty=0.7, length_penalty_form="hf", early_stopping=False)


def _hf_generate(model, **kwargs):
    torch.manual_seed(0)
    with torch.no_grad():
        return model.generate(**kwargs, max_new_tokens=N, do_sample=False, pad_token_id=0, eos_token_id=1).numpy()


def _hf_t5():
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=2,
        relative_attention_num_buckets=16, relative_attention_max_distance=20, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    )
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 0.5)
    model.config.tie_word_embeddings = False
    return model


@needs_transformers
def test_t5_greedy_and_beam_equal_transformers_generate():
    hf = _hf_t5()
    config = convert.t5_config_from_hf(hf.config, dtype="float32")
    params = convert.t5_params_from_hf(hf.state_dict(), config)
    model = EncoderDecoder(config)
    enc = _encoder_batch()
    kwargs = dict(input_ids=torch.from_numpy(enc).long(), attention_mask=torch.from_numpy(enc > 0).long())
    for hf_kwargs, t5k_kwargs in ((dict(num_beams=1), {}),
                                  (dict(HF_BEAM, early_stopping=True), dict(T5K_BEAM, early_stopping=True))):
        ref = _hf_generate(hf, **kwargs, **hf_kwargs)[:, 1:]  # drop the decoder start token
        got = np.asarray(decoding.generate(model, params, {"encoder_input_tokens": enc},
                                           decoding.DecodeConfig(max_new_tokens=N, **t5k_kwargs)).tokens[:, 0])
        np.testing.assert_array_equal(got[:, : ref.shape[1]], ref, err_msg=str(hf_kwargs))
        assert (got[:, ref.shape[1]:] == 0).all()


@needs_transformers
def test_gpt2_greedy_and_beam_equal_transformers_generate():
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                        eos_token_id=1)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # GPT-2's 0.02 init makes every logit ~0: livelier matrices. The layer norms keep their identity init (random
        # norm biases make one token win at every position, and the comparison would test nothing).
        for p in hf.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    config = convert.gpt2_config_from_hf(hf.config, dtype="float32")
    params = convert.gpt2_params_from_hf(hf.state_dict(), config)
    model = DecoderOnly(config)
    prompt, lengths = _prompts()
    refs = {}
    for hf_kwargs, t5k_kwargs in ((dict(num_beams=1), {}), (HF_BEAM, T5K_BEAM)):
        got = np.asarray(decoding.generate(model, params, {"prompt_tokens": prompt, "prompt_lengths": lengths},
                                           decoding.DecodeConfig(max_new_tokens=N, **t5k_kwargs)).tokens[:, 0])
        for row, (p, n) in enumerate(zip(prompt, lengths)):  # transformers: each prompt alone, unpadded
            ref = _hf_generate(hf, input_ids=torch.from_numpy(p[None, :n]).long(), **hf_kwargs)[0, n:]
            np.testing.assert_array_equal(got[row, : len(ref)], ref, err_msg=f"{hf_kwargs} row {row}")
            assert (got[row, len(ref):] == 0).all()
            refs[hf_kwargs["num_beams"], row] = ref.tolist()
    # The case is not degenerate: varied tokens, beam search choosing otherwise than greedy, a beam ending at EOS.
    assert all(len(set(refs[1, row])) >= 3 for row in range(3))
    assert any(refs[1, row] != refs[3, row] for row in range(3)) and any(len(refs[3, row]) < N for row in range(3))


def test_nucleus_threshold_equals_the_sort_and_cumsum_definition():
    """The sort-free bisection keeps exactly the ids that sorting + cumulative sums keep (ties, peaky and flat
    rows, masked ids with probability 0)."""
    from t5k import logits_processing

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 300)) * rng.choice([0.1, 1.0, 5.0, 20.0], (64, 1))
    logits[:8, :40] = 3.0  # exact ties at the top
    logits[8:16, 100:] = logits_processing.NEG_INF  # top-k-masked ids
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    for top_p in (0.05, 0.5, 0.9, 0.99):
        p = np.asarray(probs, np.float64)
        order = np.argsort(-p, axis=-1, kind="stable")
        descending = np.take_along_axis(p, order, axis=-1)
        mass_before = np.cumsum(descending, axis=-1) - descending
        num_kept = (mass_before < top_p).sum(-1, keepdims=True)
        expected = p >= np.take_along_axis(descending, num_kept - 1, axis=-1)
        kept = np.asarray(probs >= logits_processing.nucleus_threshold(probs, top_p))
        np.testing.assert_array_equal(kept, expected, err_msg=f"top_p={top_p}")


def test_argmax_is_the_first_index_of_the_row_maximum():
    """The two-reduction argmax equals numpy's on random rows, exact ties (first index wins) and masked rows."""
    from t5k import logits_processing

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((32, 1000)).astype(np.float32)
    logits[0, [7, 500, 999]] = 50.0  # ties at the top: index 7
    logits[1, :] = logits_processing.NEG_INF  # everything masked: index 0
    logits[2, -1] = 1e30  # the last id
    logits[3, :] = 0.0
    got = np.asarray(logits_processing.argmax(jnp.asarray(logits)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
    assert got[:4].tolist() == [7, 0, 999, 0]


def test_inverse_cdf_sampling_matches_the_softmax_distribution():
    """`logits_processing.sample` inverts the softmax CDF: at given uniforms it picks numpy's searchsorted id,
    never an id of probability 0, and its frequencies over many draws match the probabilities (chi-square)."""
    from t5k import logits_processing

    rng = np.random.default_rng(11)
    vocab = 1000  # not a multiple of the 128-id block
    logits = rng.standard_normal((4, vocab)).astype(np.float32) * np.array([[0.5], [2.0], [4.0], [8.0]], np.float32)
    logits[:, 300:700] = logits_processing.NEG_INF  # masked ids (top-k / top-p)
    logits[3, :] = logits_processing.NEG_INF
    logits[3, [5, 999]] = [0.0, np.log(3.0)]  # two ids left: 1/4 and 3/4, the second in the last, partial block
    uniform = rng.random((4000, 4)).astype(np.float32)
    sample = jax.jit(jax.vmap(logits_processing.sample, in_axes=(None, 0)))
    got = np.asarray(sample(jnp.asarray(logits), jnp.asarray(uniform)))  # [draws, rows]
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1), np.float64)
    cdf = np.cumsum(probs, axis=-1)
    expected = np.stack([np.searchsorted(cdf[r], uniform[:, r] * cdf[r, -1], side="right") for r in range(4)], 1)
    assert (probs[np.arange(4), got] > 0).all()
    assert (got == expected).mean() > 0.999  # float32 block sums vs float64 cumsum differ only at boundaries
    for r in range(4):
        counts = np.bincount(got[:, r], minlength=vocab)
        kept = probs[r] > 1e-3
        expected_counts = probs[r, kept] * len(got) / probs[r, kept].sum()
        chi2 = ((counts[kept] - expected_counts) ** 2 / expected_counts).sum()
        assert chi2 < kept.sum() + 5 * np.sqrt(2 * kept.sum()), (r, chi2, kept.sum())
    assert abs((got[:, 3] == 999).mean() - 0.75) < 0.03
