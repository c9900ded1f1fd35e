"""The partitioned training step and the flat training loop.

The loop (`train`) reads top to bottom: build mesh and rules → abstract state and its shardings (nothing
allocated) → restore the latest checkpoint or initialise → for each step: fetch the batch *for that step*,
run the jitted step, log, checkpoint, evaluate. Because the batch for step s is a pure function of
(seed, s) and the dropout key is `fold_in(seed, s)`, a run resumed from a checkpoint at step s continues
bit-for-bit as if it had never stopped.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5k import feature_converters, files, gin_utils, losses, optim, partitioning
from t5k.models import EncoderDecoder, dummy_inputs
from t5k.models import abstract_params as abstract_boxed_params

Batch = Mapping[str, np.ndarray]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    skipped: jax.Array  # int32 scalar: steps whose update was not finite and was skipped


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossConfig:
    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    # None: divide by the number of real target tokens in the (global) batch; a number: divide by that constant
    # (T5's 'loss_normalizing_factor', which keeps the gradient scale independent of padding).
    normalizing_factor: Optional[float] = None


def model_inputs(model: nn.Module, batch: Batch) -> Dict[str, Any]:
    """The model's keyword arguments from a feature-converter batch (keys it does not take are dropped).

    A decoder-only model takes `decoder_causal_attention` when the batch has it (prefix LM), so the
    'prefix_lm' key set serves both decoder-only layouts.
    """
    return feature_converters.model_kwargs(batch, "encoder_decoder" if isinstance(model, EncoderDecoder) else "prefix_lm")


def loss_sums(model: nn.Module, params, batch: Batch, dropout_rng, loss_config: LossConfig) -> losses.LossSums:
    deterministic = dropout_rng is None
    rngs = None if deterministic else {"dropout": dropout_rng}
    logits = model.apply({"params": params}, **model_inputs(model, batch), deterministic=deterministic, rngs=rngs)
    weights = batch.get("decoder_loss_weights")
    if weights is None:
        weights = batch["decoder_target_tokens"] > 0
    return losses.cross_entropy_sums(
        logits, batch["decoder_target_tokens"], weights.astype(jnp.float32),
        z_loss=loss_config.z_loss, label_smoothing=loss_config.label_smoothing,
    )


def _split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
    """`[batch, ...]` -> `[microbatches, batch/microbatches, ...]` (row i goes to microbatch i // size)."""
    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by num_microbatches={num_microbatches}")
        return x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])
    return jax.tree_util.tree_map(split, batch)


def gradient_sums(model, params, batch, dropout_rng, loss_config, num_microbatches: int, trainable=None):
    """Summed loss statistics and the gradient of the summed loss, accumulated over microbatches.

    Accumulating *sums* and normalising once at the end makes k microbatches give exactly the full-batch
    gradient (up to float summation order), whatever the padding in each microbatch.

    `trainable(path) -> bool` (optim.trainable_parameters): the gradients of the other parameters are zeros.
    Nothing reads their computed values then, so XLA drops the weight-gradient matmuls of frozen kernels: a
    LoRA step back-propagates through the activations and forms only the adapters' gradients.
    """
    def sums_and_grads(mb, rng):
        def summed_loss(p):
            stats = loss_sums(model, p, mb, rng, loss_config)
            return stats.loss, stats

        (_, stats), grads = jax.value_and_grad(summed_loss, has_aux=True)(params)
        return stats, zero_frozen(grads, trainable)

    if num_microbatches <= 1:
        return sums_and_grads(batch, dropout_rng)
    micro = _split_microbatches(batch, num_microbatches)
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    zero_stats = losses.LossSums(*(jnp.zeros((), jnp.float32) for _ in losses.LossSums._fields))

    def body(carry, xs):
        stats, grads = carry
        mb, index = xs
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        mb_stats, mb_grads = sums_and_grads(mb, rng)
        stats = losses.LossSums(*(a + b for a, b in zip(stats, mb_stats)))
        return (stats, jax.tree_util.tree_map(jnp.add, grads, mb_grads)), None

    (stats, grads), _ = jax.lax.scan(body, (zero_stats, zero_grads), (micro, jnp.arange(num_microbatches)))
    return stats, grads


def zero_frozen(grads, trainable=None):
    """`grads` with zeros for every parameter `trainable` rejects (unchanged when `trainable` is None)."""
    if trainable is None:
        return grads
    labels = optim.trainable_labels(trainable, grads)
    return jax.tree_util.tree_map(lambda g, label: g if label == "train" else jnp.zeros_like(g), grads, labels)


