"""`t5k infer`: a checkpoint written on a 4×2 mesh serves prompts on one device; bad lines become per-line
error records while the good lines are answered; a killed run (partial output with a truncated last line)
resumed by the same call ends with exactly the uninterrupted output."""

import json

import gin
import jax
import numpy as np
import pytest

from t5k import checkpoints, cli, decoding, infer, model_loading, optim, partitioning, trainer
from t5k.models import build_model
from tiny_models import ENCODER_DECODER, model_gin

GIN = model_gin(**ENCODER_DECODER) + """
DecodeConfig.max_new_tokens = 4
infer.input_length = 12
infer.batch_size = 2
"""

GOOD = [{"prompt": "안녕하세요", "id": "a"}, "서울의 날씨는", {"prompt": "하늘이 파랗다", "stop": ["다"]}]


@pytest.fixture(scope="module")
def checkpoint_4x2(tmp_path_factory):
    """Random parameters saved as a TrainState from a 4×2 FSDP mesh; returns (directory, host params)."""
    gin.clear_config()
    gin.parse_config(GIN)
    model = build_model()
    rng = np.random.default_rng(0)
    host = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                                  jax.eval_shape(lambda: model_loading.abstract_sharded_params(
                                      model, *_mesh_4x2())))
    mesh, rules = _mesh_4x2()
    target = model_loading.abstract_sharded_params(model, mesh, rules)
    params = jax.tree_util.tree_map(lambda x, t: jax.device_put(x, t.sharding), host, target)
    kernel = params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    optimizer = optim.make_optimizer(optimizer=optim.adafactor, schedule=optim.constant_schedule(0.01))
    state = trainer.TrainState(step=np.int32(5), params=params, opt_state=optimizer.init(params),
                               skipped=np.int32(0))
    directory = str(tmp_path_factory.mktemp("model_dir") / "checkpoints")
    manager = checkpoints.checkpoint_manager(directory, save_interval_steps=1, async_save=False)
    checkpoints.save(manager, 5, state, force=True)
    manager.wait_until_finished()
    yield directory, host
    gin.clear_config()


def _mesh_4x2():
    return (partitioning.create_mesh(data=4, model=2, devices=jax.devices()[:8]),
            partitioning.logical_axis_rules(fsdp=True))


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_bad_lines_become_error_records_and_good_lines_are_answered(checkpoint_4x2, tmp_path):
    directory, host = checkpoint_4x2
    lines = [
        json.dumps(GOOD[0], ensure_ascii=False),
        json.dumps({"prompt": ""}),
        json.dumps({"prompt": "가 " * 30}, ensure_ascii=False),  # 30+ tokens > input_length 12 (EOS included)
        '{"prompt": "닫히지 않은',
        json.dumps(GOOD[1], ensure_ascii=False),
        json.dumps({"prompt": "좋은 아침", "stop": ["\ud800"]}),  # a lone surrogate: not encodable text
        json.dumps(GOOD[2], ensure_ascii=False),
        json.dumps({"prompt": "좋은 아침", "id": ["x", "\udc80"]}),  # an id the UTF-8 output cannot echo
    ]
    source, output = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    _write_lines(source, lines)
    # The checkpoint came from 8 devices (4×2); it is served on one.
    counts = infer.infer(str(source), str(output), directory, num_devices=1, progress=False)
    assert counts == {"outputs": 3, "errors": 5, "skipped": 0}
    records = _records(output)
    assert [r["line"] for r in records] == list(range(1, 9))
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert errors[2] == f'{source}:2: field "prompt" is empty'
    assert errors[3].startswith(f'{source}:3: field "prompt" is ') and "at most 11" in errors[3]
    assert errors[4].startswith(f"{source}:4: invalid JSON")
    assert errors[6].startswith(f'{source}:6: field "stop"[0] cannot be encoded by the vocabulary')
    assert errors[8].startswith(f'{source}:8: field "id": holds a lone surrogate')
    answered = [r for r in records if "outputs" in r]
    assert [r["prompt"] for r in answered] == ["안녕하세요", "서울의 날씨는", "하늘이 파랗다"]
    assert [r["id"] for r in answered] == ["a", None, None]

    # The outputs are those of the saved parameters: the restored tree equals the saved one, and greedy decoding
    # (the same program: two rows on the one-device mesh) gives the same texts.
    loaded = model_loading.load_model(directory, num_devices=1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(loaded.params), host)
    config = decoding.DecodeConfig()
    with partitioning.activate(loaded.mesh, loaded.rules):
        expected = decoding.generate_text(loaded.model, loaded.params, loaded.vocabulary,
                                          ["안녕하세요", "서울의 날씨는"], config)
        stopped = decoding.generate_text(loaded.model, loaded.params, loaded.vocabulary, ["하늘이 파랗다"] * 2,
                                         config.replace(stop_strings=("다",)))
    assert [r["outputs"] for r in answered[:2]] == expected
    assert answered[2]["outputs"] == stopped[0] and "다" not in stopped[0][0]


