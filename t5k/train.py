"""`t5k train`: the training loop, configured entirely by gin.

    t5k train --gin_file=gin/runs/quickstart.gin [--gin_file=gin/mesh/fsdp.gin] [--gin.train.train_steps=100]

The loop is flat on purpose (MaxText style): every line below is a step a researcher may want to change.
"""

import argparse
import json
import os
import sys
from typing import Dict, Mapping, Optional, Sequence, Tuple

import gin
import jax
import numpy as np
from tqdm import tqdm

from t5k import checkpoints, cli, decoding, gin_utils, optim, partitioning, records, throughput, trainer, vocab
from t5k.models import EncoderDecoder, build_model


@gin.configurable(denylist=["model_dir"])
def train(
    model_dir: str,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    seed: int = 0,
    pack: bool = True,
    num_microbatches: int = 1,
    log_every: int = 10,
    eval_every: int = 0,
    eval_batches: int = 4,
    eval_metric_examples: int = 64,
    checkpoint_every: int = 1000,
    keep_checkpoints: Optional[int] = 3,
    predict_examples: int = 0,
    predict_length: int = 32,
    schedule: Optional[optim.Schedule] = None,
    model_type: Optional[str] = None,
    peak_flops_per_s: Optional[float] = None,
    init_checkpoint: Optional[str] = None,
    init_step: Optional[int] = None,
    init_assignment_map: Optional[Sequence[Tuple[str, Optional[str]]]] = None,
) -> Dict[str, float]:
    """Trains `build_model()` on a seqio task; returns the last logged scalars.

    The mesh comes from `create_mesh.*` bindings (gin/mesh/*.gin), the rules from `logical_axis_rules.*`, the
    optimizer from `make_optimizer.*`; `schedule` defaults to T5's `rsqrt_schedule()`. `model_type` picks the
    feature converter ('encoder_decoder' | 'decoder' | 'prefix_lm'; default from the model, see
    `default_model_type`).
    `peak_flops_per_s` (per device) is the MFU denominator; None measures it with a float32 matmul probe on the
    first device (right for a CPU; give the datasheet figure on GPU/TPU). See `t5k.throughput`.
    Every `eval_every` steps: loss and token accuracy on `eval_batches` validation batches, and the seqio metrics
    of the task (or of each task of the mixture) that has metric functions, on its first `eval_metric_examples`
    validation examples (0: skip), logged as `eval_{task}/{metric}` (see `task_metrics`).
    Resumes from the latest checkpoint in `model_dir/checkpoints` if there is one: the batch stream restarts at
    the restored step, so the continued run equals an uninterrupted one.
    Fine-tuning and adaptation (gin/runs/finetune.gin, dialog_adapt.gin): while `model_dir` has no checkpoint,
    the parameters come from `init_checkpoint` (a model_dir, its `checkpoints/` or a step directory; the newest
    step unless `init_step`), read onto this run's mesh by `checkpoints.restore_params` with `init_assignment_map`
    (regex -> source path, or None to keep the fresh value: new or renamed parameters); the step, the optimizer
    state and the schedule start from zero. Once `model_dir` has checkpoints of its own, resuming from them wins.
    """
    # Everything that can be wrong with the configuration fails here, before any compilation.
    for name, value in (("train_steps", train_steps), ("log_every", log_every), ("checkpoint_every", checkpoint_every)):
        gin_utils.check_positive_int(f"train.{name}", value)
    if keep_checkpoints is not None:
        gin_utils.check_positive_int("train.keep_checkpoints", keep_checkpoints)
    for name, value in (("eval_every", eval_every), ("eval_metric_examples", eval_metric_examples)):
        gin_utils.check_positive_int(f"train.{name}", value, allow_zero=True)  # 0: off
    partitioning.initialize_distributed()  # multi-host: before anything asks jax for its devices
    model = build_model()
    mesh = partitioning.create_mesh()
    rules = partitioning.logical_axis_rules()
    trainer.check_batch_divisible(batch_size, mesh, num_microbatches)
    schedule = schedule or optim.rsqrt_schedule()
    trainable = optim.trainable_parameters()  # None: all (gin: trainable_parameters.pattern)
    param_axes = trainer.param_axes(model)
    optim.check_trains_something(trainable, param_axes)
    optimizer = optim.make_optimizer(schedule=schedule, param_axes=param_axes, trainable=trainable)
    loss_config = trainer.LossConfig()
    # The feature converter: seqio's EncDec, Decoder (causal LM) or PrefixLM layout.
    model_type = model_type or default_model_type(model)
    check_model_type(model, model_type)
    import seqio

    from t5k_tasks import pipeline  # registers the seqio tasks and mixtures

    if mixture_or_task_name not in _registered_names():
        raise ValueError(f"train.mixture_or_task_name: no task or mixture named {mixture_or_task_name!r} "
                         f"({cli.UNKNOWN_TASK_HINT})")
    task_features = seqio.get_mixture_or_task(mixture_or_task_name).output_features
    task_vocabulary = task_features["targets"].vocabulary
    vocab.check_tasks_follow_gin(task_vocabulary, f"task {mixture_or_task_name!r}")
    vocab.check_fits_model(task_vocabulary, model.config.vocab_size)
    # The checkpoints' ids mean text only in the vocabulary they were trained with (recorded next to them).
    # So do settings that change what the parameters compute without changing their shapes (t5k.records).
    checkpoint_dir = os.path.join(model_dir, "checkpoints")
    init_directory = checkpoints.checkpoint_directory(init_checkpoint) if init_checkpoint else None
    if records.has_steps(checkpoint_dir):
        records.check(checkpoint_dir, task_vocabulary, model, f"model_dir {model_dir}")
    elif init_checkpoint:
        records.check_vocabulary(init_directory, task_vocabulary, f"train.init_checkpoint {init_checkpoint}")
        changed = records.model_differences(init_directory, model)
        if changed:  # fine-tuning may change them on purpose (e.g. a causal LM fine-tuned as a prefix LM)
            print(f"t5k train: note: starting from {init_checkpoint} with other settings: {'; '.join(changed)}",
                  flush=True)

    with partitioning.activate(mesh, rules):
        shardings = trainer.state_shardings(model, optimizer, mesh, rules)
        manager = checkpoints.checkpoint_manager(
            checkpoint_dir, save_interval_steps=checkpoint_every, max_to_keep=keep_checkpoints
        )
        records.write(checkpoint_dir, task_vocabulary, model)
        if manager.latest_step() is not None:
            state = checkpoints.restore(manager, trainer.abstract_state(model, optimizer, shardings))
            print(f"t5k train: resumed from step {int(state.step)} in {model_dir}", flush=True)
        elif init_checkpoint:
            params = initial_params(model, shardings, seed, init_directory, init_step, init_assignment_map)
            state = trainer.state_from_params(optimizer, shardings, params)
            print(f"t5k train: parameters from {init_directory}" + ("" if init_step is None else f" (step {init_step})")
                  + ", fresh optimizer state", flush=True)
        else:
            state = trainer.init_state(model, optimizer, shardings, seed)
        start = int(state.step)
        host_rows, shard_index, num_shards = partitioning.host_batch_shard(batch_size)
        batches = pipeline.get_batches(
            mixture_or_task_name, task_feature_lengths, host_rows, split="train", seed=seed, start_step=start,
            model_type=model_type, pack=pack, shard_index=shard_index, num_shards=num_shards,
        )
        first = next(batches)
        batch_shardings = {k: partitioning.batch_sharding(mesh, rules, v.ndim) for k, v in first.items()}
        step_fn = trainer.compile_train_step(model, optimizer, loss_config, shardings, batch_shardings,
                                             num_microbatches, trainable)
        dropout_key = jax.random.PRNGKey(seed + 1)
        writer = trainer.MetricsWriter(os.path.join(model_dir, "train"), resume_step=start)
        last: Dict[str, float] = {}
        # The first window of a process includes the train step's compilation (its first call).
        meter = throughput.ThroughputMeter(
            throughput.step_flops(model, {k: (batch_size,) + v.shape[1:] for k, v in first.items()}),
            peak_flops_per_s or throughput.measure_matmul_peak(dtype=model.config.compute_dtype),
            num_devices=mesh.devices.size)
        batch = first
        progress = tqdm(range(start, train_steps), initial=start, total=train_steps, desc="train",
                        disable=not sys.stderr.isatty())
        for step in progress:
            if step > start:
                batch = next(batches)
            state, metrics = step_fn(state, trainer.device_batch(batch, mesh, rules),
                                     jax.random.fold_in(dropout_key, step))
            meter.add(trainer.real_tokens(batch) * num_shards)  # other hosts' batches: as many rows
            done = step + 1
            if done == 1 or done % log_every == 0 or done == train_steps:  # step 1: the starting loss
                scalars = trainer.to_host(metrics)  # waits for the step: the window's time is complete
                scalars.update(meter.read())
                # The optimizer counts applied updates only: a skipped step does not advance its schedule.
                scalars["learning_rate"] = optim.learning_rate_at(schedule, step - int(scalars["skipped_steps"]))
                writer.write(done, scalars)
                progress.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{scalars['tokens_per_s']:.0f}",
                                     mfu=f"{scalars['mfu']:.1%}")
                print(trainer.log_line(done, scalars), flush=True)
                last = scalars
            if done % checkpoint_every == 0 or done == train_steps:  # Orbax alone would also save the first step
                checkpoints.save(manager, done, state, force=True)
            if eval_every and (done % eval_every == 0 or done == train_steps):
                last.update(evaluate(model, state.params, mesh, rules, mixture_or_task_name, task_feature_lengths,
                                     batch_size, eval_batches, model_type, pack, seed))
                if eval_metric_examples:
                    last.update(task_metrics(model, state.params, mesh, rules, mixture_or_task_name,
                                             task_feature_lengths, eval_metric_examples, batch_size, seed))
                evaluated = {k: v for k, v in last.items() if k.startswith("eval_")}
                writer.write(done, evaluated)
                print(f"step {done}: " + " ".join(f"{k}={v:.4g}" for k, v in evaluated.items()), flush=True)
                meter.restart()  # evaluation time is not training throughput
        manager.wait_until_finished()
        writer.close()
        if predict_examples and isinstance(model, EncoderDecoder):
            show_predictions(model, state.params, mixture_or_task_name, task_feature_lengths, predict_examples,
                             predict_length, seed)
    return last


