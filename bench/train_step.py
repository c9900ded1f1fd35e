"""The real t5k train step (`trainer.compile_train_step`: Adafactor, z-loss, donated state) on ct5_small, across
activation dtype, layer scanning and remat policy; and the compile time of ct5_large scanned vs unrolled.

  python bench/train_step.py                                  # 12 ct5_small cases + ct5_large compiles
  python bench/train_step.py --cases float32/unrolled/none,float32/scanned/none --large none
  python bench/train_step.py --quick                          # tiny shapes: a smoke run of every code path

Case names are `{float32|bfloat16}/{unrolled|scanned}/{none|minimal|full}`: `TransformerConfig.dtype`
(parameters and logits stay float32), `scan_layers`, `remat_policy`. Each case runs on one device (a 1×1 mesh)
with random tokens without padding, batch 8 × (512 inputs, 114 targets) by default.

- step time: median wall time of the timed steps after `--warmup` untimed ones (compilation excluded);
  "cpu s" is the median process CPU time of a step (all threads), steadier than wall time on a shared machine.
- tokens/s = batch · (inputs + targets) / step time.
- MFU = model FLOPs per step / step time / peak. Model FLOPs are `t5k.throughput.step_flops` (6 · Σ weights ·
  tokens through them: forward + backward matmuls, no attention scores, no remat recomputation) -- the same
  figure for every case. The peak is the best dense matmul rate measured here in the case's dtype with float32
  accumulation (`t5k.throughput.measure_matmul_peak`, n=4096): bfloat16 cases are measured against the bfloat16
  peak (~1.6x float32's on this AVX512-BF16 CPU), so MFU compares cases within a dtype, tokens/s across them.
- "MFU cpu" is the same ratio in CPU time: FLOPs per CPU-second of the step / FLOPs per CPU-second of the
  probe of its dtype. On a machine shared with other jobs, wall times stretch with their load while CPU times mostly
  do not, so this is the steadier figure there (it is close to MFU on a quiet machine).
- ct5_large: lower and compile the train step with abstract arguments (nothing allocated), scanned and unrolled.

The last line is one JSON object with every figure and the ratios scanned/unrolled, bfloat16/float32 and
remat/none.
"""

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DTYPES = ("float32", "bfloat16")
LAYOUTS = ("unrolled", "scanned")
REMATS = ("none", "minimal", "full")
ALL_CASES = tuple("/".join(c) for c in itertools.product(DTYPES, LAYOUTS, REMATS))


def small_dims(quick: bool) -> dict:
    if quick:
        return dict(vocab_size=512, d_model=64, num_heads=2, head_dim=32, d_ff=128, num_encoder_layers=2,
                    num_decoder_layers=2)
    return dict(vocab_size=51200, d_model=512, num_heads=6, head_dim=64, d_ff=1024, num_encoder_layers=8,
                num_decoder_layers=8)  # gin/models/ct5_small.gin


def large_dims(quick: bool) -> dict:
    if quick:
        return dict(small_dims(True), num_encoder_layers=4, num_decoder_layers=4)
    return dict(vocab_size=51200, d_model=1024, num_heads=16, head_dim=64, d_ff=2816, num_encoder_layers=24,
                num_decoder_layers=24)  # gin/models/ct5_large.gin


def _setup(dims, dtype, scan, remat):
    """Model, t5k Adafactor, 1×1 mesh and rules, state shardings."""
    import jax

    from t5k import optim, partitioning, trainer
    from t5k.models import EncoderDecoder, TransformerConfig

    config = TransformerConfig(**dims, dtype=dtype, scan_layers=scan, remat_policy=remat)
    model = EncoderDecoder(config)
    optimizer = optim.make_optimizer(schedule=optim.rsqrt_schedule(), param_axes=trainer.param_axes(model))
    mesh = partitioning.create_mesh(data=1, model=1, devices=jax.devices()[:1])
    return model, optimizer, mesh, partitioning.logical_axis_rules()


