"""The shipped gin files compose as documented: an objective file after a run file switches what `t5k train`
trains on; the fine-tuning and DialogCT5 adaptation runs carry their papers' settings and a checkpoint to start from."""

import glob
import os

import gin
import pytest
import seqio

from t5k import gin_utils, optim, train
from t5k.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJECTIVES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "gin/objectives/*.gin")))


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _binding(name):
    """The value bound to `name`, through a macro if it names one."""
    value = gin.query_parameter(name)
    return gin.query_parameter(str(value)) if str(value).startswith("%") else value


def _train_binding(name):
    return _binding(f"train.{name}")


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_an_objective_file_selects_what_t5k_train_trains_on(objective):
    """Composed after the run file (model + run + objective), the objective's task and lengths replace the run's,
    for `t5k train` as for direct `get_batches` calls."""
    import t5k_tasks  # noqa: F401  (registers the tasks)

    gin_utils.parse_gin(["gin/models/ct5_tiny.gin", "gin/runs/pretrain.gin", objective], [])
    name = gin.query_parameter("%MIXTURE_OR_TASK_NAME")
    lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
    assert _train_binding("mixture_or_task_name") == name
    assert _train_binding("task_feature_lengths") == lengths
    assert _binding("t5k_tasks.get_batches.mixture_or_task_name") == name
    assert name in set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()), name


# Objectives whose targets length is an input to the objective itself: salient masking keeps the spans that fit.
ADAPTS_TO_TARGETS_LENGTH = ("gin/objectives/salient_span.gin",)


@pytest.mark.parametrize("objective", [o for o in OBJECTIVES if o not in ADAPTS_TO_TARGETS_LENGTH])
def test_an_objective_files_targets_length_holds_its_targets_whole(objective):
    """seqio trims a target longer than the length without a word; the file's length must hold what its task
    makes. Measured on the first 128 examples built with 4x the targets length (the chunks depend on the inputs
    length only, so the examples are the ones training sees, untrimmed)."""
    import t5k_tasks

    gin_utils.parse_gin(["gin/models/ct5_tiny.gin", "gin/runs/pretrain.gin", objective], [])
    lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
    if "inputs" not in lengths:
        pytest.skip("a decoder-only LM task: its chunks are cut to the targets length")
    roomy = dict(lengths, targets=4 * lengths["targets"])
    dataset = t5k_tasks.get_dataset(gin.query_parameter("%MIXTURE_OR_TASK_NAME"), roomy, shuffle=False)
    longest = max(len(example["targets"]) for example in dataset.take(128).as_numpy_iterator())
    assert longest <= lengths["targets"], f"{objective}: a target of {longest} ids, the file's length is {lengths}"


def test_the_curriculum_objective_trains_unpacked():
    """One session per row, so the curriculum's step (example index // rows per step) is the trainer's step, even
    composed after pretrain.gin, which packs."""
    gin_utils.parse_gin(["gin/models/ct5_tiny.gin", "gin/runs/pretrain.gin", "gin/objectives/dialog_curriculum.gin"],
                        [])
    assert _train_binding("pack") is False


def test_finetune_run_starts_from_a_checkpoint_with_t5s_recipe():
    gin_utils.parse_gin(["gin/models/ct5_small.gin", "gin/runs/finetune.gin"],
                        ["INIT_CHECKPOINT = 'runs/ct5_small'", "MIXTURE_OR_TASK_NAME = 'nsmc'"])
    assert _train_binding("init_checkpoint") == "runs/ct5_small"
    assert _train_binding("mixture_or_task_name") == "nsmc"
    assert build_model().config.dropout_rate == 0.1  # the run file overrides the model file's 0.0
    assert _train_binding("schedule").selector == "constant_schedule"
    schedule = optim.constant_schedule()  # with the run's binding
    assert [optim.learning_rate_at(schedule, s) for s in (0, 1000, 4000)] == pytest.approx([1e-3] * 3)
    assert gin.query_parameter("%MODEL_DIR") == "runs/finetune"
    assert _binding("t5k_tasks.get_dataset.train_examples") is None  # the whole train split by default


def test_finetune_run_takes_a_low_data_subset_by_macro():
    gin_utils.parse_gin(["gin/models/ct5_small.gin", "gin/runs/finetune.gin"],
                        ["TRAIN_EXAMPLES = 5", "SUBSET_SEED = 3"])
    import t5k_tasks
    from t5k_tasks import corpora

    records = seqio.get_mixture_or_task("wikinews_title").source.records("train")
    batches = t5k_tasks.get_batches("wikinews_title", {"inputs": 64, "targets": 32}, batch_size=5, pack=False)
    vocab = t5k_tasks.pretraining.VOCAB
    titles = {vocab.decode([int(t) for t in row]) for _ in range(3) for row in next(batches)["decoder_target_tokens"]}
    assert titles == {records[i]["targets"] for i in corpora.subset_indices(len(records), 5, 3)}


