"""`t5k plan`: per-device memory/FLOPs of the real train step on simulated meshes, with nothing allocated.

In-process tests use the 8 simulated devices of conftest; meshes larger than that (hyperclova_82b on 64×4 = 256
devices) run the CLI in a subprocess, which sets its own device count before jax starts.
"""

import json
import os
import subprocess
import sys

import gin
import jax
import pytest

from t5k import gin_utils, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def _cli(*args, timeout):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the subprocess sets its own device count
    out = subprocess.run([sys.executable, "-m", "t5k.cli", "plan", *args, "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def gin_config():
    def parse(files, bindings=()):
        gin_utils.parse_gin(files, list(bindings))
    yield parse
    gin.clear_config()


def test_ct5_3b_on_2x4_reports_per_device_memory():
    p = _cli("--gin_file=gin/models/ct5_3b.gin", "--gin_file=gin/runs/pretrain.gin", "--devices=8",
             "--gin.create_mesh.model=4", timeout=400)
    assert p["mesh"] == {"data": 2, "model": 4} and p["devices"] == 8
    assert 2.9e9 < p["param_count"] < 3.0e9
    d = p["per_device"]
    # No FSDP: parameters are split over the model axis only (4), up to the few replicated norms/biases.
    assert p["param_bytes_total"] / 4 <= d["param_bytes"] < p["param_bytes_total"] / 4 * 1.01
    # The compiled arguments are exactly this device's state + batch shards.
    # The compiled arguments are this device's state shards + the batch rows the model reads (unused position
    # inputs of a relative-position model are pruned) + a few scalars.
    state = d["param_bytes"] + d["opt_state_bytes"]
    assert state < d["argument_bytes"] <= state + d["batch_bytes"] + 64
    assert d["alias_bytes"] > 0.99 * (d["param_bytes"] + d["opt_state_bytes"])  # the donated state is reused
    assert d["temp_bytes"] > 0 and d["flops"] > 0 and d["peak_bytes"] > d["argument_bytes"]
    assert p["scan_layers"] and "scanned" in p["scan_note"]  # 2.9B > AUTO_SCAN_PARAMS


def test_hyperclova_82b_on_64x4_in_a_subprocess():
    p = _cli("--gin_file=gin/models/hyperclova_82b.gin", "--gin_file=gin/runs/pretrain.gin", "--devices=256",
             "--gin.create_mesh.model=4", "--gin.logical_axis_rules.fsdp=True",
             "--gin.TransformerConfig.remat_policy='full'", "--task_feature_lengths=targets=2048",
             "--batch_size=256", timeout=900)
    assert p["mesh"] == {"data": 64, "model": 4} and p["devices"] == 256
    assert 8.0e10 < p["param_count"] < 8.4e10
    d = p["per_device"]
    # FSDP over 64 × tensor parallelism over 4: each device holds ~1/256 of the parameters.
    assert d["param_bytes"] < p["param_bytes_total"] / 256 * 1.05
    state = d["param_bytes"] + d["opt_state_bytes"]
    assert state < d["argument_bytes"] <= state + d["batch_bytes"] + 64
    assert d["temp_bytes"] > 0 and d["flops"] > 0


def test_fsdp_lowers_per_device_parameter_bytes_linearly(gin_config):
    """ct5_3b with FSDP on data = 1, 2, 4, 8: analytic parameter bytes per device ∝ 1/data (no step compiled)."""
    gin_config(["gin/models/ct5_3b.gin", "gin/runs/pretrain.gin", "gin/mesh/fsdp.gin"],
               ["train.batch_size = 8"])
    sizes = {}
    for data in (1, 2, 4, 8):
        p = plan.plan_from_gin(devices=jax.devices()[:data], scan="yes", compile=False)
        assert p["mesh"] == {"data": data, "model": 1} and p["fsdp"]
        sizes[data] = p["per_device"]["param_bytes"]
    total = p["param_bytes_total"]
    assert sizes[1] == total
    for data in (2, 4, 8):
        # Linear up to the small replicated leaves (norm scales, relative position tables: < 0.1%).
        assert total / data <= sizes[data] < total / data * 1.01, (data, sizes[data] / total)


def test_fsdp_compiled_arguments_are_the_analytic_shards(gin_config):
    """The compiled FSDP step's per-device arguments are exactly the analytic parameter + optimizer shards (+ the
    batch rows the model reads), so the linear fall of the analytic bytes above is the compiled one too."""
    gin_config(["gin/models/ct5_tiny.gin", "gin/runs/pretrain.gin", "gin/mesh/fsdp.gin"],
               ["train.batch_size = 8", "train.task_feature_lengths = {'inputs': 32, 'targets': 8}"])
    p = plan.plan_from_gin(devices=jax.devices()[:8], scan="yes")
    d = p["per_device"]
    assert p["mesh"] == {"data": 8, "model": 1} and d["param_bytes"] < p["param_bytes_total"] / 8 * 1.01
    state = d["param_bytes"] + d["opt_state_bytes"]
    assert state < d["argument_bytes"] <= state + d["batch_bytes"] + 64  # + step/skipped/rng scalars
    assert d["alias_bytes"] >= state  # the donated state is updated in place
    assert p["flops_note"].startswith("compiled flops count one iteration")


def test_batch_shapes_are_the_feature_converter_keys():
    shapes = plan.batch_shapes("encoder_decoder", {"inputs": 512, "targets": 114}, 16)
    assert shapes["encoder_input_tokens"] == (16, 512) and shapes["decoder_loss_weights"] == (16, 114)
    assert {"encoder_segment_ids", "encoder_positions", "decoder_segment_ids", "decoder_positions"} <= set(shapes)
    lm = plan.batch_shapes("decoder", {"inputs": 512, "targets": 2048}, 4, pack=False)
    assert lm == {k: (4, 2048) for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")}
    prefix = plan.batch_shapes("prefix_lm", {"inputs": 512, "targets": 114}, 4)
    assert prefix["decoder_causal_attention"] == (4, 626) and prefix["decoder_positions"] == (4, 626)


def test_decoder_only_plan_follows_the_prefix_lm_switch_like_train(gin_config):
    """The planned batch is the one `t5k train` would feed: prefix LM when the config says so, and a
    contradicting train.model_type is refused as train refuses it."""
    tiny = ["TransformerConfig.num_decoder_layers = 1", "TransformerConfig.d_model = 64", "TransformerConfig.d_ff = 128",
            "TransformerConfig.num_heads = 2", "TransformerConfig.head_dim = 32", "train.batch_size = 4",
            "train.task_feature_lengths = {'inputs': 16, 'targets': 8}"]
    gin_config(["gin/models/hyperclova_137m.gin", "gin/runs/pretrain.gin"],
               tiny + ["TransformerConfig.prefix_lm = True"])
    p = plan.plan_from_gin(devices=jax.devices()[:2], compile=False)
    assert p["model_type"] == "prefix_lm" and p["batch_shapes"]["decoder_causal_attention"] == [4, 24]
    gin.clear_config()
    gin_config(["gin/models/hyperclova_137m.gin", "gin/runs/pretrain.gin"], tiny + ["train.model_type = 'prefix_lm'"])
    with pytest.raises(ValueError, match="train.model_type = 'prefix_lm' but TransformerConfig.prefix_lm = False"):
        plan.plan_from_gin(devices=jax.devices()[:2], compile=False)


def test_objective_files_bind_the_lengths_by_macro(gin_config):
    """gin/objectives/*.gin bind `train.task_feature_lengths = %TASK_FEATURE_LENGTHS`: plan resolves the macro."""
    gin_config(["gin/models/ct5_tiny.gin", "gin/runs/pretrain.gin", "gin/objectives/ul2.gin"],
               ["train.batch_size = 8"])
    p = plan.plan_from_gin(devices=jax.devices()[:1], compile=False)
    assert p["task_feature_lengths"] == {"inputs": 512, "targets": 512}
    assert p["batch_shapes"]["encoder_input_tokens"] == [8, 512]


def test_lengths_missing_a_feature_are_a_clear_error():
    with pytest.raises(ValueError, match="lack targets: model_type 'encoder_decoder' needs inputs and targets"):
        plan.batch_shapes("encoder_decoder", {"inputs": 64}, 4)


def test_too_many_devices_in_process_is_a_clear_error():
    with pytest.raises(ValueError, match="already initialised with 8 devices"):
        plan.simulate_devices(16)


def test_a_lora_plan_keeps_optimizer_state_for_the_adapters_only(gin_config):
    """gin/runs/lora.gin's trainable_parameters reach the plan: AdamW's two float32 moments of the adapters alone
    (ct5_small, rank 2 on query and value: 86,016 adapter parameters)."""
    gin_config(["gin/models/ct5_small.gin", "gin/runs/lora.gin"], ["LORA_RANK = 2"])
    p = plan.plan_from_gin(devices=jax.devices()[:1], compile=False)
    assert p["param_count"] == 96_490_880 + 86_016
    assert p["opt_state_bytes_total"] == 2 * 4 * 86_016 + 2 * 4  # + two int32 counts (Adam's, the schedule's)


def test_a_ptuning_plan_keeps_optimizer_state_for_the_prompt_only(gin_config):
    """gin/runs/ptuning.gin on hyperclova_137m: AdamW's two float32 moments of the prompt table and its MLP."""
    gin_config(["gin/models/hyperclova_137m.gin", "gin/runs/ptuning.gin"], [])
    p = plan.plan_from_gin(devices=jax.devices()[:1], compile=False)
    d, n = 768, 10
    prompt = n * d + 2 * (d * d + d)  # the table, mlp_in and mlp_out (width d_model)
    assert p["opt_state_bytes_total"] == 2 * 4 * prompt + 2 * 4  # + two int32 counts (Adam's, the schedule's)
    assert p["batch_shapes"]["decoder_input_tokens"] == [32, 2038] and "decoder_segment_ids" not in p["batch_shapes"]
