"""`t5k eval`: a checkpoint on seqio tasks' validation data, scored by the tasks' own postprocessors and metrics.

    t5k eval --gin_file=gin/models/ct5_tiny.gin --checkpoint runs/quickstart --tasks nsmc,korquad \\
             --output_dir runs/quickstart/eval [--split validation] [--gin.evaluate.max_examples=200]

For each task, over the first `max_examples` examples of the split in file order:

* predictions: multiple-choice tasks (those with candidate answers: the few-shot templates' `choices`, or gin
  `evaluate.choices`) are answered by rank classification over the candidates, unless
  `evaluate.rank_classification=False`; every other task by generation (`t5k.decoding`, gin `DecodeConfig.*`)
  from the task's input ids (decoder-only: `[0] + inputs`, the PrefixLM layout). Rank classification reports
  the metrics twice: of the argmax of the summed log-likelihood (plain names) and of the per-token mean (names
  suffixed `_length_normalized`). Candidates are scored with EOS, as the task's targets end with it.
* targets and predictions go through the task's `postprocess_fn` (targets with `is_target=True` and the
  example, as seqio's Evaluator does), then through its `predict_metric_fns`; `score_metric_fns` get the
  log-likelihood of each target.

With `evaluate.fewshot_k=K` the tasks are evaluated in context instead (decoder-only models): K-shot prompts
from `t5k.fewshot` templates, shots from the train split, rank classification over the template's candidates
or generation up to the end of the line.

Writes `results.json` (per task: method, examples, metrics; plus the checkpoint, split and the decoding
settings), `results.md` (one Markdown table row per task and metric) and `predictions/TASK.jsonl`
(input, target, prediction per example). Each file is written to a temporary path, then renamed.
"""

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import gin
import numpy as np

from t5k import cli, decoding, fewshot, files, gin_utils, infer, model_loading, partitioning, scoring, vocab

DEFAULT_LENGTHS = {"inputs": 512, "targets": 128}


@dataclasses.dataclass
class TaskResult:
    task: str
    method: str  # "generation" | "rank_classification", prefixed "K-shot " for few-shot evaluation
    examples: int
    metrics: Dict[str, float]
    rows: List[Dict[str, Any]]  # per example: input, target, prediction


def task_choices(task_name: str, overrides: Optional[Mapping[str, Sequence[str]]] = None) -> Optional[Tuple[str, ...]]:
    """The candidate answers of a multiple-choice task (`overrides` first, then the few-shot templates)."""
    if overrides and task_name in overrides:
        return tuple(overrides[task_name])
    template = fewshot.TEMPLATES.get(task_name)
    return template.choices if template is not None else None


def _examples(task_name: str, lengths: Mapping[str, int], split: str, max_examples: Optional[int]):
    from t5k_tasks import pipeline

    dataset = pipeline.get_dataset(task_name, lengths, split=split, shuffle=False)
    out = []
    for example in dataset.as_numpy_iterator():
        if max_examples is not None and len(out) >= max_examples:
            break
        out.append(example)
    if not out:
        raise ValueError(f"task {task_name!r} has no {split!r} examples")
    return out


def _ids(array) -> List[int]:
    """A seqio example's token ids (examples are unpadded, and end with EOS after `append_eos_after_trim`)."""
    return [int(t) for t in array]


def _postprocess(task, text: str, example, is_target: bool):
    if task.postprocess_fn is None:
        return text
    return task.postprocess_fn(text, example=example, is_target=is_target)


def _metrics(task, targets: List[Any], predictions: List[Any], scores: Optional[np.ndarray]) -> Dict[str, float]:
    """The task's predict metrics, and its score metrics when `scores` (target log-likelihoods) are given."""
    results: Dict[str, float] = {}
    for metric_fn in task.predict_metric_fns:
        results.update(metric_fn(targets, predictions))
    for metric_fn in task.score_metric_fns if scores is not None else ():
        results.update(metric_fn(targets, list(scores)))
    return {k: float(v) for k, v in results.items()}


