"""Orbax checkpoints of the TrainState: async, keep-last-K, atomic, restorable onto any mesh.

Atomicity comes from Orbax: a step is written to a temporary directory and renamed when complete, so a crash
mid-save leaves the previous checkpoint as the latest restorable one. Restoring takes an *abstract* target
(shapes, dtypes and the shardings of the current mesh), which is how a checkpoint written on a 4×2 mesh is
read onto 1 or 2 devices (HyperCLOVA's "checkpoint merge"), with no conversion step.
"""

import logging
import math
import os
import re
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import gin
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from t5k.models.stack import LAYER_KEY

_log = logging.getLogger(__name__)


@gin.configurable
def checkpoint_manager(directory: str, save_interval_steps: int = 1000, max_to_keep: Optional[int] = 3,
                       async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps, max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> bool:
    return manager.save(step, args=ocp.args.StandardSave(state), force=force)


class CheckpointMismatchError(ValueError):
    """A checkpoint whose stored tree differs from the state it is restored into; the message names the paths."""


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: Optional[int] = None) -> Any:
    """Restores `step` (default: the latest) onto the shardings carried by `abstract_state`.

    A checkpoint that differs from the state only in its layer layout (written with the other
    `TransformerConfig.scan_layers`) is converted while it is read: every parameter *and* optimizer-state leaf is
    sliced out of, or stacked from, its counterpart (see `_layer_layout_plan`), so a run resumes exactly where it
    stopped with the other layout. Raises CheckpointMismatchError (see `check_restorable`) for any other tree."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    item_dir = _latest_step_dir(str(manager.directory), step)
    try:
        check_restorable(item_dir, abstract_state)
    except CheckpointMismatchError:
        tree = _read_metadata(item_dir)
        stored = _stored_leaves(tree)
        plan = _layer_layout_plan(stored, abstract_state)
        if plan is None:
            raise
        _log.info("checkpoint %s: layer layout converted (scanned <-> unrolled) while restoring", item_dir)
        leaves = _restore_planned(item_dir, (), stored, plan, _flatten(abstract_state), {}, tree)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract_state), leaves)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def check_restorable(item_dir: str, abstract_state: Any, examples: int = 2) -> None:
    """Compares the leaf paths and shapes stored in `item_dir` with `abstract_state` (metadata only).

    Orbax reports a mismatch as "tree structures do not match" without saying where. This names the leaves
    missing from the checkpoint, the ones it has beyond the state, and the ones with other shapes, and says which
    part differs: `params` (the checkpoint was written by another model configuration) or only `opt_state` (by
    another optimizer, or by a t5k whose optimizer state had another layout), with the way out for each.
    """
    stored = {path: tuple(leaf.shape) for path, leaf in _stored_leaves(_read_metadata(item_dir)).items()}
    target = {path: tuple(leaf.shape) for path, leaf in _flatten(abstract_state).items()}
    missing = [p for p in target if p not in stored]
    unexpected = [p for p in stored if p not in target]
    reshaped = [p for p in target if p in stored and stored[p] != target[p]]
    if not (missing or unexpected or reshaped):
        return
    found = []
    if missing:
        found.append(f"{len(missing)} leaves of the state are not in it (e.g. {', '.join(missing[:examples])})")
    if unexpected:
        found.append(f"it has {len(unexpected)} leaves the state lacks (e.g. {', '.join(unexpected[:examples])})")
    if reshaped:
        found.append(f"{len(reshaped)} leaves differ in shape (e.g. "
                     + ", ".join(f"{p} {stored[p]} in it vs {target[p]}" for p in reshaped[:examples]) + ")")
    if any(p.split("/", 1)[0] == "params" for p in missing + unexpected + reshaped):
        cause = "its parameters belong to another model configuration; restore with that configuration"
        stored_stacked, target_stacked = _stacks_layers(unexpected), _stacks_layers(missing)
        if None not in (stored_stacked, target_stacked) and stored_stacked != target_stacked:
            cause += f" (it was written with TransformerConfig.scan_layers = {stored_stacked})"
    else:
        cause = ("only the optimizer state differs (another optimizer, or an earlier t5k's optimizer-state layout); "
                 "to keep the parameters, train in a new model_dir with train.init_checkpoint set to this one")
    raise CheckpointMismatchError(f"checkpoint {item_dir} does not match this run's state: {'; '.join(found)}. "
                                  f"{cause[0].upper()}{cause[1:]}")


def _stacks_layers(paths) -> Optional[bool]:
    """Whether parameter paths use the scanned layout (`…/layers/…`: True), the unrolled one (`…/layers_3/…`:
    False), or neither (None)."""
    parts = {part for path in paths if path.startswith("params/") for part in path.split("/")}
    if "layers" in parts:
        return True
    return False if any(LAYER_KEY.match(part) for part in parts) else None


def _is_array(leaf) -> bool:
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def checkpoint_directory(path: str) -> str:
    """The checkpoint manager directory for `path`: a `t5k train` model_dir's `checkpoints/` subdirectory, or
    `path` itself (a manager directory or a step directory)."""
    nested = os.path.join(path, "checkpoints")
    return nested if os.path.isdir(nested) else path


# ------------------------------------------------------------------------------------------------ partial restore


def _latest_step_dir(directory: str, step: Optional[int]) -> str:
    """The item directory of `step` (default: the newest committed step) under a manager's `directory`.

    Also accepts a step directory or the item directory itself (the one holding the array files)."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"restore_params: no checkpoint directory {directory}")
    steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit())
    if steps:
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"restore_params: no step {step} in {directory} (steps: {steps})")
        directory = os.path.join(directory, str(step))
    elif step is not None and os.path.basename(directory) != str(step):
        raise FileNotFoundError(f"restore_params: no step {step} in {directory}")
    item = os.path.join(directory, "default")
    return item if os.path.isdir(item) else directory


