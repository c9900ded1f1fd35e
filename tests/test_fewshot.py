"""Few-shot prompts: exact rendering of a hand-written 2-shot case per template family, shots deterministic by
seed and different across seeds, the query never among its own shots (even when the pool holds copies of it)."""

import pytest

from t5k import fewshot


def _nsmc(document, label):
    return {"inputs": f"nsmc 문장: {document}", "targets": label}


POOL = [_nsmc(f"리뷰 번호 {i}", "긍정" if i % 3 else "부정") for i in range(40)]


def test_korquad_two_shot_prompt_is_exact():
    template = fewshot.template_for("korquad")
    shots = [
        {"inputs": "korquad 제목: 한강 지문: 한강은 서울을 지난다. 질문: 한강이 지나는 도시는?", "targets": "서울"},
        {"inputs": "korquad 제목: 세종 지문: 세종은 한글을 만들었다. 질문: 한글을 만든 왕은?", "targets": "세종"},
    ]
    query = {"inputs": "korquad 제목: 달 지문: 달은 지구를 돈다. 질문: 달이 도는 것은?", "targets": "지구"}
    example = fewshot.build_prompt(template, query, shots)
    assert example.prompt == (
        "제목: 한강\n지문: 한강은 서울을 지난다.\n질문: 한강이 지나는 도시는?\n답변: 서울\n\n"
        "제목: 세종\n지문: 세종은 한글을 만들었다.\n질문: 한글을 만든 왕은?\n답변: 세종\n\n"
        "제목: 달\n지문: 달은 지구를 돈다.\n질문: 달이 도는 것은?\n답변:"
    )
    assert (example.target, example.completion, example.candidates, example.label) == ("지구", " 지구", None, None)


def test_translation_and_multiple_choice_two_shot_prompts_are_exact():
    ko_en = fewshot.template_for("ko_en_translation")
    shots = [{"inputs": "번역 한영: 고양이", "targets": "cat"}, {"inputs": "번역 한영: 개", "targets": "dog"}]
    example = fewshot.build_prompt(ko_en, {"inputs": "번역 한영: 새", "targets": "bird"}, shots)
    assert example.prompt == "한국어를 영어로 번역해\n고양이=cat\n개=dog\n새="
    assert example.completion == "bird"  # no space between '=' and the target

    nli = fewshot.template_for("klue_nli")
    shots = [{"inputs": "klue_nli 전제: 비가 온다. 가설: 날씨가 맑다.", "targets": "모순"},
             {"inputs": "klue_nli 전제: 개가 짖는다. 가설: 동물이 소리를 낸다.", "targets": "함의"}]
    example = fewshot.build_prompt(nli, {"inputs": "klue_nli 전제: 그는 웃었다. 가설: 그는 기뻤다.", "targets": "중립"},
                                   shots)
    assert example.prompt == ("전제: 비가 온다.\n가설: 날씨가 맑다.\n관계: 모순\n\n"
                              "전제: 개가 짖는다.\n가설: 동물이 소리를 낸다.\n관계: 함의\n\n"
                              "전제: 그는 웃었다.\n가설: 그는 기뻤다.\n관계:")
    assert example.candidates == (" 함의", " 중립", " 모순") and example.label == 1
    nsmc = fewshot.build_prompt(fewshot.template_for("nsmc"), _nsmc("재밌다", "긍정"), [_nsmc("지루하다", "부정")])
    assert nsmc.prompt == "리뷰: 지루하다\n감정: 부정\n\n리뷰: 재밌다\n감정:"
    assert nsmc.candidates == (" 부정", " 긍정") and nsmc.label == 1  # the task's label order (0 = 부정)


def test_shots_are_deterministic_by_seed_and_differ_across_seeds():
    template = fewshot.template_for("nsmc")
    query = _nsmc("질문 리뷰", "부정")
    first = fewshot.ShotSampler(template, POOL, k=4, seed=0).example(query)
    again = fewshot.ShotSampler(template, list(POOL), k=4, seed=0).example(query)
    assert first.prompt == again.prompt and first.shots == again.shots and len(set(first.shots)) == 4
    other_seeds = {fewshot.ShotSampler(template, POOL, k=4, seed=s).shot_indices(query) for s in range(1, 6)}
    assert first.shots not in other_seeds and len(other_seeds) == 5
    # Per-query keys: two queries with the same seed get different shots; order of evaluation does not matter.
    sampler = fewshot.ShotSampler(template, POOL, k=4, seed=0)
    assert sampler.shot_indices(_nsmc("다른 리뷰", "긍정")) != sampler.shot_indices(query)
    assert sampler.shot_indices(query) == first.shots


def test_a_prompt_that_does_not_fit_drops_its_farthest_shots_first():
    template = fewshot.template_for("nsmc")
    query = _nsmc("질문 리뷰", "부정")
    whole = fewshot.ShotSampler(template, POOL, k=4, seed=0).example(query)
    two_shots = fewshot.build_prompt(template, query, [POOL[i] for i in whole.shots[2:]])
    fitted = fewshot.ShotSampler(template, POOL, k=4, seed=0).example(
        query, fits=lambda e: len(e.prompt) <= len(two_shots.prompt))
    assert fitted.shots == whole.shots[2:] and fitted.prompt == two_shots.prompt
    nothing_fits = fewshot.ShotSampler(template, POOL, k=4, seed=0).example(query, fits=lambda e: False)
    assert nothing_fits.shots == () and nothing_fits.prompt == "리뷰: 질문 리뷰\n감정:"  # zero-shot: the caller decides


def test_the_query_is_never_its_own_shot():
    template = fewshot.template_for("nsmc")
    pool = POOL[:6] + [POOL[2], POOL[2]]  # three copies of record 2
    sampler = fewshot.ShotSampler(template, pool, k=5, seed=0)
    for seed in range(30):
        sampler.seed = seed
        example = sampler.example(POOL[2])
        assert len(example.shots) == 5 and not {2, 6, 7} & set(example.shots)
        assert POOL[2]["inputs"].split(": ", 1)[1] not in example.prompt.rsplit("\n\n", 1)[0]
    with pytest.raises(ValueError, match="6 shots requested but the pool has only 5 records other than the query"):
        fewshot.ShotSampler(template, pool, k=6, seed=0).example(POOL[2])


def test_bad_records_and_unknown_tasks_are_named():
    with pytest.raises(ValueError, match="Template nsmc: record inputs 'klue_nli 전제: x' do not match"):
        fewshot.template_for("nsmc").render_query({"inputs": "klue_nli 전제: x", "targets": "긍정"})
    with pytest.raises(ValueError, match=r"answer '보통' is not one of \('부정', '긍정'\)"):
        fewshot.build_prompt(fewshot.template_for("nsmc"), _nsmc("그냥", "보통"), [])
    with pytest.raises(KeyError, match="no few-shot template for task 'ynat'"):
        fewshot.template_for("ynat")
