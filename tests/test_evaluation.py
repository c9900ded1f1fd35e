"""`t5k eval` end to end (in-process CLI): a multiple-choice task by rank classification and a generative task,
each scored by its own postprocessor and metrics, reported in results.json, results.md and predictions/."""

import json

import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5k import checkpoints, cli, decoding, metrics, scoring
from t5k.models import EncoderDecoder, TransformerConfig, abstract_params
from t5k.trainer import unbox_values
from t5k.vocab import default_vocabulary
from tiny_models import ENCODER_DECODER, model_gin

CONFIG = ENCODER_DECODER
GIN = model_gin(**CONFIG)
LABELS = ("부정", "긍정")
REVIEWS = [("재미있다", "긍정"), ("지루하다", "부정"), ("최고의 영화", "긍정"), ("돈이 아깝다", "부정"), ("또 보고 싶다", "긍정")]


def _label(output, example=None, is_target=False):
    text = output.decode() if isinstance(output, bytes) else output
    return LABELS.index(text.strip()) if text.strip() in LABELS else -1


def mean_target_log_likelihood(targets, scores):
    return {"mean_target_log_likelihood": float(np.mean(scores))}


def _register(name, records, postprocess_fn, metric_fns):
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    features = {k: seqio.Feature(default_vocabulary(), add_eos=True) for k in ("inputs", "targets")}

    def dataset_fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices({k: [r[k] for r in records] for k in ("inputs", "targets")})

    seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(dataset_fn, splits=["validation"]),
                           preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
                           output_features=features, postprocess_fn=postprocess_fn, metric_fns=metric_fns)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _register("t5k_test_reviews", [{"inputs": f"리뷰: {t}", "targets": y} for t, y in REVIEWS], _label,
              [metrics.classification_metrics, mean_target_log_likelihood])
    _register("t5k_test_answers", [{"inputs": f"질문: {t}", "targets": t.split()[0]} for t, _ in REVIEWS], None,
              [metrics.squad])
    root = tmp_path_factory.mktemp("eval")
    (root / "tiny.gin").write_text(GIN)
    # A parameters-only checkpoint of random weights (numpy: no init program to compile).
    model = EncoderDecoder(TransformerConfig(**CONFIG))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                                    unbox_values(abstract_params(model)))
    manager = checkpoints.checkpoint_manager(str(root / "ckpt"), save_interval_steps=1, async_save=False)
    checkpoints.save(manager, 1, params, force=True)
    manager.wait_until_finished()
    yield root, model, params
    gin.clear_config()
    for name in ("t5k_test_reviews", "t5k_test_answers"):
        seqio.TaskRegistry.remove(name)


