"""Optimizers and learning-rate schedules as optax transforms, configured by gin.

Adafactor with the T5 settings is the default (`t5k.adafactor`: second moments factored along dims chosen by
logical axis names, decay 0.8, update clipping 1.0, parameter-scale updates, epsilon 1e-30) with T5's
inverse-square-root schedule `1/sqrt(max(step, 10k))`.
AdamW is the alternative the CT5 seed compared against.
"""

import functools
import math
import re
from typing import Any, Callable, Optional

import gin
import jax
import jax.numpy as jnp
import optax

from t5k.adafactor import scale_by_adafactor

Schedule = Callable[[Any], Any]


@gin.configurable
def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Schedule:
    """T5: `base / sqrt(max(step, warmup))` — constant `base/sqrt(warmup)` during warm-up, then decaying."""
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(f"rsqrt_schedule.warmup_steps = {warmup_steps!r}; expected an integer >= 1 (step 0 would "
                         "get an infinite learning rate)")
    return lambda step: base_learning_rate * jax.lax.rsqrt(jnp.maximum(step, warmup_steps).astype(jnp.float32))


@gin.configurable
def constant_schedule(learning_rate: float = 1e-3) -> Schedule:
    return optax.constant_schedule(learning_rate)


@gin.configurable
def warmup_schedule(
    peak_learning_rate: float = 1e-3, warmup_steps: int = 10_000, total_steps: int = 100_000, decay: str = "cosine",
    end_fraction: float = 0.1,
) -> Schedule:
    """Linear warm-up to the peak, then linear or cosine decay to `end_fraction * peak` at `total_steps`."""
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"warmup_schedule.decay = {decay!r}; expected 'cosine', 'linear' or 'constant'")
    warmup = optax.linear_schedule(0.0, peak_learning_rate, max(warmup_steps, 1))
    decay_steps = max(total_steps - warmup_steps, 1)
    end = peak_learning_rate * end_fraction
    if decay == "cosine":
        after = optax.cosine_decay_schedule(peak_learning_rate, decay_steps, alpha=end_fraction)
    elif decay == "linear":
        after = optax.linear_schedule(peak_learning_rate, end, decay_steps)
    else:
        after = optax.constant_schedule(peak_learning_rate)
    return optax.join_schedules([warmup, after], [warmup_steps])


@gin.configurable
def adafactor(learning_rate: Schedule = gin.REQUIRED, param_axes: Optional[Any] = None, decay_rate: float = 0.8,
              clipping_threshold: Optional[float] = 1.0, multiply_by_parameter_scale: bool = True,
              epsilon1: float = 1e-30, epsilon2: float = 1e-3, min_dim_size_to_factor: int = 128,
              momentum: Optional[float] = None, state_dtype: str = "float32") -> optax.GradientTransformation:
    """Adafactor with T5's settings, factored by logical axis names (the rules: `t5k.adafactor`).

    `param_axes` (each parameter's logical names) is passed by `make_optimizer`; `state_dtype='bfloat16'`
    halves the optimizer state.
    """
    return scale_by_adafactor(
        learning_rate, param_axes=param_axes, decay_rate=decay_rate, clipping_threshold=clipping_threshold,
        multiply_by_parameter_scale=multiply_by_parameter_scale, epsilon1=epsilon1, epsilon2=epsilon2,
        min_dim_size_to_factor=min_dim_size_to_factor, momentum=momentum, state_dtype=state_dtype,
    )


@gin.configurable
def adamw(learning_rate: Schedule = gin.REQUIRED, param_axes: Optional[Any] = None, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01,
          decay_vectors: bool = False) -> optax.GradientTransformation:
    """AdamW. Weight decay applies to matrices (kernels, embeddings, position tables) and, unless
    `decay_vectors`, not to vectors (biases, norm scales), as in GPT-2/3 and Megatron practice. A parameter's
    dims are counted from its logical names (`param_axes`) without a scanned `layers` dim, so a scanned stack of
    biases `[layers, mlp]` is still a vector; without names, from its rank."""
    mask = None if decay_vectors else functools.partial(_matrices, param_axes)
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)


def _matrices(param_axes, params):
    """A tree like `params`: True where the parameter has two or more dims besides a scanned `layers` dim. Looked
    up by path, so `params` may be a subset (the trainable ones inside `make_optimizer(trainable=...)`)."""
    if param_axes is None:
        return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    matrix = {path: sum(name != "layers" for name in spec) >= 2
              for path, spec in jax.tree_util.tree_leaves_with_path(param_axes, is_leaf=is_spec)}
    return jax.tree_util.tree_map_with_path(lambda path, _: matrix[path], params)


@gin.configurable
def trainable_parameters(pattern: Optional[str] = None) -> Optional[Callable[[str], bool]]:
    """Which parameters a run trains: those whose '/'-joined path the regex `pattern` matches whole (None: all).

    `t5k train` hands the predicate to both `make_optimizer` (frozen parameters get no optimizer state) and the
    train step (their gradients are never formed, and `grad_norm` and clipping see the trained ones only).
    LoRA fine-tuning (gin/runs/lora.gin) trains `.*/lora_[ab]`.
    """
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"trainable_parameters.pattern = {pattern!r} is not a regular expression: {e}") from None
    return lambda path: compiled.fullmatch(path) is not None


@gin.configurable
def make_optimizer(
    optimizer: Callable[..., optax.GradientTransformation] = adafactor,
    schedule: Schedule = gin.REQUIRED,
    max_grad_norm: Optional[float] = None,
    trainable: Optional[Callable[[str], bool]] = None,
    param_axes: Optional[Any] = None,
) -> optax.GradientTransformation:
    """The optimizer with its schedule, optional global-norm clipping, and an optional trainable-subset mask.

    `param_axes`: the logical axis names of every parameter (`trainer.param_axes(model)`), handed to the
    optimizer as `optimizer(learning_rate=..., param_axes=...)`; Adafactor picks its factored dims from them.

    `trainable(path) -> bool` receives each parameter's '/'-joined path; frozen parameters get zero updates
    and no optimizer state (the hook LoRA and prompt tuning use).
    """
    chain = []
    if max_grad_norm:
        chain.append(optax.clip_by_global_norm(max_grad_norm))
    chain.append(optimizer(learning_rate=schedule, param_axes=param_axes))
    tx = optax.chain(*chain)
    if trainable is not None:
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                                   lambda params: trainable_labels(trainable, params))
    return tx


def check_trains_something(trainable: Optional[Callable[[str], bool]], params) -> None:
    """ValueError when `trainable` rejects every parameter of `params` (a tree, e.g. `trainer.param_axes(model)`):
    a misspelt pattern would otherwise train nothing, silently."""
    if trainable is None:
        return
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_spec)]
    if not any(trainable(p) for p in paths):
        raise ValueError(f"trainable_parameters.pattern matches none of the model's {len(paths)} parameters (e.g. "
                         f"{paths[0]!r}); LoRA needs TransformerConfig.lora_rank > 0, P-tuning prompt_length > 0")


def trainable_labels(trainable: Callable[[str], bool], params) -> Any:
    """A tree like `params` holding "train" or "freeze" for each leaf, by `trainable(path)`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if trainable(path_str(path)) else "freeze", params)


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def learning_rate_at(schedule: Schedule, step: int) -> float:
    value = float(schedule(jnp.asarray(step)))
    return value if math.isfinite(value) else float("nan")
