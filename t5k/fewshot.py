"""Few-shot prompts for decoder-only models (HyperCLOVA's in-context evaluation, seed 001).

A `Template` turns a downstream record (`{"inputs": "korquad 제목: … 지문: … 질문: …", "targets": …}`, as the
records functions of `t5k_tasks.downstream` produce them) into named fields, and fields into text:

    KorQuAD       제목: {title}\\n지문: {context}\\n질문: {question}\\n답변: {answer}
    translation   {source}={target}             (one instruction line first: 한국어를 영어로 번역해)
    NSMC          리뷰: {document}\\n감정: {answer}       candidates 부정 / 긍정
    KLUE-NLI      전제: {premise}\\n가설: {hypothesis}\\n관계: {answer}   candidates 함의 / 중립 / 모순

A prompt is the instruction (if any), k solved shots and the query rendered without its answer, joined by the
template's separator. The query's text ends just before the answer (trailing spaces removed, as a model should
not be asked to continue after a space); that whitespace becomes the `lead` of every completion, so generation
and rank classification score " 긍정", not "긍정".

Shots are drawn from a pool (the task's train split) by a seeded generator keyed by (seed, the query's text):
the same seed gives the same prompt for a query whatever the evaluation order, another seed other shots, and a
pool record equal to the query (same inputs) is never a shot of it.
"""

import dataclasses
import re
import zlib
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

Record = Mapping[str, str]
ANSWER = "{answer}"


@dataclasses.dataclass(frozen=True)
class Template:
    """How one task's records become prompt text.

    pattern: regex with named groups matched against a record's "inputs" (the whole string).
    shot: format string over the groups and `{answer}`; must end with `{answer}`.
    choices: the answer strings of a multiple-choice task, in the task's label order (its postprocessor maps
      an answer to its index), or None for free generation.
    """

    name: str
    pattern: str
    shot: str
    header: str = ""
    separator: str = "\n\n"
    choices: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        if not self.shot.endswith(ANSWER):
            raise ValueError(f"Template {self.name}: shot must end with {ANSWER}, got {self.shot!r}")

    @property
    def lead(self) -> str:
        """The whitespace between a query prompt and its answer (e.g. the space in '감정: 긍정')."""
        before = self.shot[: -len(ANSWER)]
        return before[len(before.rstrip(" ")):]

    def fields(self, record: Record) -> Dict[str, str]:
        match = re.fullmatch(self.pattern, str(record["inputs"]), flags=re.DOTALL)
        if match is None:
            raise ValueError(f"Template {self.name}: record inputs {str(record['inputs'])[:80]!r} do not match "
                             f"the expected form {self.pattern!r}")
        return match.groupdict()

    def render_shot(self, record: Record) -> str:
        return self.shot.format(**self.fields(record), answer=record["targets"])

    def render_query(self, record: Record) -> str:
        return self.shot[: -len(ANSWER)].format(**self.fields(record)).rstrip(" ")


@dataclasses.dataclass(frozen=True)
class FewShotExample:
    prompt: str
    target: str  # the gold answer (without the lead)
    completion: str  # lead + target: what the model should continue the prompt with
    candidates: Optional[Tuple[str, ...]]  # lead + each choice (multiple choice), else None
    label: Optional[int]  # index of the gold answer among the choices
    shots: Tuple[int, ...]  # indices of the shots in the pool
    record: Record  # the query record (metrics may need more than the answer, e.g. KorQuAD's other answers)


TEMPLATES: Dict[str, Template] = {
    t.name: t for t in (
        Template("korquad", r"korquad 제목: (?P<title>.*?) 지문: (?P<context>.*) 질문: (?P<question>.*)",
                 "제목: {title}\n지문: {context}\n질문: {question}\n답변: {answer}"),
        Template("ko_en_translation", r"번역 한영: (?P<source>.*)", "{source}={answer}",
                 header="한국어를 영어로 번역해", separator="\n"),
        Template("en_ko_translation", r"번역 영한: (?P<source>.*)", "{source}={answer}",
                 header="영어를 한국어로 번역해", separator="\n"),
        Template("nsmc", r"nsmc 문장: (?P<document>.*)", "리뷰: {document}\n감정: {answer}", choices=("부정", "긍정")),
        Template("klue_nli", r"klue_nli 전제: (?P<premise>.*?) 가설: (?P<hypothesis>.*)",
                 "전제: {premise}\n가설: {hypothesis}\n관계: {answer}", choices=("함의", "중립", "모순")),
    )
}


