"""Training throughput: tokens/s and model FLOPs utilisation (MFU) of the train step.

MFU = model FLOPs per step / step time / peak FLOP/s.

- Model FLOPs per step are the analytic `6 · Σ (weights × tokens that pass through them)` (`plan.matmul_flops`):
  forward + backward matmuls, attention scores and remat recomputation left out (the usual 6·N·D convention,
  applied per stack for an encoder-decoder: encoder weights see the encoder tokens, decoder weights the decoder
  tokens). It is chosen over XLA's `cost_analysis()` of the compiled step because that counts a loop body once,
  so it undercounts scanned layers and microbatches, and it depends on the backend's fusion decisions. Padding
  counts as tokens: the step computes on it.
- The peak is a gin parameter (`train.peak_flops_per_s`, the accelerator's datasheet figure on GPU/TPU); left
  unset it is measured on the local device by a dense matmul probe in the model's compute dtype with float32
  accumulation (`measure_matmul_peak`; how every t5k matmul runs), the honest denominator on a CPU.
"""

import time
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np


def step_flops(model, batch_shapes: Mapping[str, tuple]) -> float:
    """Model FLOPs of one train step (all devices) for batches of `batch_shapes` (key -> shape)."""
    from t5k.models import abstract_params
    from t5k.plan import matmul_flops
    from t5k.trainer import unbox_values

    params = unbox_values(abstract_params(model))
    return matmul_flops(params, batch_shapes, tie_embeddings=model.config.tie_embeddings)


def measure_matmul_peak(size: int = 2048, dtype=jnp.float32, repeats: int = 5, device=None,
                        clock: Callable[[], float] = time.perf_counter) -> float:
    """FLOP/s of the fastest of `repeats` `[size, size] @ [size, size]` matmuls on `device` (default: the first).

    The best repeat, not the mean: on a shared machine it is the least disturbed one. `clock=time.process_time`
    gives FLOPs per CPU-second of this process (all threads) instead, for comparisons with step CPU times.
    """
    device = device or jax.devices()[0]
    x = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype), device)
    matmul = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))  # as t5k's kernels run
    # A mesh of its own: under a caller's multi-device mesh (`partitioning.activate`), jit would refuse an
    # argument that lives on one of its devices only.
    with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("probe",))):
        matmul(x).block_until_ready()  # compile
        best = float("inf")
        for _ in range(repeats):
            start = clock()
            matmul(x).block_until_ready()
            best = min(best, clock() - start)
    return 2.0 * size**3 / best


class ThroughputMeter:
    """Tokens/s and MFU over the steps since the last `read()` (a logging window)."""

    def __init__(self, flops_per_step: float, peak_flops_per_s: float, num_devices: int = 1):
        if peak_flops_per_s <= 0:
            raise ValueError(f"peak_flops_per_s must be positive, got {peak_flops_per_s}")
        self.flops_per_step = flops_per_step
        self.peak = peak_flops_per_s * num_devices  # the step runs on all devices
        self.restart()

    def restart(self) -> None:
        """Starts a new window now (after work that is not training, e.g. an evaluation)."""
        self._tokens, self._steps, self._start = 0.0, 0, time.perf_counter()

    def add(self, tokens: float) -> None:
        self._tokens += tokens
        self._steps += 1

    def read(self, now: Optional[float] = None) -> Mapping[str, float]:
        elapsed = max((now or time.perf_counter()) - self._start, 1e-9)
        out = {
            "tokens_per_s": self._tokens / elapsed,
            "steps_per_s": self._steps / elapsed,
            "mfu": self._steps * self.flops_per_step / elapsed / self.peak,
        }
        self.restart()
        return out
