"""Periodic evaluation in `train`: a task with seqio metric functions gets them logged at each evaluation, on
predictions equal to an independent (uncached) greedy decode of the trained parameters."""

import json

import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5k import train
from t5k.decoding import greedy_decode_uncached
from t5k.model_loading import load_model
from t5k.vocab import default_vocabulary
from tiny_models import ENCODER_DECODER, model_gin

TASK = "t5k_test_copy_words"
WORDS = ["사과", "바다", "하늘", "구름", "나무", "연필", "우유", "기차", "바람", "편지", "노래", "시계"]
MAX_NEW_TOKENS = 4
GIN = model_gin(**ENCODER_DECODER) + f"""
import t5k.decoding
DecodeConfig.max_new_tokens = {MAX_NEW_TOKENS}
train.mixture_or_task_name = '{TASK}'
train.task_feature_lengths = {{'inputs': 16, 'targets': 8}}
train.batch_size = 8
train.train_steps = 2
train.pack = False
train.log_every = 1
train.eval_every = 2
train.eval_batches = 1
train.eval_metric_examples = 6
train.checkpoint_every = 2
train.peak_flops_per_s = 1e9
"""


def exact_match(targets, predictions):
    return {"exact_match": float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def prediction_chars(targets, predictions):
    return {"prediction_chars": float(np.mean([len(p) for p in predictions]))}


@pytest.fixture
def copy_task():
    gin.clear_config()  # nothing left over from another test in this process
    features = {k: seqio.Feature(default_vocabulary(), add_eos=True) for k in ("inputs", "targets")}

    def dataset_fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices({"inputs": [f"복사: {w}" for w in WORDS], "targets": WORDS})

    seqio.TaskRegistry.add(TASK, source=seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"]),
                           preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
                           output_features=features, metric_fns=[exact_match, prediction_chars])
    yield
    seqio.TaskRegistry.remove(TASK)
    gin.clear_config()


def test_task_metrics_are_logged_from_greedy_predictions(copy_task, tmp_path):
    gin.parse_config(GIN)
    last = train.train(str(tmp_path))
    logged = [json.loads(line) for line in open(tmp_path / "train" / "metrics.jsonl")]
    evaluation = [row for row in logged if f"eval_{TASK}/exact_match" in row]
    assert [row["step"] for row in evaluation] == [2]
    assert last[f"eval_{TASK}/prediction_chars"] == evaluation[0][f"eval_{TASK}/prediction_chars"]

    # Independently: the uncached reference decode of the checkpointed parameters, scored by hand.
    loaded = load_model(str(tmp_path))
    vocab = default_vocabulary()
    inputs = [list(vocab.encode(f"복사: {w}")) + [1] for w in WORDS[:6]]
    tokens = np.zeros((len(inputs), 16), np.int32)
    for i, ids in enumerate(inputs):
        tokens[i, : len(ids)] = ids
    params = jax.device_get(loaded.params)  # host copies: the reference runs unsharded
    outputs = np.asarray(greedy_decode_uncached(loaded.model, params, tokens, MAX_NEW_TOKENS))
    predictions = [vocab.decode(row.tolist()) for row in outputs]
    assert evaluation[0][f"eval_{TASK}/prediction_chars"] == pytest.approx(np.mean([len(p) for p in predictions]))
    assert evaluation[0][f"eval_{TASK}/exact_match"] == pytest.approx(
        np.mean([p == w for p, w in zip(predictions, WORDS)]))


def test_decoder_only_feature_converter_follows_the_prefix_lm_switch():
    """`train` learns a decoder-only model from the PrefixLM layout exactly when its config says prefix LM (the
    switch inference reads), and refuses a model_type that contradicts it."""
    from t5k.models import DecoderOnly, EncoderDecoder, TransformerConfig

    causal, prefix = DecoderOnly(TransformerConfig()), DecoderOnly(TransformerConfig(prefix_lm=True))
    assert train.default_model_type(causal) == "decoder" and train.default_model_type(prefix) == "prefix_lm"
    assert train.default_model_type(EncoderDecoder(TransformerConfig())) == "encoder_decoder"
    train.check_model_type(prefix, "prefix_lm")
    with pytest.raises(ValueError, match="bind TransformerConfig.prefix_lm = True"):
        train.check_model_type(causal, "prefix_lm")
    with pytest.raises(ValueError, match="bind TransformerConfig.prefix_lm = False"):
        train.check_model_type(prefix, "decoder")