def _flatten(tree: Any, is_leaf=None) -> Dict[str, Any]:
    """{'a/b/c': leaf} of a nested tree (dict keys, sequence indices, dataclass fields)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {_path_str(path): leaf for path, leaf in flat}


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _nest(flat: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return out


def _compile_map(assignment_map) -> List[Tuple[re.Pattern, Optional[str]]]:
    if assignment_map is None:
        return []
    items = assignment_map.items() if isinstance(assignment_map, Mapping) else assignment_map
    return [(re.compile(pattern), replacement) for pattern, replacement in items]


def _source_of(path: str, rules) -> Tuple[Optional[str], bool]:
    """(source path or None, whether a rule matched) for a target path: the first rule whose regex matches the
    whole path wins; its replacement may use groups (`\\1`, `\\g<name>`)."""
    for pattern, replacement in rules:
        match = pattern.fullmatch(path)
        if match:
            return (None if replacement is None else match.expand(replacement)), True
    return path, False


def checkpoint_param_shapes(directory: str, step: Optional[int] = None) -> Dict[str, Tuple[Tuple[int, ...], Any]]:
    """{'encoder/layers_0/mlp/wi_0/kernel': (shape, dtype)} of the parameters stored in a checkpoint (the
    `params` subtree of a TrainState checkpoint, or the whole tree of a parameters-only one); reads metadata only."""
    _, stored = _stored_params(_latest_step_dir(directory, step))
    return {k: (tuple(v.shape), v.dtype) for k, v in stored.items()}


def _read_metadata(item_dir: str) -> Dict[str, Any]:
    from etils import epath

    metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(os.path.abspath(item_dir)))
    return metadata.tree if hasattr(metadata, "tree") else metadata


def _stored_leaves(tree: Any) -> Dict[str, Any]:
    """{path: ArrayMetadata} of every array in a stored metadata tree (`_read_metadata`)."""
    return {path: leaf for path, leaf in _flatten(tree, is_leaf=_is_array).items() if _is_array(leaf)}


def _stored_params(item_dir: str) -> Tuple[Tuple[str, ...], Dict[str, Any]]:
    """(prefix of the params subtree in the stored tree, {relative path: ArrayMetadata})."""
    tree = _read_metadata(item_dir)
    prefix: Tuple[str, ...] = ("params",) if isinstance(tree, Mapping) and "params" in tree else ()
    sub = tree["params"] if prefix else tree
    flat = _flatten(sub, is_leaf=_is_array)
    return prefix, {k: v for k, v in flat.items() if hasattr(v, "shape")}


def restore_params(directory: str, abstract_params: Any, step: Optional[int] = None,
                   assignment_map=None, fallback: Any = None) -> Any:
    """Restores parameters into the structure, dtypes and shardings of `abstract_params`, renaming and skipping
    by regex (t5x's `assignment_map` for partial restore / fine-tuning from a different architecture).

    directory: a checkpoint manager's directory (the newest step unless `step`), a step directory, or the item
      directory. TrainState checkpoints contribute their `params` subtree; only those leaves are read.
    abstract_params: the target tree: `jax.ShapeDtypeStruct`s (with `sharding` to restore straight onto a mesh,
      e.g. `trainer.abstract_state(...).params`) or arrays. Paths are '/'-joined keys,
      e.g. 'encoder/layers_0/mlp/wi_0/kernel'.
    assignment_map: ordered `(regex, source)` pairs (or a dict). The first regex that matches a whole target path
      decides: `source` is the checkpoint path to read (may use the regex's groups, e.g.
      `(r'decoder/(.*)', r'encoder/\\1')`), or None to keep `fallback`'s value. Targets no rule matches are read
      from the same path.
    fallback: a tree like `abstract_params` with real values (e.g. freshly initialised parameters) for the targets
      mapped to None.

    Layer layouts need no map: a source missing as such but present in the other layout (stacked `…/layers/…`,
    the `nn.scan`-ned stack of `TransformerConfig.scan_layers`, vs unrolled `…/layers_0/…`, `…/layers_1/…`) is
    sliced out of, or stacked from, the checkpoint's leaves.

    Raises KeyError naming the target and source path when the checkpoint lacks a source (or no fallback value
    exists), and ValueError naming both when shapes differ.
    """
    item_dir = _latest_step_dir(directory, step)
    prefix, stored = _stored_params(item_dir)
    rules = _compile_map(assignment_map)
    targets = _flatten(abstract_params)
    fallbacks = _flatten(fallback) if fallback is not None else {}
    plan: Dict[str, Optional[_Recipe]] = {}
    for path, target in targets.items():
        source, matched = _source_of(path, rules)
        if source is None:
            if path not in fallbacks:
                raise KeyError(f"restore_params: {path!r} is mapped to None (keep the fallback) but `fallback` has "
                               "no value for it")
            plan[path] = None
            continue
        recipe = _Recipe("copy", (source,)) if source in stored else _other_layer_layout(source, stored)
        if recipe is None:
            how = f"mapped to {source!r}" if matched else "read from the same path (no assignment_map rule matched)"
            near = [p for p in stored if p.rsplit("/", 1)[-1] == path.rsplit("/", 1)[-1]][:3]
            raise KeyError(f"restore_params: target {path!r} is {how}, but the checkpoint in {item_dir} has no "
                           f"parameter {source!r}" + (f" (similar: {near})" if near else "")
                           + "; map it to None in assignment_map to keep a fresh value")
        if recipe.shape(stored) != tuple(target.shape):
            raise ValueError(f"restore_params: target {path!r} has shape {tuple(target.shape)} but its source "
                             f"{recipe.describe(stored)} in the checkpoint has shape {recipe.shape(stored)}")
        plan[path] = recipe

    leaves = _restore_planned(item_dir, prefix, stored, plan, targets, fallbacks)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract_params), leaves)


def _restore_planned(item_dir: str, prefix: Tuple[str, ...], stored, plan: Dict[str, Optional["_Recipe"]],
                     targets: Dict[str, Any], fallbacks: Dict[str, Any], tree: Any = None) -> List[Any]:
    """The leaves of `targets` (in order) built by their recipes from the arrays under `prefix` in `item_dir`
    (None: the fallback value), each on its target's sharding. With `tree` (the stored metadata tree, whose
    structure Orbax then restores: it may hold lists), the plan reads every stored array; without it, only the
    arrays the plan needs are read, from the dicts under `prefix` (empty for a parameters-only checkpoint)."""
    # Read every needed source once, onto the sharding of the first target that uses it (with the layer axis
    # replicated when the source and the target stack their layers differently).
    read: Dict[str, Any] = {}
    for path, recipe in plan.items():
        for source in (recipe.sources if recipe else ()):
            if source not in read:
                shape = tuple(stored[source].shape)
                read[source] = jax.ShapeDtypeStruct(shape, targets[path].dtype,
                                                    sharding=_source_sharding(targets[path], len(shape)))
    values: Dict[str, Any] = {}
    if read:
        if tree is None:  # a tree of dicts: restore just the leaves read
            item, partial = _nest({"/".join(prefix + (k,)): v for k, v in read.items()}), True
        else:  # the whole stored tree, its sequences kept as stored
            item = jax.tree_util.tree_map_with_path(lambda key_path, _: read[_path_str(key_path)], tree,
                                                    is_leaf=_is_array)
            partial = False
        restored = ocp.PyTreeCheckpointer().restore(
            item_dir,
            args=ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                        partial_restore=partial),
        )
        values = _flatten(restored[prefix[0]] if prefix else restored)

    returned = set()

    def leaf(path):
        target = targets[path]
        value = fallbacks[path] if plan[path] is None else plan[path].build(values)
        sharding = getattr(target, "sharding", None)
        if sharding is not None and getattr(value, "sharding", None) != sharding:
            value = jax.device_put(value, sharding)
        if id(value) in returned:  # one source copied to several targets: give each its own buffer, so the
            value = jnp.copy(value)  # tree can be donated (a buffer donated twice is an error)
        returned.add(id(value))
        return value

    return [leaf(path) for path in targets]



class _Recipe(NamedTuple):
    """How a target leaf is made from checkpoint leaves: `copy` one, `slice` layer `index` out of a stacked
    (`nn.scan`-ned, `layers/...` with a leading layer axis) one, `stack` the per-layer (`layers_0/...`, …) ones,
    or `reshape` a one-element placeholder (Adafactor's `[1, …, 1]` slot of a statistic a parameter does not
    keep; the per-layer ones all hold the same value) to the target's rank, one more or one less in the other
    layer layout."""

    kind: str
    sources: Tuple[str, ...]
    index: int = 0  # `slice`: the layer; `reshape`: the target's rank

    def shape(self, stored) -> Tuple[int, ...]:
        first = tuple(stored[self.sources[0]].shape)
        if self.kind == "reshape":
            return (1,) * self.index
        if self.kind == "slice":
            return first[1:]
        if self.kind == "stack":
            return (len(self.sources),) + first
        return first

    def describe(self, stored) -> str:
        if self.kind == "slice":
            return f"{self.sources[0]!r}[{self.index}] (of {tuple(stored[self.sources[0]].shape)})"
        if self.kind == "stack":
            return f"{self.sources[0]!r} … {self.sources[-1]!r} stacked"
        if self.kind == "reshape":
            return f"{self.sources[0]!r} reshaped to rank {self.index}"
        return repr(self.sources[0])

    def build(self, values):
        if self.kind == "slice":
            return values[self.sources[0]][self.index]
        if self.kind == "reshape":
            return jnp.reshape(values[self.sources[0]], (1,) * self.index)
        if self.kind == "stack":
            return jnp.stack([values[source] for source in self.sources])
        return values[self.sources[0]]


def _other_layer_layout(source: str, stored, placeholders: bool = False) -> Optional[_Recipe]:
    """`source` from a checkpoint that stacks its layers the other way: an unrolled `…/layers_3/…` read from the
    scanned `…/layers/…` (layer 3 of its leading axis), or a scanned `…/layers/…` from `…/layers_0/…`,
    `…/layers_1/…`, … . So a model trained with `TransformerConfig.scan_layers` loads unrolled, and back.
    With `placeholders`, a one-element stacked leaf (an optimizer placeholder, not stacked) serves every layer."""
    parts = source.split("/")
    for j, part in enumerate(parts):
        match = LAYER_KEY.match(part)
        if match:
            stacked = "/".join(parts[:j] + ["layers"] + parts[j + 1:])
            if stacked in stored and (int(match.group(1)) < stored[stacked].shape[0]
                                      or (placeholders and math.prod(stored[stacked].shape) == 1)):
                return _Recipe("slice", (stacked,), int(match.group(1)))
        elif part == "layers":
            per_layer = []
            while (candidate := "/".join(parts[:j] + [f"layers_{len(per_layer)}"] + parts[j + 1:])) in stored:
                per_layer.append(candidate)
            if per_layer:
                return _Recipe("stack", tuple(per_layer))
    return None


def _layer_layout_plan(stored: Dict[str, Any], abstract_state: Any) -> Optional[Dict[str, _Recipe]]:
    """A recipe for every leaf of `abstract_state` (parameters and optimizer state alike) from a checkpoint that
    stores the same tree in the other layer layout; None when anything else differs.

    Per-layer statistics follow their parameter (Adafactor keeps each statistic at its parameter's rank and treats
    the `layers` axis as a batch of matrices, so slicing or stacking the state is exactly the state the other
    layout would have built), one-element placeholders are reshaped, and every stored leaf must be used, every
    layer of a stacked leaf included: a checkpoint of a deeper or shallower model is not a layout change."""
    plan: Dict[str, _Recipe] = {}
    for path, target in _flatten(abstract_state).items():
        shape = tuple(target.shape)
        recipe = _Recipe("copy", (path,)) if path in stored else _other_layer_layout(path, stored, placeholders=True)
        if recipe is None:
            return None
        if recipe.kind != "copy" and math.prod(shape) == 1 and all(
                math.prod(stored[source].shape) == 1 for source in recipe.sources):
            recipe = _Recipe("reshape", recipe.sources, len(shape))
        if recipe.shape(stored) != shape:
            return None
        plan[path] = recipe
    used = {source for recipe in plan.values() for source in recipe.sources}
    sliced = {}
    for recipe in plan.values():
        if recipe.kind == "slice":
            sliced.setdefault(recipe.sources[0], set()).add(recipe.index)
    whole = all(indices == set(range(stored[source].shape[0])) for source, indices in sliced.items())
    return plan if whole and used == set(stored) else None


def _source_sharding(target, rank: int):
    """Where a source leaf of rank `rank` is read for `target`: the target's own sharding when the ranks agree;
    for a stacked source of a per-layer target, that sharding with a replicated leading layer axis; for a
    per-layer source of a stacked target, the target's sharding without its layer axis. One device otherwise."""
    sharding = getattr(target, "sharding", None)
    target_rank = len(target.shape)
    if sharding is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if rank == target_rank:
        return sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    spec = tuple(sharding.spec) + (None,) * (target_rank - len(sharding.spec))
    spec = (None,) + spec if rank == target_rank + 1 else spec[1:]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
