"""Generation throughput of ct5_small: t5k `generate` (JAX, KV cache) vs transformers' PyTorch `generate`.

  python bench/decode.py                       # batch 8, inputs 512, 64 new tokens, greedy and top-p
  python bench/decode.py --quick               # tiny model and shapes: a smoke run of every code path
  python bench/decode.py --runs 5 --cases t5k_fp32,torch_ftz
  python bench/decode.py --runs 3 --rounds 2    # the cases twice, forward then backward (cancels drift)
  python bench/decode.py --device gpu           # both frameworks on the GPU (docs/decoding.md: "On a GPU")

Cases (each in its own subprocess, so thread pools and denormal modes never leak between them):

  t5k_fp32 / t5k_bf16   EncoderDecoder from gin/models/ct5_small.gin with dtype float32 / bfloat16
  torch_default         transformers T5ForConditionalGeneration, float32, default CPU settings
  torch_ftz             the same with torch.set_flush_denormal(True) -- PyTorch's best float32 configuration
  torch_ftz_bf16        torch_ftz with the model in bfloat16 (`model.to(torch.bfloat16)`), the dtype peer of t5k_bf16

Both frameworks run the same weights (t5k's initialisation exported by `t5k.convert.t5_params_to_hf`) on the
same random 512-token inputs (no padding); the bf16 cases cast their weights once, before the timed calls
(`decoding.params_for_decoding` / `model.to(torch.bfloat16)`). Every case generates exactly `--new` tokens per
row (min_new_tokens = max_new_tokens on both sides, so EOS never ends a row early): greedy, and nucleus
sampling with top_p 0.9 (top_k off, temperature 1). The time of a call covers encoding the inputs and the whole generation loop; the
first call (compilation, caches) is excluded, the figure is the median of `--runs` calls. With `--rounds R` the whole
sequence of cases runs R times, every other round in reverse order, and the median is taken over all R * runs calls
of a case: this machine's speed drifts over minutes, and a case measured only at the start of a run against one
measured only at its end would carry that drift into their ratio. tokens/s counts new
tokens: batch * new / time. "cpu s" is the process CPU time of a call (all threads). "1st tok s" is the median
call that generates one greedy token (the encoder and the first step), and "ms/step" spreads the rest of a call
over its other `--new - 1` steps: where the time goes, since the two parts depend on the machine in different
ways (matmul rate against per-step overheads). The last line of output is one JSON object with every figure,
including t5k / PyTorch ratios against both PyTorch configurations.

`--device gpu` runs every case on the first GPU: JAX's CUDA backend and `model.to("cuda")`, each timed call ended
by a device synchronisation (`block_until_ready` / `torch.cuda.synchronize`). A worker that finds no GPU fails
rather than timing the CPU. `--device cpu` (the default) hides any GPU from JAX (`JAX_PLATFORMS=cpu`) and never
moves PyTorch off the CPU, so the CPU figures mean the same on a machine that has one. The flush-denormal setting
of the `torch_ftz*` cases only changes CPU arithmetic; on a GPU they are PyTorch's default configuration.
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
DEFAULT_CASES = ALL_CASES
METHODS = ("greedy", "top_p")
TOP_P = 0.9
RESULT_TAG = "RESULT "


def t5k_config(args, dtype: str):
    """ct5_small as its gin file defines it (tiny dims with --quick), with the given compute dtype."""
    from t5k import gin_utils
    from t5k.models import TransformerConfig

    gin_utils.parse_gin(["gin/models/ct5_small.gin"], [])
    config = TransformerConfig().replace(dtype=dtype)
    if args.quick:
        config = config.replace(vocab_size=512, d_model=64, num_heads=2, head_dim=32, d_ff=128, num_encoder_layers=2,
                                num_decoder_layers=2)
    return config


def _inputs(args, vocab_size):
    import numpy as np

    return np.random.default_rng(1).integers(2, vocab_size, size=(args.batch, args.inputs)).astype(np.int32)


def _time_calls(call, runs):
    """Runs `call` once untimed (compilation), then `runs` timed calls: (wall seconds, cpu seconds) lists."""
    call()
    walls, cpus = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return walls, cpus


def worker_init(args):
    """Initialises t5k params once and saves them for every other worker."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from t5k import convert
    from t5k.models import EncoderDecoder

    _check_jax_device(args)
    config = t5k_config(args, "float32")
    dummy = jnp.ones((1, 8), jnp.int32)
    params = jax.jit(lambda r: nn.unbox(EncoderDecoder(config).init(r, dummy, dummy)["params"]))(jax.random.PRNGKey(0))
    return {"num_params": convert.save_params_npz(params, args.params_file)}


def _check_jax_device(args):
    """The JAX backend the case runs on; an error when `--device gpu` finds no GPU (it must not time the CPU)."""
    import jax

    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise RuntimeError(f"--device gpu: JAX's backend is {jax.default_backend()!r} (no CUDA jaxlib plugin or GPU)")
    return jax.devices()[0].device_kind


def _torch_device(args):
    import torch

    if args.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device gpu: torch.cuda.is_available() is False")
    return torch.device("cuda")