def _batch(batch, inputs, targets, vocab):
    import numpy as np

    rng = np.random.default_rng(0)
    tgt = rng.integers(1, vocab, size=(batch, targets)).astype(np.int32)
    return {
        "encoder_input_tokens": rng.integers(1, vocab, size=(batch, inputs)).astype(np.int32),
        "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1),
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": np.ones((batch, targets), np.float32),
    }


def run_case(case, args, dims, flops):
    from t5k import partitioning, trainer

    dtype, layout, remat = case.split("/")
    model, optimizer, mesh, rules = _setup(dims, dtype, layout == "scanned", remat)
    host_batch = _batch(args.batch, args.inputs, args.targets, dims["vocab_size"])
    with partitioning.activate(mesh, rules):
        shardings = trainer.state_shardings(model, optimizer, mesh, rules)
        state = trainer.init_state(model, optimizer, shardings, seed=0)
        batch = trainer.device_batch(host_batch, mesh, rules)
        step = trainer.compile_train_step(model, optimizer, trainer.LossConfig(), shardings,
                                          {k: v.sharding for k, v in batch.items()})
        t0 = time.perf_counter()
        compiled = step.lower(state, batch, None).compile()
        compile_s = time.perf_counter() - t0
        walls, cpus, losses = [], [], []
        for i in range(args.warmup + args.steps):
            w0, c0 = time.perf_counter(), time.process_time()
            state, metrics = compiled(state, batch, None)
            losses.append(float(metrics["loss"]))  # blocks until the step is done
            if i >= args.warmup:
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
    del state
    t = statistics.median(walls)
    tokens = args.batch * (args.inputs + args.targets)
    cpu = statistics.median(cpus)
    return dict(step_s=round(t, 4), cpu_s=round(cpu, 3), tokens_per_s=round(tokens / t, 1),
                mfu=round(flops / t / args.peak[dtype], 4), mfu_cpu=round(flops / cpu / args.peak_cpu[dtype], 4),
                compile_s=round(compile_s, 2), loss=round(losses[0], 5),
                min_s=round(min(walls), 4), max_s=round(max(walls), 4))


def compile_large(args, scan):
    """Seconds to lower and to compile ct5_large's train step (abstract state and batch: nothing allocated)."""
    import jax

    from t5k import partitioning, trainer

    dims = large_dims(args.quick)
    model, optimizer, mesh, rules = _setup(dims, "float32", scan, "none")
    host_batch = _batch(args.batch, args.inputs, args.targets, dims["vocab_size"])
    with partitioning.activate(mesh, rules):
        shardings = trainer.state_shardings(model, optimizer, mesh, rules)
        state = trainer.abstract_state(model, optimizer, shardings)
        batch_sharding = {k: partitioning.batch_sharding(mesh, rules, v.ndim) for k, v in host_batch.items()}
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding[k]) for k, v in host_batch.items()}
        step = trainer.compile_train_step(model, optimizer, trainer.LossConfig(), shardings, batch_sharding)
        t0 = time.perf_counter()
        lowered = step.lower(state, batch, None)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
    return dict(lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2), total_s=round(t2 - t0, 2))


def _ratio(summary, a, b, field="tokens_per_s"):
    if a in summary and b in summary:
        return round(summary[a][field] / summary[b][field], 3)
    return None


