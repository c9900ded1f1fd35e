"""`t5k infer`: generation for a JSONL file of prompts, streamed, resumable, one output record per input line.

    t5k infer --gin_file=gin/models/ct5_tiny.gin --checkpoint runs/quickstart --input prompts.jsonl \\
              --output out.jsonl [--gin.DecodeConfig.method="'sample'"] [--gin.infer.batch_size=16]

Input: one JSON value per line: an object `{"prompt": "...", "id": <any>, "stop": ["..."], "max_new_tokens": 32,
"temperature": 0.7, ...}` or a bare JSON string (the prompt). Everything but "prompt" is optional: "stop" adds stop
strings to the gin `DecodeConfig.stop_strings` for that line, and the decoding settings of `LINE_SETTINGS` (the
Studio controls: response length, temperature, top-k, top-p, repetition penalty, and the method, beams, samples)
replace the gin `DecodeConfig`'s for that line. Other fields are ignored (a line may carry its own metadata).

Output: one JSON object per input line, in input order:
    {"line": 3, "id": ..., "prompt": "...", "outputs": ["...", ...]}    (DecodeConfig.num_samples texts)
    {"line": 4, "error": "prompts.jsonl:4: ..."}                         (bad input; the run goes on)
Bad input is an empty prompt, a prompt longer than the model takes, a line that is not valid JSON (or has the
wrong shape), a prompt or stop string the vocabulary cannot encode, and a decoding setting of the wrong type or
out of its range.

Lines are generated in groups of equal settings (one decoding program per distinct combination, compiled once).

Resume: each record is written whole and flushed. Rerunning the same command on a partial output keeps its
complete records, drops a truncated last line (a kill mid-write), and continues with the first missing input
line. Sampling seeds are per input line (`infer.seed + line`), so a resumed run writes what an uninterrupted one
would have.
"""

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import gin
import numpy as np
from tqdm import tqdm

from t5k import cli, decoding, gin_utils, model_loading, partitioning, stop_strings

Generator = Callable[[List[str], List[int], decoding.DecodeConfig], List[List[str]]]
PromptLimit = Callable[[decoding.DecodeConfig], int]  # most prompt tokens a line with these settings may have

# Decoding settings a line may set for itself, over gin's `DecodeConfig` (HyperCLOVA Studio's per-request
# controls). Each takes the type `DecodeConfig` annotates it with.
LINE_SETTINGS = ("method", "max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "temperature",
                 "top_k", "top_p", "repetition_penalty", "num_samples")


class InputError(ValueError):
    """One input line cannot be served; the message becomes the line's error record."""


@dataclasses.dataclass(frozen=True)
class Request:
    line: int  # 1-based line number in the input file
    id: Any
    prompt: str
    config: decoding.DecodeConfig  # gin's, with the line's stop strings and settings


# ------------------------------------------------------------------------------------------------ input


def _encodable(vocabulary, text: str, where: str) -> List[int]:
    """The ids of `text`; InputError when the vocabulary cannot encode it or does not decode it back."""
    try:
        ids = list(vocabulary.encode(text))
    except (ValueError, UnicodeError) as e:
        raise InputError(f"{where} cannot be encoded by the vocabulary: {str(e).splitlines()[0]}") from e
    if vocabulary.decode(ids) != text:
        raise InputError(f"{where} {text!r} does not survive the vocabulary (decodes as {vocabulary.decode(ids)!r})")
    return ids


