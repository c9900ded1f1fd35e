"""Dialog tasks on the embedded MIT sessions (HG-TODS + XPersona-ko): DialogCT5's pre-training objectives and the
dialog downstream tasks.

Objectives (t5k.preprocessors.dialog), speaker tags " A: " / " B: " (text, as in DialogCT5's slides):

| task | objective |
|---|---|
| ko_dialog_next_utterance | context + next speaker's tag -> last utterance (over every session prefix) |
| ko_dialog_utterance_order | shuffled turns -> the session in order |
| ko_dialog_single_masking | one utterance -> <extra_id_0> |
| ko_dialog_multiple_masking | round(0.15 * turns) utterances -> sentinels |
| ko_dialog_partial_masking | spans inside utterances (rate 0.15, mean span 3) -> sentinels |
| ko_dialog_partial_masking_curriculum | same, rate = linear_rate(step) (gin: linear_rate.r0/r1/num_steps) |

Downstream (text to text, split by session id; metrics BLEU + ROUGE):

| task | inputs -> targets |
|---|---|
| ko_dialog_response | `대화 응답: A: … B: … A:` -> the next utterance (every prefix of >= 2 turns) |
| ko_dialog_infilling | `대화 빈칸: A: … B: <extra_id_0> A: …` -> the hidden utterance (one per session, by crc32) |
| ko_dialog_summarization | `대화 요약: <XPersona session>` -> speaker B's persona sentences (the only openly licensed
  Korean dialog-to-summary pairs here) |
"""

import functools
import zlib
from typing import List

import seqio

from t5k import metrics
from t5k.preprocessors import curriculum
from t5k.preprocessors import dialog as dialog_objectives
from t5k_tasks import corpora
from t5k_tasks.downstream import register as register_text, text_postprocessor
from t5k_tasks.pipeline import T5kTask, index_examples, seeded
from t5k_tasks.pretraining import OUTPUT_FEATURES, VOCAB

TAG_TEXT = (" A: ", " B: ")
RESPONSE_PREFIX, INFILLING_PREFIX = "대화 응답:", "대화 빈칸:"
HIDDEN = "<extra_id_0>"  # the hidden utterance of an in-filling context
SESSIONS = corpora.SessionSource(lambda: list(corpora.SESSION_FILES.values()), VOCAB, name="dialog")


def _prefixes(dataset, sequence_length=None, output_features=None):
    del sequence_length, output_features
    return dialog_objectives.session_prefixes(dataset)


def speaker_tags(output_features) -> List[List[int]]:
    """The speaker tags as ids of the task's vocabulary (asked when the pipeline is built: the vocabulary follows
    gin)."""
    return [output_features["targets"].vocabulary.encode(t) for t in TAG_TEXT]


def _fit_sessions(dataset, sequence_length, output_features, features=("inputs",)):
    """Sessions longer than the smallest of `features`' lengths (less EOS) cut into whole-turn windows that fit
    (`split_long_sessions`), so seqio never trims an objective's output; without lengths, sessions pass whole."""
    lengths = [(sequence_length or {}).get(f) for f in features]
    if None in lengths:
        return dataset
    return dialog_objectives.split_long_sessions(dataset, min(lengths) - 1, speaker_tags(output_features))


def _objective(dataset, sequence_length, output_features, seed: int = 0, **kwargs):
    return dialog_objectives.dialog_objective(dataset, sequence_length, output_features, seed=seed,
                                              speaker_tags=speaker_tags(output_features), **kwargs)


def register_objective(name: str, objective, expand_prefixes: bool = False, rate_fn=None, fit=("inputs",)):
    """`fit`: the features whose lengths a rendered session must fit (the targets too when they hold the whole
    session)."""
    steps = [functools.partial(_fit_sessions, features=fit)] + ([_prefixes] if expand_prefixes else [])
    steps += [index_examples,
              seeded(_objective, salt=name, objective=objective, rate_fn=rate_fn),
              seqio.preprocessors.append_eos_after_trim]
    return seqio.TaskRegistry.add(name, source=SESSIONS, preprocessors=steps, output_features=OUTPUT_FEATURES,
                                  shuffle_buffer_size=None, metric_fns=[], task_cls=T5kTask)


register_objective("ko_dialog_next_utterance", dialog_objectives.next_utterance, expand_prefixes=True)
register_objective("ko_dialog_utterance_order", dialog_objectives.utterance_order, fit=("inputs", "targets"))
register_objective("ko_dialog_single_masking", dialog_objectives.single_utterance_masking)
register_objective("ko_dialog_multiple_masking", dialog_objectives.multiple_utterance_masking)
register_objective("ko_dialog_partial_masking", dialog_objectives.partial_utterance_masking)
register_objective("ko_dialog_partial_masking_curriculum", dialog_objectives.partial_utterance_masking,
                   rate_fn=curriculum.linear_rate)


# ----------------------------------------------------------------------------------------------------------
# Downstream
# ----------------------------------------------------------------------------------------------------------


def _speaker_tags(session: corpora.Session) -> List[str]:
    index: dict = {}
    return [TAG_TEXT[min(index.setdefault(s, len(index)), 1)].strip() for s, _ in session.turns]


def render(session: corpora.Session, upto: int = None, hide: int = None) -> str:
    tags = _speaker_tags(session)
    parts = []
    for k, (_, text) in enumerate(session.turns[:upto]):
        parts.append(f"{tags[k]} {HIDDEN if k == hide else text}")
    return " ".join(parts)


def response_records(split: str) -> List[dict]:
    out = []
    for s in SESSIONS.sessions()[split]:
        tags = _speaker_tags(s)
        for k in range(1, len(s.turns)):
            out.append({"inputs": f"{RESPONSE_PREFIX} {render(s, k)} {tags[k]}", "targets": s.turns[k][1]})
    return out


def infilling_records(split: str) -> List[dict]:
    out = []
    for s in SESSIONS.sessions()[split]:
        hide = zlib.crc32(s.id.encode()) % len(s.turns)
        out.append({"inputs": f"{INFILLING_PREFIX} {render(s, hide=hide)}", "targets": s.turns[hide][1]})
    return out


def summarization_records(split: str) -> List[dict]:
    out = []
    for s in SESSIONS.sessions()[split]:
        persona = s.extra.get("persona_B")
        if isinstance(persona, list) and persona:
            out.append({"inputs": f"대화 요약: {render(s)}", "targets": " ".join(str(p) for p in persona)})
    return out


def generation_metrics(targets, predictions):
    return {**metrics.bleu(targets, predictions, "char"), **metrics.rouge(targets, predictions)}


def _fit_context(prefix: str, anchor=None):
    """Long contexts cut at a speaker tag around what the target depends on (`dialog.fit_context`), not at the end."""
    return functools.partial(dialog_objectives.fit_context, prefix=prefix, speaker_tags=TAG_TEXT, anchor=anchor)


register_text("ko_dialog_response", response_records, text_postprocessor, [generation_metrics],
              "dialog response generation: context + next tag -> utterance", fit=_fit_context(RESPONSE_PREFIX))
register_text("ko_dialog_infilling", infilling_records, text_postprocessor, [generation_metrics],
              "dialog in-filling: one utterance hidden -> that utterance",
              fit=_fit_context(INFILLING_PREFIX, anchor=HIDDEN))
register_text("ko_dialog_summarization", summarization_records, text_postprocessor, [generation_metrics],
              "dialog summarization proxy: XPersona session -> speaker B's persona")
