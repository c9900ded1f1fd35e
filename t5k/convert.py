"""Hugging Face `transformers` checkpoints <-> t5k parameters: T5 (T5.1.0, T5.1.1, mT5) and GPT-2.

Each family has three functions:

    t5_config_from_hf(hf_config, **overrides)   -> TransformerConfig      (a transformers config or its dict)
    t5_params_from_hf(state_dict, config)       -> t5k params             (nested dict of float32 numpy arrays)
    t5_params_to_hf(params, config)             -> HF state dict          ({name: float32 numpy array})
    t5_config_to_hf(config)                     -> kwargs for transformers.T5Config
    gpt2_config_from_hf / gpt2_params_from_hf / gpt2_params_to_hf / gpt2_config_to_hf   the same for GPT-2

`state_dict` values may be torch tensors (any float dtype, upcast exactly to float32) or numpy arrays, so
`model.state_dict()` works as is; exports are numpy so that this module never imports torch:
`model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})` loads one. Params are unrolled
(`layers_i`) or scanned (`layers`, stacked as `t5k.models.stack.stack_layer_params`) per `config.scan_layers`;
exports accept either layout and boxed (`nn.LogicallyPartitioned`) leaves. Every mapping is a transpose,
reshape, split or concatenation, so export -> import is bitwise exact.

Checks: a missing key raises KeyError, a wrong shape ValueError; both name the key and the expected shape.
Keys that map to nothing raise ValueError (with `strict=False`: a warning listing them). Aliases of the token
embedding (`encoder.embed_tokens.weight`, `decoder.embed_tokens.weight`, a tied `lm_head.weight`) must equal
it. Dropped without a word: GPT-2's causal-mask buffers (`attn.bias`, `attn.masked_bias`) and the unused
`decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight` of old T5 checkpoints.

T5 (`i` a layer index; HF Linear weights are `[out, in]` and are transposed; h = heads, k = head_dim)

| HF key                                                        | t5k path                                        |
|---------------------------------------------------------------|-------------------------------------------------|
| shared.weight [V, d]  (= encoder/decoder.embed_tokens.weight) | token_embedder/embedding [V, d]                 |
| encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight [B, h] | encoder/relpos_bias/rel_embedding [h, B] |
| encoder.block.i.layer.0.layer_norm.weight                     | encoder/layers_i/pre_attention_norm/scale       |
| encoder.block.i.layer.0.SelfAttention.{q,k,v}.weight [hk, d]  | encoder/layers_i/attention/{query,key,value}/kernel [d, h, k] |
| encoder.block.i.layer.0.SelfAttention.o.weight [d, hk]        | encoder/layers_i/attention/out/kernel [h, k, d] |
| encoder.block.i.layer.1.layer_norm.weight                     | encoder/layers_i/pre_mlp_norm/scale             |
| encoder.block.i.layer.1.DenseReluDense.{wi_0,wi_1 or wi}.weight [ff, d] | encoder/layers_i/mlp/{wi_0,wi_1 or wi}/kernel [d, ff] |
| encoder.block.i.layer.1.DenseReluDense.wo.weight [d, ff]      | encoder/layers_i/mlp/wo/kernel [ff, d]          |
| encoder.final_layer_norm.weight                               | encoder/final_norm/scale                        |
| decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight [B, h] | decoder/relpos_bias/rel_embedding [h, B] |
| decoder.block.i.layer.0.layer_norm.weight / SelfAttention.*   | decoder/layers_i/pre_self_attention_norm / self_attention/* |
| decoder.block.i.layer.1.layer_norm.weight / EncDecAttention.* | decoder/layers_i/pre_cross_attention_norm / encoder_decoder_attention/* |
| decoder.block.i.layer.2.layer_norm.weight / DenseReluDense.*  | decoder/layers_i/pre_mlp_norm / mlp/*           |
| decoder.final_layer_norm.weight                               | decoder/final_norm/scale                        |
| lm_head.weight [V, d]  (untied only; tied: must equal shared) | decoder/logits_dense/kernel [d, V]              |

Tying: t5k `tie_embeddings=True` means logits = x @ embedding.T * d_model**-0.5, which is HF's T5.1.0 behaviour
(`scale_decoder_outputs`). transformers 5 always ties `lm_head` to `shared` in a fresh model and decides the
rescale by `scale_decoder_outputs` (T5) or never rescales (mT5); `t5_config_from_hf` maps "rescaled" to
`tie_embeddings=True` and "not rescaled" to an untied `logits_dense` (which may hold a copy of `shared`). To run
an exported untied checkpoint in transformers 5, give `lm_head` its own parameter and set
`config.tie_word_embeddings = False` before loading, as the tests do.

GPT-2 (Conv1D weights are already `[in, out]`; `transformer.` prefixes optional on import, written on export)

| HF key                                        | t5k path                                                    |
|-----------------------------------------------|-------------------------------------------------------------|
| transformer.wte.weight [V, d] (= lm_head.weight when tied) | token_embedder/embedding [V, d]                |
| transformer.wpe.weight [P, d]                 | position_embedder/embedding [P, d]  (P = config.max_length) |
| transformer.h.i.ln_1.{weight,bias}            | layers_i/pre_self_attention_norm/{scale,bias}               |
| transformer.h.i.attn.c_attn.weight [d, 3d]    | layers_i/self_attention/{query,key,value}/kernel [d, h, k]  (split in thirds, q|k|v) |
| transformer.h.i.attn.c_attn.bias [3d]         | layers_i/self_attention/{query,key,value}/bias [h, k]       |
| transformer.h.i.attn.c_proj.{weight [d, d], bias} | layers_i/self_attention/out/{kernel [h, k, d], bias}    |
| transformer.h.i.ln_2.{weight,bias}            | layers_i/pre_mlp_norm/{scale,bias}                          |
| transformer.h.i.mlp.c_fc.{weight [d, ff], bias} | layers_i/mlp/wi/{kernel, bias}                            |
| transformer.h.i.mlp.c_proj.{weight [ff, d], bias} | layers_i/mlp/wo/{kernel, bias}                          |
| transformer.ln_f.{weight,bias}                | final_norm/{scale,bias}                                     |
| lm_head.weight [V, d] (untied only)           | logits_dense/kernel [d, V]                                  |
"""

