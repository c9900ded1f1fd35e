"""The `t5k` command line: one subcommand per concern, each implemented in its own module.

A subcommand module exposes `configure_parser(parser)` (adds its arguments) and `run(args, bindings) -> int`
(`bindings`: the `--gin.NAME=VALUE` flags, already split off argv, for commands configured by gin). Modules are
imported only when their subcommand runs, so `t5k vocab …` never pays for importing jax.
"""

import argparse
import ast
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "tasks": ("t5k.tasks_cli", "list the registered seqio tasks/mixtures and show decoded examples"),
    "corpus": ("t5k_tasks.clean", "clean document files for pre-training: quality filter, de-identify, deduplicate"),
    "params": ("t5k.models.params_cli", "print the parameter count of a gin model preset (no allocation)"),
    "plan": ("t5k.plan", "per-device memory and FLOPs of the train step on a simulated mesh (no allocation)"),
    "train": ("t5k.train", "train a model on a seqio task or mixture (gin files + --gin.X=Y bindings)"),
    "grow": ("t5k.growth", "grow a trained checkpoint into a wider/deeper model (bert2BERT's FPI / AKI, stacking)"),
    "eval": ("t5k.evaluation", "evaluate a checkpoint on seqio tasks' metrics; writes results.json and results.md"),
    "adversarial": ("t5k.adversarial", "how well a discriminator tells a generator's continuations from real text"),
    "infer": ("t5k.infer", "generate for a JSONL file of prompts from a checkpoint (streamed, resumable)"),
    "vocab": ("t5k.vocab", "train, inspect and use the morpheme-aware byte-level BPE vocabularies"),
}
RESUMABLE = ("train", "infer")  # commands that pick up where an interrupted run stopped
# What an unknown task name's error adds: the registered names, and how a task of one's own gets registered.
UNKNOWN_TASK_HINT = "see `t5k tasks list`; a task of your own: `import` its module in a gin file, docs/tasks.md"


def error_line(command: str, error: BaseException) -> str:
    """The one line a subcommand prints for an error it reports without a traceback: `t5k COMMAND: message`.

    The message is the error's first line. A KeyError's str() is the repr of its message (quoted, newlines
    escaped), also when gin re-raises it with the configurable's name appended on later lines (gin's proxy
    exception has no `args`), so that line is read back as the string it represents.
    """
    line = (str(error).splitlines() or [type(error).__name__])[0]
    if isinstance(error, KeyError) and line[:1] in ("'", '"'):
        try:
            line = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            pass
    return f"t5k {command}: {line}"


def _usage() -> str:
    lines = ["usage: t5k COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"t5k: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"t5k {command}", description=help_text)
    module.configure_parser(parser)
    from t5k.gin_utils import GinConfigError, split_gin_bindings

    try:
        bindings, rest = split_gin_bindings(rest)
    except GinConfigError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    try:
        return int(module.run(args, bindings) or 0)
    except OSError as e:  # an output path that cannot be written (a file in its way, a full disk), named in one line
        print(error_line(command, e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumes = " (rerun the same command to resume)" if command in RESUMABLE else ""
        print(f"t5k {command}: interrupted{resumes}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