def _writable_id(value: Any, where: str) -> Any:
    """The line's `id`, echoed into the UTF-8 output: InputError if it holds a lone surrogate (a JSON escape like
    "\\ud800", or non-UTF-8 bytes), which no UTF-8 file can hold."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where}: holds a lone surrogate (a \\ud800-\\udfff escape or non-UTF-8 bytes), which "
                         f"the UTF-8 output cannot hold") from e
    return value


def _line_settings(value: Dict[str, Any], at: str) -> Dict[str, Any]:
    """The `LINE_SETTINGS` fields present in a line, type-checked (JSON booleans are not numbers)."""
    hints = typing.get_type_hints(decoding.DecodeConfig)
    settings = {}
    for name in LINE_SETTINGS:
        if name not in value:
            continue
        setting, hint = value[name], hints[name]
        if not gin_utils.has_type(setting, hint):
            raise InputError(f"{at}: field \"{name}\": expected {gin_utils.describe_type(hint)}, got {setting!r}")
        settings[name] = float(setting) if hint is float else setting  # 1 and 1.0: one group, one program
    return settings


def parse_request(line_number: int, text: str, vocabulary, where: str, base: decoding.DecodeConfig,
                  prompt_limit: PromptLimit) -> Request:
    """One input line -> Request; InputError naming `where:line` and the field for anything unusable."""
    at = f"{where}:{line_number}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{at}: invalid JSON ({e})") from e
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise InputError(f"{at}: expected a JSON object with a \"prompt\" string, or a JSON string; got "
                         f"{type(value).__name__}")
    prompt, stop = value.get("prompt"), value.get("stop", [])
    if not isinstance(prompt, str):
        raise InputError(f"{at}: field \"prompt\": expected a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InputError(f"{at}: field \"prompt\" is empty")
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InputError(f"{at}: field \"stop\": expected a list of non-empty strings, got {stop!r}")
    if stop:
        try:
            stop_strings.check_vocabulary(vocabulary)
        except TypeError as e:
            raise InputError(f"{at}: field \"stop\": {e}") from e
    for i, s in enumerate(stop):
        _encodable(vocabulary, s, f"{at}: field \"stop\"[{i}]")
    settings = _line_settings(value, at)
    try:
        config = base.replace(stop_strings=tuple(dict.fromkeys(base.stop_strings + tuple(stop))), **settings)
    except ValueError as e:
        # A setting out of its range: "DecodeConfig.top_p = 2.0; expected in (0, 1]" (gin adds lines naming the
        # configurable, dropped here).
        reason = str(e).splitlines()[0]
        raise InputError(f"{at}: {reason} (the line's settings over gin's DecodeConfig)") from e
    ids = _encodable(vocabulary, prompt, f"{at}: field \"prompt\"")
    try:
        limit = prompt_limit(config)
    except InputError as e:
        raise InputError(f"{at}: {e} (the line's settings over gin's DecodeConfig)") from e
    if len(ids) > limit:
        raise InputError(f"{at}: field \"prompt\" is {len(ids)} tokens; the model takes at most "
                         f"{limit} (infer.input_length, or max_length minus max_new_tokens)")
    return Request(line_number, _writable_id(value.get("id"), f"{at}: field \"id\""), prompt, config)


# ------------------------------------------------------------------------------------------------ output / resume


def completed_lines(output_path: str) -> Set[int]:
    """Line numbers already answered in `output_path`, after cutting the file back to its last complete record.

    A kill can leave a partial last line; everything after the last newline-terminated valid JSON record is
    dropped (rewritten through a temporary file and a rename, so a second kill here loses nothing either).
    """
    if not os.path.exists(output_path):
        return set()
    with open(output_path, "rb") as f:
        data = f.read()
    done: Set[int] = set()
    keep = 0
    for raw in data.split(b"\n")[:-1]:  # the piece after the last newline is incomplete by definition
        try:
            record = json.loads(raw)
            line = int(record["line"])
        except (ValueError, KeyError, TypeError):
            break
        done.add(line)
        keep += len(raw) + 1
    if keep < len(data):
        tmp = output_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data[:keep])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output_path)
    return done


def _check_same_input(output_path: str, input_path: str, done: Set[int]) -> None:
    """Refuses to resume into an output written for another input (a record's prompt differs from its line)."""
    if not done:
        return
    with open(output_path, encoding="utf-8") as f:
        written = {r["line"]: r.get("prompt") for r in map(json.loads, f) if "prompt" in r}
    for number, text in _numbered_lines(input_path):
        if number in written:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = None
            prompt = value if isinstance(value, str) else value.get("prompt") if isinstance(value, dict) else None
            if prompt != written[number]:
                raise ValueError(f"{output_path}: line {number} was written for a different prompt than "
                                 f"{input_path}:{number}; choose another --output or delete it to start over")


def _numbered_lines(path: str) -> Iterator[Tuple[int, str]]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for number, text in enumerate(f, start=1):
            yield number, text.rstrip("\n")


def _write(f, records: Sequence[Dict[str, Any]]) -> None:
    """Whole lines only, flushed to disk: a kill leaves at most one partial line, which resume drops."""
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------ the loop


def infer_file(input_path: str, output_path: str, generate: Generator, vocabulary, base: decoding.DecodeConfig,
               prompt_limit: PromptLimit, batch_size: int, seed: int = 0, progress: bool = True) -> Dict[str, int]:
    """Streams `input_path` in chunks of `batch_size` lines and appends one record per line to `output_path`.

    `generate(prompts, seeds, config) -> [prompt][sample] texts`; `base` is the gin DecodeConfig the lines'
    settings apply over. Returns counts of written records.
    """
    done = completed_lines(output_path)
    _check_same_input(output_path, input_path, done)
    total = sum(1 for _ in _numbered_lines(input_path))
    counts = {"outputs": 0, "errors": 0, "skipped": len(done)}
    bar = tqdm(total=total, initial=len(done), desc="infer", unit="line", disable=not progress)
    with open(output_path, "a", encoding="utf-8") as out:
        chunk: List[Tuple[int, str]] = []
        for number, text in _numbered_lines(input_path):
            if number in done:
                continue
            chunk.append((number, text))
            if len(chunk) == batch_size:
                _serve_chunk(chunk, out, generate, vocabulary, base, prompt_limit, seed, counts, input_path)
                bar.update(len(chunk))
                chunk = []
        if chunk:
            _serve_chunk(chunk, out, generate, vocabulary, base, prompt_limit, seed, counts, input_path)
            bar.update(len(chunk))
    bar.close()
    return counts


def _serve_chunk(chunk, out, generate: Generator, vocabulary, base, prompt_limit, seed, counts, input_path):
    records: Dict[int, Dict[str, Any]] = {}
    requests: List[Request] = []
    for number, text in chunk:
        try:
            requests.append(parse_request(number, text, vocabulary, input_path, base, prompt_limit))
        except InputError as e:
            records[number] = {"line": number, "error": str(e)}
    by_config: Dict[decoding.DecodeConfig, List[Request]] = {}
    for request in requests:
        by_config.setdefault(request.config, []).append(request)
    for config, group in by_config.items():
        outputs = generate([r.prompt for r in group], [(seed + r.line) % (1 << 32) for r in group], config)
        for request, texts in zip(group, outputs):
            records[request.line] = {"line": request.line, "id": request.id, "prompt": request.prompt,
                                     "outputs": list(texts)}
    ordered = [records[number] for number, _ in chunk]
    counts["errors"] += sum("error" in r for r in ordered)
    counts["outputs"] += sum("outputs" in r for r in ordered)
    _write(out, ordered)


# ------------------------------------------------------------------------------------------------ the model side


def model_generator(loaded, batch_size: int) -> Generator:
    """A Generator over `t5k.decoding`: every call runs `batch_size` rows (short groups are padded with copies
    of their first prompt, whose outputs are dropped), so one program per decoding config serves the whole file
    and each row's batch dimension divides the mesh's data axis."""
    params = decoding.params_for_decoding(loaded.model, loaded.params)  # once, not per batch

    def generate(prompts: List[str], seeds: List[int], line_config: decoding.DecodeConfig) -> List[List[str]]:
        texts: List[List[str]] = []
        for start in range(0, len(prompts), batch_size):
            rows, row_seeds = prompts[start: start + batch_size], seeds[start: start + batch_size]
            pad = batch_size - len(rows)
            batch = decoding.encode_prompts(loaded.model, loaded.vocabulary, rows + [rows[0]] * pad, line_config)
            with partitioning.activate(loaded.mesh, loaded.rules):
                result = decoding.generate(loaded.model, params, batch, line_config,
                                           np.asarray(row_seeds + [row_seeds[0]] * pad, np.uint32), loaded.vocabulary)
            texts += decoding.decode_outputs(loaded.vocabulary, np.asarray(result.tokens), line_config)[: len(rows)]
        return texts

    return generate


def max_prompt_tokens(loaded, config, input_length: int) -> int:
    """How many prompt tokens fit: encoder-decoder `input_length` minus the EOS the encoder input ends with;
    decoder-only with learned positions: max_length minus max_new_tokens (the start id 0 takes one more slot,
    the last new token needs none)."""
    if loaded.is_encoder_decoder:
        return input_length - 1
    room = decoding.prompt_room(loaded.model, config)  # start id included
    if room is None:
        return input_length
    if room < 2:
        raise InputError(f"max_new_tokens {config.max_new_tokens} leaves no room for a prompt: the model's "
                         f"max_length is {loaded.model.config.max_length}")
    return min(input_length, room - 1)


@gin.configurable(denylist=["input_path", "output_path", "checkpoint", "step", "num_devices", "progress"])
def infer(input_path: str, output_path: str, checkpoint: Optional[str], step: Optional[int] = None,
          num_devices: Optional[int] = None, progress: bool = True, batch_size: int = 8, input_length: int = 512,
          seed: int = 0) -> Dict[str, int]:
    """Restores the gin model from `checkpoint` (or random parameters when None) and serves `input_path`.

    batch_size: rows per generation call (a multiple of the mesh's data axis). input_length: the most tokens
    a prompt may have (encoder-decoder: EOS included; decoder-only models with learned positions are also
    capped by max_length minus max_new_tokens). seed: base of the per-line sampling seeds.
    Decoding settings: gin `DecodeConfig.*` (t5k.decoding)."""
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input {input_path}: no such file")
    if os.path.exists(output_path) and not os.path.isfile(output_path):
        raise ValueError(f"--output {output_path}: not a regular file (records are appended to it and read back)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output_path))):
        raise FileNotFoundError(f"--output {output_path}: its directory does not exist")
    config = decoding.DecodeConfig()
    gin_utils.check_positive_int("infer.batch_size", batch_size)
    loaded = model_loading.load_model(checkpoint, step, num_devices)
    if config.stop_strings:
        try:
            stop_strings.check_vocabulary(loaded.vocabulary)
        except TypeError as e:
            raise ValueError(f"DecodeConfig.stop_strings: {e}") from None
    if loaded.source == model_loading.RANDOM_INIT:
        print("t5k infer: no --checkpoint: RANDOMLY INITIALISED parameters, outputs are noise", file=sys.stderr)
    try:
        max_prompt_tokens(loaded, config, input_length)
    except InputError as e:
        raise ValueError(f"DecodeConfig: {e}") from None
    data_axis = loaded.mesh.shape["data"]
    if batch_size % data_axis:
        raise ValueError(f"infer.batch_size={batch_size} is not divisible by the mesh's data axis ({data_axis})")
    return infer_file(input_path, output_path, model_generator(loaded, batch_size), loaded.vocabulary, config,
                      lambda line_config: max_prompt_tokens(loaded, line_config, input_length), batch_size, seed,
                      progress)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    gin_utils.add_gin_arguments(parser)
    model_loading.add_checkpoint_arguments(parser)
    parser.add_argument("--input", required=True, help="JSONL prompts, one per line")
    parser.add_argument("--output", required=True, help="JSONL results, one per input line (resumed if present)")


def run(args: argparse.Namespace, bindings=()) -> int:
    try:
        import t5k_tasks  # noqa: F401  (before gin: its configurables, e.g. pretraining_files, may be bound)
        gin_utils.parse_gin(args.gin_file, bindings, args.gin_search_path)
        counts = infer(args.input, args.output, args.checkpoint, args.step, args.num_devices,
                       progress=sys.stderr.isatty())
    except (gin_utils.GinConfigError, ValueError, FileNotFoundError, KeyError) as e:
        print(cli.error_line("infer", e), file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0
