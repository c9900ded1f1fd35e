"""The model, its parameters on the devices present, and the vocabulary, for `t5k infer` and `t5k eval`.

Parameters are restored straight into the shardings of the *current* mesh (`checkpoints.restore_params` with
an abstract target), so a checkpoint written by `t5k train` on a 4×2 mesh loads on one device, or on 2, with
no conversion step. Without a checkpoint the parameters are freshly initialised, which only makes sense for
smoke tests: every caller labels such results (`LoadedModel.source == "random-init"`).
"""

import argparse
import dataclasses
from typing import Any, Optional

import jax
import seqio

from t5k import checkpoints, partitioning, records, trainer, vocab
from t5k.models import EncoderDecoder, abstract_params, build_model

RANDOM_INIT = "random-init"


@dataclasses.dataclass
class LoadedModel:
    model: Any
    params: Any
    mesh: Any
    rules: Any
    vocabulary: seqio.Vocabulary
    source: str  # the checkpoint directory (and step), or RANDOM_INIT

    @property
    def is_encoder_decoder(self) -> bool:
        return isinstance(self.model, EncoderDecoder)


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every command that serves a checkpoint takes (`t5k eval`, `t5k infer`)."""
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint directory of `t5k train` (model_dir, its checkpoints/ or a step); "
                             "omitted: random parameters (smoke tests only, labelled random-init)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--num_devices", type=int, default=None, help="use the first N devices (default: all)")


def current_mesh(num_devices: Optional[int] = None):
    """The gin-configured mesh (`create_mesh.*`) over the first `num_devices` devices (default: all)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"--num_devices={num_devices}: between 1 and the {len(devices)} devices present")
        devices = devices[:num_devices]
    return partitioning.create_mesh(devices=devices)


def abstract_sharded_params(model, mesh, rules):
    """`jax.ShapeDtypeStruct`s of the parameters, each carrying its sharding on `mesh` (nothing allocated)."""
    return trainer.abstract_params(model, partitioning.param_shardings(abstract_params(model), mesh, rules))


def load_model(checkpoint: Optional[str], step: Optional[int] = None, num_devices: Optional[int] = None,
               seed: int = 0) -> LoadedModel:
    """Builds the gin model and mesh and restores `checkpoint` (a `t5k train` model_dir's `checkpoints`
    directory, a step directory, or a model_dir holding `checkpoints/`) onto it; None: random parameters."""
    vocabulary = vocab.get_vocabulary()  # what gin selects (gin/vocab/*.gin), as the registered tasks do
    model = build_model()
    vocab.check_fits_model(vocabulary, model.config.vocab_size)
    mesh = current_mesh(num_devices)
    rules = partitioning.logical_axis_rules()
    target = abstract_sharded_params(model, mesh, rules)
    with partitioning.activate(mesh, rules):
        if checkpoint is None:
            shardings = jax.tree_util.tree_map(lambda x: x.sharding, target)
            params, source = trainer.init_params(model, shardings, seed), RANDOM_INIT
        else:
            directory = checkpoints.checkpoint_directory(checkpoint)
            records.check(directory, vocabulary, model, f"checkpoint {checkpoint}")
            params = checkpoints.restore_params(directory, target, step=step)
            source = directory + ("" if step is None else f" (step {step})")
    return LoadedModel(model, params, mesh, rules, vocabulary, source)