def train_step(
    state: TrainState, batch: Batch, dropout_rng, *, model, optimizer: optax.GradientTransformation,
    loss_config: LossConfig, num_microbatches: int = 1, trainable=None,
) -> Tuple[TrainState, Dict[str, jax.Array]]:
    """One optimizer update. Non-finite gradients skip the update (params and optimizer state unchanged).
    With `trainable` (optim.trainable_parameters) only those parameters have gradients; `grad_norm` is theirs."""
    stats, grads = gradient_sums(model, state.params, batch, dropout_rng, loss_config, num_microbatches, trainable)
    denominator = loss_config.normalizing_factor or jnp.maximum(stats.weight, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denominator, grads)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(stats.loss)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = TrainState(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        skipped=state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
    )
    weight = jnp.maximum(stats.weight, 1.0)
    metrics = {
        "loss": stats.loss / weight,
        "z_loss": stats.z_loss / weight,
        "accuracy": stats.correct / weight,
        "target_tokens": stats.weight,
        "grad_norm": grad_norm,
        "skipped_steps": new_state.skipped,
    }
    return new_state, metrics


def eval_step(params, batch: Batch, *, model, loss_config: LossConfig) -> Dict[str, jax.Array]:
    stats = loss_sums(model, params, batch, None, loss_config)
    return {"loss_sum": stats.loss, "correct": stats.correct, "weight": stats.weight}


# ------------------------------------------------------------------------------------------------ state


def param_axes(model: nn.Module):
    """Each parameter's logical axis names (a tree of PartitionSpecs), from abstract shapes: what
    `optim.make_optimizer(param_axes=...)` needs for Adafactor's factoring."""
    return nn.get_partition_spec(abstract_boxed_params(model))


def unbox_values(boxed):
    """The raw values of boxed params, without the sharding constraint `nn.unbox` applies under a mesh."""
    return jax.tree_util.tree_map(
        lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def state_shardings(model: nn.Module, optimizer, mesh, rules):
    """Shardings of every TrainState leaf, computed without allocating anything.

    Parameters follow their logical names. Each optimizer-state copy of a parameter (Adam moments, Adafactor's
    unfactored second moment) takes that parameter's sharding, and Adafactor's factored row/column statistics
    (kept at the parameter's rank, reduced dims of size 1) take it with the reduced dims replicated; everything
    else (step counts) is replicated. Left to the
    compiler, `optimizer.init`'s zeros would come out fully replicated on every device.
    """
    param_shardings = partitioning.param_shardings(abstract_boxed_params(model), mesh, rules)
    params = abstract_params(model, param_shardings)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731  (a frozen parameter's empty state)
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda leaf, param: leaf if masked(leaf) else _derived_sharding(leaf, param, replicated),
        jax.eval_shape(optimizer.init, params),
        params,
        transform_non_params=lambda _: replicated,
        is_leaf=masked,
    )
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, skipped=replicated)


def _derived_sharding(leaf, param, replicated):
    """The sharding of an optimizer-state leaf that mirrors `param`: same shape (moments), or same rank with
    some dims reduced to size 1 (Adafactor's factored statistics), where the reduced dims are replicated."""
    if len(leaf.shape) != len(param.shape):
        return replicated
    spec = tuple(param.sharding.spec) + (None,) * (len(param.shape) - len(param.sharding.spec))
    kept = [axis if n == full else None for axis, n, full in zip(spec, leaf.shape, param.shape)]
    if any(n not in (1, full) for n, full in zip(leaf.shape, param.shape)):
        return replicated
    return jax.sharding.NamedSharding(param.sharding.mesh, jax.sharding.PartitionSpec(*kept))


def abstract_state(model, optimizer, shardings: TrainState) -> TrainState:
    """`jax.ShapeDtypeStruct`s of the state, each with its sharding: the restore target of a checkpoint."""
    shapes = jax.eval_shape(lambda: init_state_fn(model, optimizer)(jax.random.PRNGKey(0)))
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


def init_state_fn(model, optimizer) -> Callable[[jax.Array], TrainState]:
    def init(rng):
        return _fresh_state(optimizer, _random_params(model, rng))
    return init


