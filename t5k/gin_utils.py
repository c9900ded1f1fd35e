"""Gin plumbing shared by every `t5k` subcommand: `--gin_file=F` (repeatable) and `--gin.NAME=VALUE` bindings.

Files are looked up relative to the current directory and to the t5k checkout, so
`--gin_file=gin/models/ct5_base.gin` works from anywhere, and `include 'gin/models/t5_1_1.gin'` inside a gin
file resolves the same way.
"""

import argparse
import os
from typing import List, Sequence, Tuple

import gin

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class GinConfigError(ValueError):
    """A gin file or binding could not be parsed or bound (unknown name, bad value, missing file)."""


def add_gin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable, applied in order)")
    parser.add_argument("--gin_search_path", action="append", default=[], help="extra directory for gin includes")


def split_gin_bindings(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Separates `--gin.NAME=VALUE` (or `--gin.NAME VALUE`) flags from the rest of argv."""
    bindings, rest = [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--gin."):
            body = arg[len("--gin."):]
            if "=" not in body:
                if not args:
                    raise GinConfigError(f"{arg}: expected --gin.NAME=VALUE")
                body = f"{body}={args.pop(0)}"
            name, value = body.split("=", 1)
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
    return bindings, rest


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()) -> None:
    """Parses files then bindings; any gin failure becomes one GinConfigError line naming the culprit."""
    for path in list(search_paths) + [os.getcwd(), PROJECT_ROOT]:
        gin.add_config_file_search_path(path)
    resolved = [_resolve(f, search_paths) for f in gin_files]
    try:
        gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=False)
    except (ValueError, KeyError, SyntaxError, ImportError, TypeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GinConfigError(f"gin configuration error: {first_line}") from e


def _resolve(path: str, search_paths: Sequence[str]) -> str:
    for base in ["", *search_paths, PROJECT_ROOT]:
        candidate = os.path.join(base, path) if base else path
        if os.path.exists(candidate):
            return candidate
    raise GinConfigError(f"gin file not found: {path} (looked in the current directory and {PROJECT_ROOT})")
