"""Generation with a KV cache: greedy, beam search and sampling, in one jitted `lax.while_loop` per call.

    tokens, scores = generate(model, params, batch, DecodeConfig(...), seeds)
    texts = generate_text(model, params, vocabulary, ["요약: ..."], DecodeConfig(...), seed=0)

Inputs (`batch`):
- encoder-decoder: `encoder_input_tokens [batch, enc_len]`, 0-padded at the end. The decoder starts from id 0
  (T5's BOS) at position 0.
- decoder-only: `prompt_tokens [batch, prompt_len]`, RIGHT-padded with 0, and optionally `prompt_lengths
  [batch]` (default: up to the last non-zero id, so give lengths when a prompt ends with id 0). Right padding
  keeps every token at its unpadded position, so absolute, rotary and relative positions need no offsets: row r
  writes its prompt at cache slots 0..len_r-1 and its new tokens from slot len_r on; a query at position p
  attends to slots 0..p only, so the padding slots beyond a short prompt are never seen (they are overwritten
  by the row's own new tokens before they could be). A padded batch therefore computes what each prompt alone
  computes.

Output: `GenerateOutput(tokens [batch, num_samples, max_new_tokens] int32, scores [batch, num_samples])`.
Tokens after a row stops are 0. A row stops after a `stop_token_ids` id (kept in the output), after the token
on which its decoded text first contains a `stop_strings` entry (that token is kept; `generate_text` cuts the
text just before the stop string, which is not part of the returned text), or at `max_new_tokens`.

Scores: greedy and sampling give the sum of the model's log-probabilities (log-softmax of the raw logits,
before repetition penalty, temperature, top-k and top-p) of the row's tokens, stop token included. Beam search
gives the beam score: the sum of processed log-probabilities divided by the length penalty.

Controls (the HyperCLOVA Studio set), applied in this order to each step's logits:
1. repetition penalty (CTRL, as in `transformers`): for every id already in the sequence (decoder-only: the
   prompt and the new tokens; encoder-decoder: the decoder's BOS and the new tokens), a positive logit is
   divided by the penalty and a negative one multiplied by it;
2. min_new_tokens: stop ids are forbidden before that many new tokens;
3. sampling only: temperature, then top-k, then top-p (the smallest set of ids, by probability after top-k,
   whose mass reaches top_p; ties at the boundary are kept).
Greedy takes the argmax; beam search ranks by log-softmax of the processed logits (step 3 is not applied).

Beam search follows `transformers`' algorithm (so that the same weights give the same beams): 2*num_beams
candidates per step (more with several stop ids), candidates that stop within the top num_beams ranks become
finished hypotheses scored `sum_logprob / penalty(length)`, the best num_beams others continue. `length` counts
new tokens including the stop token. `length_penalty_form='gnmt'` is T5's / GNMT's `((5 + length) / 6) ** alpha`,
`'hf'` is `transformers`' `length ** alpha`. `early_stopping`: True ends a row once it has num_beams finished
hypotheses; False also ends it when the best running beam, scored at its current length, cannot beat the worst
finished one; 'never' scores that bound at max_new_tokens when alpha > 0 (exact for the GNMT and HF forms).
These are `transformers`' `early_stopping` values with the same meaning.

Seeds: each row r gets its own PRNG stream from `seeds[r]` (sample s of the row folds in s, step t folds in t),
so a row's samples do not depend on which other rows share the batch. A step draws one uniform number per row
and inverts the CDF of the processed distribution at it (`logits_processing.sample`).
"""

import math
import dataclasses
import functools
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from t5k import beam_search, gin_utils, logits_processing, stop_strings
from t5k.decode_model import Stepper, make_stepper, take_rows
from t5k.models import DecoderOnly, EncoderDecoder

