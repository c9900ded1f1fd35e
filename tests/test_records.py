"""t5k.records: what a checkpoint directory records about its model, found from every form of checkpoint path, and
the checks: another vocabulary or a shape-free setting refused, run-time settings allowed, bad records named."""

import dataclasses
import json

import pytest
import seqio

from t5k import records, vocab
from t5k.checkpoints import CheckpointMismatchError
from t5k.models import EncoderDecoder, TransformerConfig

CONFIG = TransformerConfig(vocab_size=96, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=2,
                           num_decoder_layers=2, dtype="float32")
IDS = seqio.PassThroughVocabulary(size=96)


@pytest.fixture
def recorded(tmp_path):
    """A manager directory with records and one step, as `t5k train` leaves it."""
    directory = tmp_path / "checkpoints"
    (directory / "8" / "default").mkdir(parents=True)
    records.write(str(directory), IDS, EncoderDecoder(CONFIG))
    return directory


def test_records_are_found_from_every_form_of_checkpoint_path(recorded):
    assert json.loads((recorded / records.MODEL_FILE).read_text())["architecture"] == "EncoderDecoder"
    assert json.loads((recorded / records.VOCABULARY_FILE).read_text())["variant"] == "PassThroughVocabulary"
    for path in (recorded, recorded / "8", recorded / "8" / "default"):
        assert records.find(str(path), records.MODEL_FILE) == str(recorded / records.MODEL_FILE)
    assert records.has_steps(str(recorded)) and not records.has_steps(str(recorded / "8" / "default"))
    assert not list(recorded.glob(".*.tmp*"))  # written through temp files, none left


def test_settings_the_shapes_do_not_show_must_match_run_time_ones_need_not(recorded):
    runtime = EncoderDecoder(dataclasses.replace(CONFIG, dtype="bfloat16", dropout_rate=0.1, scan_layers=True,
                                                 remat_policy="full"))
    records.check(str(recorded / "8" / "default"), IDS, runtime, "checkpoint x")
    other = EncoderDecoder(dataclasses.replace(CONFIG, scale_attention_logits=True, mlp_activations=("relu", "linear")))
    assert records.model_differences(str(recorded), other) == [
        "TransformerConfig.mlp_activations: ['gelu', 'linear'] -> ['relu', 'linear']",
        "TransformerConfig.scale_attention_logits: False -> True"]
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint x was trained with other settings "
                                                      r"\(TransformerConfig.mlp_activations: .*checkpoints/model.json\)"):
        records.check(str(recorded / "8"), IDS, other, "checkpoint x")
    with pytest.raises(vocab.VocabularyError, match=r"checkpoint y was trained with .*vocabulary.json\), but this run "
                                                    r"uses .*PassThroughVocabulary"):
        records.check(str(recorded), seqio.PassThroughVocabulary(size=128), EncoderDecoder(CONFIG), "checkpoint y")


@pytest.mark.parametrize("name, text, message", [
    (records.VOCABULARY_FILE, "{bad", "unreadable checkpoint record"),
    (records.VOCABULARY_FILE, "[1]", "a checkpoint record must be a JSON object, got list"),
    (records.VOCABULARY_FILE, "{}", "a vocabulary record without a fingerprint"),
    (records.MODEL_FILE, "{}", "a model record without its \"config\" object"),
    (records.MODEL_FILE, "\udcff", "unreadable checkpoint record"),
])
def test_a_damaged_record_is_an_error_naming_its_file(recorded, name, text, message):
    (recorded / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=f"{recorded / name}: {message}.*delete it to skip the check"):
        records.check(str(recorded), IDS, EncoderDecoder(CONFIG), "checkpoint z")


def test_checkpoints_without_records_are_not_checked(tmp_path):
    (tmp_path / "checkpoints" / "8").mkdir(parents=True)
    other = EncoderDecoder(dataclasses.replace(CONFIG, prefix_lm=False, norm_epsilon=1e-3))
    records.check(str(tmp_path / "checkpoints"), seqio.PassThroughVocabulary(size=7), other, "checkpoint w")
