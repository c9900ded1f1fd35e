"""Throughput logging: model FLOPs per step against a hand count, and the tokens/s / MFU window arithmetic."""

import jax.numpy as jnp
import pytest

from t5k import partitioning, throughput
from t5k.models import EncoderDecoder, TransformerConfig


def test_step_flops_is_six_times_weights_times_their_tokens():
    d, h, k, ff, v, layers, buckets = 32, 4, 8, 48, 96, 2, 8
    model = EncoderDecoder(TransformerConfig(
        vocab_size=v, d_model=d, num_heads=h, head_dim=k, d_ff=ff, num_encoder_layers=layers,
        num_decoder_layers=layers, relative_attention_num_buckets=buckets, dtype="float32"))
    batch, enc_len, dec_len = 4, 12, 6
    shapes = {"encoder_input_tokens": (batch, enc_len), "decoder_input_tokens": (batch, dec_len),
              "decoder_target_tokens": (batch, dec_len)}
    # Gated MLP (wi_0, wi_1, wo), q/k/v/o, RMSNorm scales, one relative-bias table per stack; the untied logits
    # projection is the decoder's; the input embedding is a lookup (no FLOPs).
    attention, mlp = 4 * d * h * k, 3 * d * ff
    encoder = layers * (attention + mlp + 2 * d) + d + buckets * h
    decoder = layers * (2 * attention + mlp + 3 * d) + d + buckets * h + d * v
    expected = 6 * (encoder * batch * enc_len + decoder * batch * dec_len)
    assert throughput.step_flops(model, shapes) == expected


def test_meter_reports_tokens_per_second_and_mfu_over_its_window():
    meter = throughput.ThroughputMeter(flops_per_step=1e9, peak_flops_per_s=1e10, num_devices=2)
    start = meter._start
    for _ in range(3):
        meter.add(100)
    out = meter.read(now=start + 2.0)
    assert out == {"tokens_per_s": 150.0, "steps_per_s": 1.5, "mfu": pytest.approx(3e9 / 2.0 / 2e10)}
    assert meter.read(now=meter._start + 1.0)["tokens_per_s"] == 0.0  # the window restarted


def test_matmul_peak_probe_is_a_plausible_rate():
    peak = throughput.measure_matmul_peak(size=256, dtype=jnp.float32, repeats=2)
    assert 1e7 < peak < 1e14  # a CPU core manages more than 10 MFLOP/s and no device 100 TFLOP/s in float32


def test_matmul_peak_probe_runs_under_a_multi_device_mesh():
    """`t5k train` without `peak_flops_per_s` probes inside its mesh context: the probe must not clash with it."""
    mesh = partitioning.create_mesh(data=4, model=2)
    assert mesh.devices.size == 8
    with partitioning.activate(mesh, partitioning.logical_axis_rules()):
        assert throughput.measure_matmul_peak(size=128, dtype=jnp.float32, repeats=1) > 1e7


def test_non_positive_peak_is_a_clear_error():
    with pytest.raises(ValueError, match="peak_flops_per_s must be positive"):
        throughput.ThroughputMeter(1.0, 0.0)
