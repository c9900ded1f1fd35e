"""Device meshes and the logical-axis rules that map parameter/activation names onto them.

Models name every dimension logically (`embed`, `mlp`, `heads`, …); a rule list maps each logical name to a
mesh axis (or to None = replicated). Changing parallelism is changing the rules (in gin), never the model.

Rules are ordered: for each logical dimension flax takes the first rule whose mesh axis is not already used by
another dimension of the same array. That is how FSDP works below: parameters `[embed, mlp]` map embed→data,
while an activation `[batch, length, embed]` has already spent `data` on `batch`, so its `embed` falls through
to the next rule, `embed → None`.
"""

import contextlib
from typing import Any, List, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

LogicalRules = List[Tuple[str, Optional[str]]]

# The mesh axes t5k knows: `data` (batch; FSDP parameter shards) and `model` (tensor parallelism).
MESH_AXES = ("data", "model")


def _standard_rules() -> LogicalRules:
    """t5x's standard 1-D rules: batch over `data`, the wide parameter dims over `model`.

    - batch → data: data parallelism; each data shard sees its own examples.
    - vocab, mlp, heads, joined_kv → model: Megatron-style tensor parallelism. Attention splits by heads (no
      communication inside attention), the MLP splits its hidden dim (one all-reduce after `wo`), the
      embedding/logits split the vocabulary.
    - embed, kv, length, layers, position tables → replicated: splitting `embed` would need an all-reduce after
      every projection; `layers` is the scan axis and must stay whole on each device.
    - lora → replicated: a LoRA adapter's rank (2–64) is far too small to split; its other dim follows the
      kernel it adapts (`lora_b [lora, heads, kv]` splits by heads like the query kernel).
    - prompt → replicated: P-tuning's few virtual tokens (`[prompt, embed]`); every data shard reads all of them.
    """
    return [
        ("batch", "data"),
        ("vocab", "model"),
        ("mlp", "model"),
        ("heads", "model"),
        ("joined_kv", "model"),
        ("kv", None),
        ("embed", None),
        ("length", None),
        ("layers", None),
        ("relpos_buckets", None),
        ("abspos_buckets", None),
        ("lora", None),
        ("prompt", None),
    ]


@gin.configurable
def logical_axis_rules(fsdp: bool = False, additional_rules: Sequence[Tuple[str, Optional[str]]] = ()) -> LogicalRules:
    """The rules for a `data` × `model` mesh.

    fsdp: also shard parameters (and with them optimizer state) along `data` over their `embed` dim (ZeRO-3 /
      FSDP): per-device parameter bytes fall ~linearly with the data axis, at the price of all-gathering each
      weight before use. Activations keep `embed` replicated (see the module docstring).
    additional_rules: prepended, so they take precedence (e.g. `(('length', 'model'),)` for sequence sharding).
    """
    standard = _standard_rules()
    if fsdp:
        embed_at = standard.index(("embed", None))
        standard.insert(embed_at, ("embed", "data"))
    return list(additional_rules) + standard


@gin.configurable
def create_mesh(data: int = -1, model: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A `data` × `model` mesh; one size may be -1 (= all remaining devices).

    Axis types are Auto so that XLA's sharding propagation (GSPMD) completes the partitioning from our
    constraints, as t5x does; jax.make_mesh's default Explicit axes would demand sharding-typed code instead.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, model]
    if sizes.count(-1) > 1:
        raise ValueError(f"create_mesh: at most one axis may be -1, got data={data}, model={model}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if known <= 0 or len(devices) % known:
        raise ValueError(f"create_mesh: data={data} × model={model} does not divide the {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"create_mesh: data={sizes[0]} × model={sizes[1]} = {int(np.prod(sizes))} devices, but {len(devices)} exist"
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """A pytree of logical PartitionSpecs -> the NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def param_shardings(boxed_params: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings for a tree of `nn.LogicallyPartitioned` params (real or from `jax.eval_shape`)."""
    return logical_to_sharding(nn.get_partition_spec(boxed_params), mesh, rules)


def batch_sharding(mesh: Mesh, rules: LogicalRules, ndim: int = 2) -> NamedSharding:
    """Sharding of a `[batch, length, ...]` input array: batch by the `batch` rule, the rest replicated."""
    logical = PartitionSpec("batch", *([None] * (ndim - 1)))
    return logical_to_sharding(logical, mesh, rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules):
    """Makes `mesh` and `rules` current: inside, the models' logical constraints become real sharding
    constraints (outside any mesh they are no-ops, which is what single-device code wants)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


@gin.configurable
def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, auto: bool = False) -> bool:
    """Joins a multi-process (multi-host) run with `jax.distributed.initialize`; returns whether it did.

    Must run before anything asks jax for its devices (`train` calls it first). Unconfigured (the default) it
    is a no-op: one process sees only its local devices. Set `coordinator_address`/`num_processes`/`process_id`
    for GPU clusters, or `auto=True` where jax detects them itself (TPU pods, SLURM). After it, `jax.devices()`
    lists every process's devices and the mesh spans all hosts.
    """
    if not auto and coordinator_address is None and num_processes in (None, 1):
        return False
    if jax.distributed.is_initialized():
        return True
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    return True


def host_batch_shard(global_batch_size: int) -> Tuple[int, int, int]:
    """(rows this process loads, its shard index, number of shards) for a global batch.

    Each process reads a disjoint 1/process_count of every global batch; `trainer.device_batch` assembles the
    processes' rows into one global array (`jax.make_array_from_process_local_data`).
    """
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
        raise ValueError(f"train.batch_size={global_batch_size} is not divisible by the {count} processes")
    return global_batch_size // count, index, count