def worker_t5k(args):
    import jax
    import numpy as np

    from t5k import convert, decoding
    from t5k.models import EncoderDecoder

    config = t5k_config(args, "bfloat16" if args.case == "t5k_bf16" else "float32")
    model = EncoderDecoder(config)
    # Weights in the compute dtype once, outside the timed calls, as the PyTorch bf16 case's `model.to(bfloat16)`.
    params = decoding.params_for_decoding(model, jax.device_put(convert.load_params_npz(args.params_file)))
    batch = {"encoder_input_tokens": _inputs(args, config.vocab_size)}
    seeds = np.arange(args.batch, dtype=np.uint32)
    out = {"dtype": config.dtype, "scan_layers": config.scan_layers, "device": _check_jax_device(args)}
    for method in METHODS:
        decode_config = decoding.DecodeConfig(
            method="greedy" if method == "greedy" else "sample", top_p=TOP_P, max_new_tokens=args.new,
            min_new_tokens=args.new)
        t0 = time.perf_counter()
        tokens = np.asarray(decoding.generate(model, params, batch, decode_config, seeds).tokens)
        out[f"{method}_first_call_s"] = time.perf_counter() - t0
        # min_new_tokens = max_new_tokens masks EOS until the last step, so no row ends early (a 0 after a stop
        # would be indistinguishable from the pad id 0, which a random model may well pick).
        assert tokens.shape == (args.batch, 1, args.new) and not (tokens == 1).any(), tokens
        if method == "greedy":
            out["greedy_tokens"] = tokens[:, 0].tolist()
        walls, cpus = _time_calls(
            lambda: decoding.generate(model, params, batch, decode_config, seeds).tokens.block_until_ready(),
            args.runs)
        out[f"{method}_times"], out[f"{method}_cpu"] = walls, cpus
    one_token = decoding.DecodeConfig(method="greedy", max_new_tokens=1, min_new_tokens=1)
    out["first_token_times"], _ = _time_calls(
        lambda: decoding.generate(model, params, batch, one_token, seeds).tokens.block_until_ready(), args.runs)
    return out