def ratios(summary):
    """scanned/unrolled, bfloat16/float32 (same layout and remat) and remat/none throughput ratios."""
    out = {}
    for case in summary:
        dtype, layout, remat = case.split("/")
        if layout == "scanned":
            out[f"scanned_vs_unrolled/{dtype}/{remat}"] = _ratio(summary, case, f"{dtype}/unrolled/{remat}")
        if dtype == "bfloat16":
            out[f"bfloat16_vs_float32/{layout}/{remat}"] = _ratio(summary, case, f"float32/{layout}/{remat}")
        if remat != "none":
            out[f"{remat}_vs_none/{dtype}/{layout}"] = _ratio(summary, case, f"{dtype}/{layout}/none")
    return {k: v for k, v in out.items() if v is not None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--targets", type=int, default=114)
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per case after compilation")
    p.add_argument("--cases", default=",".join(ALL_CASES), help="comma-separated subset of dtype/layout/remat")
    p.add_argument("--large", default="both", choices=("both", "scanned", "none"),
                   help="ct5_large compile timings to take (unrolled takes minutes)")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes (smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.inputs, args.targets, args.steps, args.warmup = 2, 32, 8, 1, 1
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(ALL_CASES))
    if unknown:
        p.error(f"unknown cases {unknown}; known: {', '.join(ALL_CASES)}")

    import jax.numpy as jnp

    from t5k import plan, throughput
    from t5k.models import EncoderDecoder, TransformerConfig, abstract_params
    from t5k.models.params_cli import count_params

    load_before = os.getloadavg()
    size = 512 if args.quick else 4096
    args.peak = {d: throughput.measure_matmul_peak(size=size, dtype=jnp.dtype(d)) for d in DTYPES}
    args.peak_cpu = {d: throughput.measure_matmul_peak(size=size, dtype=jnp.dtype(d), clock=time.process_time)
                     for d in DTYPES}
    dims = small_dims(args.quick)
    model = EncoderDecoder(TransformerConfig(**dims))
    shapes = plan.batch_shapes("encoder_decoder", {"inputs": args.inputs, "targets": args.targets}, args.batch,
                               pack=False)
    flops = throughput.step_flops(model, shapes)
    num_params = count_params(abstract_params(model))
    summary = {}
    for case in cases:
        summary[case] = run_case(case, args, dims, flops)
        print(f"  {case}: {summary[case]}", file=sys.stderr, flush=True)
    large = {}
    for scan in {"both": (True, False), "scanned": (True,), "none": ()}[args.large]:
        large["scanned" if scan else "unrolled"] = compile_large(args, scan)
        print(f"  ct5_large {'scanned' if scan else 'unrolled'}: {large['scanned' if scan else 'unrolled']}",
              file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    tokens = args.batch * (args.inputs + args.targets)
    print(f"ct5_small{' (QUICK shapes)' if args.quick else ''}: {num_params / 1e6:.1f}M params, batch {args.batch} x "
          f"({args.inputs} + {args.targets}) = {tokens} tokens/step, {flops / 1e9:.1f} GFLOP/step (6·N·tokens)")
    print("peak matmul (MFU denominator of the cases of that dtype; f32 accumulation): " + ", ".join(
        f"{d} {args.peak[d] / 1e9:.1f} GFLOP/s ({args.peak_cpu[d] / 1e9:.1f} per CPU-second)" for d in DTYPES)
        + f"; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after ({os.cpu_count()} CPUs)")
    header = (f"{'case':<28}{'s/step':>9}{'cpu s':>8}{'tok/s':>9}{'MFU':>8}{'MFU cpu':>9}{'compile s':>11}"
              f"{'loss':>10}")
    print(header)
    print("-" * len(header))
    for case, s in summary.items():
        print(f"{case:<28}{s['step_s']:>9.3f}{s['cpu_s']:>8.2f}{s['tokens_per_s']:>9.1f}{s['mfu'] * 100:>7.1f}%"
              f"{s['mfu_cpu'] * 100:>8.1f}%{s['compile_s']:>11.1f}{s['loss']:>10.4f}")
    for layout, t in large.items():
        print(f"ct5_large {layout:<9} lower {t['lower_s']:>7.1f} s  compile {t['compile_s']:>7.1f} s")
    record = dict(
        benchmark="train_step", quick=args.quick, batch=args.batch, inputs=args.inputs, targets=args.targets,
        tokens_per_step=tokens, steps=args.steps, warmup=args.warmup, num_params=int(num_params),
        model_flops_per_step=flops, flops_method="6 * sum(weights * tokens through them), t5k.throughput.step_flops",
        peak_flops_per_s=args.peak, peak_flops_per_cpu_s=args.peak_cpu, load_avg_before=load_before[0],
        load_avg_after=load_after[0], cpus=os.cpu_count(), results=summary, ratios=ratios(summary),
        ct5_large_compile=large,
        ct5_large_compile_scanned_vs_unrolled=(round(large["scanned"]["total_s"] / large["unrolled"]["total_s"], 3)
                                               if len(large) == 2 else None),
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
