"""Side-by-side ratios shared by the t5k-vs-PyTorch benchmarks (model_step.py, decode.py).

`summary` maps "CASE/KIND" (e.g. "t5k_bf16/grad", "torch_ftz/top_p") to a dict with "tokens_per_s"; cases whose
name ends in "bf16" are the bfloat16 ones.
"""

from typing import Dict, Optional


def best_rate(summary: Dict[str, dict], prefix: str, kind: str, dtype: Optional[str] = None) -> Optional[float]:
    """The highest tokens/s among cases starting with `prefix` for `kind`, within `dtype` ("fp32"/"bf16") if given."""
    rates = [s["tokens_per_s"] for k, s in summary.items() if k.startswith(prefix) and k.endswith("/" + kind)
             and (dtype is None or k.split("/")[0].endswith("bf16") == (dtype == "bf16"))]
    return max(rates, default=None)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b to 3 decimals; None when either side did not run."""
    return round(a / b, 3) if a and b else None
