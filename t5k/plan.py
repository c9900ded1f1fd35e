"""`t5k plan`: per-device memory and FLOPs of the real train step on a simulated mesh, with nothing allocated.

    t5k plan --gin_file=gin/models/ct5_3b.gin --gin_file=gin/runs/pretrain.gin --devices=8 \\
        --gin.create_mesh.model=4 [--gin.logical_axis_rules.fsdp=True] [--json]

The train step that `t5k train` runs (same model, optimizer, loss, microbatching, shardings, donation) is lowered
with `jax.ShapeDtypeStruct` arguments that carry their shardings and compiled for a mesh of `--devices`
simulated CPU devices. XLA's `memory_analysis()` then gives the bytes each device needs for arguments (state and
batch), outputs and temporaries, and `cost_analysis()` the FLOPs of one device's program. Next to the compiled
numbers the plan reports the analytic bytes of the parameter and optimizer-state shards each device holds.

Caveats (the numbers are a plan, not a measurement on the target hardware):
- XLA:CPU fuses and schedules differently from XLA:GPU/TPU, so `temp_bytes` is indicative (typically within tens
  of percent); argument/output bytes and the analytic state bytes are exact.
- XLA's cost analysis counts the body of a loop once: with scanned layers (`TransformerConfig.scan_layers=True`)
  or microbatches (`train.num_microbatches>1`) the compiled FLOPs cover one layer/microbatch per loop; the plan
  flags this and always also reports the analytic 6·N·tokens estimate.
- Unrolled compilation of a very large model on a big simulated mesh is slow; `--scan` sets `scan_layers=True`
  (the memory of the scanned and the unrolled step are close; the parameter layout is the stacked one).
"""

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Dict, Mapping, Optional, Sequence

import gin
import numpy as np

from t5k import cli, gin_utils

_FORCE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\d+")
# The executable is never run, so XLA:CPU may skip LLVM's optimisations and use the classic fusion emitters:
# measured here on ct5_3b (2×4, scanned) 11 s instead of 27 s with LLVM's optimisations off alone, with the
# same argument bytes and temp bytes within 1 KB.
PLAN_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                         "xla_cpu_use_fusion_emitters": False}
# `--scan=auto` scans the layers of models above this many parameters (unrolled CPU compiles take many minutes).
AUTO_SCAN_PARAMS = 1_000_000_000


