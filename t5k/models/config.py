"""One configuration dataclass for every t5k transformer (encoder-decoder and decoder-only).

Gin binds the fields (`TransformerConfig.d_model = 768`); `gin/models/*.gin` hold the presets. The block style
is a set of plain switches rather than a class hierarchy so that any mixture (say a T5.1.1 block with rotary
positions) is one gin line away:

| field                  | T5.1.1 / CT5        | GPT-3 / HyperCLOVA          |
|------------------------|---------------------|-----------------------------|
| norm                   | 'rms' (eps 1e-6)    | 'layer' (eps 1e-5)          |
| use_bias               | False               | True                        |
| mlp_activations        | ('gelu', 'linear')  | ('gelu',)                   |
| position_embedding     | 'relative'          | 'absolute' (or 'rotary')    |
| scale_attention_logits | False (folded init) | True (1/sqrt(head_dim))     |
| tie_embeddings         | False               | True                        |
"""

import dataclasses
from typing import Tuple

import gin
import jax.numpy as jnp

from t5k import gin_utils

NORMS = ("rms", "layer")
POSITION_EMBEDDINGS = ("relative", "absolute", "rotary", "none")
REMAT_POLICIES = ("none", "minimal", "full")
ACTIVATIONS = ("gelu", "gelu_exact", "relu", "silu", "linear")
# The projections LoRA can adapt (module names inside attention and MLP blocks; self- and cross-attention alike).
LORA_TARGETS = ("query", "key", "value", "out", "wi", "wi_0", "wi_1", "wo")
PROMPT_ENCODERS = ("none", "mlp")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of a t5k transformer. Defaults are T5.1.1-small with a 51,200 vocabulary."""

    vocab_size: int = 51200
    d_model: int = 512
    num_heads: int = 6
    head_dim: int = 64
    d_ff: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    # One entry per input projection of the MLP; their outputs are multiplied (('gelu', 'linear') = gated GELU).
    mlp_activations: Tuple[str, ...] = ("gelu", "linear")
    dropout_rate: float = 0.0
    dtype: str = "bfloat16"  # compute dtype of activations; parameters are always float32, logits float32.
    norm: str = "rms"
    norm_epsilon: float = 1e-6
    use_bias: bool = False
    position_embedding: str = "relative"
    max_length: int = 2048  # size of the learned absolute position table ('absolute' only)
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    rotary_base: float = 10000.0
    scale_attention_logits: bool = False
    tie_embeddings: bool = False
    # Decoder-only models trained as prefix LMs (seqio's PrefixLM layout, `decoder_causal_attention`): inference
    # (cached generation, scoring) lets the prompt -- the start id 0 and the inputs -- attend to itself
    # bidirectionally, as training did. `t5k train` picks the 'prefix_lm' feature converter from it.
    prefix_lm: bool = False
    embedding_stddev: float = 1.0  # T5 initialises embeddings with stddev 1, GPT with 0.02
    shared_encoder_decoder: bool = False  # the T5 paper's "encoder-decoder, shared" row
    scan_layers: bool = False
    remat_policy: str = "none"
    # Compute-time fusion of projections that read the same input (q/k/v, wi_0/wi_1): one wide matmul instead
    # of several narrow ones. Parameters keep their separate names, so checkpoints do not depend on it.
    fuse_projections: bool = True
    # LoRA (Hu et al. 2021; t5k.models.lora): every projection named in `lora_targets` adds a trainable low-rank
    # update `(lora_alpha / lora_rank) * x @ A @ B` to its frozen kernel; B starts at zero, so a fresh adapter
    # leaves the function unchanged. 0 = no adapters. Rank 2 on query and value of ct5_small trains 0.09% of it.
    lora_rank: int = 0
    lora_alpha: float = 8.0
    lora_targets: Tuple[str, ...] = ("query", "value")
    # P-tuning (Liu et al. 2021; HyperCLOVA seed; t5k.models.prompts): a decoder-only model reads `prompt_length`
    # trainable virtual tokens at positions 0..n-1 before its inputs (which move to n, n+1, ...). 'mlp' computes
    # them through a two-layer MLP of width `prompt_encoder_hidden` (0: d_model), P-tuning's reparameterisation;
    # 'none' trains the embeddings directly (prompt tuning). 0 = no virtual tokens.
    prompt_length: int = 0
    prompt_encoder: str = "mlp"
    prompt_encoder_hidden: int = 0

    def __post_init__(self):
        gin_utils.check_field_types(self)  # e.g. d_model = 64.5, or mlp_activations = 'gelu' (not a tuple)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
        _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        for act in self.mlp_activations:
            _check_choice("mlp_activations", act, ACTIVATIONS)
        for target in self.lora_targets:
            _check_choice("lora_targets", target, LORA_TARGETS)
        _check_choice("prompt_encoder", self.prompt_encoder, PROMPT_ENCODERS)
        for name in ("prompt_length", "prompt_encoder_hidden"):
            if getattr(self, name) < 0:
                raise ValueError(f"TransformerConfig.{name} = {getattr(self, name)}; expected 0 or more")
        if self.lora_rank < 0:
            raise ValueError(f"TransformerConfig.lora_rank = {self.lora_rank}; expected 0 (no adapters) or more")
        for name in ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TransformerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_encoder_layers < 0 or self.num_decoder_layers < 1:
            raise ValueError(f"TransformerConfig: num_encoder_layers = {self.num_encoder_layers}, num_decoder_layers = "
                             f"{self.num_decoder_layers}; expected >= 0 and >= 1")
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"TransformerConfig.dropout_rate = {self.dropout_rate}; expected in [0, 1)")
        jnp.dtype(self.dtype)  # raises TypeError on an unknown dtype name

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def lora_rank_of(self, projection: str) -> int:
        """The adapter rank of the projection named `projection` (0: not adapted)."""
        return self.lora_rank if projection in self.lora_targets else 0

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


def _check_choice(field: str, value, choices):
    if value not in choices:
        raise ValueError(f"TransformerConfig.{field} = {value!r}; expected one of {choices}")