METHODS = ("greedy", "beam", "sample")
LENGTH_PENALTY_FORMS = ("gnmt", "hf")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to generate; every field is a gin binding (`DecodeConfig.top_p = 0.9`). See the module docstring."""

    method: str = "greedy"  # greedy | beam | sample
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    num_beams: int = 4
    length_penalty: float = 0.6  # alpha
    length_penalty_form: str = "gnmt"  # gnmt: ((5 + len) / 6) ** alpha; hf: len ** alpha
    early_stopping: Union[bool, str] = True  # True | False | 'never'
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0  # 1.0: no top-p
    repetition_penalty: float = 1.0  # 1.0: none
    num_samples: int = 1  # samples (beam: best hypotheses) returned per prompt
    stop_token_ids: Tuple[int, ...] = (1,)  # EOS
    stop_strings: Tuple[str, ...] = ()

    def __post_init__(self):
        def check(ok: bool, field: str, expected: str):
            if not ok:
                raise ValueError(f"DecodeConfig.{field} = {getattr(self, field)!r}; expected {expected}")

        gin_utils.check_field_types(self)  # e.g. top_k = 1.5
        check(self.method in METHODS, "method", f"one of {METHODS}")
        check(self.max_new_tokens >= 1, "max_new_tokens", "at least 1")
        check(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", "in [0, max_new_tokens]")
        check(self.num_beams >= 1, "num_beams", "at least 1")
        check(self.length_penalty_form in LENGTH_PENALTY_FORMS, "length_penalty_form", f"one of {LENGTH_PENALTY_FORMS}")
        check(self.early_stopping in (True, False, "never"), "early_stopping", "True, False or 'never'")
        check(0 < self.temperature < math.inf, "temperature", "> 0 and finite (use method='greedy' for the argmax)")
        check(self.top_k >= 0, "top_k", ">= 0")
        check(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        check(logits_processing.FLOAT32_TINY <= self.repetition_penalty <= logits_processing.FLOAT32_MAX,
              "repetition_penalty", "> 0, a normal float32 (logits are divided by it)")
        check(self.num_samples >= 1, "num_samples", "at least 1")
        check(self.method != "beam" or self.num_samples <= self.num_beams, "num_samples", "<= num_beams for beam search")
        check(all(isinstance(i, int) and i >= 0 for i in self.stop_token_ids), "stop_token_ids", "non-negative ints")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        stop_strings.encode_stop_strings(self.stop_strings)  # raises on an empty or non-string entry

    def replace(self, **changes) -> "DecodeConfig":
        return dataclasses.replace(self, **changes)

    def length_penalty_fn(self) -> Callable[[jax.Array], jax.Array]:
        """New-token count -> divisor of the summed log-probability (beam search)."""
        alpha = self.length_penalty
        if self.length_penalty_form == "gnmt":
            return lambda length: ((5.0 + length) / 6.0) ** alpha
        return lambda length: jnp.asarray(length, jnp.float32) ** alpha


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # [batch, num_samples, max_new_tokens] int32, 0 after a row stops
    scores: jax.Array  # [batch, num_samples] float32


# ----------------------------------------------------------------------------------------------------------
# Greedy and sampling.


def _row_keys(seeds: jax.Array, num_samples: int) -> jax.Array:
    """`[batch]` seeds -> `[batch * num_samples]` keys; sample s of row r = fold_in(key(seed_r), s)."""
    samples = jnp.tile(jnp.arange(num_samples, dtype=jnp.uint32), seeds.shape[0])
    seeds = jnp.repeat(seeds, num_samples)
    return jax.vmap(lambda seed, s: jax.random.fold_in(jax.random.PRNGKey(seed), s))(seeds, samples)


def _sample_loop(stepper: Stepper, config: DecodeConfig, seeds: jax.Array, stops) -> GenerateOutput:
    start = stepper.start
    batch = start.tokens.shape[0]
    copies = config.num_samples if config.method == "sample" else 1
    rows = jnp.repeat(jnp.arange(batch), copies)
    keys = _row_keys(seeds, copies)  # [rows]
    n = config.max_new_tokens
    state = dict(
        t=jnp.zeros((), jnp.int32),
        cache=take_rows(start.cache, start.cache_axes, rows),
        inputs=start.tokens[rows],  # [rows], the token the next step feeds
        tokens=jnp.zeros((rows.shape[0], n), jnp.int32),
        done=jnp.zeros(rows.shape, bool),
        scores=jnp.zeros(rows.shape, jnp.float32),
        seen=None,
        stop_state=jnp.zeros(rows.shape, jnp.int32),
    )
    if config.repetition_penalty != 1.0:
        state["seen"] = logits_processing.seen_ids(start.history[rows], start.history_mask[rows], stepper.vocab_size)
    context = jax.tree_util.tree_map(lambda x: x[rows], start.context)  # loop-invariant
    positions = start.positions[rows]

    def choose(logits, seen, t):
        processed = logits_processing.process_logits(logits, seen, t, config)
        if config.method == "greedy":
            return logits_processing.argmax(processed)
        sample_logits = logits_processing.sampling_logits(processed, config)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t)
        return logits_processing.sample(sample_logits, jax.vmap(jax.random.uniform)(step_keys))

    def body(s):
        t = s["t"]
        logits, cache = stepper.step(s["cache"], context, s["inputs"], positions + t)  # [rows, vocab]
        seen = s["seen"]
        token = choose(logits, seen, t)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
        token = jnp.where(s["done"], 0, token)
        stop = logits_processing.is_stop_id(token, config)
        stop_state = s["stop_state"]
        if stops is not None:
            stop_state, completes = stops.advance(stop_state, token)
            stop = stop | completes
        if seen is not None:
            seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
        return dict(
            t=t + 1, cache=cache, inputs=token, tokens=s["tokens"].at[:, t].set(token), done=s["done"] | stop,
            scores=s["scores"] + jnp.where(s["done"], 0.0, logprob), seen=seen, stop_state=stop_state,
        )

    def cond(s):
        return (s["t"] < n) & ~jnp.all(s["done"])

    final = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(final["tokens"].reshape(batch, copies, n), final["scores"].reshape(batch, copies))


# ----------------------------------------------------------------------------------------------------------
# Entry points.


@functools.partial(jax.jit, static_argnames=("model", "config"))
def _generate(model, config: DecodeConfig, params, batch, seeds, stops) -> GenerateOutput:
    params = params_for_decoding(model, params)  # no-op when done already
    stepper = make_stepper(model, params, batch, config.max_new_tokens)
    if config.method == "beam":
        return GenerateOutput(*beam_search.beam_search(stepper, config, stops))
    return _sample_loop(stepper, config, seeds, stops)


def params_for_decoding(model, params):
    """The parameters `generate` reads: the matmul weights (`kernel`, `embedding`) cast to a bfloat16 compute dtype.

    Every step reads every decoder weight for a handful of tokens, so decoding is bound by memory traffic: reading
    float32 weights and converting them at each step costs twice the bytes of reading bfloat16 ones. The layers
    cast exactly these weights to the compute dtype before using them (norm scales, biases and position tables
    stay float32), so the outputs do not change. `generate` applies this itself (once per call, before the
    loop); callers that decode many batches with one set of weights cast once (`t5k infer`, `t5k eval`), and the
    calls skip the ~0.2 s of casting ct5_small's 96M parameters. Identity for float32 models.
    """
    params = nn.unbox(params)
    dtype = jnp.dtype(model.config.dtype)
    if dtype == jnp.float32:
        return params

    def cast(path, x):
        name = getattr(path[-1], "key", None)
        return x.astype(dtype) if name in ("kernel", "embedding") else x

    return jax.tree_util.tree_map_with_path(cast, params)


def _check_batch(model, batch: Dict[str, Any]) -> Dict[str, jax.Array]:
    """The model's decoding inputs from `batch`, validated (see the module docstring)."""
    if isinstance(model, EncoderDecoder):
        if "encoder_input_tokens" not in batch:
            raise KeyError("encoder-decoder generation needs batch['encoder_input_tokens'] [batch, enc_len]")
        enc = np.asarray(batch["encoder_input_tokens"])
        if enc.ndim != 2 or not np.issubdtype(enc.dtype, np.integer):
            raise ValueError(f"encoder_input_tokens: expected int [batch, enc_len], got {enc.dtype} {enc.shape}")
        empty = np.flatnonzero(~(enc > 0).any(axis=1))
        if empty.size:
            raise ValueError(f"encoder_input_tokens: rows {empty.tolist()} are empty (all padding)")
        return {"encoder_input_tokens": jnp.asarray(enc, jnp.int32)}
    if not isinstance(model, DecoderOnly):
        raise TypeError(f"generate serves EncoderDecoder and DecoderOnly models, got {type(model).__name__}")
    if "prompt_tokens" not in batch:
        raise KeyError("decoder-only generation needs batch['prompt_tokens'] [batch, prompt_len] (right-padded)")
    prompt = np.asarray(batch["prompt_tokens"])
    if prompt.ndim != 2 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_tokens: expected int [batch, prompt_len], got {prompt.dtype} {prompt.shape}")
    if "prompt_lengths" in batch:
        lengths = np.asarray(batch["prompt_lengths"])
        if lengths.shape != prompt.shape[:1]:
            raise ValueError(f"prompt_lengths: expected shape {prompt.shape[:1]}, got {lengths.shape}")
    else:
        nonzero = prompt > 0
        lengths = np.where(nonzero.any(axis=1), prompt.shape[1] - np.argmax(nonzero[:, ::-1], axis=1), 0)
    bad = np.flatnonzero((lengths < 1) | (lengths > prompt.shape[1]))
    if bad.size:
        raise ValueError(f"prompt rows {bad.tolist()}: lengths {lengths[bad].tolist()} outside [1, {prompt.shape[1]}]")
    return {"prompt_tokens": jnp.asarray(prompt, jnp.int32), "prompt_lengths": jnp.asarray(lengths, jnp.int32)}


