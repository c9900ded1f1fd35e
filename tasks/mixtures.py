"""Mixtures and mixing-rate functions.

Rate functions take a seqio Task and return its (unnormalised) rate; n = the task's number of input examples in
the train split (documents, sessions or records):

    equal_rate                      1
    examples_proportional_rate(K)   min(n, K)                 (T5: K = 2^16 .. 2^21)
    temperature_rate(T, K=None)     min(n, K) ** (1 / T)      (T5: T = 2, 4, 8)

Mixtures:

| mixture | tasks | rates |
|---|---|---|
| ko_pretrain | ko_span_corruption_{wikinews, book_review, fairytale} | 0.5 / 0.3 / 0.2 (news-heavier, CT5-style corpus mix) |
| ko_pretrain_equal / _proportional / _temperature | same tasks | equal / min(n, 512) / T = 2 |
| ko_dialog_pretrain | the five DialogCT5 objectives | equal |
| ko_nlu | nsmc, klue_nli, kornli, klue_sts, korsts, korquad | examples-proportional, K = 2^16 |
"""

import functools

import seqio

from t5k_tasks import dialog, downstream, pretraining  # noqa: F401  (registrations)


def _n(task: seqio.Task, split: str = "train") -> int:
    return int(task.num_input_examples(split) or 0)


def equal_rate(task: seqio.Task) -> float:
    del task
    return 1.0


def examples_proportional_rate(task: seqio.Task, maximum: int = 2 ** 16, split: str = "train") -> float:
    return float(min(_n(task, split), maximum))


def temperature_rate(task: seqio.Task, temperature: float = 2.0, maximum=None, split: str = "train") -> float:
    n = _n(task, split)
    if maximum is not None:
        n = min(n, maximum)
    return float(n) ** (1.0 / temperature)


def examples_proportional(maximum: int):
    return functools.partial(examples_proportional_rate, maximum=maximum)


def temperature(t: float, maximum=None):
    return functools.partial(temperature_rate, temperature=t, maximum=maximum)


PRETRAIN_TASKS = ("ko_span_corruption_wikinews", "ko_span_corruption_book_review", "ko_span_corruption_fairytale")
MIXTURES = {}


def register(name: str, tasks, default_rate=None, description: str = "") -> seqio.Mixture:
    MIXTURES[name] = description
    return seqio.MixtureRegistry.add(name, tasks, default_rate=default_rate)


register("ko_pretrain", list(zip(PRETRAIN_TASKS, (0.5, 0.3, 0.2))),
         description="span corruption, embedded corpora mixed 0.5 news / 0.3 reviews / 0.2 fairy tales")
register("ko_pretrain_equal", PRETRAIN_TASKS, equal_rate, "span corruption, corpora mixed equally")
register("ko_pretrain_proportional", PRETRAIN_TASKS, examples_proportional(512),
         "span corruption, examples-proportional (documents), cap K = 512")
register("ko_pretrain_temperature", PRETRAIN_TASKS, temperature(2.0), "span corruption, temperature T = 2")
register("ko_dialog_pretrain", ["ko_dialog_next_utterance", "ko_dialog_utterance_order", "ko_dialog_single_masking",
                                "ko_dialog_multiple_masking", "ko_dialog_partial_masking"], equal_rate,
         "the five DialogCT5 objectives, equally")
register("ko_nlu", ["nsmc", "klue_nli", "kornli", "klue_sts", "korsts", "korquad"], examples_proportional(2 ** 16),
         "Korean NLU fine-tuning mixture, examples-proportional K = 2^16 (needs T5K_DATA_DIR)")