def evaluate_task(loaded, task_name: str, lengths: Mapping[str, int], split: str, max_examples: Optional[int],
                  batch_size: int, config, choices: Optional[Tuple[str, ...]], seed: int) -> TaskResult:
    import seqio

    task = seqio.get_mixture_or_task(task_name)
    if not isinstance(task, seqio.Task):
        raise ValueError(f"--tasks: {task_name!r} is a mixture; evaluate its tasks by name")
    vocabulary = loaded.vocabulary
    task_vocabulary = vocab.resolve(task.output_features["targets"].vocabulary)
    model_vocabulary = vocab.resolve(vocabulary)
    if task_vocabulary != model_vocabulary:
        raise vocab.VocabularyError(f"task {task_name!r} tokenizes with {task_vocabulary}, the model's vocabulary is "
                                    f"{model_vocabulary}: bind get_vocabulary to the task's")
    examples = _examples(task_name, lengths, split, max_examples)
    if "inputs" not in examples[0]:
        raise ValueError(f"task {task_name!r} has no 'inputs' feature: evaluate text-to-text tasks")
    inputs = [_ids(ex["inputs"]) for ex in examples]
    target_ids = [_ids(ex["targets"]) for ex in examples]
    input_texts = [vocabulary.decode(ids) for ids in inputs]
    target_texts = [vocabulary.decode(ids) for ids in target_ids]
    targets = [_postprocess(task, text, ex, True) for text, ex in zip(target_texts, examples)]
    scores = None
    with partitioning.activate(loaded.mesh, loaded.rules):
        if task.score_metric_fns:
            scores = scoring.score(loaded.model, loaded.params, inputs, target_ids, batch_size).log_likelihood
        if choices:
            method = "rank_classification"
            candidate_ids = [list(vocabulary.encode(c)) + [vocabulary.eos_id] for c in choices]
            flat = scoring.score(loaded.model, loaded.params, [ids for ids in inputs for _ in choices],
                                 candidate_ids * len(inputs), batch_size)
            sums = flat.log_likelihood.reshape(len(inputs), len(choices))
            means = flat.mean_log_likelihood.reshape(len(inputs), len(choices))
            by_sum = [choices[i] for i in np.argmax(sums, axis=1)]
            by_mean = [choices[i] for i in np.argmax(means, axis=1)]
        else:
            method = "generation"
            seeds = [(seed + i) % (1 << 32) for i in range(len(inputs))]
            by_sum = [samples[0] for samples in generate_from_ids(loaded, config, inputs, seeds, batch_size)]
    predictions = [_postprocess(task, text, ex, False) for text, ex in zip(by_sum, examples)]
    metrics = _metrics(task, targets, predictions, scores)
    if method == "rank_classification":
        normalized = [_postprocess(task, text, ex, False) for text, ex in zip(by_mean, examples)]
        metrics.update({f"{k}_length_normalized": v
                        for k, v in _metrics(task, targets, normalized, None).items()})
    rows = [{"input": i, "target": t, "prediction": p} for i, t, p in zip(input_texts, target_texts, by_sum)]
    return TaskResult(task_name, method, len(examples), metrics, rows)


def evaluate_fewshot(loaded, task_name: str, k: int, split: str, max_examples: Optional[int], batch_size: int,
                     config, rank_classification: bool, seed: int) -> TaskResult:
    """k-shot in-context evaluation from the task's few-shot template (`t5k.fewshot`), shots from its train
    split: rank classification over the template's candidates, or generation up to the end of the line."""
    import seqio

    task = seqio.get_mixture_or_task(task_name)
    template = fewshot.template_for(task_name)
    ranked_choices = bool(template.choices and rank_classification)
    fits, limit = _fewshot_fit(loaded, config, ranked_choices)
    examples = fewshot.fewshot_examples(task_name, k, seed, split=split, max_examples=max_examples, fits=fits)
    if not examples:
        raise ValueError(f"task {task_name!r} has no {split!r} records for few-shot evaluation")
    # An example that kept a shot fits (shots are dropped until it does): only shotless ones need the check.
    too_long = [i for i, e in enumerate(examples) if fits and not e.shots and not fits(e)]
    if too_long:
        raise ValueError(f"{task_name} {split} examples {too_long[:10]}: even without shots, the prompt does not fit "
                         f"{limit}")
    fewer = sum(len(e.shots) < k for e in examples)
    cut_note = f" ({fewer} of {len(examples)} with fewer shots to fit {limit})" if fewer else ""
    prompts = [e.prompt for e in examples]
    with partitioning.activate(loaded.mesh, loaded.rules):
        if ranked_choices:
            method = f"{k}-shot rank_classification"
            ranked = scoring.rank_classify(loaded.model, loaded.params, loaded.vocabulary, prompts,
                                           [e.candidates for e in examples], batch_size, continuation_eos=False)
            by_sum = [template.choices[r.best_by_sum] for r in ranked]
            by_mean = [template.choices[r.best_by_mean] for r in ranked]
        else:
            method = f"{k}-shot generation"
            line_end = config.replace(stop_strings=tuple(dict.fromkeys(config.stop_strings + ("\n",))))
            generate = infer.model_generator(loaded, batch_size)
            seeds = [(seed + i) % (1 << 32) for i in range(len(prompts))]
            by_sum = [samples[0].strip() for samples in generate(prompts, seeds, line_end)]
    targets = [_postprocess(task, e.target, e.record, True) for e in examples]
    predictions = [_postprocess(task, text, e.record, False) for text, e in zip(by_sum, examples)]
    metrics = _metrics(task, targets, predictions, None)
    if method.endswith("rank_classification"):
        normalized = [_postprocess(task, text, e.record, False) for text, e in zip(by_mean, examples)]
        metrics.update({f"{name}_length_normalized": value
                        for name, value in _metrics(task, targets, normalized, None).items()})
    rows = [{"input": e.prompt, "target": e.target, "prediction": p, "shots": len(e.shots)}
            for e, p in zip(examples, by_sum)]
    return TaskResult(task_name, method + cut_note, len(examples), metrics, rows)


