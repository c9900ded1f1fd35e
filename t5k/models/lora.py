"""LoRA: low-rank adapters on frozen projections (Hu et al. 2021), as the CT5 and HyperCLOVA seeds fine-tune.

A projection `y = x @ W` named in `TransformerConfig.lora_targets` becomes

    y = x @ W + (lora_alpha / lora_rank) * (x @ A) @ B        A: [*in, rank]   B: [rank, *out]

with W frozen and only A and B trained (`layers.DenseGeneral` holds them as `lora_a` / `lora_b`, logical axes
`(*in_axes, 'lora')` and `('lora', *out_axes)`). B starts at zero, so fine-tuning starts from exactly the
pre-trained function. CT5's "as little as 0.09% of the parameters" is rank 2 on query and value of ct5_small:
24 attention layers × 2 projections × 2 × (512 + 384) = 86,016 of 96.6M parameters.

The workflow (gin/runs/lora.gin): `t5k train` restores the pre-trained kernels from `train.init_checkpoint`
while the adapters, which the checkpoint lacks, start fresh (`train.init_assignment_map`), and
`trainable_parameters.pattern = ADAPTER_PATTERN` trains the adapters alone: frozen parameters get no gradient
and no optimizer state. `merge` folds trained adapters into the kernels, giving the parameters of the same
model without adapters (for export to `transformers`, or to decode without the extra products).
"""

from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5k.models.config import TransformerConfig

# The '/'-joined parameter paths of the adapters (for optim.trainable_parameters and restore assignment maps).
ADAPTER_PATTERN = r".*/lora_[ab]"
ADAPTER_NAMES = ("lora_a", "lora_b")


def merge(params: Any, config: TransformerConfig) -> Tuple[Dict[str, Any], TransformerConfig]:
    """Folds every adapter into its kernel: `(params, config)` of the same function without adapters.

    `kernel + scale * A @ B` is computed in float32 at full precision, per layer for a scanned stack
    (`[layers, *in, rank] @ [layers, rank, *out]`). The returned config has `lora_rank = 0`; the params are
    plain (unboxed) arrays with no `lora_a` / `lora_b` left.
    """
    if not config.lora_rank:
        raise ValueError("lora.merge: TransformerConfig.lora_rank is 0, so there are no adapters to merge")
    merged = _merge_tree(nn.unbox(params), config.lora_scale, "")
    return merged, config.replace(lora_rank=0)


def _merge_tree(tree: Dict[str, Any], scale: float, where: str) -> Dict[str, Any]:
    if "lora_a" in tree or "lora_b" in tree:
        missing = [name for name in ("kernel",) + ADAPTER_NAMES if name not in tree]
        if missing:
            raise KeyError(f"lora.merge: {where or '/'} has an adapter but no {missing[0]!r}")
        out = {k: v for k, v in tree.items() if k not in ADAPTER_NAMES}
        out["kernel"] = tree["kernel"] + scale * low_rank_product(tree["lora_a"], tree["lora_b"], tree["kernel"].ndim)
        return out
    return {k: _merge_tree(v, scale, f"{where}/{k}") if isinstance(v, dict) else v for k, v in tree.items()}


def low_rank_product(a: jax.Array, b: jax.Array, kernel_ndim: int) -> jax.Array:
    """`A @ B` contracted over the rank: `[*in, r] @ [r, *out] -> [*in, *out]`, or per leading layer index when
    the three come from a scanned stack (the kernel then has one dim fewer than A and B together minus 2)."""
    product = lambda x, y: jnp.tensordot(x, y, axes=1, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
    if kernel_ndim == a.ndim + b.ndim - 2:
        return product(a, b)
    if kernel_ndim == a.ndim + b.ndim - 3 and a.shape[0] == b.shape[0]:
        return jax.vmap(product)(a, b)
    raise ValueError(f"lora: adapter shapes {a.shape} and {b.shape} do not fit a kernel of rank {kernel_ndim}")


def adapter_count(params: Any) -> int:
    """The number of adapter parameters (`lora_a` and `lora_b` leaves) in a parameter tree."""
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(params))
    return int(sum(np.prod(x.shape) for path, x in leaves if getattr(path[-1], "key", None) in ADAPTER_NAMES))