def template_for(task_name: str) -> Template:
    if task_name not in TEMPLATES:
        raise KeyError(f"no few-shot template for task {task_name!r}; templates exist for {sorted(TEMPLATES)}")
    return TEMPLATES[task_name]


def build_prompt(template: Template, query: Record, shots: Sequence[Record],
                 shot_indices: Sequence[int] = ()) -> FewShotExample:
    """The prompt for `query` with the given solved `shots`, in order."""
    parts = ([template.header] if template.header else []) + [template.render_shot(s) for s in shots]
    parts.append(template.render_query(query))
    target = str(query["targets"])
    label = None
    if template.choices is not None:
        if target not in template.choices:
            raise ValueError(f"Template {template.name}: answer {target!r} is not one of {template.choices}")
        label = template.choices.index(target)
    candidates = tuple(template.lead + c for c in template.choices) if template.choices is not None else None
    return FewShotExample(template.separator.join(parts), target, template.lead + target, candidates, label,
                          tuple(shot_indices), query)


class ShotSampler:
    """Draws k shots for a query from a pool by seed, never the query itself (nor a copy of it)."""

    def __init__(self, template: Template, pool: Sequence[Record], k: int, seed: int):
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.template, self.pool, self.k, self.seed = template, list(pool), k, seed
        self._by_inputs: Dict[str, List[int]] = {}
        for i, record in enumerate(self.pool):
            self._by_inputs.setdefault(str(record["inputs"]), []).append(i)

    def shot_indices(self, query: Record) -> Tuple[int, ...]:
        excluded = set(self._by_inputs.get(str(query["inputs"]), ()))
        available = len(self.pool) - len(excluded)
        if self.k > available:
            raise ValueError(f"{self.template.name}: {self.k} shots requested but the pool has only {available} "
                             "records other than the query")
        key = zlib.crc32(str(query["inputs"]).encode("utf-8"))
        rng = np.random.default_rng([self.seed, key])
        # Drawing k + |excluded| distinct indices always leaves k that are not the query.
        drawn = rng.choice(len(self.pool), size=min(len(self.pool), self.k + len(excluded)), replace=False)
        return tuple(int(i) for i in drawn if int(i) not in excluded)[: self.k]

    def example(self, query: Record, fits: Optional[Callable[[FewShotExample], bool]] = None) -> FewShotExample:
        """The query's k-shot prompt; with `fits`, the shots farthest from the query are dropped one by one
        until `fits(example)` (e.g. prompt and answer inside the model's context) or no shot is left."""
        indices = self.shot_indices(query)
        while True:
            example = build_prompt(self.template, query, [self.pool[i] for i in indices], indices)
            if fits is None or not indices or fits(example):
                return example
            indices = indices[1:]


def _records_fn(task_name: str) -> Callable[[str], List[dict]]:
    from t5k_tasks import downstream

    functions = {"korquad": downstream.korquad_records, "ko_en_translation": downstream.ko_en_records,
                 "en_ko_translation": downstream.en_ko_records, "nsmc": downstream.nsmc_records,
                 "klue_nli": downstream.klue_nli_records}
    return functions[task_name]


def fewshot_examples(task_name: str, k: int, seed: int = 0, split: str = "validation", pool_split: str = "train",
                     max_examples: Optional[int] = None,
                     fits: Optional[Callable[[FewShotExample], bool]] = None) -> List[FewShotExample]:
    """k-shot prompts for the first `max_examples` records of `split` of a seed task, shots from `pool_split`;
    `fits` as in `ShotSampler.example` (a prompt that does not fit keeps fewer shots: see `example.shots`)."""
    template = template_for(task_name)
    records = _records_fn(task_name)
    queries = records(split)[:max_examples]
    sampler = ShotSampler(template, records(pool_split), k, seed)
    return [sampler.example(q, fits) for q in queries]