def generate(model, params, batch: Dict[str, Any], config: DecodeConfig, seeds=None, vocabulary=None) -> GenerateOutput:
    """Generates `config.max_new_tokens` tokens (or fewer, 0-padded) for every prompt of `batch`.

    `params`: the model's parameters (boxed or not). `seeds`: `[batch]` ints for sampling (default 0 for every
    row). `vocabulary`: needed only for `config.stop_strings` (its per-id bytes define the text).
    """
    inputs = _check_batch(model, batch)
    num_rows = next(iter(inputs.values())).shape[0]
    seeds = np.zeros(num_rows, np.uint32) if seeds is None else np.asarray(seeds)
    if seeds.shape != (num_rows,):
        raise ValueError(f"seeds: expected shape ({num_rows},), got {seeds.shape}")
    stops = None
    if config.stop_strings:
        if vocabulary is None:
            raise ValueError("DecodeConfig.stop_strings needs the vocabulary (generate(..., vocabulary=...))")
        stops = _stop_tables(config.stop_strings, vocabulary)
    if num_rows > 1:
        return _generate(model, config, nn.unbox(params), inputs, jnp.asarray(seeds, jnp.uint32), stops)
    # A lone row goes through as two equal rows. XLA multiplies one row by a matrix-vector kernel that sums in
    # another order than the matrix kernel of two or more rows; near-uniform distributions turn those last bits
    # into other sampled ids, and a prompt alone would not generate what it generates as a row of any batch.
    # Decoding steps are bound by reading the weights, so the second row costs little.
    twice = {key: jnp.concatenate([value, value]) for key, value in inputs.items()}
    out = _generate(model, config, nn.unbox(params), twice, jnp.asarray(np.repeat(seeds, 2), jnp.uint32), stops)
    return GenerateOutput(out.tokens[:1], out.scores[:1])