def simulate_devices(count: int) -> None:
    """Asks jax for `count` CPU devices. Must run before jax initialises its backend (before any
    `jax.devices()`); afterwards it only checks that enough devices exist."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        flags = _FORCE_FLAG.sub("", os.environ.get("XLA_FLAGS", "")).strip()
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", count)
    available = len(jax.devices())
    if available < count:
        raise ValueError(
            f"--devices={count} but jax was already initialised with {available} devices; run `t5k plan` in a fresh "
            "process (or set XLA_FLAGS=--xla_force_host_platform_device_count before importing jax)"
        )


def _query(name: str, default: Any = None) -> Any:
    """The value gin would pass for `name`; a macro (`%TASK_FEATURE_LENGTHS`, as the objective files bind) or an
    evaluated reference (`@f()`) is resolved as gin resolves it when calling the function."""
    try:
        value = gin.query_parameter(name)
    except ValueError:
        return default
    if isinstance(value, gin.config.ConfigurableReference) and value.evaluate:
        value = value.scoped_configurable_fn()
    return default if value is gin.REQUIRED else value


def batch_shapes(model_type: str, task_feature_lengths: Mapping[str, int], batch_size: int,
                 pack: bool = True) -> Dict[str, tuple]:
    """The feature-converter batch of `t5k train`: key -> shape (all int32), with seqio's lengths.

    encoder_decoder: inputs -> encoder length, targets -> decoder length; decoder (LM): targets; prefix_lm:
    inputs + targets, with `decoder_causal_attention`. Packing adds the segment ids and positions.
    """
    lengths = dict(task_feature_lengths)
    needed = ("targets",) if model_type == "decoder" else ("inputs", "targets")
    missing = [k for k in needed if k not in lengths]
    if missing:
        raise ValueError(f"task_feature_lengths {lengths} lack {', '.join(missing)}: model_type "
                         f"{model_type!r} needs {' and '.join(needed)}")
    if model_type == "encoder_decoder":
        enc, dec = int(lengths["inputs"]), int(lengths["targets"])
        shapes = {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": dec,
                  "decoder_loss_weights": dec}
        if pack:
            shapes.update(encoder_segment_ids=enc, encoder_positions=enc, decoder_segment_ids=dec,
                          decoder_positions=dec)
    elif model_type in ("decoder", "prefix_lm"):
        dec = int(lengths["targets"]) + (int(lengths.get("inputs", 0)) if model_type == "prefix_lm" else 0)
        shapes = {"decoder_input_tokens": dec, "decoder_target_tokens": dec, "decoder_loss_weights": dec}
        if model_type == "prefix_lm":
            shapes["decoder_causal_attention"] = dec
        if pack:
            shapes.update(decoder_segment_ids=dec, decoder_positions=dec)
    else:
        raise ValueError(f"model_type {model_type!r}; expected encoder_decoder, decoder or prefix_lm")
    return {k: (batch_size, v) for k, v in shapes.items()}


def _shard_bytes(tree, shardings) -> int:
    """Bytes of the shards one device holds (the largest shard, which is what every device holds)."""
    import jax

    total = 0
    for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
        total += int(np.prod(s.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def _tree_bytes(tree) -> int:
    import jax

    return int(sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


def matmul_flops(params, shapes: Mapping[str, tuple], tie_embeddings: bool) -> float:
    """6 · Σ (weights of a module × tokens that pass through it): the forward+backward matmul FLOPs of a step.

    Encoder weights see the encoder tokens, decoder weights (with the logits projection) the decoder tokens;
    embedding tables are lookups (no FLOPs) unless tied to the logits. Attention scores (2·length² per head and
    layer, fwd+bwd ×3) are left out, as in the usual 6·N·D estimate.
    """
    import jax

    enc_tokens = int(np.prod(shapes["encoder_input_tokens"])) if "encoder_input_tokens" in shapes else 0
    dec_tokens = int(np.prod(shapes["decoder_input_tokens"]))
    total = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        top = str(getattr(path[0], "key", path[0]))
        size = float(np.prod(leaf.shape))
        if top == "encoder":
            total += size * enc_tokens
        elif top == "decoder":
            total += size * dec_tokens
        elif top == "token_embedder" and tie_embeddings:
            total += size * dec_tokens
        elif top not in ("token_embedder",) and "position" not in top and "relpos" not in top:
            total += size * dec_tokens  # decoder-only layers live at the top level
    return 6.0 * total


def plan(model, optimizer, mesh, rules, task_feature_lengths: Mapping[str, int], batch_size: int,
         num_microbatches: int = 1, pack: bool = True, loss_config=None, compile: bool = True,
         model_type: Optional[str] = None, trainable=None) -> Dict[str, Any]:
    """Lowers and compiles the train step for `mesh` with abstract arguments; returns the plan as a dict.
    `trainable`: the run's `optim.trainable_parameters()` (the optimizer must be made with the same).

    Nothing of the model's size is allocated: parameters, optimizer state and batch are `ShapeDtypeStruct`s.
    compile=False skips the train step (seconds instead of minutes): only the analytic per-device bytes of
    parameters, optimizer state and batch are reported, the compiled fields are None.
    """
    import jax
    import jax.numpy as jnp

    from t5k import partitioning, trainer
    from t5k.train import check_model_type, default_model_type

    loss_config = loss_config or trainer.LossConfig()
    trainer.check_batch_divisible(batch_size, mesh, num_microbatches)
    model_type = model_type or default_model_type(model)  # the converter `t5k train` would use
    check_model_type(model, model_type)
    cfg = model.config
    start = time.perf_counter()
    with partitioning.activate(mesh, rules):
        shardings = trainer.state_shardings(model, optimizer, mesh, rules)
        state = trainer.abstract_state(model, optimizer, shardings)
        shapes = batch_shapes(model_type, task_feature_lengths, batch_size, pack)
        batch_shardings = {k: partitioning.batch_sharding(mesh, rules, len(s)) for k, s in shapes.items()}
        batch = {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=batch_shardings[k]) for k, s in shapes.items()}
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
        step = trainer.compile_train_step(model, optimizer, loss_config, shardings, batch_shardings,
                                          num_microbatches, trainable)
        lower_s = compile_s = 0.0
        memory, cost = None, {}
        if compile:
            lowered = step.lower(state, batch, rng)
            lower_s = time.perf_counter() - start
            compiled = lowered.compile(compiler_options=PLAN_COMPILER_OPTIONS)
            compile_s = time.perf_counter() - start - lower_s
            memory = compiled.memory_analysis()
            cost = compiled.cost_analysis()
            if isinstance(cost, (list, tuple)):  # older jax: one dict per program
                cost = cost[0] if cost else {}
            cost = cost or {}
    n_devices = int(np.prod(list(mesh.shape.values())))
    param_count = int(sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree_util.tree_leaves(state.params)))
    analytic_flops = matmul_flops(state.params, shapes, tie_embeddings=cfg.tie_embeddings)
    loops = []
    if cfg.scan_layers:
        loops.append("scanned layers")
    if num_microbatches > 1:
        loops.append("microbatches")

    per_device = {
        "param_bytes": _shard_bytes(state.params, shardings.params),
        "opt_state_bytes": _shard_bytes(state.opt_state, shardings.opt_state),
        "batch_bytes": _shard_bytes(batch, batch_shardings),
        "argument_bytes": None, "output_bytes": None, "alias_bytes": None, "temp_bytes": None,
        "generated_code_bytes": None, "peak_bytes": None, "flops": None, "bytes_accessed": None,
    }
    if memory is not None:
        per_device.update(
            argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
            alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
            generated_code_bytes=int(memory.generated_code_size_in_bytes),
            flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        )
        # Donated state buffers are reused for the new state (alias), so they count once.
        per_device["peak_bytes"] = (per_device["argument_bytes"] + per_device["output_bytes"]
                                    - per_device["alias_bytes"] + per_device["temp_bytes"])
    return {
        "model": type(model).__name__,
        "param_count": param_count,
        "param_bytes_total": _tree_bytes(state.params),
        "opt_state_bytes_total": _tree_bytes(state.opt_state),
        "mesh": {name: int(size) for name, size in mesh.shape.items()},
        "devices": n_devices,
        "fsdp": any(r == ("embed", "data") for r in map(tuple, rules)),
        "scan_layers": bool(cfg.scan_layers),
        "remat_policy": cfg.remat_policy,
        "dtype": cfg.dtype,
        "model_type": model_type,
        "batch_size": int(batch_size),
        "num_microbatches": int(num_microbatches),
        "batch_shapes": {k: list(s) for k, s in shapes.items()},
        "per_device": per_device,
        # 6 · params · tokens they see: forward + backward matmul FLOPs of the whole step (all devices).
        "analytic_flops_per_step": analytic_flops,
        "compiled": bool(compile),
        "flops_note": (f"compiled flops count one iteration of each loop ({', '.join(loops)}): they undercount "
                       "the step; use analytic_flops_per_step" if loops else
                       "compiled flops are one device's program; x devices = the step"),
        "lower_seconds": round(lower_s, 2),
        "compile_seconds": round(compile_s, 2),
    }


def plan_from_gin(devices: Optional[Sequence[Any]] = None, scan: str = "auto", batch_size: Optional[int] = None,
                  task_feature_lengths: Optional[Mapping[str, int]] = None, compile: bool = True) -> Dict[str, Any]:
    """The plan of the parsed gin configuration (model, `train.*`, `create_mesh.*`, `logical_axis_rules.*`,
    `make_optimizer.*`) on `devices` (default: all of jax's devices).

    scan: 'yes' compiles with `scan_layers=True`, 'no' as configured, 'auto' scans models above
    `AUTO_SCAN_PARAMS` parameters (the plan says so in `scan_note`).
    """
    from t5k import optim, partitioning, trainer
    from t5k.models import build_model
    from t5k.models.params_cli import count_params, abstract_params

    if scan not in ("auto", "yes", "no"):
        raise ValueError(f"--scan={scan!r}; expected auto, yes or no")
    model = build_model()
    note = None
    if not model.config.scan_layers and scan != "no":
        if scan == "yes":
            note = "layers scanned for planning (--scan=yes)"
        else:
            n = count_params(abstract_params(model))
            if n > AUTO_SCAN_PARAMS:
                note = (f"layers scanned for planning: {n / 1e9:.2f}B parameters > {AUTO_SCAN_PARAMS / 1e9:.0f}B "
                        "(an unrolled CPU compile takes many minutes; --scan=no to force it)")
        if note:
            model = type(model)(model.config.replace(scan_layers=True))
    mesh = partitioning.create_mesh(devices=devices)
    rules = partitioning.logical_axis_rules()
    # The schedule does not change the step's memory or FLOPs (it is a scalar function of the step).
    trainable = optim.trainable_parameters()  # a LoRA plan keeps optimizer state for the adapters only
    optimizer = optim.make_optimizer(schedule=optim.rsqrt_schedule(), param_axes=trainer.param_axes(model),
                                     trainable=trainable)
    lengths = task_feature_lengths or _query("train.task_feature_lengths")
    size = batch_size or _query("train.batch_size")
    if lengths is None or size is None:
        raise ValueError("needs train.task_feature_lengths and train.batch_size (a gin/runs/*.gin file or "
                         "--batch_size/--task_feature_lengths)")
    result = plan(model, optimizer, mesh, rules, lengths, int(size),
                  num_microbatches=int(_query("train.num_microbatches", 1)), pack=bool(_query("train.pack", True)),
                  compile=compile, model_type=_query("train.model_type"), trainable=trainable)
    result["task_feature_lengths"] = dict(lengths)
    result["scan_note"] = note
    return result


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def format_plan(p: Dict[str, Any]) -> str:
    d = p["per_device"]
    mesh = " × ".join(f"{k} {v}" for k, v in p["mesh"].items())
    lines = [
        f"{p['model']}: {p['param_count']:,d} parameters ({_gib(p['param_bytes_total'])} float32), optimizer state "
        f"{_gib(p['opt_state_bytes_total'])}",
        f"mesh {mesh} ({p['devices']} devices), fsdp={p['fsdp']}, scan_layers={p['scan_layers']}, "
        f"remat={p['remat_policy']}, batch {p['batch_size']} × {p['task_feature_lengths']}, "
        f"microbatches {p['num_microbatches']}",
        "per device:",
        f"  parameters (analytic)   {_gib(d['param_bytes'])}",
        f"  optimizer (analytic)    {_gib(d['opt_state_bytes'])}",
    ]
    if not p["compiled"]:
        return "\n".join(lines + [f"  batch (analytic)        {_gib(d['batch_bytes'])}",
                                   f"  analytic 6·params·tokens FLOPs per step (all devices) "
                                   f"{p['analytic_flops_per_step']:.3e}",
                                   "train step not compiled (--no_compile)"])
    lines += [
        f"  arguments (compiled)    {_gib(d['argument_bytes'])}",
        f"  outputs                 {_gib(d['output_bytes'])}  (aliased to donated arguments: {_gib(d['alias_bytes'])})",
        f"  temporaries             {_gib(d['temp_bytes'])}",
        f"  peak ≈ args+out-alias+temp {_gib(d['peak_bytes'])}",
        f"  FLOPs per step          {d['flops']:.3e} (compiled, one device); analytic 6·params·tokens over all devices "
        f"{p['analytic_flops_per_step']:.3e}",
        f"  note: {p['flops_note']}",
        *([f"note: {p['scan_note']}"] if p.get("scan_note") else []),
        f"lowered in {p['lower_seconds']} s, compiled in {p['compile_seconds']} s on simulated CPU devices",
    ]
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    gin_utils.add_gin_arguments(parser)
    parser.add_argument("--devices", type=int, default=8, help="number of simulated devices of the mesh")
    parser.add_argument("--scan", choices=("auto", "yes", "no"), default="auto",
                        help="compile with scanned layers (TransformerConfig.scan_layers=True), much faster for big "
                             f"models; auto: above {AUTO_SCAN_PARAMS / 1e9:.0f}B parameters")
    parser.add_argument("--batch_size", type=int, default=None, help="override train.batch_size")
    parser.add_argument("--task_feature_lengths", default=None,
                        help="override train.task_feature_lengths, e.g. inputs=512,targets=114")
    parser.add_argument("--no_compile", action="store_true",
                        help="only the analytic per-device bytes of parameters/optimizer state/batch (seconds)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _parse_lengths(text: Optional[str]) -> Optional[Dict[str, int]]:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if not value:
            raise ValueError(f"--task_feature_lengths: expected NAME=LENGTH[,NAME=LENGTH], got {text!r}")
        out[key.strip()] = int(value)
    return out


def run(args: argparse.Namespace, bindings=()) -> int:
    try:
        if args.devices < 1:
            raise ValueError(f"--devices must be positive, got {args.devices}")
        simulate_devices(args.devices)  # before anything touches jax's devices
        import jax

        import t5k_tasks  # noqa: F401  (before gin: its configurables, e.g. pretraining_files, may be bound)
        gin_utils.parse_gin(args.gin_file, bindings, args.gin_search_path)
        result = plan_from_gin(devices=jax.devices()[: args.devices], scan=args.scan, batch_size=args.batch_size,
                               task_feature_lengths=_parse_lengths(args.task_feature_lengths), compile=not args.no_compile)
    except (gin_utils.GinConfigError, ValueError) as e:
        print(cli.error_line("plan", e), file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_plan(result))
    return 0
