"""Pre-training tasks on prose: span corruption (CT5) and the rest of the T5 objective family, UL2, plain LM.

Documents come from `corpora.pretraining_files()` (the embedded prose unless T5K_PRETRAIN_FILES / gin say
otherwise), are tokenized once into the token cache, concatenated in the seeded stream order and cut into chunks
(`pipeline.concat_and_split`), then corrupted by the objectives of t5k.preprocessors.denoise.

| task | objective | chunk (raw tokens) | lengths that fit |
|---|---|---|---|
| ko_span_corruption | T5 span corruption 0.15 / 3 | raw_length_for_inputs(inputs): 568 for 512 | 512/114, 128/32 |
| ko_span_corruption_from_text | same, tokenizing on the fly (no cache) | same | same |
| ko_span_corruption_{wikinews,book_review,fairytale} | same, one embedded corpus each (mixtures) | same | same |
| ko_prefix_lm, ko_bert_mlm, ko_deshuffle, ko_iid_replace_span, ko_iid_drop_tokens, ko_ul2 | see denoise.py | inputs - 1 | targets = inputs for prefix LM/MLM/deshuffle/UL2; 512/256 iid replace-span; 512/114 drop-tokens |
| ko_lm | decoder-only LM (targets only) | targets - 1 | any |
| ko_salient_span | salient span masking: proper nouns, numbers, dates (`t5k.salient`) -> sentinels | inputs - 1 | any |
"""

import functools
from typing import Callable, Dict, List, Sequence

import seqio

from t5k.preprocessors import denoise
from t5k.vocab import GinVocabulary
from t5k_tasks import corpora
from t5k_tasks.pipeline import T5kTask, FIXED_LENGTH_TASKS, concat_and_split, index_examples, seeded, tokenize_batched

VOCAB = GinVocabulary()  # get_vocabulary() under the gin bindings in force when a pipeline is built
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(VOCAB, add_eos=True, required=False),
    "targets": seqio.Feature(VOCAB, add_eos=True),
}
LM_FEATURES = {"targets": seqio.Feature(VOCAB, add_eos=True)}
UL2_MODES = ("[NLU]", "[NLG]", "[S2S]")

PROSE = corpora.DocumentSource(corpora.pretraining_files, VOCAB, tokenized=True, name="prose")
PROSE_TEXT = corpora.DocumentSource(corpora.pretraining_files, VOCAB, tokenized=False, name="prose")
CORPUS_SOURCES = {
    name: corpora.DocumentSource(lambda path=path: [path], VOCAB, tokenized=True, name=f"prose_{name}")
    for name, path in corpora.PROSE_FILES.items()
}


SALIENT_PROSE = corpora.SalientDocumentSource(corpora.pretraining_files, VOCAB, name="prose")


def ul2_mode_tokens(output_features) -> Dict[str, List[int]]:
    """UL2's mode tokens as plain text in the task's vocabulary ("[S2S]": 4-5 ids in the shipped one)."""
    vocabulary = output_features["targets"].vocabulary
    return {mode: vocabulary.encode(mode) for mode in UL2_MODES}


def longest_mode_token(output_features) -> int:
    return max(map(len, ul2_mode_tokens(output_features).values()))


def _ul2(dataset, sequence_length, output_features, seed: int = 0):
    return denoise.ul2(dataset, sequence_length, output_features, ul2_mode_tokens(output_features), seed=seed)


def _no_reserve(output_features) -> int:
    del output_features
    return 0


def _chunks(mode: str, keys: Sequence[str], reserve: Callable[..., int]):
    """The chunking step; `reserve(output_features)` is asked when the pipeline is built (the vocabulary follows
    gin)."""
    if mode == "span_corruption":
        return functools.partial(concat_and_split, keys=keys)

    def chunks(dataset, sequence_length, output_features):
        return concat_and_split(dataset, sequence_length, length_key=mode, keys=keys,
                                reserve=reserve(output_features))

    return chunks


def register(name: str, preprocessor, source=PROSE, chunk: str = "inputs", features=OUTPUT_FEATURES,
             fixed_length: bool = False, salt: str = "", keys: Sequence[str] = ("targets",),
             reserve: Callable[..., int] = _no_reserve,
             **kwargs) -> seqio.Task:
    """Registers `name`: source -> [tokenize] -> chunks of `keys` (`reserve` ids shorter) -> index ->
    `preprocessor` -> EOS."""
    steps = []
    if source is PROSE_TEXT:
        steps.append(functools.partial(tokenize_batched, text_key="text"))
    steps += [_chunks(chunk, keys, reserve), index_examples, seeded(preprocessor, salt=salt or name, **kwargs),
              seqio.preprocessors.append_eos_after_trim]
    task = seqio.TaskRegistry.add(name, source=source, preprocessors=steps, output_features=features,
                                  shuffle_buffer_size=None, metric_fns=[], task_cls=T5kTask)
    if fixed_length:
        FIXED_LENGTH_TASKS.add(name)
    return task


def _lm(dataset, sequence_length, output_features, seed=0):
    del sequence_length, output_features, seed
    return dataset


register("ko_span_corruption", denoise.span_corruption, chunk="span_corruption", fixed_length=True)
register("ko_span_corruption_from_text", denoise.span_corruption, source=PROSE_TEXT, chunk="span_corruption",
         fixed_length=True, salt="ko_span_corruption")  # same masks as ko_span_corruption: byte-identical batches
for _name, _source in CORPUS_SOURCES.items():
    register(f"ko_span_corruption_{_name}", denoise.span_corruption, source=_source, chunk="span_corruption",
             fixed_length=True)
register("ko_prefix_lm", denoise.prefix_lm)
register("ko_bert_mlm", denoise.bert_mlm)
register("ko_deshuffle", denoise.deshuffle)
register("ko_iid_replace_span", denoise.iid_replace_span)
register("ko_iid_drop_tokens", denoise.iid_drop_tokens)
# Chunks leave room for the longest mode token (plain text: 4-5 ids), so an S (prefix LM) example is never trimmed.
register("ko_ul2", _ul2, reserve=longest_mode_token)
register("ko_lm", _lm, chunk="targets", features=LM_FEATURES)
# Every salient span whose targets fit the targets length (random spans first), one chunk of inputs - 1 tokens each.
register("ko_salient_span", denoise.salient_span_masking, source=SALIENT_PROSE, keys=("targets", "salient_mask"))
