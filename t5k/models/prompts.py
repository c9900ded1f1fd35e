"""P-tuning: trainable virtual tokens before a decoder-only model's inputs (Liu et al. 2021, "GPT Understands,
Too"), the prompt-based adaptation of the HyperCLOVA seed next to LoRA.

With `TransformerConfig.prompt_length = n`, `DecoderOnly` reads n continuous embeddings at positions 0..n-1 and
the tokens after them (token i at position n + i). The logits of the virtual positions are dropped, so the model's
inputs and outputs keep their shapes and every caller (training, scoring, cached decoding) is unchanged. The
embeddings are a trainable `[n, embed]` table, computed through a two-layer ReLU MLP when `prompt_encoder = 'mlp'`
(P-tuning's reparameterisation, which the paper found to train faster and more stably than the bare table, prompt
tuning's 'none'). They live under `prompt/`: gin/runs/ptuning.gin freezes everything else
(`trainable_parameters.pattern = 'prompt/.*'`) and starts them fresh next to a pre-trained checkpoint.

A packed row holds several examples, and only the first would see the virtual tokens, so P-tuning needs unpacked
batches (`train.pack = False`); cached decoding writes the virtual tokens' keys and values once, with the prompt.
"""

import flax.linen as nn
import jax.numpy as jnp

from t5k.models import layers
from t5k.models.config import TransformerConfig

# The cache entry that marks a decoding cache whose virtual slots are written (`[batch]`, logical axis `batch`).
WRITTEN = "virtual_prompt_written"
PARAMS_PATTERN = r"prompt/.*"


class VirtualPrompt(nn.Module):
    """The `[prompt_length, embed]` virtual-token embeddings, in the compute dtype."""

    config: TransformerConfig

    @nn.compact
    def __call__(self) -> layers.Array:
        cfg = self.config
        init = nn.initializers.normal(stddev=cfg.embedding_stddev)
        table = self.param("embedding", nn.with_logical_partitioning(init, ("prompt", "embed")),
                           (cfg.prompt_length, cfg.d_model), jnp.float32)  # [prompt, embed]
        if cfg.prompt_encoder == "none":
            return table.astype(cfg.compute_dtype)
        hidden = cfg.prompt_encoder_hidden or cfg.d_model
        h = layers.DenseGeneral((cfg.d_model,), (hidden,), ("embed", "mlp"), use_bias=True, dtype=cfg.compute_dtype,
                                name="mlp_in")(table)
        return layers.DenseGeneral((hidden,), (cfg.d_model,), ("mlp", "embed"), use_bias=True,
                                   dtype=cfg.compute_dtype, name="mlp_out")(nn.relu(h))  # [prompt, embed]
