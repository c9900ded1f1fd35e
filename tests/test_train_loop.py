"""The `t5k train` loop end to end: loss falls, and a SIGKILLed run resumed by the same command continues
bit-for-bit as an uninterrupted one (final params and the logged loss curve)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5k import trainer

# A very small CT5 on the real embedded corpus and the shipped vocabulary; every step is cheap.
TINY = [
    "--gin_file=gin/runs/quickstart.gin",
    "--gin.TransformerConfig.d_model=32",
    "--gin.TransformerConfig.num_heads=2",
    "--gin.TransformerConfig.head_dim=16",
    "--gin.TransformerConfig.d_ff=64",
    "--gin.TransformerConfig.num_encoder_layers=1",
    "--gin.TransformerConfig.num_decoder_layers=1",
    "--gin.train.task_feature_lengths={'inputs': 64, 'targets': 16}",
    "--gin.train.batch_size=8",
    "--gin.train.train_steps=24",
    "--gin.train.log_every=1",
    "--gin.train.eval_every=0",
    "--gin.train.checkpoint_every=8",
    "--gin.train.predict_examples=0",
    "--gin.rsqrt_schedule.warmup_steps=10",
    "--gin.DecodeConfig.max_new_tokens=4",  # the evaluation's decoding settings bind on the command line too
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(model_dir):
    return [sys.executable, "-m", "t5k.cli", "train", f"--model_dir={model_dir}", *TINY]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # one CPU device, like a laptop run
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def _run(model_dir):
    result = subprocess.run(_command(model_dir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _curve(model_dir):
    with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _final_params(model_dir):
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(model_dir), "checkpoints"))
    restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
    return manager.latest_step(), restored["params"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("straight"))
    _run(model_dir)
    return model_dir


def test_loss_falls_and_logs_are_written(uninterrupted):
    curve = _curve(uninterrupted)
    assert [row["step"] for row in curve] == list(range(1, 25))
    first, last = np.mean([r["loss"] for r in curve[:3]]), np.mean([r["loss"] for r in curve[-3:]])
    assert last < 0.8 * first, (first, last)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(uninterrupted, "train")))


def test_sigkill_then_resume_is_bit_identical(uninterrupted, tmp_path):
    model_dir = str(tmp_path / "killed")
    process = subprocess.Popen(_command(model_dir), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    steps_seen = _follow_steps(process)
    # Kill it at a random step after the first checkpoint (step 8) and before the end, once that checkpoint is
    # committed: saving is asynchronous, so on a busy machine step 9 can come before step 8's save is renamed
    # into place (a kill then would restart from scratch, which is right but not what this test is about).
    kill_at = 8 + int(np.random.default_rng().integers(1, 12))
    deadline = time.time() + 500
    while not (steps_seen[-1] >= kill_at and _committed_steps(model_dir)):
        assert process.poll() is None, f"the run ended before it could be killed (steps seen: {steps_seen[-1]})"
        assert time.time() < deadline, f"no committed checkpoint and step {kill_at} within 500 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    resumed = _run(model_dir)
    assert "resumed from step" in resumed.stdout

    assert _without_timing(_curve(model_dir)) == _without_timing(_curve(uninterrupted))
    step, params = _final_params(model_dir)
    ref_step, ref_params = _final_params(uninterrupted)
    assert step == ref_step == 24
    flat = dict(_leaves(params))
    for path, value in _leaves(ref_params):
        np.testing.assert_array_equal(flat[path], value, err_msg=path)


def _follow_steps(process):
    """A list whose last item is the latest `step N:` line `process` printed (0 before any), kept current by a
    thread that reads its stdout (so the pipe never fills)."""
    seen = [0]

    def read():
        for line in process.stdout:
            match = re.match(r"step (\d+):", line)
            if match:
                seen.append(int(match.group(1)))

    threading.Thread(target=read, daemon=True).start()
    return seen


def _committed_steps(model_dir):
    """The checkpoint steps Orbax has finished: their directories are renamed from a temporary name when done."""
    directory = os.path.join(model_dir, "checkpoints")
    return [int(name) for name in os.listdir(directory) if name.isdigit()] if os.path.isdir(directory) else []


def _without_timing(curve):
    """Every logged scalar but the wall-clock ones, which must be there (and only they are left out)."""
    for row in curve:
        assert all(row[k] > 0 for k in trainer.TIMING_METRICS), row
    kept = [{k: v for k, v in row.items() if k not in trainer.TIMING_METRICS} for row in curve]
    assert all({"loss", "accuracy", "learning_rate", "grad_norm", "skipped_steps"} <= set(row) for row in kept)
    return kept


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield prefix + key, np.asarray(value)


def test_bad_configuration_fails_in_one_line_before_compiling(tmp_path):
    cases = {
        "--gin.train.no_such_option=1": "no_such_option",
        "--gin.create_mesh.data=3": "does not divide",
        "--gin.train.mixture_or_task_name='no_such_task'": "no_such_task",
        "--gin.train.checkpoint_every=0": "train.checkpoint_every = 0; expected a positive integer",
        "--gin.trainable_parameters.pattern='.*/lora_[ab]'": "trainable_parameters.pattern matches none of the model",
    }
    for flag, expected in cases.items():
        result = subprocess.run(_command(str(tmp_path / "bad")) + [flag], cwd=ROOT, env=_env(), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 2, (flag, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.startswith("t5k train:")]
        assert len(lines) == 1 and expected in lines[0], (flag, result.stderr[-2000:])


def _opt_counts(model_dir):
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(model_dir), "checkpoints"))
    restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
    return [int(v) for path, v in _leaves({"opt_state": _as_dict(restored["opt_state"])}) if path.endswith("count")]


def _as_dict(tree):
    """Orbax returns sequences for tuple nodes: index them like dict keys."""
    if isinstance(tree, dict):
        return {k: _as_dict(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {str(i): _as_dict(v) for i, v in enumerate(tree)}
    return tree


# Fine-tuning at learning rate 0 for 3 steps: every step sees the starting parameters.
AT_REST = ["--gin.train.train_steps=3", "--gin.train.checkpoint_every=3", "--gin.train.schedule=@constant_schedule()",
           "--gin.constant_schedule.learning_rate=0.0"]


@pytest.fixture(scope="module")
def finetuned_at_rest(uninterrupted, tmp_path_factory):
    """(model_dir, stdout) of a run that starts from the trained checkpoint at learning rate 0."""
    model_dir = str(tmp_path_factory.mktemp("finetune"))
    result = subprocess.run(_command(model_dir) + AT_REST + [f"--gin.train.init_checkpoint='{uninterrupted}'"],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir, result.stdout


def test_finetuning_starts_from_the_checkpoint_parameters_with_a_fresh_state(uninterrupted, finetuned_at_rest):
    """train.init_checkpoint: the new run's step and optimizer state start at 0, its parameters are the
    checkpoint's (a zero learning rate keeps them bit-identical), and its first loss is the trained model's."""
    model_dir, stdout = finetuned_at_rest
    assert f"parameters from {os.path.join(uninterrupted, 'checkpoints')}, fresh optimizer state" in stdout
    step, params = _final_params(model_dir)
    assert step == 3  # counted from 0, not from the checkpoint's 24
    assert _opt_counts(model_dir) and set(_opt_counts(model_dir)) == {3}
    flat = dict(_leaves(params))
    for path, value in _leaves(_final_params(uninterrupted)[1]):
        np.testing.assert_array_equal(flat[path], value, err_msg=path)
    # Same data and seed as the pre-training run: its first batch, scored by the trained parameters.
    pretrained, finetuned = _curve(uninterrupted), _curve(model_dir)
    assert finetuned[0]["loss"] < 0.8 * pretrained[0]["loss"], (finetuned[0], pretrained[0])
    assert finetuned[0]["learning_rate"] == 0.0


def test_lora_finetuning_trains_fresh_adapters_on_frozen_checkpoint_kernels(uninterrupted, tmp_path):
    """gin/runs/lora.gin on the pre-trained checkpoint: the adapters start fresh (the checkpoint has none) and are
    all the run changes; the optimizer state (AdamW's two moments) is the adapters' size."""
    model_dir = str(tmp_path / "lora")
    flags = ["--gin_file=gin/runs/lora.gin", f"--gin.INIT_CHECKPOINT='{uninterrupted}'", "--gin.LORA_RANK=2",
             "--gin.train.train_steps=4", "--gin.train.checkpoint_every=4", "--gin.train.eval_every=0",
             "--gin.train.batch_size=8", "--gin.train.task_feature_lengths={'inputs': 64, 'targets': 16}"]
    result = subprocess.run(_command(model_dir) + flags, cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"parameters from {os.path.join(uninterrupted, 'checkpoints')}, fresh optimizer state" in result.stdout
    step, params = _final_params(model_dir)
    assert step == 4
    tuned = dict(_leaves(params))
    adapters = {path for path in tuned if path.rsplit("/", 1)[-1] in ("lora_a", "lora_b")}
    # query and value of 3 attention layers (encoder self, decoder self and cross), A and B each
    assert len(adapters) == 3 * 2 * 2
    assert all(np.any(tuned[path] != 0) for path in adapters if path.endswith("lora_b"))  # B moved from 0
    pretrained = dict(_leaves(_final_params(uninterrupted)[1]))
    assert set(tuned) - adapters == set(pretrained)
    for path, value in pretrained.items():
        np.testing.assert_array_equal(tuned[path], value, err_msg=path)
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(model_dir), "checkpoints"))
    opt_state = manager.restore(step, args=ocp.args.StandardRestore())["opt_state"]
    state_size = sum(np.size(v) for _, v in _leaves({"opt_state": _as_dict(opt_state)}) if np.ndim(v) > 0)
    assert state_size == 2 * sum(tuned[path].size for path in adapters)


def test_a_grown_checkpoint_starts_where_the_small_model_stood(uninterrupted, finetuned_at_rest, tmp_path):
    """`t5k grow` (FPI: d_model, heads and d_ff doubled) on the trained run, then `t5k train` from the grown
    checkpoint at learning rate 0: its first loss is the small model's on the same batch (the run from the source at
    rest)."""
    wide = ["--gin.TransformerConfig.d_model=64", "--gin.TransformerConfig.num_heads=4",
            "--gin.TransformerConfig.d_ff=128"]
    grown = str(tmp_path / "grown")
    result = subprocess.run([sys.executable, "-m", "t5k.cli", "grow", f"--checkpoint={uninterrupted}",
                             f"--out={grown}", *TINY, *wide], cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["method"] == "fpi" and summary["grown_params"] > 2 * summary["source_params"]
    model_dir = str(tmp_path / "from_grown")
    run = subprocess.run(_command(model_dir) + wide + AT_REST + [f"--gin.train.init_checkpoint='{grown}'"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    first_losses = [_curve(finetuned_at_rest[0])[0]["loss"], _curve(model_dir)[0]["loss"]]
    assert first_losses[1] == pytest.approx(first_losses[0], rel=1e-4)
    # A second grow into the same place is refused rather than mixed in.
    again = subprocess.run([sys.executable, "-m", "t5k.cli", "grow", f"--checkpoint={uninterrupted}", f"--out={grown}",
                            *TINY, *wide], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr


def test_incompatible_checkpoints_fail_in_one_line_naming_the_leaves(uninterrupted, tmp_path):
    """A fine-tuning source of another shape, and a resumed model_dir written with another optimizer: one line
    each, naming what differs, before any compilation."""
    import shutil

    resumed = str(tmp_path / "other_optimizer")
    shutil.copytree(uninterrupted, resumed)
    cases = [
        (str(tmp_path / "wider"), [f"--gin.train.init_checkpoint='{uninterrupted}'",
                                   "--gin.TransformerConfig.d_ff=48"],
         "has shape (32, 48) but its source"),
        (resumed, ["--gin.make_optimizer.optimizer=@adamw"],
         "Only the optimizer state differs"),
        (str(tmp_path / "missing"), [f"--gin.train.init_checkpoint='{tmp_path / 'nothing_here'}'"],
         "no checkpoint directory"),
    ]
    for model_dir, flags, expected in cases:
        result = subprocess.run(_command(model_dir) + flags, cwd=ROOT, env=_env(), capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2, (flags, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.startswith("t5k train:")]
        assert len(lines) == 1 and expected in lines[0], (flags, result.stderr[-2000:])
