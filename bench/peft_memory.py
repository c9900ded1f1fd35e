"""Per-device memory and FLOPs of a fine-tuning step: full fine-tuning against LoRA (ct5_small) and against
P-tuning (hyperclova_137m), from the compiled train step (`t5k plan`'s analysis: nothing of the model's size is run).

  python bench/peft_memory.py            # batch 32 x (512 inputs, 64 targets) / 32 x 512 targets, one device
  python bench/peft_memory.py --quick    # tiny batches: a smoke run of every case

Each case is a gin composition, as `t5k train` would run it:

    full_adafactor  ct5_small + gin/runs/finetune.gin                         (T5's fine-tuning)
    full_adamw      ct5_small + gin/runs/finetune.gin with AdamW              (the optimizer LoRA uses)
    lora_r8         ct5_small + gin/runs/lora.gin, rank 8 on query and value
    lm_full_adamw   hyperclova_137m + gin/runs/pretrain_lm.gin, unpacked      (full fine-tuning of the LM)
    ptuning_10      hyperclova_137m + gin/runs/ptuning.gin, 10 virtual tokens

Reported per case: parameters, trained parameters, optimizer state, the step's peak bytes (arguments + outputs -
donated aliases + temporaries, XLA's memory analysis) and temporaries, and XLA's FLOPs count of the step. Ratios
are against full AdamW fine-tuning of the same model. The CT5 seed reports "up to 69% less memory than full fine-
tuning" for Ladder Side Tuning (which t5k does not have); these are LoRA's and P-tuning's figures next to it.
The last line is one JSON object.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = {
    "full_adafactor": ("gin/models/ct5_small.gin", "gin/runs/finetune.gin", []),
    "full_adamw": ("gin/models/ct5_small.gin", "gin/runs/finetune.gin", ["make_optimizer.optimizer = @adamw"]),
    "lora_r8": ("gin/models/ct5_small.gin", "gin/runs/lora.gin", ["LORA_RANK = 8"]),
    "lm_full_adamw": ("gin/models/hyperclova_137m.gin", "gin/runs/pretrain_lm.gin", ["train.pack = False"]),
    "ptuning_10": ("gin/models/hyperclova_137m.gin", "gin/runs/ptuning.gin", ["PROMPT_LENGTH = 10"]),
}
BASELINE = {"full_adafactor": "full_adamw", "full_adamw": "full_adamw", "lora_r8": "full_adamw",
            "lm_full_adamw": "lm_full_adamw", "ptuning_10": "lm_full_adamw"}


def run_case(name: str, quick: bool) -> dict:
    import gin
    import jax

    from t5k import gin_utils, plan

    model_file, run_file, bindings = CASES[name]
    encoder_decoder = "ct5" in model_file
    lengths = ({"inputs": 64, "targets": 16} if quick else {"inputs": 512, "targets": 64}) if encoder_decoder else \
        ({"targets": 54} if quick else {"targets": 502})  # P-tuning: + 10 virtual tokens = 512 positions
    bindings = bindings + [f"train.batch_size = {4 if quick else 32}", f"train.task_feature_lengths = {lengths}",
                           "TransformerConfig.dtype = 'bfloat16'"]
    gin.clear_config()
    gin_utils.parse_gin([model_file, run_file], bindings)
    p = plan.plan_from_gin(devices=jax.devices()[:1], scan="no")
    d = p["per_device"]
    return {"params": p["param_count"], "trained_params": _trained_count(), "opt_state_bytes": p["opt_state_bytes_total"],
            "peak_bytes": d["peak_bytes"], "temp_bytes": d["temp_bytes"], "flops": d["flops"],
            "batch": p["batch_shapes"], "compile_s": p["compile_seconds"]}


def _trained_count() -> int:
    """The parameters of the gin model that `trainable_parameters` (gin) lets the run train."""
    import flax.linen as nn
    import jax
    import numpy as np

    from t5k import optim
    from t5k.models import abstract_params, build_model

    trainable = optim.trainable_parameters() or (lambda path: True)
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_params(build_model())))
    return int(sum(np.prod(x.shape) for path, x in leaves if trainable(optim.path_str(path))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    names = args.cases.split(",")
    results = {}
    for name in names:
        results[name] = run_case(name, args.quick)
        print(f"{name}: compiled in {results[name]['compile_s']:.0f} s", file=sys.stderr, flush=True)
    for name, r in results.items():
        base = results.get(BASELINE[name])
        if base:
            r["peak_vs_full_adamw"] = round(r["peak_bytes"] / base["peak_bytes"], 3)
            r["flops_vs_full_adamw"] = round(r["flops"] / base["flops"], 3)
    mib = 2 ** 20
    print(f"{'case':<16} {'params':>12} {'trained':>12} {'opt state MiB':>14} {'peak MiB':>10} {'temp MiB':>10} "
          f"{'GFLOP':>9} {'peak/full':>10} {'flops/full':>11}")
    for name, r in results.items():
        print(f"{name:<16} {r['params']:>12,d} {r['trained_params']:>12,d} {r['opt_state_bytes'] / mib:>14.1f} "
              f"{r['peak_bytes'] / mib:>10.1f} {r['temp_bytes'] / mib:>10.1f} {r['flops'] / 1e9:>9.1f} "
              f"{r.get('peak_vs_full_adamw', float('nan')):>10.3f} {r.get('flops_vs_full_adamw', float('nan')):>11.3f}")
    print(json.dumps({"benchmark": "peft_memory", "quick": args.quick, "results": results}))


if __name__ == "__main__":
    main()