import dataclasses
import re
import warnings
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np

from t5k.models import lora
from t5k.models.config import TransformerConfig
from t5k.models.stack import stack_layer_params, unstack_layer_params

Path = Tuple[str, ...]
Shape = Tuple[int, ...]

# HF activation names <-> t5k's (`t5k.models.layers.activation_fn`).
_ACT_FROM_HF = {
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu_fast": "gelu",
    "gelu": "gelu_exact",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "linear": "linear",
}
_ACT_TO_HF = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu", "linear": "linear"}


# ----------------------------------------------------------------------------------------------------------
# Rules: one HF tensor <-> one or more t5k leaves, with exact, invertible array maps.


@dataclasses.dataclass(frozen=True)
class _Rule:
    hf_key: str
    hf_shape: Shape
    paths: Tuple[Path, ...]
    shapes: Tuple[Shape, ...]
    to_t5k: Callable[[np.ndarray], Tuple[np.ndarray, ...]]
    to_hf: Callable[[Sequence[np.ndarray]], np.ndarray]


def _copy(hf_key: str, path: Path, shape: Shape) -> _Rule:
    return _Rule(hf_key, shape, (path,), (shape,), lambda w: (w,), lambda ps: ps[0])


def _transposed(hf_key: str, path: Path, shape: Shape) -> _Rule:
    """A 2-D table stored transposed (the relative position bias: HF [buckets, heads], t5k [heads, buckets])."""
    return _Rule(hf_key, shape[::-1], (path,), (shape,), lambda w: (w.T,), lambda ps: ps[0].T)