def test_dialog_adaptation_run_has_the_dialogct5_settings():
    """Seed 000: batch 64 sessions, Adafactor at a constant 5e-5, no dropout; partial utterance masking whose
    corruption rate rises over the whole run, one session per row so the curriculum step is the trainer's."""
    import t5k_tasks  # noqa: F401

    gin_utils.parse_gin(["gin/models/ct5_small.gin", "gin/runs/dialog_adapt.gin"], [])
    assert _train_binding("mixture_or_task_name") == "ko_dialog_partial_masking_curriculum"
    assert _train_binding("init_checkpoint") == "runs/pretrain"
    assert _train_binding("batch_size") == 64 and _train_binding("pack") is False
    assert build_model().config.dropout_rate == 0.0
    assert _train_binding("schedule").selector == "constant_schedule"
    schedule = optim.constant_schedule()
    assert optim.learning_rate_at(schedule, 0) == optim.learning_rate_at(schedule, 100) == pytest.approx(5e-5)
    assert _binding("linear_rate.num_steps") == _train_binding("train_steps")
    assert gin.query_parameter("make_optimizer.optimizer").selector == "adafactor"


@pytest.mark.parametrize("model, peak", [("hyperclova_137m", 6.0e-4), ("hyperclova_82b", 0.6e-4)])
def test_decoder_only_pretraining_takes_the_model_files_learning_rate(model, peak):
    """Seed 001: each HyperCLOVA size brings its peak learning rate; the run warms up linearly for 1,000 steps and
    decays by a cosine to 10% of the peak at its last step, with AdamW (b2 0.95) and clipping at 1.0."""
    import t5k_tasks  # noqa: F401

    gin_utils.parse_gin([f"gin/models/{model}.gin", "gin/runs/pretrain_lm.gin"], ["TRAIN_STEPS = 3000"])
    assert _train_binding("schedule").selector == "warmup_schedule"
    schedule = optim.warmup_schedule()
    for step, fraction in ((500, 0.5), (1000, 1.0), (2000, 0.55), (3000, 0.1)):
        assert optim.learning_rate_at(schedule, step) == pytest.approx(fraction * peak, rel=1e-4), step
    assert gin.query_parameter("make_optimizer.optimizer").selector == "adamw"
    assert (_binding("adamw.b2"), _binding("adamw.weight_decay"), _binding("make_optimizer.max_grad_norm")) == \
        (0.95, 0.1, 1.0)
    assert _train_binding("mixture_or_task_name") == "ko_lm" and _binding("LossConfig.z_loss") == 0.0
    assert train.default_model_type(build_model()) == "decoder"


def test_a_macro_no_file_defines_is_a_gin_configuration_error():
    """gpt.gin has no LEARNING_RATE (the hyperclova size files do): a one-line error when parsing, not a traceback
    when the schedule is built."""
    with pytest.raises(gin_utils.GinConfigError, match=r"macro LEARNING_RATE is used at \S*gin/runs/pretrain_lm.gin:27 but defined by none"):
        gin_utils.parse_gin(["gin/models/gpt.gin", "gin/runs/pretrain_lm.gin"], [])
    gin.clear_config()
    gin_utils.parse_gin(["gin/models/gpt.gin", "gin/runs/pretrain_lm.gin"], ["LEARNING_RATE = 6e-4"])


def test_an_undefined_macro_is_traced_through_includes_and_bindings(tmp_path):
    """The error names the first use: inside an included file (with its line), or the flag that uses it."""
    mine = tmp_path / "mine.gin"
    mine.write_text("# a run of one's own\ninclude 'gin/models/gpt.gin'\ninclude 'gin/runs/pretrain_lm.gin'\n")
    with pytest.raises(gin_utils.GinConfigError, match=r"LEARNING_RATE is used at \S*gin/runs/pretrain_lm.gin:27 "):
        gin_utils.parse_gin([str(mine)], [])
    gin.clear_config()
    with pytest.raises(gin_utils.GinConfigError, match=r"macro STEPS is used by --gin.train.train_steps = %STEPS "):
        gin_utils.parse_gin(["gin/models/ct5_tiny.gin"], ["train.train_steps = %STEPS"])


def test_run_files_bind_only_arguments_of_train():
    """Every `train.*` binding of the run files is an argument of `train` (gin would only fail at call time)."""
    import inspect

    arguments = set(inspect.signature(train.train).parameters)
    for run in ("gin/runs/finetune.gin", "gin/runs/dialog_adapt.gin", "gin/runs/pretrain_lm.gin"):
        with open(os.path.join(ROOT, run)) as f:
            bound = {line.split("=")[0].strip()[len("train."):] for line in f if line.startswith("train.")}
        assert bound and bound <= arguments, (run, bound - arguments)
