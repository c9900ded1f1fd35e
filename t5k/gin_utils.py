"""Gin plumbing shared by every `t5k` subcommand: `--gin_file=F` (repeatable) and `--gin.NAME=VALUE` bindings.

Files are looked up relative to the current directory and to the t5k checkout, so
`--gin_file=gin/models/ct5_base.gin` works from anywhere, and `include 'gin/models/t5_1_1.gin'` inside a gin
file resolves the same way.
"""

import argparse
import dataclasses
import os
import re
import tokenize
import typing
from typing import Any, List, Sequence, Tuple

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
        _check_macros_defined(resolved, bindings, search_paths)
    except (ValueError, KeyError, SyntaxError, ImportError, TypeError, tokenize.TokenError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GinConfigError(f"gin configuration error: {first_line}") from e


def _check_macros_defined(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]) -> None:
    """Every %MACRO a binding uses is defined. Gin checks this only when a config is finalized, which t5k does not
    do (tests and notebooks keep binding after parsing); an undefined macro would otherwise fail when its
    configurable is called, with a traceback instead of a line. The line names where the macro is first used."""
    try:
        gin.config.validate_macros_hook(gin.config._CONFIG)
    except ValueError as e:
        undefined = re.search(r"'([^'/]+)/gin\.macro'", str(e))
        if undefined is None:
            raise
        name = undefined.group(1)
        where = _first_macro_use(name, files, bindings, search_paths)
        raise ValueError(f"macro {name} is used{where} but defined by none of the gin files or bindings") from None


def _first_macro_use(name: str, files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]) -> str:
    """' at FILE:LINE' (or ' by --gin.BINDING') of the first `%name` in the files, their includes first as gin
    reads them, then the bindings; '' if none is found (gin's own files, say)."""
    use = re.compile(rf"%{re.escape(name)}(?![\w.])")
    include = re.compile(r"^\s*include\s+['\"]([^'\"]+)['\"]")
    seen = set()

    def search(path: str) -> str:
        if path in seen or not os.path.isfile(path):
            return ""
        seen.add(path)
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for number, line in enumerate(lines, 1):
            code = line.split("#", 1)[0]
            included = include.match(code)
            if included:
                try:
                    found = search(_resolve(included.group(1), search_paths))
                except GinConfigError:
                    found = ""
                if found:
                    return found
            elif use.search(code):
                return f" at {path}:{number}"
        return ""

    for path in files:
        found = search(path)
        if found:
            return found
    return next((f" by --gin.{b}" for b in bindings if use.search(b)), "")


def _resolve(path: str, search_paths: Sequence[str]) -> str:
    for base in ["", *search_paths, PROJECT_ROOT]:
        candidate = os.path.join(base, path) if base else path
        if os.path.exists(candidate):
            return candidate
    raise GinConfigError(f"gin file not found: {path} (looked in the current directory and {PROJECT_ROOT})")


def check_field_types(config) -> None:
    """Raises ValueError naming `Class.field` when a dataclass field does not hold its annotated type.

    Gin binds whatever a file or flag says (`d_model = 64.5`, `mlp_activations = 'gelu'`, `top_k = 1.5`), and
    the mistake would otherwise surface as a shape error deep inside jax, or not at all. An `int` field takes
    ints (not bools), `float` ints or floats, `bool` bools, `str` strs, `Tuple[X, ...]` a tuple or list of X,
    `Union[...]` any of its members; other annotations are not checked.
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, hint = getattr(config, field.name), hints[field.name]
        if not has_type(value, hint):
            raise ValueError(f"{type(config).__name__}.{field.name} = {value!r}; expected {describe_type(hint)}")


def has_type(value: Any, hint) -> bool:
    """Whether `value` holds the annotated type `hint` (the rules of `check_field_types`)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return isinstance(value, (tuple, list)) and all(has_type(v, args[0]) for v in value)
    if origin is typing.Union:
        return any(has_type(value, member) for member in args)
    if hint is type(None):
        return value is None
    return True


def describe_type(hint) -> str:
    """`hint` in words, for error messages: "an integer", "a number", "a tuple of strings", ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        plurals = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
        return f"a tuple of {plurals.get(args[0], describe_type(args[0]))}"
    if origin is typing.Union:
        return " or ".join(describe_type(member) for member in args)
    names = {int: "an integer", float: "a number", bool: "True or False", str: "a string", type(None): "None"}
    return names.get(hint, str(hint))


def check_positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    """`name = value` must be an integer >= 1 (a batch size, a step count), or >= 0 with `allow_zero` (0: off)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} = {value!r}; expected a {'non-negative' if allow_zero else 'positive'} integer")