def _linear(hf_key: str, path: Path, in_shape: Shape, out_shape: Shape) -> _Rule:
    """torch.nn.Linear weight [out, in] (flattened) <-> DenseGeneral kernel [*in, *out]."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    shape = tuple(in_shape) + tuple(out_shape)
    return _Rule(
        hf_key, (n_out, n_in), (path,), (shape,),
        lambda w: (w.T.reshape(shape),), lambda ps: ps[0].reshape(n_in, n_out).T,
    )


def _reshaped(hf_key: str, hf_shape: Shape, path: Path, shape: Shape) -> _Rule:
    """Same element order, different shape (GPT-2 Conv1D weights are [in, out] already)."""
    return _Rule(hf_key, hf_shape, (path,), (shape,), lambda w: (w.reshape(shape),), lambda ps: ps[0].reshape(hf_shape))


def _split(hf_key: str, hf_shape: Shape, axis: int, paths: Sequence[Path], shape: Shape) -> _Rule:
    """An HF tensor made of equal pieces concatenated along `axis` (GPT-2 c_attn: q|k|v); each piece reshaped."""
    n = len(paths)
    piece = list(hf_shape)
    piece[axis] //= n

    def to_t5k(w):
        return tuple(p.reshape(shape) for p in np.split(w, n, axis=axis))

    def to_hf(ps):
        return np.concatenate([p.reshape(piece) for p in ps], axis=axis)

    return _Rule(hf_key, tuple(hf_shape), tuple(paths), (tuple(shape),) * n, to_t5k, to_hf)


def _to_numpy(value: Any) -> np.ndarray:
    """torch tensor / jax or numpy array -> float32 numpy (bf16/fp16 are upcast exactly)."""
    if hasattr(value, "detach"):  # torch, without importing it
        value = value.detach().cpu().float().numpy()
    return np.asarray(value).astype(np.float32, copy=False)


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b)


def _import(
    rules: List[_Rule],
    state_dict: Mapping[str, Any],
    aliases: Mapping[str, str],
    ignored: Callable[[str], bool],
    normalize: Callable[[str], str],
    strict: bool,
    scan_layers: bool,
) -> Dict[str, Any]:
    """Applies `rules` to `state_dict` (keys passed through `normalize` first); see the module docstring."""
    by_key: Dict[str, str] = {}  # normalized key -> key as given
    for key in state_dict:
        norm = normalize(key)
        if norm in by_key:
            raise ValueError(f"state dict keys {by_key[norm]!r} and {key!r} name the same tensor {norm!r}")
        by_key[norm] = key
    missing = [r for r in rules if r.hf_key not in by_key]
    if missing:
        listing = ", ".join(f"{r.hf_key!r} (expected shape {r.hf_shape})" for r in missing)
        raise KeyError(f"{len(missing)} key(s) missing from the state dict: {listing}")

    params: Dict[str, Any] = {}
    arrays: Dict[str, np.ndarray] = {}
    for rule in rules:
        w = _to_numpy(state_dict[by_key[rule.hf_key]])
        if w.shape != rule.hf_shape:
            raise ValueError(f"state dict key {by_key[rule.hf_key]!r}: expected shape {rule.hf_shape}, got {w.shape}")
        arrays[rule.hf_key] = w
        for path, piece in zip(rule.paths, rule.to_t5k(w)):
            _set(params, path, np.ascontiguousarray(piece))

    unused = []
    for norm, key in by_key.items():
        if norm in arrays or ignored(norm):
            continue
        if norm in aliases:
            target = aliases[norm]
            if not _same_array(_to_numpy(state_dict[key]), arrays[target]):
                raise ValueError(
                    f"state dict key {key!r} must equal {by_key[target]!r} (tied weights in this configuration), "
                    "but differs; an untied checkpoint needs a config with tie_embeddings=False"
                )
            continue
        unused.append(key)
    if unused:
        message = f"{len(unused)} state dict key(s) map to no t5k parameter: {sorted(unused)}"
        if strict:
            raise ValueError(message + " (pass strict=False to drop them with a warning)")
        warnings.warn(message)
    return _stack(params) if scan_layers else params


def _export(
    rules: List[_Rule], params: Mapping[str, Any], aliases: Mapping[str, str], prefix: str
) -> Dict[str, np.ndarray]:
    """The inverse of `_import`: t5k params (boxed or not, scanned or not) -> {HF key: float32 numpy array}."""
    params = _plain(nn.unbox(params))
    if set(params) == {"params"}:
        params = params["params"]
    flat = {path: _to_numpy(v) for path, v in _flatten(unstack_layer_params(params)).items()}
    expected = {path: shape for r in rules for path, shape in zip(r.paths, r.shapes)}
    missing = [p for p in expected if p not in flat]
    if missing:
        listing = ", ".join(f"{'/'.join(p)!r} (expected shape {expected[p]})" for p in missing)
        raise KeyError(f"{len(missing)} parameter(s) missing: {listing}")
    for path, shape in expected.items():
        if flat[path].shape != shape:
            raise ValueError(f"parameter {'/'.join(path)!r}: expected shape {shape}, got {flat[path].shape}")
    unexpected = sorted("/".join(p) for p in flat if p not in expected)
    if unexpected:
        raise ValueError(f"{len(unexpected)} parameter(s) map to no HF key in this configuration: {unexpected}")
    out = {}
    for rule in rules:
        out[prefix + rule.hf_key] = np.ascontiguousarray(rule.to_hf([flat[p] for p in rule.paths]))
    for alias, target in aliases.items():
        out[prefix + alias] = out[prefix + target].copy()
    return out


def _set(tree: Dict[str, Any], path: Path, value: np.ndarray):
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    if path[-1] in tree:
        raise AssertionError(f"two rules write {'/'.join(path)}")
    tree[path[-1]] = value


def _plain(tree: Any) -> Any:
    """Nested Mappings (FrozenDict included) -> nested dicts."""
    return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _flatten(tree: Mapping[str, Any], prefix: Path = ()) -> Dict[Path, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def save_params_npz(params: Mapping[str, Any], path: str) -> int:
    """Writes a param tree as one `.npz` with '/'-joined keys (a framework-neutral hand-off, e.g. between the
    processes of a benchmark); returns the number of parameters."""
    flat = {"/".join(k): np.asarray(v) for k, v in _flatten(params).items()}
    np.savez(path, **flat)
    return int(sum(v.size for v in flat.values()))


def load_params_npz(path: str) -> Dict[str, Any]:
    """The nested numpy param tree written by `save_params_npz`."""
    tree: Dict[str, Any] = {}
    with np.load(path) as archive:
        for key in archive.files:
            *parents, leaf = key.split("/")
            node = tree
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = archive[key]
    return tree


def _stack(params: Dict[str, Any]) -> Dict[str, Any]:
    """Unrolled -> scanned layout, as numpy (the layout of `stack_layer_params`)."""
    return jax.tree_util.tree_map(np.asarray, stack_layer_params(params))


def _get(hf_config: Any, name: str, default: Any = None) -> Any:
    if isinstance(hf_config, Mapping):
        return hf_config.get(name, default)
    return getattr(hf_config, name, default)


def _require(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


# ----------------------------------------------------------------------------------------------------------
# T5 / mT5


def t5_config_from_hf(hf_config: Any, **overrides) -> TransformerConfig:
    """A t5k config for a transformers `T5Config` / `MT5Config` (or its `to_dict()`); `overrides` win.

    Tying follows the logits HF computes: rescaled by d_model**-0.5 (T5.1.0) -> `tie_embeddings=True`;
    not rescaled (T5.1.1, mT5) -> a separate `logits_dense`.
    """
    proj = _get(hf_config, "feed_forward_proj", "relu")
    parts = proj.split("-")
    _require(len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated"), f"unsupported feed_forward_proj {proj!r}")
    act_name = "gelu_new" if proj == "gated-gelu" else parts[-1]  # HF's own backward-compatible special case
    _require(act_name in _ACT_FROM_HF, f"unsupported T5 activation {act_name!r}; known: {sorted(_ACT_FROM_HF)}")
    act = _ACT_FROM_HF[act_name]
    scale = _get(hf_config, "scale_decoder_outputs")
    if scale is None:  # transformers 4.x configs, dicts, and mT5 (which never rescales in transformers 5)
        scale = False if _get(hf_config, "model_type") == "mt5" else _get(hf_config, "tie_word_embeddings", True)
    num_layers = _get(hf_config, "num_layers")
    fields = dict(
        vocab_size=_get(hf_config, "vocab_size"),
        d_model=_get(hf_config, "d_model"),
        num_heads=_get(hf_config, "num_heads"),
        head_dim=_get(hf_config, "d_kv"),
        d_ff=_get(hf_config, "d_ff"),
        num_encoder_layers=num_layers,
        num_decoder_layers=_get(hf_config, "num_decoder_layers") or num_layers,
        mlp_activations=(act, "linear") if len(parts) == 2 else (act,),
        dropout_rate=float(_get(hf_config, "dropout_rate", 0.0)),
        norm="rms",
        norm_epsilon=float(_get(hf_config, "layer_norm_epsilon", 1e-6)),
        use_bias=False,
        position_embedding="relative",
        relative_attention_num_buckets=_get(hf_config, "relative_attention_num_buckets", 32),
        relative_attention_max_distance=_get(hf_config, "relative_attention_max_distance", 128),
        scale_attention_logits=False,
        tie_embeddings=bool(scale),
        embedding_stddev=1.0,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def t5_config_to_hf(config: TransformerConfig) -> Dict[str, Any]:
    """Keyword arguments for `transformers.T5Config` describing `config` (see the tying note above)."""
    _check_t5_config(config)
    acts = config.mlp_activations
    if len(acts) == 2:
        if acts[0] == "gelu":
            proj = "gated-gelu"  # HF reads this as gated gelu_new
        else:
            _require(acts[0] not in ("gelu_exact",), "HF T5 cannot express a gated exact-GELU MLP")
            proj = f"gated-{_ACT_TO_HF[acts[0]]}"
    else:
        proj = _ACT_TO_HF[acts[0]]
    return dict(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_kv=config.head_dim,
        d_ff=config.d_ff,
        num_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        dropout_rate=config.dropout_rate,
        layer_norm_epsilon=config.norm_epsilon,
        feed_forward_proj=proj,
        tie_word_embeddings=config.tie_embeddings,
    )


def _check_t5_config(config: TransformerConfig):
    _require(config.norm == "rms", f"HF T5 uses RMS norm; config.norm = {config.norm!r}")
    _require(not config.use_bias, "HF T5 has no biases; config.use_bias = True")
    _require(config.position_embedding == "relative", "HF T5 uses relative position biases")
    _require(not config.scale_attention_logits, "HF T5 does not scale attention logits at run time")
    _require(not config.shared_encoder_decoder, "HF T5 has separate encoder and decoder stacks")
    _require(len(config.mlp_activations) in (1, 2), f"HF T5 MLPs have 1 or 2 projections: {config.mlp_activations}")
    _require(len(config.mlp_activations) == 1 or config.mlp_activations[1] == "linear",
             f"HF T5 gated MLPs multiply by a linear projection: {config.mlp_activations}")


def _t5_rules(config: TransformerConfig) -> Tuple[List[_Rule], Dict[str, str]]:
    _check_t5_config(config)
    d, h, k, ff, vocab = config.d_model, config.num_heads, config.head_dim, config.d_ff, config.vocab_size
    wi_names = ["wi"] if len(config.mlp_activations) == 1 else ["wi_0", "wi_1"]
    rules = [_copy("shared.weight", ("token_embedder", "embedding"), (vocab, d))]

    def norm(hf: str, path: Path):
        rules.append(_copy(f"{hf}.layer_norm.weight", path + ("scale",), (d,)))

    def attention(hf: str, path: Path):
        for hf_name, name in zip("qkv", ("query", "key", "value")):
            rules.append(_linear(f"{hf}.{hf_name}.weight", path + (name, "kernel"), (d,), (h, k)))
        rules.append(_linear(f"{hf}.o.weight", path + ("out", "kernel"), (h, k), (d,)))

    def mlp(hf: str, path: Path):
        for name in wi_names:
            rules.append(_linear(f"{hf}.DenseReluDense.{name}.weight", path + ("mlp", name, "kernel"), (d,), (ff,)))
        rules.append(_linear(f"{hf}.DenseReluDense.wo.weight", path + ("mlp", "wo", "kernel"), (ff,), (d,)))

    for stack in ("encoder", "decoder"):
        rules.append(_transposed(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (stack, "relpos_bias", "rel_embedding"), (h, config.relative_attention_num_buckets),
        ))
    for i in range(config.num_encoder_layers):
        hf, path = f"encoder.block.{i}.layer", ("encoder", f"layers_{i}")
        norm(f"{hf}.0", path + ("pre_attention_norm",))
        attention(f"{hf}.0.SelfAttention", path + ("attention",))
        norm(f"{hf}.1", path + ("pre_mlp_norm",))
        mlp(f"{hf}.1", path)
    for i in range(config.num_decoder_layers):
        hf, path = f"decoder.block.{i}.layer", ("decoder", f"layers_{i}")
        norm(f"{hf}.0", path + ("pre_self_attention_norm",))
        attention(f"{hf}.0.SelfAttention", path + ("self_attention",))
        norm(f"{hf}.1", path + ("pre_cross_attention_norm",))
        attention(f"{hf}.1.EncDecAttention", path + ("encoder_decoder_attention",))
        norm(f"{hf}.2", path + ("pre_mlp_norm",))
        mlp(f"{hf}.2", path)
    for stack in ("encoder", "decoder"):
        rules.append(_copy(f"{stack}.final_layer_norm.weight", (stack, "final_norm", "scale"), (d,)))
    aliases = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    if config.tie_embeddings:
        aliases["lm_head.weight"] = "shared.weight"
    else:
        rules.append(_linear("lm_head.weight", ("decoder", "logits_dense", "kernel"), (d,), (vocab,)))
    return rules, aliases


_T5_IGNORED = {"decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}


def t5_params_from_hf(state_dict: Mapping[str, Any], config: TransformerConfig, strict: bool = True) -> Dict[str, Any]:
    """A `T5ForConditionalGeneration` / `MT5ForConditionalGeneration` state dict -> t5k `EncoderDecoder` params."""
    rules, aliases = _t5_rules(config)
    return _import(rules, state_dict, aliases, _T5_IGNORED.__contains__, lambda k: k, strict, config.scan_layers)


def t5_params_to_hf(params: Mapping[str, Any], config: TransformerConfig) -> Dict[str, np.ndarray]:
    """t5k `EncoderDecoder` params -> a `T5ForConditionalGeneration` state dict (float32 numpy, all keys).
    LoRA adapters are merged into their kernels first."""
    if config.lora_rank:
        params, config = lora.merge(params, config)
    rules, aliases = _t5_rules(config)
    return _export(rules, params, aliases, prefix="")


# ----------------------------------------------------------------------------------------------------------
# GPT-2


def gpt2_config_from_hf(hf_config: Any, **overrides) -> TransformerConfig:
    """A t5k decoder-only config for a transformers `GPT2Config` (or its `to_dict()`); `overrides` win."""
    _require(not _get(hf_config, "scale_attn_by_inverse_layer_idx", False),
             "scale_attn_by_inverse_layer_idx=True has no t5k equivalent")
    _require(not _get(hf_config, "add_cross_attention", False), "GPT-2 with cross-attention has no t5k equivalent")
    act_name = _get(hf_config, "activation_function", "gelu_new")
    _require(act_name in _ACT_FROM_HF, f"unsupported GPT-2 activation {act_name!r}; known: {sorted(_ACT_FROM_HF)}")
    d, n_head = _get(hf_config, "n_embd"), _get(hf_config, "n_head")
    _require(d % n_head == 0, f"n_embd={d} is not a multiple of n_head={n_head}")
    fields = dict(
        vocab_size=_get(hf_config, "vocab_size"),
        d_model=d,
        num_heads=n_head,
        head_dim=d // n_head,
        d_ff=_get(hf_config, "n_inner") or 4 * d,
        num_encoder_layers=0,
        num_decoder_layers=_get(hf_config, "n_layer"),
        mlp_activations=(_ACT_FROM_HF[act_name],),
        dropout_rate=float(_get(hf_config, "resid_pdrop", 0.0)),
        norm="layer",
        norm_epsilon=float(_get(hf_config, "layer_norm_epsilon", 1e-5)),
        use_bias=True,
        position_embedding="absolute",
        max_length=_get(hf_config, "n_positions"),
        scale_attention_logits=bool(_get(hf_config, "scale_attn_weights", True)),
        tie_embeddings=bool(_get(hf_config, "tie_word_embeddings", True)),
        embedding_stddev=float(_get(hf_config, "initializer_range", 0.02)),
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def gpt2_config_to_hf(config: TransformerConfig) -> Dict[str, Any]:
    """Keyword arguments for `transformers.GPT2Config` describing `config`."""
    _check_gpt2_config(config)
    return dict(
        vocab_size=config.vocab_size,
        n_positions=config.max_length,
        n_embd=config.d_model,
        n_layer=config.num_decoder_layers,
        n_head=config.num_heads,
        n_inner=config.d_ff,
        activation_function=_ACT_TO_HF[config.mlp_activations[0]],
        resid_pdrop=config.dropout_rate,
        embd_pdrop=config.dropout_rate,
        attn_pdrop=config.dropout_rate,
        layer_norm_epsilon=config.norm_epsilon,
        scale_attn_weights=config.scale_attention_logits,
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.embedding_stddev,
    )


def _check_gpt2_config(config: TransformerConfig):
    _require(config.norm == "layer", f"GPT-2 uses LayerNorm; config.norm = {config.norm!r}")
    _require(config.use_bias, "GPT-2 has biases; config.use_bias = False")
    _require(config.position_embedding == "absolute", "GPT-2 uses learned absolute positions")
    _require(len(config.mlp_activations) == 1, f"GPT-2 MLPs are not gated: {config.mlp_activations}")
    _require(config.d_model == config.num_heads * config.head_dim, "GPT-2 needs d_model == num_heads * head_dim")


def _gpt2_rules(config: TransformerConfig) -> Tuple[List[_Rule], Dict[str, str]]:
    _check_gpt2_config(config)
    d, h, k, ff, vocab = config.d_model, config.num_heads, config.head_dim, config.d_ff, config.vocab_size
    rules = [
        _copy("wte.weight", ("token_embedder", "embedding"), (vocab, d)),
        _copy("wpe.weight", ("position_embedder", "embedding"), (config.max_length, d)),
    ]

    def layer_norm(hf: str, path: Path):
        rules.append(_copy(f"{hf}.weight", path + ("scale",), (d,)))
        rules.append(_copy(f"{hf}.bias", path + ("bias",), (d,)))

    for i in range(config.num_decoder_layers):
        hf, path = f"h.{i}", (f"layers_{i}",)
        attn = path + ("self_attention",)
        qkv = [attn + (name,) for name in ("query", "key", "value")]
        layer_norm(f"{hf}.ln_1", path + ("pre_self_attention_norm",))
        rules.append(_split(f"{hf}.attn.c_attn.weight", (d, 3 * d), 1, [p + ("kernel",) for p in qkv], (d, h, k)))
        rules.append(_split(f"{hf}.attn.c_attn.bias", (3 * d,), 0, [p + ("bias",) for p in qkv], (h, k)))
        rules.append(_reshaped(f"{hf}.attn.c_proj.weight", (d, d), attn + ("out", "kernel"), (h, k, d)))
        rules.append(_copy(f"{hf}.attn.c_proj.bias", attn + ("out", "bias"), (d,)))
        layer_norm(f"{hf}.ln_2", path + ("pre_mlp_norm",))
        rules.append(_copy(f"{hf}.mlp.c_fc.weight", path + ("mlp", "wi", "kernel"), (d, ff)))
        rules.append(_copy(f"{hf}.mlp.c_fc.bias", path + ("mlp", "wi", "bias"), (ff,)))
        rules.append(_copy(f"{hf}.mlp.c_proj.weight", path + ("mlp", "wo", "kernel"), (ff, d)))
        rules.append(_copy(f"{hf}.mlp.c_proj.bias", path + ("mlp", "wo", "bias"), (d,)))
    layer_norm("ln_f", ("final_norm",))
    aliases = {}
    if config.tie_embeddings:
        aliases["lm_head.weight"] = "wte.weight"
    else:
        rules.append(_linear("lm_head.weight", ("logits_dense", "kernel"), (d,), (vocab,)))
    return rules, aliases


_GPT2_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of older checkpoints


def _gpt2_normalize(key: str) -> str:
    return key[len("transformer."):] if key.startswith("transformer.") else key


def gpt2_params_from_hf(
    state_dict: Mapping[str, Any], config: TransformerConfig, strict: bool = True
) -> Dict[str, Any]:
    """A `GPT2LMHeadModel` (or bare `GPT2Model`) state dict -> t5k `DecoderOnly` params."""
    rules, aliases = _gpt2_rules(config)
    return _import(rules, state_dict, aliases, lambda k: bool(_GPT2_BUFFER.match(k)), _gpt2_normalize, strict,
                   config.scan_layers)


def gpt2_params_to_hf(params: Mapping[str, Any], config: TransformerConfig) -> Dict[str, np.ndarray]:
    """t5k `DecoderOnly` params -> a `GPT2LMHeadModel` state dict (float32 numpy, `transformer.` prefixed).
    LoRA adapters are merged into their kernels first."""
    if config.lora_rank:
        params, config = lora.merge(params, config)
    rules, aliases = _gpt2_rules(config)
    # lm_head lives outside `transformer.`; the prefix is applied to the rest.
    out = _export(rules, params, {}, prefix="transformer.")
    if "transformer.lm_head.weight" in out:
        out["lm_head.weight"] = out.pop("transformer.lm_head.weight")
    for alias, target in aliases.items():
        out[alias] = out["transformer." + target].copy()
    return out