def initial_params(model, shardings, seed, directory, step, assignment_map):
    """The parameters a fine-tuning run starts from: `directory`'s, restored straight into this run's shardings.
    With an assignment map, the targets it maps to None keep freshly initialised values (seed `seed`)."""
    target = trainer.abstract_params(model, shardings.params)
    fresh = trainer.init_params(model, shardings.params, seed) if assignment_map else None
    return checkpoints.restore_params(directory, target, step=step, assignment_map=assignment_map, fallback=fresh)


def default_model_type(model) -> str:
    """The feature converter a model learns from: 'encoder_decoder', or for a decoder-only model 'prefix_lm'
    when its config says it is a prefix LM (`TransformerConfig.prefix_lm`) and 'decoder' otherwise."""
    if isinstance(model, EncoderDecoder):
        return "encoder_decoder"
    return "prefix_lm" if model.config.prefix_lm else "decoder"


def check_model_type(model, model_type: str) -> None:
    """Refuses a decoder-only feature converter that disagrees with `TransformerConfig.prefix_lm`: inference
    reads the prompt the way the config says, so a model trained otherwise would be decoded wrongly."""
    if isinstance(model, EncoderDecoder) or model_type not in ("decoder", "prefix_lm"):
        return
    if (model_type == "prefix_lm") != model.config.prefix_lm:
        raise ValueError(f"train.model_type = {model_type!r} but TransformerConfig.prefix_lm = {model.config.prefix_lm}: "
                         f"bind TransformerConfig.prefix_lm = {model_type == 'prefix_lm'} (inference reads the prompt "
                         f"{'bidirectionally' if model_type == 'prefix_lm' else 'causally'} only when they agree)")


