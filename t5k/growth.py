"""Model growth (Ko-bert2BERT, seed 004): a trained small model's parameters initialise a wider and deeper one.

Width: d_model, heads and d_ff grow; head_dim, the vocabulary and the block style stay. Every parameter dimension
carries a logical name, and the name says how it grows. A grown axis (`embed`, `heads`, `mlp`) of size n → n'
keeps its n units and appends copies: unit j' copies unit j' mod n. A kernel's input axis (its first: `embed` of
query/key/value, wi and the logits; `heads` of the attention output; `mlp` of wo) also divides each copied unit's
weights by its number of copies, so the products sum to what they summed before.

- **FPI** (function preserving initialisation, Net2Net): the rule above, everywhere. Every residual-stream vector
  of the grown model is the old one with its units copied, every head's attention is an old head's, every MLP
  unit an old unit. The grown model computes the same function: exactly for the attention heads and the MLP
  width, and for d_model when it grows by a whole multiple. Then each unit is copied equally often, and RMSNorm
  and LayerNorm see the same mean and variance; for other widths the norms' statistics shift. Untied output
  embeddings are required: a tied table cannot both copy (lookup) and divide (logits).
- **AKI** (advanced knowledge initialisation): as FPI, but inside layer l the appended output units come from
  layer l+1's parameters (the top layer uses its own). Neighbouring layers hold similar functions, so the new
  units start useful while breaking the copies' symmetry; the function is no longer preserved.

Depth: StackBERT's progressive stacking. Grown layer i is a copy of (width-grown) layer i mod L, for the encoder
and the decoder separately. Growing depth does not preserve the function.

`t5k grow` writes the grown parameters as a checkpoint that `train.init_checkpoint` starts from (docs/training.md).
"""

import dataclasses
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import numpy as np

from t5k.models import abstract_params
from t5k.optim import path_str
from t5k.models.config import TransformerConfig
from t5k.models.stack import LAYER_KEY, stack_layer_params, unstack_layer_params

METHODS = ("fpi", "aki")
GROWN_AXES = {"embed": "d_model", "heads": "num_heads", "mlp": "d_ff"}
# What growth may change; everything else in the two configs must agree. Run-time settings are free.
GROWN_FIELDS = ("d_model", "num_heads", "d_ff", "num_encoder_layers", "num_decoder_layers")
RUN_TIME_FIELDS = ("dtype", "dropout_rate", "scan_layers", "remat_policy", "fuse_projections")


class GrowthError(ValueError):
    """A growth that cannot be done; the message names the config field or parameter."""


def grow(model: nn.Module, params: Any, target: TransformerConfig, method: str = "fpi") -> Dict[str, Any]:
    """The parameters of `type(model)(target)` grown from `model`'s `params` (see the module docstring)."""
    source = model.config
    check_growth(source, target, method)
    names = _logical_names(type(model)(source.replace(scan_layers=False)))
    params = unstack_layer_params(_plain(nn.unbox(params)))
    differing = sorted(set(_flatten(params)) ^ set(names))
    if differing:
        raise GrowthError(f"grow: the parameters do not match the source config (differing paths: {differing[:4]})")
    maps = {axis: copy_map(getattr(source, field), getattr(target, field)) for axis, field in GROWN_AXES.items()}
    wide = _map_tree(params, lambda path, x: _widen(x, names[path], path, maps))
    if method == "aki":
        wide = _borrow_from_next_layer(wide, names, maps)
    grown = _deepen(wide, target)
    return stack_layer_params(grown) if target.scan_layers else grown


def check_growth(source: TransformerConfig, target: TransformerConfig, method: str) -> None:
    if method not in METHODS:
        raise GrowthError(f"grow: method {method!r}; expected one of {METHODS}")
    for field in GROWN_FIELDS:
        if getattr(target, field) < getattr(source, field):
            raise GrowthError(f"grow: TransformerConfig.{field} {getattr(source, field)} -> {getattr(target, field)}; "
                              "growth only adds units and layers")
    fixed = [f.name for f in dataclasses.fields(TransformerConfig) if f.name not in GROWN_FIELDS + RUN_TIME_FIELDS]
    differ = [f"{name} {getattr(source, name)!r} -> {getattr(target, name)!r}" for name in fixed
              if getattr(source, name) != getattr(target, name)]
    if differ:
        raise GrowthError(f"grow: TransformerConfig fields other than {', '.join(GROWN_FIELDS)} must agree: "
                          f"{'; '.join(differ)}")
    if source.tie_embeddings and target.d_model != source.d_model:
        raise GrowthError("grow: a tied embedding table cannot grow d_model function-preservingly (its lookup copies "
                          "units, its logits would need them divided); untie the embeddings")
    if source.lora_rank or source.prompt_length:
        raise GrowthError("grow: merge the LoRA adapters (t5k.models.lora.merge) or drop the virtual prompt first")
    if source.shared_encoder_decoder:
        raise GrowthError("grow: shared_encoder_decoder models are not supported")


def copy_map(old: int, new: int) -> Tuple[np.ndarray, np.ndarray]:
    """(source unit of each of the `new` units, how many units copy each of the `old` units): j -> j mod old."""
    source = np.arange(new) % old
    return source, np.bincount(source, minlength=old)


def _widen(x: jax.Array, names: Tuple[str, ...], path: str, maps) -> np.ndarray:
    """One parameter, every grown axis copied; the input axis of a kernel (its first) divided by the counts."""
    out = np.asarray(x, np.float32)
    for axis, name in enumerate(names):
        if name not in maps:
            continue
        source, counts = maps[name]
        if out.shape[axis] != len(counts):
            raise GrowthError(f"grow: {path} has {out.shape[axis]} units along {name!r}, the config {len(counts)}")
        if axis == 0 and path.endswith("/kernel"):
            out = out / _along(counts, axis, out.ndim)
        out = np.take(out, source, axis=axis)
    return out


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    return values.reshape([-1 if i == axis else 1 for i in range(ndim)])


