"""Tiny model configurations for the tests that build their model through gin (`t5k eval`, `t5k infer`, `train`),
where `build_model()` reads it from the gin config rather than from a `TransformerConfig` in the test."""

# One layer each side, 2 heads of 8, the shipped vocabulary's size: milliseconds per step, every code path.
ENCODER_DECODER = dict(vocab_size=51200, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=1,
                       num_decoder_layers=1, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                       dtype="float32")


def model_gin(architecture: str = "encoder_decoder", **config) -> str:
    """Gin text for which `build_model()` returns `architecture` with these `TransformerConfig` fields."""
    lines = ["import t5k.models", f"build_model.architecture = {architecture!r}",
             "build_model.config = @TransformerConfig()"]
    lines += [f"TransformerConfig.{name} = {value!r}" for name, value in config.items()]
    return "\n".join(lines) + "\n"


def train_subset(model, pattern: str, batch, mesh, steps: int, learning_rate: float = 3e-2):
    """`steps` AdamW steps of `model` on one fixed `batch` (numpy), on `mesh` with FSDP rules, training only the
    parameters whose path matches `pattern` (optim.trainable_parameters), as `t5k train` does.
    Returns (first params, last params, per-step metrics, last optimizer state), all on the host."""
    import jax

    from t5k import optim, partitioning, trainer

    trainable = optim.trainable_parameters(pattern)
    tx = optim.make_optimizer(optimizer=optim.adamw, schedule=optim.constant_schedule(learning_rate),
                              param_axes=trainer.param_axes(model), trainable=trainable)
    rules = partitioning.logical_axis_rules(fsdp=True)
    with partitioning.activate(mesh, rules):
        shardings = trainer.state_shardings(model, tx, mesh, rules)
        state = trainer.init_state(model, tx, shardings, seed=0)
        first = jax.device_get(state.params)
        step = trainer.compile_train_step(model, tx, trainer.LossConfig(), shardings,
                                          {k: partitioning.batch_sharding(mesh, rules, 2) for k in batch},
                                          trainable=trainable)
        history = []
        for _ in range(steps):
            state, metrics = step(state, trainer.device_batch(batch, mesh, rules), None)
            history.append(jax.device_get(metrics))
    return first, jax.device_get(state.params), history, jax.device_get(state.opt_state)