def _fewshot_fit(loaded, config, ranked_choices: bool):
    """(fits(example) -> bool, what it checks) for a decoder-only model with a position table (None otherwise):
    generation needs `[0] + prompt` and max_new_tokens inside max_length (`decoding.encode_prompts`), rank
    classification the prompt and its longest candidate (`scoring.score`)."""
    model_config = loaded.model.config
    if loaded.is_encoder_decoder or model_config.position_embedding != "absolute":
        return None, None
    max_length, encode = model_config.max_length, loaded.vocabulary.encode
    if ranked_choices:
        return (lambda e: len(encode(e.prompt)) + max(len(encode(c)) for c in e.candidates) <= max_length,
                f"max_length {max_length} with the longest candidate")
    return (lambda e: len(encode(e.prompt)) + config.max_new_tokens <= max_length,
            f"max_length {max_length} minus max_new_tokens {config.max_new_tokens}")


def generate_from_ids(loaded, config, inputs: List[List[int]], seeds: List[int], batch_size: int) -> List[List[str]]:
    """`[example][sample]` texts generated from task inputs in the layout the model was trained on: the
    encoder input as the task gives it (EOS-terminated); for a decoder-only model `[0] + inputs`, the prefix
    of seqio's PrefixLM layout `inputs, EOS, targets`. Batches have `batch_size` rows (short ones padded with
    copies of their first row, whose outputs are dropped)."""
    rows = [list(ids) for ids in inputs] if loaded.is_encoder_decoder else [[0] + list(ids) for ids in inputs]
    room = decoding.prompt_room(loaded.model, config)
    too_long = [i for i, row in enumerate(rows) if room is not None and len(row) > room]
    if too_long:
        raise ValueError(f"examples {too_long[:5]}: inputs longer than {room - 1} tokens, the model's max_length "
                         f"{loaded.model.config.max_length} minus DecodeConfig.max_new_tokens {config.max_new_tokens}"
                         f": lower evaluate.task_feature_lengths['inputs'] to {room - 1} (the inputs are trimmed to "
                         f"it) or max_new_tokens")
    params = decoding.params_for_decoding(loaded.model, loaded.params)  # once, not per batch
    texts: List[List[str]] = []
    for start in range(0, len(rows), batch_size):
        chunk, chunk_seeds = rows[start: start + batch_size], seeds[start: start + batch_size]
        pad = batch_size - len(chunk)
        # Power-of-two widths (capped by the prompt room): a task's lengths vary, each width is a compilation.
        batch = decoding.batch_from_ids(loaded.model, chunk + [chunk[0]] * pad, config, scoring.length_bucket)
        result = decoding.generate(loaded.model, params, batch, config,
                                   np.asarray(chunk_seeds + [chunk_seeds[0]] * pad, np.uint32), loaded.vocabulary)
        texts += decoding.decode_outputs(loaded.vocabulary, np.asarray(result.tokens), config)[: len(chunk)]
    return texts


# ------------------------------------------------------------------------------------------------ reports


def markdown_table(results: Sequence[TaskResult], source: str, split: str) -> str:
    lines = [f"Evaluation of `{source}` on split `{split}`.", "",
             "| task | method | examples | metric | value |", "|---|---|---:|---|---:|"]
    for result in results:
        for name, value in sorted(result.metrics.items()):
            lines.append(f"| {result.task} | {result.method} | {result.examples} | {name} | {value:.4g} |")
    return "\n".join(lines) + "\n"