def _borrow_from_next_layer(wide: Dict[str, Any], names: Dict[str, Tuple[str, ...]], maps) -> Dict[str, Any]:
    """AKI: in every layer, the appended units of each grown output axis are taken from the next layer."""
    flat = _flatten(wide)

    def borrow(path, x):
        parts = path.split("/")
        layer = next((i for i, part in enumerate(parts) if LAYER_KEY.match(part)), None)
        if layer is None:
            return x
        index = int(LAYER_KEY.match(parts[layer]).group(1))
        upper = "/".join(parts[:layer] + [f"layers_{index + 1}"] + parts[layer + 1:])
        if upper not in flat:
            return x  # the top layer keeps its own
        out = np.array(x)
        for axis, name in enumerate(names[path]):
            is_input = axis == 0 and path.endswith("/kernel")
            if name in maps and not is_input:
                appended = np.arange(len(maps[name][0])) >= len(maps[name][1])
                mask = np.broadcast_to(_along(appended, axis, out.ndim), out.shape)
                out = np.where(mask, flat[upper], out)
        return out

    return _map_tree(wide, borrow)


def _deepen(tree: Dict[str, Any], target: TransformerConfig) -> Dict[str, Any]:
    """Progressive stacking: each stack's layer i is its layer i mod L (encoder and decoder stacks separately)."""
    def deepen(node, key):
        if not isinstance(node, dict):
            return node
        layers = sorted(int(m.group(1)) for k in node if (m := LAYER_KEY.match(k)))
        out = {k: deepen(v, k) for k, v in node.items() if not LAYER_KEY.match(k)}
        if layers:
            wanted = target.num_encoder_layers if key == "encoder" else target.num_decoder_layers
            for i in range(wanted):
                out[f"layers_{i}"] = node[f"layers_{i % len(layers)}"]
        return out

    return deepen(tree, "")


def _logical_names(model) -> Dict[str, Tuple[str, ...]]:
    boxed = abstract_params(model)
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return {path_str(p): tuple(leaf.names) for p, leaf in leaves}


def _flatten(tree) -> Dict[str, Any]:
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _map_tree(tree, fn):
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def _plain(tree):
    """Orbax/flax containers as plain dicts."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


# ------------------------------------------------------------------------------------------------ t5k grow


def configure_parser(parser) -> None:
    from t5k import gin_utils

    gin_utils.add_gin_arguments(parser)  # the grown model: a gin model file (+ --gin.X=Y)
    parser.add_argument("--checkpoint", required=True,
                        help="the trained source: a `t5k train` model_dir, its checkpoints/ or a step directory")
    parser.add_argument("--step", type=int, default=None, help="the source step (default: the newest)")
    parser.add_argument("--out", required=True, help="where the grown checkpoint goes (OUT/checkpoints/0)")
    parser.add_argument("--method", choices=METHODS, default="fpi", help="width growth: fpi (default) or aki")


def run(args, bindings=()) -> int:
    """Grows the source checkpoint into the gin model; prints the two parameter counts and one JSON line."""
    import json
    import os
    import sys

    import orbax.checkpoint as ocp

    from t5k import checkpoints, cli, gin_utils, records
    from t5k.models import build_model

    try:
        gin_utils.parse_gin(args.gin_file, bindings, args.gin_search_path)
        target_model = build_model()
        source_dir = checkpoints.checkpoint_directory(args.checkpoint)
        architecture, fields = records.read_model(source_dir)
        if architecture != type(target_model).__name__:
            raise GrowthError(f"grow: the checkpoint holds a {architecture}, the gin model is a "
                              f"{type(target_model).__name__}")
        source_model = type(target_model)(config_from_record(fields))
        out_dir = os.path.join(args.out, "checkpoints")
        if records.has_steps(out_dir):
            raise GrowthError(f"grow: {out_dir} already holds checkpoints; choose another --out")
        abstract = nn.unbox(abstract_params(source_model))  # ShapeDtypeStructs: nothing allocated
        params = checkpoints.restore_params(source_dir, abstract, step=args.step)
        grown = grow(source_model, params, target_model.config, args.method)
    except (gin_utils.GinConfigError, ValueError, KeyError, FileNotFoundError, TypeError) as e:
        print(cli.error_line("grow", e), file=sys.stderr)
        return 2
    manager = ocp.CheckpointManager(os.path.abspath(out_dir), options=ocp.CheckpointManagerOptions(create=True))
    manager.save(0, args=ocp.args.StandardSave({"params": grown}))  # a temporary directory, renamed when complete
    manager.wait_until_finished()
    records.write_grown(out_dir, source_dir, target_model)
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))  # noqa: E731
    summary = {"method": args.method, "source_params": count(params), "grown_params": count(grown),
               "checkpoint": os.path.abspath(out_dir)}
    print(f"t5k grow: {summary['source_params']:,d} -> {summary['grown_params']:,d} parameters ({args.method}), "
          f"written to {summary['checkpoint']}; start from it with --gin.train.init_checkpoint")
    print(json.dumps(summary))
    return 0


def config_from_record(fields: dict) -> TransformerConfig:
    """The TransformerConfig of a model record (lists back to tuples; fields this version lacks are refused)."""
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise GrowthError(f"grow: the model record has fields this t5k does not know: {unknown}")
    return TransformerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