def _fresh_state(optimizer, params) -> TrainState:
    """Step 0 around `params`, with the optimizer state `optimizer.init` gives them."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      skipped=jnp.zeros((), jnp.int32))


def init_state(model, optimizer, shardings: TrainState, seed: int) -> TrainState:
    """Initialises the state directly into its shardings (no full copy on any one device)."""
    return jax.jit(init_state_fn(model, optimizer), out_shardings=shardings)(jax.random.PRNGKey(seed))


def init_params(model, param_shardings, seed: int):
    """Freshly initialised parameters, directly in their shardings."""
    init = jax.jit(functools.partial(_random_params, model), out_shardings=param_shardings)
    return init(jax.random.PRNGKey(seed))


def _random_params(model, rng):
    return nn.unbox(model.init(rng, *dummy_inputs(model))["params"])


def abstract_params(model, param_shardings):
    """`jax.ShapeDtypeStruct`s of the parameters with their shardings: a restore target for `restore_params`."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  unbox_values(abstract_boxed_params(model)), param_shardings)


def state_from_params(optimizer, shardings: TrainState, params) -> TrainState:
    """A step-0 state around given (e.g. pre-trained) parameters with a fresh optimizer state, laid out by
    `shardings`: how fine-tuning starts. `params` is donated (it becomes the state's parameters)."""
    build = jax.jit(functools.partial(_fresh_state, optimizer), in_shardings=(shardings.params,),
                    out_shardings=shardings, donate_argnums=(0,))
    return build(params)


def compile_train_step(model, optimizer, loss_config, shardings: TrainState, batch_shardings, num_microbatches=1,
                       trainable=None):
    step_fn = functools.partial(
        train_step, model=model, optimizer=optimizer, loss_config=loss_config, num_microbatches=num_microbatches,
        trainable=trainable,
    )
    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_shardings, None),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )


def device_batch(batch: Batch, mesh, rules) -> Dict[str, jax.Array]:
    """Host numpy batch -> global arrays sharded over `data`.

    Each process holds the rows of its own data shards (`make_array_from_process_local_data`), so the same code
    serves one CPU and a multi-host pod.
    """
    out = {}
    for key, value in batch.items():
        sharding = partitioning.batch_sharding(mesh, rules, ndim=value.ndim)
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return out


def check_batch_divisible(batch_size: int, mesh, num_microbatches: int = 1) -> None:
    gin_utils.check_positive_int("batch_size", batch_size)
    gin_utils.check_positive_int("num_microbatches", num_microbatches)
    data = mesh.shape["data"]
    if batch_size % (data * num_microbatches):
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the data axis ({data})"
            + (f" × num_microbatches ({num_microbatches})" if num_microbatches > 1 else "")
        )


# ------------------------------------------------------------------------------------------------ logging


class MetricsWriter:
    """Writes scalars to TensorBoard and to `metrics.jsonl` (the machine-readable loss curve).

    On resume the JSONL file is truncated to the restored step, so the curve of an interrupted and resumed run
    is line-for-line the curve of an uninterrupted one.
    """

    def __init__(self, log_dir: str, resume_step: int):
        os.makedirs(log_dir, exist_ok=True)
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl")
        self._truncate_after(resume_step)
        import tensorflow as tf  # TensorBoard event files; imported here to keep `import t5k.trainer` light

        self._tf = tf
        self._writer = tf.summary.create_file_writer(log_dir)

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.jsonl_path):
            return
        with open(self.jsonl_path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        files.write_text(self.jsonl_path, "".join(kept))

    def write(self, step: int, scalars: Dict[str, float]) -> None:
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"step": step, **scalars}, sort_keys=True) + "\n")
        with self._writer.as_default(step=step):
            for name, value in scalars.items():
                self._tf.summary.scalar(name, value)
        self._writer.flush()

    def close(self):
        self._writer.close()


# Wall-clock figures: they differ between an interrupted-and-resumed run and an uninterrupted one, while every
# other logged scalar is bit-identical (tests/test_train_loop.py compares all keys but these).
TIMING_METRICS = ("tokens_per_s", "steps_per_s", "mfu")


def real_tokens(batch: Batch) -> float:
    """Non-padding input + target tokens of a host batch (what tokens/s counts)."""
    return float(sum(np.count_nonzero(batch[k]) for k in ("encoder_input_tokens", "decoder_target_tokens")
                     if k in batch))


def to_host(metrics: Dict[str, jax.Array]) -> Dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def log_line(step: int, scalars: Dict[str, float]) -> str:
    keys = ("loss", "accuracy", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "skipped_steps")
    return f"step {step}: " + " ".join(f"{k}={scalars[k]:.4g}" for k in keys if k in scalars)
