"""Training-step throughput of ct5_small: t5k (JAX) vs transformers' PyTorch T5 with identical dims and weights.

  python bench/model_step.py                      # batch 8, inputs 512, targets 114, 5 timed steps per case
  python bench/model_step.py --quick              # tiny shapes, a smoke run of every code path
  python bench/model_step.py --steps 7 --cases t5k_fp32,torch_ftz --no-train

Cases (each runs in its own subprocess, so thread pools, denormal modes and memory never leak between them):

  t5k_fp32 / t5k_bf16   EncoderDecoder(ct5_small) with dtype float32 / bfloat16 (params float32, logits float32)
  torch_default         transformers T5ForConditionalGeneration, float32, default CPU settings
  torch_ftz             the same with torch.set_flush_denormal(True) -- PyTorch's best configuration here
  torch_ftz_bf16        torch_ftz under torch.autocast('cpu', bfloat16)

Both frameworks run the same weights (t5k's initialisation exported by `t5k.convert.t5_params_to_hf`), the same
random tokens (no padding) and the same loss (mean token cross entropy on float32 logits). Two measurements per
case: "grad" = forward + backward (loss and gradients of every parameter); "train" = grad + an Adafactor update
(t5k's own Adafactor, `t5k.optim.adafactor` factored by logical axis names as `t5k train` runs it, and
transformers.optimization.Adafactor for PyTorch, both factored, lr 1e-3).
Warm-up steps (compilation included) are excluded; the step time is the median of the timed steps. "cpu s" is
the median process CPU time (all threads) of a step: on a shared machine it moves less with other people's load
than wall time does (PyTorch's OpenMP spin-waiting counts in it, so it flatters t5k somewhat).

tokens/s counts input + target tokens: batch * (inputs + targets) / step time. Model FLOPs are analytic matmul
FLOPs (projections, attention scores and values, logits; backward = 2x forward), the same count for both
frameworks; XLA's own `cost_analysis()` figure of the t5k grad step is printed alongside as a cross-check.
The peak is the best dense matmul rate of this machine, measured by this script in JAX and in PyTorch (the max
of the two), in float32 for the float32 cases and in bfloat16 with float32 accumulation for the bfloat16 cases
(AVX512-BF16 CPUs run those at ~2x the float32 rate). "best t5k / best PyTorch" compares the fastest t5k case
with the fastest PyTorch case of any dtype; the same-dtype ratios pair float32 with float32 and bf16 with bf16.
The last line of output is one JSON object with every figure.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import compare  # noqa: E402  (bench/compare.py, beside this script)

ALL_CASES = ("t5k_fp32", "t5k_bf16", "torch_default", "torch_ftz", "torch_ftz_bf16")
RESULT_TAG = "RESULT "

# XLA CPU flags set for the t5k cases (before jax is imported in the worker).
XLA_FLAGS = ""


def model_dims(args):
    if args.quick:
        return dict(vocab_size=512, d_model=64, num_heads=2, head_dim=32, d_ff=128, num_encoder_layers=2,
                    num_decoder_layers=2)
    return dict(vocab_size=51200, d_model=512, num_heads=6, head_dim=64, d_ff=1024, num_encoder_layers=8,
                num_decoder_layers=8)


def analytic_flops(dims, batch, li, lt):
    """Matmul FLOPs of one forward+backward step (3x the forward), gated MLP (3 matrices)."""
    d, h, k, ff, v = dims["d_model"], dims["num_heads"], dims["head_dim"], dims["d_ff"], dims["vocab_size"]
    inner = h * k
    te, td = batch * li, batch * lt
    enc = 2 * te * d * inner * 4 + 2 * te * d * ff * 3 + 2 * 2 * batch * h * li * li * k
    dec = (2 * td * d * inner * 4 + 2 * 2 * batch * h * lt * lt * k  # self-attention
           + 2 * td * d * inner * 2 + 2 * te * d * inner * 2 + 2 * 2 * batch * h * lt * li * k  # cross-attention
           + 2 * td * d * ff * 3)
    fwd = dims["num_encoder_layers"] * enc + dims["num_decoder_layers"] * dec + 2 * td * d * v
    return 3 * fwd


# ----------------------------------------------------------------------------------------------------------
# Workers (run in subprocesses)


CPU_TIMES = {}  # per call of _timed: process CPU seconds (all threads) of each timed step


def _timed(step, warmup, steps, label=None):
    for _ in range(warmup):
        step()
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if label:
        CPU_TIMES[label] = cpu
    return times


def worker_peak(args):
    n = 512 if args.quick else 4096
    reps = 3 if args.quick else 10  # the best rep: on a shared machine the max is the least disturbed
    out = {}
    bf16 = args.case.endswith("bf16")
    if args.case.startswith("peak_jax"):  # the probe `t5k train` uses for its MFU
        import jax.numpy as jnp

        from t5k import throughput

        out["flops_per_s"] = throughput.measure_matmul_peak(n, jnp.bfloat16 if bf16 else jnp.float32, reps)
    else:
        import numpy as np
        import torch

        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        x = torch.from_numpy(a).to(torch.bfloat16 if bf16 else torch.float32)
        out["flops_per_s"] = 2 * n**3 / min(_timed(lambda: torch.mm(x, x), 2, reps))
    out["n"] = n
    return out


def _data(args, vocab):
    import numpy as np

    rng = np.random.default_rng(1)
    enc = rng.integers(1, vocab, size=(args.batch, args.inputs)).astype(np.int32)
    tgt = rng.integers(1, vocab, size=(args.batch, args.targets)).astype(np.int32)
    dec = np.concatenate([np.zeros((args.batch, 1), np.int32), tgt[:, :-1]], axis=1)  # shifted right, 0 = BOS
    return enc, dec, tgt


def worker_init(args):
    """Initialises t5k params once and saves them (flat '/'-joined keys) for every other worker."""
    import flax.linen as nn
    import jax

    from t5k import convert
    from t5k.models import EncoderDecoder, TransformerConfig

    config = TransformerConfig(**model_dims(args), dtype="float32")
    enc, dec, _ = _data(args, config.vocab_size)
    params = jax.jit(lambda r: nn.unbox(EncoderDecoder(config).init(r, enc[:1], dec[:1])["params"]))(
        jax.random.PRNGKey(0))
    return {"num_params": convert.save_params_npz(params, args.params_file)}


def worker_t5k(args):
    import jax
    import jax.numpy as jnp
    import optax

    from t5k import convert, optim, trainer
    from t5k.models import EncoderDecoder, TransformerConfig

    overrides = dict(kv.split("=", 1) for kv in args.t5k_override)
    for key, value in overrides.items():
        overrides[key] = {"True": True, "False": False}.get(value, value)
    dtype = "bfloat16" if args.case == "t5k_bf16" else "float32"
    config = TransformerConfig(**model_dims(args), dtype=dtype, **overrides)
    model = EncoderDecoder(config)
    enc, dec, tgt = (jnp.asarray(x) for x in _data(args, config.vocab_size))
    params = jax.tree_util.tree_map(jnp.asarray, convert.load_params_npz(args.params_file))

    def loss_fn(p):
        logits = model.apply({"params": p}, enc, dec)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tgt).mean()

    grad_step = jax.jit(jax.value_and_grad(loss_fn))
    out = {"config": {k: getattr(config, k) for k in ("dtype", "fuse_projections", "scan_layers", "remat_policy")},
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    t0 = time.perf_counter()
    compiled = grad_step.lower(params).compile()
    out["compile_s"] = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["xla_flops"] = float(cost.get("flops", 0.0)) if cost else 0.0
    loss0, _ = compiled(params)
    out["loss"] = float(loss0)
    out["grad_times"] = _timed(lambda: jax.block_until_ready(compiled(params)), args.warmup, args.steps, "grad")
    if args.train:
        opt = optim.adafactor(learning_rate=1e-3, param_axes=trainer.param_axes(model))

        def train_step(p, s):
            loss, grads = jax.value_and_grad(loss_fn)(p, )
            updates, s = opt.update(grads, s, p)
            return optax.apply_updates(p, updates), s, loss

        train = jax.jit(train_step, donate_argnums=(0, 1))
        state = [params, jax.jit(opt.init)(params)]

        def one():
            state[0], state[1], loss = train(*state)
            jax.block_until_ready(loss)

        out["train_times"] = _timed(one, args.warmup, args.steps, "train")
    return out


def worker_torch(args):
    import numpy as np
    import torch
    import transformers

    from t5k import convert
    from t5k.models import TransformerConfig

    transformers.logging.set_verbosity_error()
    if args.case in ("torch_ftz", "torch_ftz_bf16"):
        torch.set_flush_denormal(True)  # before any op, so every intra-op thread inherits the mode
    config = TransformerConfig(**model_dims(args), dtype="float32")
    hf_cfg = transformers.T5Config(**convert.t5_config_to_hf(config), decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(hf_cfg)
    # transformers 5 ties lm_head to shared in a fresh model; T5.1.1's head is a parameter of its own.
    model.lm_head.weight = torch.nn.Parameter(torch.empty(config.vocab_size, config.d_model))
    model.config.tie_word_embeddings = False
    sd = convert.t5_params_to_hf(convert.load_params_npz(args.params_file), config)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not model.config.scale_decoder_outputs
    model.train()  # dropout_rate is 0
    enc, dec, tgt = (torch.from_numpy(x).long() for x in _data(args, config.vocab_size))
    mask = (enc > 0).long()
    autocast = args.case.endswith("bf16")

    def loss_fn():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=enc, attention_mask=mask, decoder_input_ids=dec).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1))

    def grad_step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss

    out = {"threads": torch.get_num_threads(), "flush_denormal": "ftz" in args.case, "autocast_bf16": autocast,
           "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    out["loss"] = float(grad_step())
    out["grad_times"] = _timed(grad_step, args.warmup, args.steps, "grad")
    if args.train:
        from transformers.optimization import Adafactor

        opt = Adafactor(model.parameters(), lr=1e-3, scale_parameter=True, relative_step=False, warmup_init=False)

        def train_step():
            grad_step()
            opt.step()

        out["train_times"] = _timed(train_step, args.warmup, args.steps, "train")
    return out


WORKERS = {"init": worker_init, "peak_jax": worker_peak, "peak_torch": worker_peak, "peak_jax_bf16": worker_peak,
           "peak_torch_bf16": worker_peak, "t5k_fp32": worker_t5k,
           "t5k_bf16": worker_t5k, "torch_default": worker_torch, "torch_ftz": worker_torch,
           "torch_ftz_bf16": worker_torch}


# ----------------------------------------------------------------------------------------------------------
# Driver


def run_worker(case, args, params_file):
    cmd = [sys.executable, __file__, "--worker", case, "--params-file", params_file, "--batch", str(args.batch),
           "--inputs", str(args.inputs), "--targets", str(args.targets), "--steps", str(args.steps), "--warmup",
           str(args.warmup)]
    cmd += ["--quick"] * args.quick + ["--no-train"] * (not args.train)
    for kv in args.t5k_override:
        cmd += ["--t5k-override", kv]
    env = dict(os.environ)
    if case.startswith("t5k") or case.startswith("peak_jax"):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + XLA_FLAGS + " " + args.xla_flags).strip()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise RuntimeError(f"worker {case} failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result["wall_s"] = time.perf_counter() - t0
    print(f"  {case}: done in {result['wall_s']:.0f}s", file=sys.stderr, flush=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--targets", type=int, default=114)
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case after compilation")
    p.add_argument("--cases", default=",".join(ALL_CASES), help=f"comma-separated subset of {ALL_CASES}")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the Adafactor train step")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes (smoke run)")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the t5k cases")
    p.add_argument("--t5k-override", action="append", default=[], metavar="FIELD=VALUE",
                   help="TransformerConfig override for the t5k cases (e.g. fuse_projections=False)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--params-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and args.batch == 8 and args.inputs == 512 and args.targets == 114:
        args.batch, args.inputs, args.targets = 2, 32, 8
        args.steps, args.warmup = min(args.steps, 2), 1

    if args.worker:
        args.case = args.worker
        out = WORKERS[args.worker](args)
        out.update({f"{k}_cpu": v for k, v in CPU_TIMES.items()})
        print(RESULT_TAG + json.dumps(out), flush=True)
        return

    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(ALL_CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; known: {ALL_CASES}")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        params_file = os.path.join(tmp, "params.npz")
        info = run_worker("init", args, params_file)
        peaks = {c: run_worker(c, args, params_file)["flops_per_s"]
                 for c in ("peak_jax", "peak_torch", "peak_jax_bf16", "peak_torch_bf16")}
        results = {c: run_worker(c, args, params_file) for c in cases}
    load_after = os.getloadavg()

    dims = model_dims(args)
    tokens = args.batch * (args.inputs + args.targets)
    flops = analytic_flops(dims, args.batch, args.inputs, args.targets)
    peak = max(peaks["peak_jax"], peaks["peak_torch"])
    peak_bf16 = max(peaks["peak_jax_bf16"], peaks["peak_torch_bf16"])
    summary = {}
    for case, r in results.items():
        case_peak = peak_bf16 if case.endswith("bf16") else peak  # MFU against the matmul peak of its dtype
        for kind in ("grad", "train"):
            if f"{kind}_times" not in r:
                continue
            t = statistics.median(r[f"{kind}_times"])
            summary[f"{case}/{kind}"] = dict(
                step_s=round(t, 4), tokens_per_s=round(tokens / t, 1), mfu=round(flops / t / case_peak, 4),
                min_s=round(min(r[f"{kind}_times"]), 4), max_s=round(max(r[f"{kind}_times"]), 4),
                cpu_s=round(statistics.median(r[f"{kind}_cpu"]), 3),
                loss=round(r["loss"], 5))
    ref = {kind: summary.get(f"torch_ftz/{kind}") for kind in ("grad", "train")}
    ref_default = {kind: summary.get(f"torch_default/{kind}") for kind in ("grad", "train")}
    for key, s in summary.items():
        kind = key.split("/")[1]
        if ref[kind]:
            s["vs_torch_ftz"] = round(s["tokens_per_s"] / ref[kind]["tokens_per_s"], 3)
        if ref_default[kind]:
            s["vs_torch_default"] = round(s["tokens_per_s"] / ref_default[kind]["tokens_per_s"], 3)

    print(f"ct5_small{' (QUICK shapes)' if args.quick else ''}: batch {args.batch}, inputs {args.inputs}, targets "
          f"{args.targets} = {tokens} tokens/step; {info['num_params'] / 1e6:.1f}M params; "
          f"{flops / 1e9:.1f} GFLOP/step (analytic matmuls, fwd+bwd)")
    print(f"peak float32 matmul: jax {peaks['peak_jax'] / 1e9:.1f} GFLOP/s, torch {peaks['peak_torch'] / 1e9:.1f} "
          f"GFLOP/s -> peak {peak / 1e9:.1f}; bfloat16 (f32 accumulation): jax {peaks['peak_jax_bf16'] / 1e9:.1f}, "
          f"torch {peaks['peak_torch_bf16'] / 1e9:.1f} -> {peak_bf16 / 1e9:.1f}; load average {load_before[0]:.2f} "
          f"before, {load_after[0]:.2f} after ({os.cpu_count()} CPUs)")
    for case, r in results.items():
        if "xla_flops" in r:
            print(f"{case}: XLA cost_analysis {r['xla_flops'] / 1e9:.1f} GFLOP/step, compile {r['compile_s']:.1f}s")
    header = (f"{'case':<22}{'step':<7}{'s/step':>9}{'cpu s':>8}{'tok/s':>9}{'MFU':>7}{'vs ftz':>8}{'vs dflt':>8}"
              f"{'loss':>10}")
    print(header)
    print("-" * len(header))
    for key, s in summary.items():
        case, kind = key.split("/")
        print(f"{case:<22}{kind:<7}{s['step_s']:>9.3f}{s['cpu_s']:>8.2f}{s['tokens_per_s']:>9.1f}{s['mfu'] * 100:>6.1f}%"
              f"{s.get('vs_torch_ftz', float('nan')):>8.3f}{s.get('vs_torch_default', float('nan')):>8.3f}"
              f"{s['loss']:>10.4f}")
    def best(prefix, kind, dtype=None):
        return compare.best_rate(summary, prefix, kind, dtype)

    ratio = compare.ratio
    kinds = ("grad", "train")
    best_t5k = {kind: best("t5k", kind) for kind in kinds}
    best_torch = {kind: best("torch", kind) for kind in kinds}
    same_dtype = {f"{dtype}/{kind}": ratio(best("t5k", kind, dtype), best("torch", kind, dtype))
                  for dtype in ("fp32", "bf16") for kind in kinds}
    print("best t5k / best PyTorch configuration: " + ", ".join(f"{k} {ratio(best_t5k[k], best_torch[k])}" for k in kinds)
          + "; same dtype: " + ", ".join(f"{k} {v}" for k, v in same_dtype.items()))
    record = dict(
        benchmark="model_step", quick=args.quick, batch=args.batch, inputs=args.inputs, targets=args.targets,
        tokens_per_step=tokens, steps=args.steps, warmup=args.warmup, num_params=info["num_params"],
        model_flops_per_step=flops, flops_method="analytic matmul FLOPs, 3x forward",
        xla_flops_per_step={c: r["xla_flops"] for c, r in results.items() if "xla_flops" in r},
        peak_flops={"jax": peaks["peak_jax"], "torch": peaks["peak_torch"], "peak": peak,
                    "jax_bf16": peaks["peak_jax_bf16"], "torch_bf16": peaks["peak_torch_bf16"], "peak_bf16": peak_bf16},
        load_avg_before=load_before[0], load_avg_after=load_after[0], cpus=os.cpu_count(),
        xla_flags=(XLA_FLAGS + " " + args.xla_flags).strip(), t5k_overrides=args.t5k_override,
        results=summary,
        best_t5k_vs_torch_ftz={k: ratio(best_t5k[k], ref[k] and ref[k]["tokens_per_s"]) for k in kinds},
        best_t5k_vs_best_torch={k: ratio(best_t5k[k], best_torch[k]) for k in kinds},
        t5k_vs_torch_same_dtype=same_dtype,
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