def evaluate(model, params, mesh, rules, name, lengths, batch_size, num_batches, model_type, pack, seed):
    """Loss and token accuracy on the first `num_batches` validation batches."""
    from t5k_tasks import pipeline

    loss_config = trainer.LossConfig()
    eval_fn = jax.jit(lambda p, b: trainer.eval_step(p, b, model=model, loss_config=loss_config))
    host_rows, shard_index, num_shards = partitioning.host_batch_shard(batch_size)
    batches = pipeline.get_batches(name, lengths, host_rows, split="validation", seed=seed, model_type=model_type,
                                   pack=pack, shard_index=shard_index, num_shards=num_shards)
    totals = np.zeros(3)
    for _, batch in zip(range(num_batches), batches):
        out = jax.device_get(eval_fn(params, trainer.device_batch(batch, mesh, rules)))
        totals += [out["loss_sum"], out["correct"], out["weight"]]
    weight = max(totals[2], 1.0)
    return {"eval_loss": totals[0] / weight, "eval_accuracy": totals[1] / weight}


def task_metrics(model, params, mesh, rules, name, lengths, num_examples, batch_size, seed) -> Dict[str, float]:
    """The seqio metrics of task `name` (of each task, for a mixture) that has metric functions and an `inputs`
    feature, on its first `num_examples` validation examples: `t5k eval`'s `evaluate_task`, i.e. the task's
    postprocessor and metrics over predictions from `decoding.generate` (gin `DecodeConfig`, greedy by default)
    or, for multiple-choice tasks, rank classification. Pre-training objectives have no metrics: {}."""
    import seqio

    from t5k import evaluation, model_loading

    task_or_mixture = seqio.get_mixture_or_task(name)
    tasks = task_or_mixture.tasks if isinstance(task_or_mixture, seqio.Mixture) else [task_or_mixture]
    scored = [t for t in tasks if (t.predict_metric_fns or t.score_metric_fns) and "inputs" in t.output_features
              and "validation" in t.splits]
    out: Dict[str, float] = {}
    for task in scored:
        vocabulary = task.output_features["targets"].vocabulary
        loaded = model_loading.LoadedModel(model, params, mesh, rules, vocabulary, source="training")
        result = evaluation.evaluate_task(loaded, task.name, lengths, "validation", num_examples, batch_size,
                                          decoding.DecodeConfig(), evaluation.task_choices(task.name), seed)
        out.update({f"eval_{task.name}/{metric}": value for metric, value in result.metrics.items()})
    return out