def _stop_tables(strings: Tuple[str, ...], vocabulary) -> stop_strings.StopStringTables:
    """Built once per stop strings and concrete vocabulary (a GinVocabulary is resolved first: its hash follows
    gin). A vocabulary without per-id bytes is refused before the cache: seqio's SentencePiece one is unhashable."""
    concrete = stop_strings.concrete_vocabulary(vocabulary)
    stop_strings.check_vocabulary(concrete)
    return _cached_stop_tables(strings, concrete)


@functools.lru_cache(maxsize=8)
def _cached_stop_tables(strings: Tuple[str, ...], vocabulary) -> stop_strings.StopStringTables:
    return stop_strings.StopStringTables.build(strings, stop_strings.vocabulary_id_bytes(vocabulary))


def _bucket(length: int, multiple: int = 32) -> int:
    """Pads batch lengths up to a multiple, so that prompts of similar lengths reuse one compilation."""
    return -(-length // multiple) * multiple


def encode_prompts(model, vocabulary, prompts: Sequence[str], config: DecodeConfig) -> Dict[str, np.ndarray]:
    """Text prompts -> the `generate` batch. Encoder inputs end with EOS (as seqio tasks write them);
    decoder-only prompts start with id 0, the start token t5k's decoder feature converter puts first.
    """
    ids = vocabulary.encode_batch(list(prompts)) if hasattr(vocabulary, "encode_batch") else [
        vocabulary.encode(p) for p in prompts]
    for i, (text, seq) in enumerate(zip(prompts, ids)):
        if not seq:
            raise ValueError(f"prompt {i} ({text!r}) is empty")
    if isinstance(model, EncoderDecoder):
        rows = [list(seq) + [vocabulary.eos_id] for seq in ids]
    else:
        rows = [[0] + list(seq) for seq in ids]
    return batch_from_ids(model, rows, config)


def prompt_room(model, config: DecodeConfig) -> Optional[int]:
    """The longest decoder-only prompt (start id included) that leaves room for `max_new_tokens` in a model with
    learned positions: max_length - max_new_tokens + 1 (the last new token needs no position of its own). None
    when nothing bounds it (relative positions, or an encoder-decoder)."""
    if isinstance(model, EncoderDecoder) or model.config.position_embedding != "absolute":
        return None
    return model.config.max_length - config.max_new_tokens + 1


def batch_from_ids(model, rows: Sequence[Sequence[int]], config: DecodeConfig,
                   bucket: Callable[[int], int] = _bucket) -> Dict[str, np.ndarray]:
    """Id rows in the model's layout (encoder inputs ending with EOS; decoder-only prompts starting with 0) -> the
    `generate` batch, zero-padded to `bucket(longest)` columns (few distinct widths, few compilations). A
    decoder-only batch is never wider than `prompt_room`: generation runs to width + max_new_tokens - 1."""
    longest = max(map(len, rows))
    if isinstance(model, EncoderDecoder):
        key, width = "encoder_input_tokens", bucket(longest)
    else:
        key, room = "prompt_tokens", prompt_room(model, config)
        if room is not None:
            too_long = [i for i, row in enumerate(rows) if len(row) > room]
            if too_long:
                raise ValueError(f"prompts {too_long}: longer than {room} tokens, the model's max_length "
                                 f"{model.config.max_length} minus max_new_tokens {config.max_new_tokens} plus 1")
        width = bucket(longest) if room is None else min(bucket(longest), room)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    batch = {key: tokens}
    if key == "prompt_tokens":
        batch["prompt_lengths"] = np.array([len(row) for row in rows], np.int32)
    return batch


def decode_outputs(vocabulary, tokens: np.ndarray, config: DecodeConfig) -> List[List[str]]:
    """`[batch, num_samples, new]` ids -> texts: the ids before the first stop id (its text is not part of the
    answer, whether it is EOS or, say, a newline id), cut before the first stop string."""
    table = stop_strings.vocabulary_id_bytes(vocabulary) if config.stop_strings else None
    texts = []
    for row in np.asarray(tokens):
        out = []
        for seq in row:
            ids = seq.tolist()
            stop_at = [ids.index(i) for i in config.stop_token_ids if i in ids]
            ids = ids[: min(stop_at, default=len(ids))]
            if table is None:
                out.append(vocabulary.decode(ids))
                continue
            data = b"".join(table[i] for i in ids)
            out.append(stop_strings.cut_at_stop_string(data, config.stop_strings).decode("utf-8", "replace"))
        texts.append(out)
    return texts


def generate_text(model, params, vocabulary, prompts: Sequence[str], config: DecodeConfig, seed: int = 0
                  ) -> List[List[str]]:
    """`[prompt][sample]` generated texts. Row i samples with seed `seed + i` (so its samples do not depend on
    the other prompts of the call)."""
    if not prompts:
        return []
    batch = encode_prompts(model, vocabulary, prompts, config)
    seeds = (np.uint64(seed) + np.arange(len(prompts), dtype=np.uint64)) % (1 << 32)
    out = generate(model, params, batch, config, seeds.astype(np.uint32), vocabulary)
    return decode_outputs(vocabulary, np.asarray(out.tokens), config)


# ----------------------------------------------------------------------------------------------------------
# Reference: greedy decoding by full forward passes, no cache.


def greedy_decode_uncached(model: EncoderDecoder, params, encoder_input_tokens: jax.Array, max_decode_length: int,
                           eos_id: int = 1) -> jax.Array:
    """`[batch, enc_len]` -> `[batch, max_decode_length]` greedy outputs, 0-padded after the first EOS.

    Each step re-runs the decoder over the whole fixed-length buffer and reads the logits at the current
    position: O(length²), but simple enough to be the reference that cached decoding must reproduce token for
    token. The decoder input starts with id 0 (T5's BOS); position i's prediction becomes input i+1.
    """
    if not isinstance(model, EncoderDecoder):
        raise TypeError("greedy_decode_uncached serves encoder-decoder models")
    return _greedy(model, params, encoder_input_tokens, max_decode_length, eos_id)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _greedy(model, params, encoder_input_tokens, max_decode_length, eos_id):
    batch = encoder_input_tokens.shape[0]
    encoded = model.apply({"params": params}, encoder_input_tokens, method=model.encode)

    def step(i, carry):
        inputs, outputs, done = carry  # [batch, len], [batch, len], [batch]
        logits = model.apply({"params": params}, encoded, encoder_input_tokens, inputs, method=model.decode)
        token = jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32)  # [batch]
        token = jnp.where(done, 0, token)
        outputs = outputs.at[:, i].set(token)
        inputs = jnp.where(i + 1 < max_decode_length, inputs.at[:, jnp.minimum(i + 1, max_decode_length - 1)].set(token), inputs)
        return inputs, outputs, done | (token == eos_id)

    zeros = jnp.zeros((batch, max_decode_length), jnp.int32)
    _, outputs, _ = jax.lax.fori_loop(0, max_decode_length, step, (zeros, zeros, jnp.zeros((batch,), bool)))
    return outputs