def worker_torch(args):
    import numpy as np
    import torch
    import transformers

    from t5k import convert

    transformers.logging.set_verbosity_error()
    if args.case.startswith("torch_ftz"):
        torch.set_flush_denormal(True)  # before any op, so every intra-op thread inherits the mode
    torch.set_grad_enabled(False)
    config = t5k_config(args, "float32")
    hf_cfg = transformers.T5Config(**convert.t5_config_to_hf(config), decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(hf_cfg)
    # transformers 5 ties lm_head to shared in a fresh model; T5.1.1's head is a parameter of its own.
    model.lm_head.weight = torch.nn.Parameter(torch.empty(config.vocab_size, config.d_model))
    model.config.tie_word_embeddings = False
    sd = convert.t5_params_to_hf(convert.load_params_npz(args.params_file), config)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
    model.eval()
    if args.case.endswith("bf16"):
        model = model.to(torch.bfloat16)
    device = _torch_device(args)
    model = model.to(device)
    enc = torch.from_numpy(_inputs(args, config.vocab_size)).long().to(device)
    mask = torch.ones_like(enc)
    out = {"threads": torch.get_num_threads(), "flush_denormal": args.case.startswith("torch_ftz"),
           "dtype": "bfloat16" if args.case.endswith("bf16") else "float32",
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    def generate(new, **kwargs):
        tokens = model.generate(input_ids=enc, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                num_beams=1, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # generate returns once its kernels are queued, not done
        return tokens

    for method in METHODS:
        kwargs = dict(do_sample=False) if method == "greedy" else dict(do_sample=True, top_p=TOP_P, top_k=0)
        tokens = generate(args.new, **kwargs)[:, 1:].cpu().numpy()
        assert tokens.shape == (args.batch, args.new)
        if method == "greedy":
            out["greedy_tokens"] = tokens.tolist()
        out[f"{method}_times"], out[f"{method}_cpu"] = _time_calls(lambda: generate(args.new, **kwargs), args.runs)
    out["first_token_times"], _ = _time_calls(lambda: generate(1, do_sample=False), args.runs)
    return out


WORKERS = {"init": worker_init, "t5k_fp32": worker_t5k, "t5k_bf16": worker_t5k, "torch_default": worker_torch,
           "torch_ftz": worker_torch, "torch_ftz_bf16": worker_torch}


def pool_rounds(rounds):
    """One case's worker results from several rounds -> one result whose timing lists hold every round's calls."""
    pooled = dict(rounds[0])
    for key in pooled:
        if key.endswith(("_times", "_cpu")):
            pooled[key] = [value for r in rounds for value in r[key]]
    return pooled


def run_worker(case, args, params_file):
    cmd = [sys.executable, __file__, "--worker", case, "--params-file", params_file, "--batch", str(args.batch),
           "--inputs", str(args.inputs), "--new", str(args.new), "--runs", str(args.runs),
           "--device", args.device] + ["--quick"] * args.quick
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if args.device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise RuntimeError(f"worker {case} failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    print(f"  {case}: done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--new", type=int, default=64, help="new tokens per row")
    p.add_argument("--runs", type=int, default=3, help="timed calls per case and method (median reported)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the cases this many times, alternating forward and backward order; medians pool all rounds")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated subset of {ALL_CASES}")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes (smoke run)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where every case runs (see above)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--params-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and (args.batch, args.inputs, args.new) == (8, 512, 64):
        args.batch, args.inputs, args.new, args.runs = 2, 32, 8, min(args.runs, 2)

    if args.worker:
        args.case = args.worker
        print(RESULT_TAG + json.dumps(WORKERS[args.worker](args)), flush=True)
        return

    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(ALL_CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; known: {ALL_CASES}")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        params_file = os.path.join(tmp, "params.npz")
        info = run_worker("init", args, params_file)
        results = {}
        for round_index in range(args.rounds):
            for case in cases if round_index % 2 == 0 else cases[::-1]:
                results.setdefault(case, []).append(run_worker(case, args, params_file))
        results = {case: pool_rounds(rounds) for case, rounds in results.items()}
    load_after = os.getloadavg()

    new_tokens = args.batch * args.new
    summary = {}
    for case, r in results.items():
        first_token = statistics.median(r["first_token_times"])
        for method in METHODS:
            t = statistics.median(r[f"{method}_times"])
            summary[f"{case}/{method}"] = dict(
                call_s=round(t, 4), tokens_per_s=round(new_tokens / t, 1),
                cpu_s=round(statistics.median(r[f"{method}_cpu"]), 3),
                min_s=round(min(r[f"{method}_times"]), 4), max_s=round(max(r[f"{method}_times"]), 4),
                first_token_s=round(first_token, 4),
                step_ms=round(1e3 * (t - first_token) / max(args.new - 1, 1), 2))
    for key, s in summary.items():
        method = key.split("/")[1]
        for ref in ("torch_ftz", "torch_default"):
            if f"{ref}/{method}" in summary:
                s[f"vs_{ref}"] = round(s["tokens_per_s"] / summary[f"{ref}/{method}"]["tokens_per_s"], 3)
    # Same weights and inputs: greedy outputs should agree (float32 rounding may flip a near-tie late on).
    greedy = {c: r["greedy_tokens"] for c, r in results.items() if not c.endswith("bf16")}
    agree = None
    if len(greedy) > 1:
        first, *rest = greedy.values()
        agree = min(sum(a == b for ra, rb in zip(first, other) for a, b in zip(ra, rb)) / new_tokens for other in rest)

    devices = {case: r["device"] for case, r in results.items()}
    print(f"ct5_small{' (QUICK shapes)' if args.quick else ''}: {info['num_params'] / 1e6:.1f}M params; batch "
          f"{args.batch}, inputs {args.inputs}, {args.new} new tokens per row; load average {load_before[0]:.2f} "
          f"before, {load_after[0]:.2f} after ({os.cpu_count()} CPUs); devices {sorted(set(devices.values()))}")
    header = (f"{'case':<16}{'method':<8}{'s/call':>9}{'cpu s':>8}{'new tok/s':>11}{'vs ftz':>8}{'vs dflt':>8}"
              f"{'1st tok s':>11}{'ms/step':>9}")
    print(header)
    print("-" * len(header))
    for key, s in summary.items():
        case, method = key.split("/")
        print(f"{case:<16}{method:<8}{s['call_s']:>9.3f}{s['cpu_s']:>8.2f}{s['tokens_per_s']:>11.1f}"
              f"{s.get('vs_torch_ftz', float('nan')):>8.3f}{s.get('vs_torch_default', float('nan')):>8.3f}"
              f"{s['first_token_s']:>11.3f}{s['step_ms']:>9.2f}")
    if agree is not None:
        print(f"greedy tokens equal across float32 cases: {agree:.1%}")
    def best(prefix, method, dtype=None):
        return compare.best_rate(summary, prefix, method, dtype)

    vs_ftz = {m: compare.ratio(best("t5k", m), summary.get(f"torch_ftz/{m}", {}).get("tokens_per_s")) for m in METHODS}
    best_vs_best = {m: compare.ratio(best("t5k", m), best("torch", m)) for m in METHODS}
    same_dtype = {f"{d}/{m}": compare.ratio(best("t5k", m, d), best("torch", m, d)) for d in ("fp32", "bf16")
                  for m in METHODS}
    print("best t5k / best PyTorch: " + ", ".join(f"{m} {v}" for m, v in best_vs_best.items())
          + "; same dtype: " + ", ".join(f"{k} {v}" for k, v in same_dtype.items()))
    record = dict(
        benchmark="decode", quick=args.quick, batch=args.batch, inputs=args.inputs, new_tokens=args.new,
        runs=args.runs, rounds=args.rounds, top_p=TOP_P, num_params=info["num_params"], load_avg_before=load_before[0],
        load_avg_after=load_after[0], cpus=os.cpu_count(), device=args.device, devices=devices, results=summary,
        greedy_token_agreement=agree,
        best_t5k_vs_torch_ftz=vs_ftz, best_t5k_vs_best_torch=best_vs_best, t5k_vs_torch_same_dtype=same_dtype,
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
