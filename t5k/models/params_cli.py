"""`t5k params`: parameter count of a gin model preset, from abstract shapes (nothing is allocated).

    t5k params --gin_file=gin/models/ct5_base.gin [--gin.TransformerConfig.vocab_size=32128] [--json]
"""

import argparse
import json
import re
import sys
from typing import Dict

import jax
import numpy as np

from t5k import gin_utils
from t5k.models import abstract_params, build_model, lora


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def param_counts(model) -> Dict[str, int]:
    """Total and per top-level module (`token_embedder`, `encoder`, `decoder`, …); unrolled `layers_i` are
    summed under `layers`. With LoRA adapters, `lora_adapters` counts them (they are also in the totals)."""
    params = abstract_params(model)
    counts: Dict[str, int] = {}
    for name, sub in sorted(params.items()):
        key = "layers" if re.fullmatch(r"layers_\d+", name) else name
        counts[key] = counts.get(key, 0) + count_params(sub)
    counts["total"] = count_params(params)
    if model.config.lora_rank:  # what a LoRA run trains (gin/runs/lora.gin)
        counts["lora_adapters"] = lora.adapter_count(params)
    return counts


def configure_parser(parser: argparse.ArgumentParser) -> None:
    gin_utils.add_gin_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace, bindings=()) -> int:
    try:
        gin_utils.parse_gin(args.gin_file, bindings, args.gin_search_path)
        model = build_model()
    except (gin_utils.GinConfigError, ValueError, TypeError) as e:
        from t5k.cli import error_line

        print(error_line("params", e), file=sys.stderr)
        return 2
    counts = param_counts(model)
    if args.json:
        print(json.dumps(counts))
        return 0
    cfg = model.config
    print(f"{type(model).__name__}: d_model={cfg.d_model} heads={cfg.num_heads}x{cfg.head_dim} d_ff={cfg.d_ff} "
          f"layers={cfg.num_encoder_layers}+{cfg.num_decoder_layers} vocab={cfg.vocab_size}")
    for name, n in counts.items():
        print(f"  {name:<20} {n:>16,d}  ({n / 1e6:,.1f}M)")
    print(json.dumps(counts))
    return 0