def write_reports(output_dir: str, results: Sequence[TaskResult], source: str, vocabulary: str, split: str,
                  config) -> None:
    """The predictions of the newest result (`results[-1]`; the earlier ones were written with theirs) and the
    summary of all of them, `results.md` then `results.json`. Each file is replaced whole; `results.json` comes
    last, so after a kill it never lists a task whose predictions or table row are missing."""
    os.makedirs(os.path.join(output_dir, "predictions"), exist_ok=True)
    summary = {"checkpoint": source, "vocabulary": vocabulary, "split": split,
               "decode_config": dataclasses.asdict(config),
               "tasks": {r.task: {"method": r.method, "examples": r.examples, "metrics": r.metrics}
                         for r in results}}
    if results:
        newest = results[-1]
        rows = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in newest.rows)
        files.write_text(os.path.join(output_dir, "predictions", f"{newest.task}.jsonl"), rows)
    files.write_text(os.path.join(output_dir, "results.md"), markdown_table(results, source, split))
    files.write_text(os.path.join(output_dir, "results.json"), json.dumps(summary, ensure_ascii=False, indent=2) + "\n")


@gin.configurable(denylist=["task_names", "output_dir", "checkpoint", "step", "num_devices", "split"])
def evaluate(task_names: Sequence[str], output_dir: str, checkpoint: Optional[str], step: Optional[int] = None,
             num_devices: Optional[int] = None, split: str = "validation",
             task_feature_lengths: Mapping[str, int] = DEFAULT_LENGTHS, max_examples: Optional[int] = None,
             batch_size: int = 8, rank_classification: bool = True,
             choices: Optional[Mapping[str, Sequence[str]]] = None, fewshot_k: int = 0,
             seed: int = 0) -> List[TaskResult]:
    """Evaluates the gin model restored from `checkpoint` (None: random parameters, labelled so) on each task.

    task_feature_lengths: inputs/targets are trimmed to these (as in training). choices: extra multiple-choice
    tasks, `{task: (answer, ...)}` in the order of the task's labels. fewshot_k > 0: in-context evaluation
    with the tasks' few-shot templates (for decoder-only models; `t5k.fewshot`), k shots per query.
    """
    import t5k_tasks  # noqa: F401  (registers the tasks)
    import seqio

    known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    missing = [name for name in task_names if name not in known]
    if missing:
        raise ValueError(f"--tasks: no task named {', '.join(map(repr, missing))} ({cli.UNKNOWN_TASK_HINT})")
    if fewshot_k:
        untemplated = [name for name in task_names if name not in fewshot.TEMPLATES]
        if untemplated:
            raise ValueError(f"evaluate.fewshot_k={fewshot_k}: no few-shot template for {', '.join(untemplated)} "
                             f"(templates: {', '.join(sorted(fewshot.TEMPLATES))})")
    config = decoding.DecodeConfig()
    gin_utils.check_positive_int("evaluate.batch_size", batch_size)
    os.makedirs(os.path.join(output_dir, "predictions"), exist_ok=True)  # an unwritable --output_dir fails first
    loaded = model_loading.load_model(checkpoint, step, num_devices)
    if loaded.source == model_loading.RANDOM_INIT:
        print("t5k eval: no --checkpoint: RANDOMLY INITIALISED parameters (results labelled random-init)",
              file=sys.stderr)
    if batch_size % loaded.mesh.shape["data"]:
        raise ValueError(f"evaluate.batch_size={batch_size} is not divisible by the mesh's data axis "
                         f"({loaded.mesh.shape['data']})")
    results = []
    for name in task_names:
        if fewshot_k:
            result = evaluate_fewshot(loaded, name, fewshot_k, split, max_examples, batch_size, config,
                                      rank_classification, seed)
        else:
            result = evaluate_task(loaded, name, task_feature_lengths, split, max_examples, batch_size, config,
                                   task_choices(name, choices) if rank_classification else None, seed)
        print(f"t5k eval: {name} ({result.method}, {result.examples} examples): "
              + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items())), flush=True)
        results.append(result)
        # After each task: a later task's failure keeps these.
        write_reports(output_dir, results, loaded.source, str(vocab.resolve(loaded.vocabulary)), split, config)
    return results


def configure_parser(parser: argparse.ArgumentParser) -> None:
    gin_utils.add_gin_arguments(parser)
    model_loading.add_checkpoint_arguments(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated seqio task names")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--output_dir", required=True, help="where results.json, results.md, predictions/ go")


def run(args: argparse.Namespace, bindings=()) -> int:
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    try:
        if not tasks:
            raise ValueError("--tasks: expected at least one task name")
        import t5k_tasks  # noqa: F401  (before gin: its configurables, e.g. pretraining_files, may be bound)
        gin_utils.parse_gin(args.gin_file, bindings, args.gin_search_path)
        evaluate(tasks, args.output_dir, args.checkpoint, args.step, args.num_devices, args.split)
    except (gin_utils.GinConfigError, ValueError, FileNotFoundError, KeyError) as e:
        print(cli.error_line("eval", e), file=sys.stderr)
        return 2
    print(os.path.join(args.output_dir, "results.md"))
    return 0
