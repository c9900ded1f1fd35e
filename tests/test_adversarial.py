"""Adversarial evaluation: a discriminator cannot beat chance on real text against real text, tells real text
from clearly different text, and `t5k adversarial` scores a random-init generator as easy to spot."""

import json

import gin
import numpy as np
import pytest

from t5k import adversarial, cli, vocab
from t5k_tasks import corpora
from tiny_models import model_gin

PROMPT, CONTINUATION = 16, 24


@pytest.fixture(scope="module")
def news_rows():
    texts = [d.text for d in corpora.read_documents(corpora.PROSE_FILES["wikinews"])][:400]
    return corpora.encode_texts(vocab.get_vocabulary(), texts)


def test_real_against_real_is_chance(news_rows):
    """'Generated' continuations that are other documents' real ones: held-out accuracy within 3 standard
    errors of 0.5."""
    _, real = adversarial.split_documents(news_rows, PROMPT, CONTINUATION)
    real = [real[i] for i in np.random.default_rng(0).permutation(len(real))]  # the file is ordered by date
    half = len(real) // 2
    result = adversarial.evaluate(adversarial.paired(real[:half], real[half:2 * half]))
    sigma = np.sqrt(0.25 / result["test_continuations"])
    assert abs(result["accuracy"] - 0.5) < 3 * sigma, result
    assert result["ci95_low"] < 0.5 < result["ci95_high"]


def test_real_against_scrambled_is_told_apart(news_rows):
    """Continuations with their tokens in reverse order: the same tokens, other text."""
    _, real = adversarial.split_documents(news_rows, PROMPT, CONTINUATION)
    pairs = adversarial.paired(real, [row[::-1] for row in real])
    result = adversarial.evaluate(pairs)
    assert result["accuracy"] > 0.9 and result["ci95_low"] > 0.85, result


def test_pairs_are_cut_at_eos_and_to_equal_length():
    pairs = adversarial.paired([[5, 6, 7, 8], [9, 1, 9], [4]], [[15, 16, 1, 17], [19, 18, 17], [1]])
    assert pairs == [([5, 6], [15, 16]), ([9], [19])]
    assert adversarial.wilson_interval(50, 100) == pytest.approx((0.404, 0.596), abs=1e-3)
    with pytest.raises(ValueError, match="at least 10 pairs"):
        adversarial.evaluate(pairs)


def test_cli_scores_a_random_generator_as_easy_to_spot(tmp_path, capsys):
    gin_file = tmp_path / "generator.gin"
    gin_file.write_text(model_gin("decoder_only", vocab_size=51200, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                                  num_encoder_layers=0, num_decoder_layers=1, dtype="float32")
                        + "import t5k.decoding\nDecodeConfig.method = 'sample'\nDecodeConfig.top_p = 0.9\n")
    out = tmp_path / "adv.json"
    try:
        assert cli.main(["adversarial", f"--gin_file={gin_file}", f"--out={out}", "--num_devices=2",
                         "--max_documents=120", f"--prompt_tokens={PROMPT}",
                         f"--continuation_tokens={CONTINUATION}"]) == 0
    finally:
        gin.clear_config()  # its model and DecodeConfig bindings must not reach later tests in this process
    result = json.loads(out.read_text())
    assert result["generator"] == "random-init" and result["documents"] >= 80
    assert result["accuracy"] > 0.8, result
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-2].startswith("| random-init | ") and json.loads(printed[-1]) == result
