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
