"""The `t5k` command line: one subcommand per concern, each implemented in its own module.

A subcommand module exposes `configure_parser(parser)` (adds its arguments) and `run(args) -> int`
(the exit status). Modules are imported only when their subcommand runs, so `t5k vocab ...` never pays
for importing jax, and `t5k params ...` never imports TensorFlow.
"""

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "params": ("t5k.models.params_cli", "print the parameter count of a gin model preset (no allocation)"),
    "vocab": ("t5k.vocab", "train, inspect and use the morpheme-aware byte-level BPE vocabularies"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t5k", description="Korean T5-family models in JAX/Flax.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        # Parsers are configured lazily below, once we know which subcommand was asked for.
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        sub = argparse.ArgumentParser(prog=f"t5k {argv[0]}", description=COMMANDS[argv[0]][1])
        module.configure_parser(sub)
        args = sub.parse_args(argv[1:])
        return int(module.run(args) or 0)
    parser.parse_args(argv)  # prints usage / errors for unknown commands
    return 2


if __name__ == "__main__":
    sys.exit(main())
