"""`t5k tasks list | show`: inspect the registered seqio tasks and mixtures.

    t5k tasks list
    t5k tasks show NAME [--split S] [-n N] [--seed K] [--step S --batch_size B] [--inputs 512 --targets 114] [--json]
                        [--train_examples K [--subset_seed J]] [--gin_file F] [--gin.NAME=VALUE]

`show` prints N task-level examples as text (sentinels visible as <extra_id_k>) exactly as `get_dataset` yields
them under that seed; `--step S --batch_size B` starts at example S*B of the stream (the examples of step S when
every example fills one batch row, e.g. ko_span_corruption). `--json` prints one JSON object per example with the
token ids too. `--train_examples K` shows the train stream of a low-data run (`t5k_tasks.get_dataset.train_examples`:
a fixed subset of K examples per task, drawn by `--subset_seed`). Gin files and bindings apply as in `t5k train`:
`--gin_file=gin/vocab/bbpe.gin --gin.VOCAB_DIR="'DIR'"` shows the examples in that vocabulary.
"""

import argparse
import json
import sys
from typing import Dict

from t5k import gin_utils


def _integer_at_least(minimum: int):
    """An argparse type: an int >= minimum (argparse turns the ValueError into a one-line usage error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="print the registered tasks and mixtures")
    show = sub.add_parser("show", help="print decoded examples of a task or mixture")
    positive, non_negative = _integer_at_least(1), _integer_at_least(0)
    show.add_argument("name")
    show.add_argument("--split", default="train")
    show.add_argument("-n", type=positive, default=3, help="number of examples")
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--step", type=non_negative, default=0)
    show.add_argument("--batch_size", type=positive, default=1, help="examples per step, for --step")
    show.add_argument("--inputs", type=positive, default=512, help="inputs length")
    show.add_argument("--targets", type=positive, default=114, help="targets length")
    show.add_argument("--json", action="store_true", help="JSON lines with token ids")
    show.add_argument("--train_examples", type=int, default=None,
                      help="train on a fixed subset of this many examples per task (low-data runs)")
    show.add_argument("--subset_seed", type=int, default=0, help="which subset, for --train_examples")
    gin_utils.add_gin_arguments(show)  # e.g. --gin_file=gin/vocab/bbpe.gin: the examples in another vocabulary


def _list() -> int:
    import seqio

    import t5k_tasks
    from t5k_tasks import downstream, mixtures

    print("tasks:")
    for name in sorted(seqio.TaskRegistry.names()):
        note = downstream.TASKS.get(name, "")
        if name in t5k_tasks.FIXED_LENGTH_TASKS:
            note = (note + " " if note else "") + "[fixed length, O(1) resume]"
        print(f"  {name:<40} {note}".rstrip())
    print("mixtures:")
    for name in sorted(seqio.MixtureRegistry.names()):
        print(f"  {name:<40} {mixtures.MIXTURES.get(name, '')}".rstrip())
    return 0


def _show(args) -> int:
    import seqio

    import t5k_tasks
    from t5k.cli import UNKNOWN_TASK_HINT, error_line
    from t5k_tasks import corpora

    try:
        provider = seqio.get_mixture_or_task(args.name)
    except ValueError:
        print(f"t5k tasks: unknown task or mixture {args.name!r} ({UNKNOWN_TASK_HINT})", file=sys.stderr)
        return 2
    lengths = {"inputs": args.inputs, "targets": args.targets}
    try:
        ds = t5k_tasks.get_dataset(args.name, lengths, split=args.split, seed=args.seed,
                                   start_index=args.step * args.batch_size, examples_per_step=args.batch_size,
                                   train_examples=args.train_examples, subset_seed=args.subset_seed)
        # Examples of a fixed-length task fill their lengths by design; any other's may have been trimmed.
        trims = {} if _fills_its_lengths(provider) else lengths
        shown = 0
        for shown, ex in enumerate(ds.take(args.n).as_numpy_iterator(), start=1):
            _print_example(shown - 1, ex, provider.output_features, args.json, trims)
        if not shown:
            start = args.step * args.batch_size
            raise ValueError(f"{args.name} has no {args.split!r} examples from example {start} on")
    except (ValueError, corpora.DataMissingError) as e:  # bad split or argument; data not on this machine
        print(error_line("tasks", e), file=sys.stderr)
        return 2
    return 0


def _fills_its_lengths(provider) -> bool:
    """Whether every example of the task (or of each task of the mixture) is cut to fill its lengths exactly."""
    import seqio

    import t5k_tasks

    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    return all(task.name in t5k_tasks.FIXED_LENGTH_TASKS for task in tasks)


def _print_example(k: int, ex: dict, features: dict, as_json: bool, trims: Dict[str, int]) -> None:
    """One example; a feature of exactly its `trims` length is marked: seqio trims longer ones to it."""
    record = {}
    for key in ("inputs", "targets"):
        if key in ex:
            ids = [int(i) for i in ex[key]]
            record[key] = features[key].vocabulary.decode(ids)
            record[f"{key}_ids"] = ids
    for key in ("example_index", "step"):
        if key in ex:
            record[key] = int(ex[key])
    if as_json:
        print(json.dumps(record, ensure_ascii=False))
        return
    head = f"# {k}" + (f"  (example_index {record['example_index']}, step {record['step']})"
                       if "example_index" in record else "")
    print(head)
    for key in ("inputs", "targets"):
        if key in record:
            count = len(record[key + "_ids"])
            mark = f", the --{key} length: trimmed if longer" if count == trims.get(key) else ""
            print(f"{key} ({count} ids{mark}): {record[key]}")
    print()


def run(args: argparse.Namespace, bindings=()) -> int:
    gin_files = getattr(args, "gin_file", [])
    if bindings or gin_files:
        import t5k_tasks  # noqa: F401  (configurables)

        gin_utils.parse_gin(gin_files, bindings, getattr(args, "gin_search_path", []))
    return _list() if args.action == "list" else _show(args)
