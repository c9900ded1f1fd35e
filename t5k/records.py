"""What a checkpoint directory records about how its model was trained, and the checks of a run that uses it.

`t5k train` writes two small JSON files next to the steps of `MODEL_DIR/checkpoints/`:

    vocabulary.json   the vocabulary's description and `vocab.model_fingerprint` (BPE/SentencePiece model, sentinels)
    model.json        the model class and its TransformerConfig

A restore checks shapes, but two mistakes keep every shape and silently change the results:
- another vocabulary of the same size (gin/vocab/*.gin): the model's ids would mean other text;
- a setting that changes what the parameters compute (FUNCTION_FIELDS, e.g. `prefix_lm`).
Resuming and loading (`t5k eval`, `t5k infer`) refuse either in one line; a run starting from
`train.init_checkpoint` refuses another vocabulary and notes changed settings (fine-tuning may change them on
purpose). Checkpoints without records (older ones, or converted from `transformers`) are not checked.
"""

import dataclasses
import json
import os
from typing import List, Optional, Tuple

import seqio

from t5k import files, vocab
from t5k.checkpoints import CheckpointMismatchError

VOCABULARY_FILE = "vocabulary.json"
MODEL_FILE = "model.json"
# TransformerConfig fields that change what the parameters compute without changing their shapes. The others
# either change shapes, which the restore checks, or are run-time choices: dtype, dropout, scan, remat, fusion,
# the initialiser.
FUNCTION_FIELDS = ("mlp_activations", "norm", "norm_epsilon", "position_embedding", "relative_attention_max_distance",
                   "rotary_base", "scale_attention_logits", "prefix_lm", "lora_alpha")


def has_steps(directory: str) -> bool:
    """Whether a checkpoint manager directory holds a saved step (records alone do not make a checkpoint)."""
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def find(directory: str, name: str) -> Optional[str]:
    """The record `name` of the checkpoints `directory` points into: a manager directory, one of its step
    directories, or a step's item directory (`checkpoints/400/default`)."""
    candidate = os.path.abspath(directory)
    for _ in range(3):
        path = os.path.join(candidate, name)
        if os.path.isfile(path):
            return path
        candidate = os.path.dirname(candidate)
    return None


def read(path: str) -> dict:
    """A record as a dict; ValueError naming the file when it is not one (hand-edited, truncated, binary)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable checkpoint record ({e}); restore it, or delete it to skip the "
                         "check") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: a checkpoint record must be a JSON object, got {type(record).__name__}; "
                         "restore it, or delete it to skip the check")
    return record


def _write(directory: str, name: str, record: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    files.write_text(os.path.join(directory, name), json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def write(directory: str, vocabulary: seqio.Vocabulary, model) -> None:
    """Records `vocabulary` and `model` in a checkpoint manager directory (each: temp file, then rename)."""
    _write(directory, VOCABULARY_FILE, vocab.describe(vocabulary))
    _write(directory, MODEL_FILE, _model_record(model))


def _model_record(model) -> dict:
    return {"architecture": type(model).__name__, "config": dataclasses.asdict(model.config)}


def write_grown(directory: str, source_directory: str, model) -> None:
    """Records for a grown model's checkpoints (`t5k grow`): the source's vocabulary record, this model's record."""
    source = find(source_directory, VOCABULARY_FILE)
    if source is not None:
        _write(directory, VOCABULARY_FILE, read(source))
    _write(directory, MODEL_FILE, _model_record(model))


def read_model(directory: str) -> Tuple[str, dict]:
    """(architecture class name, config fields) recorded for the checkpoints under `directory`."""
    path = find(directory, MODEL_FILE)
    if path is None:
        raise FileNotFoundError(f"no {MODEL_FILE} record for the checkpoints in {directory}")
    record = read(path)
    if not isinstance(record.get("config"), dict) or not isinstance(record.get("architecture"), str):
        raise ValueError(f"{path}: a model record needs \"architecture\" and \"config\"")
    return record["architecture"], record["config"]


def check_vocabulary(directory: str, vocabulary: seqio.Vocabulary, what: str) -> None:
    """vocab.VocabularyError when the checkpoints under `directory` were trained with another vocabulary."""
    path = find(directory, VOCABULARY_FILE)
    if path is None:
        return
    record = read(path)
    if "fingerprint" not in record:
        raise ValueError(f"{path}: a vocabulary record without a fingerprint; restore it, or delete it to skip "
                         "the check")
    if record["fingerprint"] != vocab.model_fingerprint(vocabulary):
        raise vocab.VocabularyError(f"{what} was trained with {record.get('vocabulary')} ({path}), but this run "
                                    f"uses {vocab.resolve(vocabulary)}: select the same vocabulary "
                                    "(gin/vocab/*.gin, VOCAB_DIR)")


def model_differences(directory: str, model) -> List[str]:
    """`TransformerConfig.field: recorded -> this run's` for each FUNCTION_FIELDS entry that differs from the
    record of the checkpoints under `directory` ([] when they agree or nothing is recorded)."""
    path = find(directory, MODEL_FILE)
    if path is None:
        return []
    recorded = read(path).get("config")
    if not isinstance(recorded, dict):
        raise ValueError(f"{path}: a model record without its \"config\" object; restore it, or delete it to skip "
                         "the check")
    current = json.loads(json.dumps(dataclasses.asdict(model.config)))  # tuples as lists, like the record
    compared = [name for name in FUNCTION_FIELDS if name in recorded]
    if not (recorded.get("lora_rank") and current["lora_rank"]):  # the LoRA scale matters only with adapters
        compared = [name for name in compared if name != "lora_alpha"]
    return [f"TransformerConfig.{name}: {recorded[name]!r} -> {current[name]!r}" for name in compared
            if recorded[name] != current[name]]


def check_model(directory: str, model, what: str) -> None:
    """CheckpointMismatchError when `model` computes differently from the model the checkpoints under `directory`
    were trained with, in a setting their shapes do not show."""
    differences = model_differences(directory, model)
    if differences:
        raise CheckpointMismatchError(f"{what} was trained with other settings ({'; '.join(differences)}): bind the "
                                      f"recorded ones ({find(directory, MODEL_FILE)})")


def check(directory: str, vocabulary: seqio.Vocabulary, model, what: str) -> None:
    """Both checks: what resuming and loading require."""
    check_vocabulary(directory, vocabulary, what)
    check_model(directory, model, what)