def show_predictions(model, params, name, lengths, count, max_length, seed):
    """Prints span-filling predictions next to the truth for a few validation examples (unpacked)."""
    import seqio
    from t5k.decoding import greedy_decode_uncached
    from t5k_tasks import pipeline

    vocab = seqio.get_mixture_or_task(name).output_features["targets"].vocabulary
    batch = next(pipeline.get_batches(name, lengths, count, split="validation", seed=seed, pack=False))
    outputs = np.asarray(greedy_decode_uncached(model, params, batch["encoder_input_tokens"], max_length))
    for i in range(count):
        print(f"\n[{i}] input:      {vocab.decode(batch['encoder_input_tokens'][i].tolist())}")
        print(f"[{i}] truth:      {vocab.decode(batch['decoder_target_tokens'][i].tolist())}")
        print(f"[{i}] prediction: {vocab.decode(outputs[i].tolist())}")


def _registered_names():
    import seqio

    return set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())


def configure_parser(parser: argparse.ArgumentParser) -> None:
    gin_utils.add_gin_arguments(parser)
    parser.add_argument("--model_dir", default=None, help="checkpoints and logs (default: gin MODEL_DIR or runs/NAME)")


def run(args: argparse.Namespace, bindings=()) -> int:
    try:
        import t5k_tasks  # noqa: F401  (before gin: its configurables, e.g. pretraining_files, may be bound)
        gin_utils.parse_gin(args.gin_file, bindings, args.gin_search_path)
        model_dir = args.model_dir or _macro("MODEL_DIR") or os.path.join("runs", "default")
        last = train(model_dir)
    except (gin_utils.GinConfigError, ValueError, FileNotFoundError, KeyError) as e:
        print(cli.error_line("train", e), file=sys.stderr)
        return 2
    print(json.dumps({k: round(v, 6) for k, v in last.items()}))
    return 0


def _macro(name: str) -> Optional[str]:
    try:
        return gin.query_parameter(f"%{name}")
    except ValueError:
        return None
