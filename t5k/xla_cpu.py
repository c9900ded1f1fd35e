"""XLA:CPU settings t5k applies by default (before jax creates its CPU client).

XLA:CPU hands dots and reductions to YNNPACK ("library fusions"). Its dots are the fastest matmuls XLA has on
CPU, but its reductions are not: a `[8, 6, 512, 512] -> [6, 512, 512]` sum takes ~30x longer as a YNNPACK
fusion than as XLA's own loop fusion, and the RMSNorm / softmax / cross-entropy statistics of a T5 training step
are 178 such reductions. So t5k gives YNNPACK single dots only (`individual_dot`; the `dot` type, which also
fuses a dot's elementwise neighbours into YNNPACK, is slower still). Measured on the bfloat16 ct5_small grad
step: 1.6x faster; float32 unchanged; docs/performance.md has the profile and the A/B.

Applied on `import t5k`, unless XLA_FLAGS already names the option (then the user's choice stands) or jax's
backends already exist (XLA reads XLA_FLAGS once, when the first client is created: import t5k before running
anything in jax). Other platforms ignore the option.
"""

import os
import sys

YNN_FUSION_OPTION = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FUSION_DEFAULT = "individual_dot"


def _backends_initialised() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(bridge and bridge.backends_are_initialized())


def set_default_flags() -> None:
    """Adds t5k's XLA:CPU defaults to XLA_FLAGS (never overriding an option the user set)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FUSION_OPTION in flags or _backends_initialised():
        return
    os.environ["XLA_FLAGS"] = f"{flags} {YNN_FUSION_OPTION}={YNN_FUSION_DEFAULT}".strip()