def test_an_output_that_is_not_a_file_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """--output a directory (or /dev/full: read back endlessly) or under a missing directory: one line, rc 2."""
    source = tmp_path / "prompts.jsonl"
    _write_lines(source, [json.dumps({"prompt": "안녕"})])
    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("loaded before the output check"))
    for output, message in ((tmp_path, "not a regular file"), (tmp_path / "no" / "out.jsonl", "does not exist")):
        assert cli.main(["infer", f"--input={source}", f"--output={output}"]) == 2
        assert capsys.readouterr().err.strip() == f"t5k infer: --output {output}: " + (
            "not a regular file (records are appended to it and read back)" if "regular" in message
            else "its directory does not exist")


def test_an_interrupted_command_says_how_to_resume(monkeypatch, capsys):
    def interrupted(args, bindings):
        raise KeyboardInterrupt

    monkeypatch.setattr(infer, "run", interrupted)
    assert cli.main(["infer", "--input=x", "--output=y"]) == 130
    assert capsys.readouterr().err.strip() == "t5k infer: interrupted (rerun the same command to resume)"


def test_killed_run_resumes_to_the_uninterrupted_output(checkpoint_4x2, tmp_path, capsys):
    directory, _ = checkpoint_4x2
    prompts = ["하나", "둘 셋", "넷", '{"broken', "다섯 여섯", "일곱"]
    lines = [p if p.startswith("{") else json.dumps({"prompt": p}, ensure_ascii=False) for p in prompts]
    source = tmp_path / "prompts.jsonl"
    _write_lines(source, lines)
    straight = tmp_path / "straight.jsonl"
    infer.infer(str(source), str(straight), directory, num_devices=1, progress=False)
    full = straight.read_bytes()
    complete = full.split(b"\n")
    # A kill after three records, in the middle of writing the fourth.
    partial = tmp_path / "partial.jsonl"
    partial.write_bytes(b"\n".join(complete[:3]) + b"\n" + complete[3][: len(complete[3]) // 2])
    counts = infer.infer(str(source), str(partial), directory, num_devices=1, progress=False)
    assert counts == {"outputs": 2, "errors": 1, "skipped": 3}
    assert partial.read_bytes() == full
    # Nothing left to do: a rerun (here through the command line) writes nothing and changes nothing.
    assert cli.main(["infer", f"--checkpoint={directory}", f"--input={source}", f"--output={partial}",
                     "--num_devices=1"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"outputs": 0, "errors": 0, "skipped": 6}
    assert partial.read_bytes() == full
    # An output written for another input is refused, not silently mixed.
    _write_lines(source, [json.dumps({"prompt": "전혀 다른 입력"}, ensure_ascii=False)] + lines[1:])
    with pytest.raises(ValueError, match="line 1 was written for a different prompt"):
        infer.infer(str(source), str(partial), directory, num_devices=1, progress=False)


def test_line_settings_replace_the_gin_decoding_settings_for_that_line(checkpoint_4x2, tmp_path):
    """A line's Studio controls (response length, sampling settings, samples) apply to it alone, over gin's
    DecodeConfig; other fields are metadata; settings of the wrong type or out of range are error records."""
    directory, _ = checkpoint_4x2
    sample = {"method": "sample", "temperature": 0.7, "top_k": 5, "num_samples": 2}
    lines = [
        {"prompt": "안녕하세요", "max_new_tokens": 2},
        {"prompt": "안녕하세요"},
        {"prompt": "서울의 날씨는", **sample},
        {"prompt": "서울의 날씨는", "top_p": 2},
        {"prompt": "서울의 날씨는", "temperature": "hot"},
        {"prompt": "서울의 날씨는", "max_new_tokens": True},
        {"prompt": "서울의 날씨는", "min_new_tokens": 9},  # more than gin's max_new_tokens = 4
        {"prompt": "안녕하세요", "max_new_tokens": 2, "source": "metadata, ignored"},
    ]
    source, output = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    _write_lines(source, [json.dumps(line, ensure_ascii=False) for line in lines])
    counts = infer.infer(str(source), str(output), directory, num_devices=1, progress=False)
    assert counts == {"outputs": 4, "errors": 4, "skipped": 0}
    records = {r["line"]: r for r in _records(output)}
    assert records[4]["error"].startswith(f"{source}:4: DecodeConfig.top_p = 2.0; expected in (0, 1]")
    assert records[5]["error"] == f"{source}:5: field \"temperature\": expected a number, got 'hot'"
    assert records[6]["error"] == f"{source}:6: field \"max_new_tokens\": expected an integer, got True"
    assert records[7]["error"].startswith(
        f"{source}:7: DecodeConfig.min_new_tokens = 9; expected in [0, max_new_tokens]")

    loaded = model_loading.load_model(directory, num_devices=1)
    base = decoding.DecodeConfig()
    assert base.max_new_tokens == 4

    def reference(prompt, config, seed):  # two rows, as infer's batch_size, row 0 read
        with partitioning.activate(loaded.mesh, loaded.rules):
            return decoding.generate_text(loaded.model, loaded.params, loaded.vocabulary, [prompt] * 2, config, seed)[0]

    short = reference("안녕하세요", base.replace(max_new_tokens=2), 1)
    assert records[1]["outputs"] == records[8]["outputs"] == short
    assert records[2]["outputs"] == reference("안녕하세요", base, 2)
    assert records[3]["outputs"] == reference("서울의 날씨는", base.replace(**sample), 3)
    assert len(records[3]["outputs"]) == 2
    assert len(loaded.vocabulary.encode(short[0])) <= 2 < len(loaded.vocabulary.encode(records[2]["outputs"][0]))