def test_eval_writes_json_markdown_and_predictions_with_the_tasks_metrics(setup):
    root, model, params = setup
    gin.clear_config()
    out = root / "out"
    code = cli.main(["eval", f"--gin_file={root / 'tiny.gin'}", f"--checkpoint={root / 'ckpt'}",
                     "--tasks=t5k_test_reviews,t5k_test_answers", f"--output_dir={out}", "--num_devices=2",
                     "--gin.evaluate.choices={'t5k_test_reviews': ('부정', '긍정')}", "--gin.evaluate.batch_size=8",
                     "--gin.DecodeConfig.max_new_tokens=3", "--gin.evaluate.task_feature_lengths="
                     "{'inputs': 16, 'targets': 8}"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    reviews, answers = results["tasks"]["t5k_test_reviews"], results["tasks"]["t5k_test_answers"]
    assert results["checkpoint"].endswith("ckpt") and results["split"] == "validation"
    assert results["vocabulary"].startswith("BPEVocabulary(variant=morph_bbpe")
    assert (reviews["method"], reviews["examples"], answers["method"], answers["examples"]) == (
        "rank_classification", 5, "generation", 5)
    assert set(reviews["metrics"]) == {"accuracy", "macro_f1", "mean_target_log_likelihood",
                                       "accuracy_length_normalized", "macro_f1_length_normalized"}
    assert set(answers["metrics"]) == {"em", "f1"}

    # The reported numbers are those of the written predictions (rank classification by the summed score).
    rows = [json.loads(line) for line in (out / "predictions" / "t5k_test_reviews.jsonl").read_text().splitlines()]
    assert [r["target"] for r in rows] == [y for _, y in REVIEWS] and {r["prediction"] for r in rows} <= set(LABELS)
    accuracy = 100.0 * np.mean([r["prediction"] == r["target"] for r in rows])
    assert reviews["metrics"]["accuracy"] == pytest.approx(accuracy)
    # ... and the rank classification is the argmax of the candidates' scores from t5k.scoring.
    vocab = default_vocabulary()
    ranked = scoring.rank_classify(model, params, vocab, [f"리뷰: {t}" for t, _ in REVIEWS],
                                   [list(LABELS)] * len(REVIEWS))
    assert [r["prediction"] for r in rows] == [LABELS[r.best_by_sum] for r in ranked]

    # The task's perplexity (t5k.scoring over the task's own examples) agrees with the score metric eval reported:
    # exp(-(mean log-likelihood × examples) / target tokens, EOS included).
    tokens = sum(len(vocab.encode(y)) + 1 for _, y in REVIEWS)
    perplexity, count = scoring.task_perplexity(model, params, "t5k_test_reviews", {"inputs": 16, "targets": 8})
    assert count == 5
    assert perplexity == pytest.approx(np.exp(-reviews["metrics"]["mean_target_log_likelihood"] * 5 / tokens),
                                       rel=1e-5)

    # Generation: the answers task's predictions are greedy decoding of its inputs (here through generate_text).
    rows = [json.loads(line) for line in (out / "predictions" / "t5k_test_answers.jsonl").read_text().splitlines()]
    expected = decoding.generate_text(model, params, vocab, [f"질문: {t}" for t, _ in REVIEWS],
                                      decoding.DecodeConfig(max_new_tokens=3))
    assert [[r["prediction"]] for r in rows] == expected

    table = (out / "results.md").read_text().splitlines()
    assert "| task | method | examples | metric | value |" in table
    for name in ("accuracy", "macro_f1", "mean_target_log_likelihood"):
        assert any(line.startswith(f"| t5k_test_reviews | rank_classification | 5 | {name} |") for line in table)
    for name in ("em", "f1"):
        assert any(line.startswith(f"| t5k_test_answers | generation | 5 | {name} |") for line in table)


def test_unknown_task_is_one_clear_error(setup, capsys):
    root, _, _ = setup
    gin.clear_config()
    code = cli.main(["eval", f"--gin_file={root / 'tiny.gin'}", "--tasks=no_such_task",
                     f"--output_dir={root / 'bad'}"])
    assert code == 2
    assert "t5k eval: --tasks: no task named 'no_such_task'" in capsys.readouterr().err


def test_unwritable_output_fails_first_in_one_line_and_reports_leave_no_tmp(setup, tmp_path, capsys, monkeypatch):
    """--output_dir under a file: one line, before any model is loaded. A report whose write fails (a full disk;
    here text no UTF-8 file holds) leaves neither its tmp file nor a half-written report."""
    from t5k import files, model_loading

    root, _, _ = setup
    gin.clear_config()
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("loaded before the output check"))
    code = cli.main(["eval", f"--gin_file={root / 'tiny.gin'}", "--tasks=t5k_test_reviews",
                     f"--output_dir={tmp_path / 'a_file' / 'ev'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("t5k eval: ") and "a_file" in err[0], err
    with pytest.raises(UnicodeEncodeError):
        files.write_text(str(tmp_path / "results.md"), "ok \ud800")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_checkpoint_without_a_parameter_of_the_model_is_one_clear_error(setup, capsys):
    """restore_params raises KeyError for a parameter the checkpoint lacks: printed without KeyError's quotes."""
    root, _, _ = setup
    gin.clear_config()
    code = cli.main(["eval", f"--gin_file={root / 'tiny.gin'}", "--gin.TransformerConfig.num_decoder_layers=2",
                     "--tasks=t5k_test_answers", f"--checkpoint={root / 'ckpt'}", f"--output_dir={root / 'bad2'}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("t5k eval: restore_params: target 'decoder/layers_1/"), err
    assert "has no" in err and not err.endswith("'") and "\n" not in err


DECODER = dict(vocab_size=51200, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=0,
               num_decoder_layers=1, dtype="float32", norm="layer", use_bias=True, position_embedding="absolute",
               max_length=256, tie_embeddings=True, scale_attention_logits=True, mlp_activations=("gelu",))
DECODER_GIN = model_gin("decoder_only", **DECODER)


def _decoder_checkpoint(tmp_path):
    """`tmp_path/decoder.gin` and a parameters-only checkpoint `tmp_path/ckpt` of a random DECODER model."""
    from t5k.models import DecoderOnly

    (tmp_path / "decoder.gin").write_text(DECODER_GIN)
    gin.clear_config()
    model = DecoderOnly(TransformerConfig(**DECODER))
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                                    unbox_values(abstract_params(model)))
    manager = checkpoints.checkpoint_manager(str(tmp_path / "ckpt"), save_interval_steps=1, async_save=False)
    checkpoints.save(manager, 1, params, force=True)
    manager.wait_until_finished()
    return model, params


def test_decoder_only_inputs_beyond_the_prompt_room_name_the_lengths_that_fit(setup, tmp_path, capsys):
    """max_length 256 - max_new_tokens 251 leaves prompts of 6 ids ([0] + 5 input ids): the error names the
    inputs length that fits, and evaluating with it (seqio trims the inputs) succeeds."""
    _decoder_checkpoint(tmp_path)
    argv = ["eval", f"--gin_file={tmp_path / 'decoder.gin'}", f"--checkpoint={tmp_path / 'ckpt'}",
            "--tasks=t5k_test_answers", f"--output_dir={tmp_path / 'out'}", "--num_devices=1",
            "--gin.DecodeConfig.max_new_tokens=251"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "inputs longer than 5 tokens" in err and "evaluate.task_feature_lengths['inputs'] to 5" in err, err
    assert cli.main(argv + ["--gin.evaluate.task_feature_lengths={'inputs': 5, 'targets': 8}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions" / "t5k_test_answers.jsonl").open()]
    vocab = default_vocabulary()
    assert len(rows) == len(REVIEWS) and all(len(vocab.encode(r["input"])) <= 4 for r in rows)


def test_fewshot_rank_classification_of_a_decoder_only_model(setup, tmp_path, monkeypatch):
    """`evaluate.fewshot_k`: NSMC's template, shots from (here: in-memory) train records, rank classification.
    One train review is too long for max_length 256: a prompt that drew it keeps fewer shots (nearest kept)."""
    from t5k import fewshot

    records = {split: [{"inputs": f"nsmc 문장: {t} {split}", "targets": y} for t, y in REVIEWS]
               for split in ("train", "validation")}
    records["train"][3]["inputs"] = "nsmc 문장: " + "정말 너무 긴 리뷰 " * 60
    monkeypatch.setattr(fewshot, "_records_fn", lambda name: records.__getitem__)
    model, params = _decoder_checkpoint(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["eval", f"--gin_file={tmp_path / 'decoder.gin'}", f"--checkpoint={tmp_path / 'ckpt'}",
                     "--tasks=nsmc", f"--output_dir={out}", "--gin.evaluate.fewshot_k=2", "--num_devices=1"]) == 0
    result = json.loads((out / "results.json").read_text())["tasks"]["nsmc"]
    vocab = default_vocabulary()
    uncut = fewshot.fewshot_examples("nsmc", 2, seed=0)
    cut = [3 in e.shots for e in uncut]
    assert 0 < sum(cut) < 5  # the seed draws the long review for some queries, not all
    assert result["method"] == f"2-shot rank_classification ({sum(cut)} of 5 with fewer shots to fit max_length 256 " \
                               "with the longest candidate)" and result["examples"] == 5
    assert set(result["metrics"]) == {"accuracy", "macro_f1", "accuracy_length_normalized",
                                      "macro_f1_length_normalized"}
    rows = [json.loads(line) for line in (out / "predictions" / "nsmc.jsonl").read_text().splitlines()]
    examples = fewshot.fewshot_examples(
        "nsmc", 2, seed=0, fits=lambda e: len(vocab.encode(e.prompt)) + max(len(vocab.encode(c)) for c in e.candidates) <= 256)
    assert [r["input"] for r in rows] == [e.prompt for e in examples]
    for row, example, whole, was_cut in zip(rows, examples, uncut, cut):
        assert row["shots"] == len(example.shots) and row["input"].count("\n감정: ") == row["shots"]
        assert example.shots == (whole.shots[whole.shots.index(3) + 1:] if was_cut else whole.shots)
        assert row["input"].endswith("validation\n감정:")
    ranked = scoring.rank_classify(model, params, default_vocabulary(), [e.prompt for e in examples],
                                   [e.candidates for e in examples])
    assert [r["prediction"] for r in rows] == [fewshot.TEMPLATES["nsmc"].choices[r.best_by_sum] for r in ranked]
    accuracy = 100.0 * np.mean([r["prediction"] == r["target"] for r in rows])
    assert result["metrics"]["accuracy"] == pytest.approx(accuracy)
