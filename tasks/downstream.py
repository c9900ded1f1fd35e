"""Downstream (fine-tuning / evaluation) tasks, text-to-text, with postprocessing and metrics.

Local data come from `corpora.shared_data_dir()` (T5K_DATA_DIR, else ../shared/data); the wikinews title task
reads the embedded CSV. Where only dev/test files exist, splits are made deterministically by `corpora.split_of`
(crc32 of a key; ~2 % validation) or as stated per task below.

| task | inputs -> targets | splits | metrics |
|---|---|---|---|
| nsmc | `nsmc 문장: …` -> 긍정/부정 | train = ratings_train, validation = ratings_test | accuracy, macro-F1 |
| klue_nli | `klue_nli 전제: … 가설: …` -> 함의/중립/모순 | KLUE dev: 2/3 train, 1/3 validation (crc32 % 3) | accuracy, macro-F1 |
| kornli | same prefix `kornli` | train = XNLI dev, validation = XNLI test | accuracy, macro-F1 |
| klue_sts, korsts | `… 문장1: … 문장2: …` -> "3.8" (label rounded to 0.2) | KLUE dev 2/3-1/3; KorSTS train/dev(+test) | Pearson, Spearman |
| korquad | `korquad 제목: … 지문: … 질문: …` -> answer | KorQuAD dev by article: crc32(title) % 5 == 0 -> validation | EM, char-F1 |
| wikinews_title | `요약: body` -> title | embedded wikinews.csv, split_of(title) | ROUGE (Hangul) |
| petitions_title | `요약: content` -> title | split_of(petition id) | ROUGE (Hangul) |
| sae4k | `sae4k: utterance` -> argument | split_of(utterance) | EM, ROUGE |
| ko_en_translation, en_ko_translation | `번역 한영: …` / `번역 영한: …` | train = news test + JHE eval, validation = news dev + JHE dev | BLEU (13a/intl/char) |
"""

import functools
import json
import zlib
from typing import Dict, List

import seqio

from t5k import metrics
from t5k_tasks import corpora
from t5k_tasks.pipeline import T5kTask, index_examples, tokenize_batched
from t5k_tasks.pretraining import OUTPUT_FEATURES

NSMC_LABELS = ("부정", "긍정")
NLI_LABELS = {"entailment": "함의", "neutral": "중립", "contradiction": "모순"}
TASKS: Dict[str, str] = {}  # name -> short description


# ----------------------------------------------------------------------------------------------------------
# Postprocessing
# ----------------------------------------------------------------------------------------------------------


def label_postprocessor(labels):
    def postprocess(output, example=None, is_target=False):
        del example, is_target
        text = output.decode("utf-8") if isinstance(output, bytes) else str(output)
        text = text.strip()
        return labels.index(text) if text in labels else -1

    return postprocess


def float_postprocessor(output, example=None, is_target=False):
    if is_target and example is not None and "label" in example:
        return float(example["label"])
    text = output.decode("utf-8") if isinstance(output, bytes) else str(output)
    try:
        return float(text.strip())
    except ValueError:
        return None


def answers_postprocessor(output, example=None, is_target=False):
    if is_target and example is not None and "answers" in example:
        answers = example["answers"]
        answers = answers.decode("utf-8") if isinstance(answers, bytes) else str(answers)
        return answers.split("\x1f")
    return output.decode("utf-8") if isinstance(output, bytes) else str(output)


def text_postprocessor(output, example=None, is_target=False):
    del example, is_target
    return output.decode("utf-8") if isinstance(output, bytes) else str(output)


def sts_target(score: float) -> str:
    """The regression target as text: rounded to the nearest 0.2 (T5's STS-B recipe), one decimal: 3.86 -> "3.8"."""
    return f"{round(score * 5) / 5:.1f}"


# ----------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------


def register(name: str, records_fn, postprocess_fn, metric_fns, description: str, splits=corpora.SPLITS,
             fit=None):
    """`fit(dataset, sequence_length, output_features)`: a step after tokenization that cuts long features itself
    (where seqio's cut at the end would lose what matters, e.g. a dialog context's latest turns)."""
    source = corpora.RecordSource(functools.partial(records_fn), splits=splits)
    TASKS[name] = description
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[tokenize_batched] + ([fit] if fit else []) + [
            index_examples, seqio.preprocessors.append_eos_after_trim],
        output_features=OUTPUT_FEATURES,
        postprocess_fn=postprocess_fn,
        metric_fns=list(metric_fns),
        shuffle_buffer_size=None, task_cls=T5kTask,
    )


def _third(key: str) -> str:
    return "validation" if zlib.crc32(key.encode()) % 3 == 0 else "train"


# ---- NSMC


def nsmc_records(split: str) -> List[dict]:
    path = corpora.shared_file(f"nsmc/ratings_{'train' if split == 'train' else 'test'}.txt.gz")
    out = []
    for number, row, skips in corpora.read_tsv(path):
        if len(row) != 3 or row[2] not in ("0", "1"):
            skips.skip(number, "row", "bad_record: expected id, document, label 0/1")
        elif not row[1].strip():
            skips.skip(number, "row", "empty_document")
        else:
            out.append({"inputs": f"nsmc 문장: {row[1]}", "targets": NSMC_LABELS[int(row[2])]})
    return out


register("nsmc", nsmc_records, label_postprocessor(NSMC_LABELS), [metrics.classification_metrics],
         "NSMC movie review sentiment -> 긍정/부정")

# ---- NLI

_NLI_WORDS = tuple(NLI_LABELS.values())


def klue_nli_records(split: str) -> List[dict]:
    with open(corpora.shared_file("klue/klue-nli-v1.1_dev.json"), encoding="utf-8") as f:
        rows = json.load(f)
    return [{"inputs": f"klue_nli 전제: {r['premise']} 가설: {r['hypothesis']}", "targets": NLI_LABELS[r["gold_label"]]}
            for r in rows if r.get("gold_label") in NLI_LABELS and _third(r["guid"]) == split]


def kornli_records(split: str) -> List[dict]:
    path = corpora.shared_file(f"kornlu/xnli.{'dev' if split == 'train' else 'test'}.ko.tsv")
    out = []
    for number, row, skips in corpora.read_tsv(path):
        if len(row) != 3 or row[2] not in NLI_LABELS:
            skips.skip(number, "row", "bad_record: expected sentence1, sentence2, gold_label")
        else:
            out.append({"inputs": f"kornli 전제: {row[0]} 가설: {row[1]}", "targets": NLI_LABELS[row[2]]})
    return out


register("klue_nli", klue_nli_records, label_postprocessor(_NLI_WORDS), [metrics.classification_metrics],
         "KLUE-NLI (dev split 2/3 train, 1/3 validation) -> 함의/중립/모순")
register("kornli", kornli_records, label_postprocessor(_NLI_WORDS), [metrics.classification_metrics],
         "KorNLI (XNLI dev = train, test = validation) -> 함의/중립/모순")

# ---- STS


def klue_sts_records(split: str) -> List[dict]:
    with open(corpora.shared_file("klue/klue-sts-v1.1_dev.json"), encoding="utf-8") as f:
        rows = json.load(f)
    return [{"inputs": f"klue_sts 문장1: {r['sentence1']} 문장2: {r['sentence2']}",
             "targets": sts_target(r["labels"]["label"]), "label": float(r["labels"]["label"])}
            for r in rows if _third(r["guid"]) == split]


def korsts_records(split: str) -> List[dict]:
    out = []
    for part in (["train"] if split == "train" else ["dev", "test"] if split == "validation" else [split]):
        for number, row, skips in corpora.read_tsv(corpora.shared_file(f"kornlu/sts-{part}.tsv")):
            try:
                score = float(row[4])
                s1, s2 = row[5], row[6]
            except (IndexError, ValueError):
                skips.skip(number, "row", "bad_record: expected 7 columns with a float score")
                continue
            out.append({"inputs": f"korsts 문장1: {s1} 문장2: {s2}", "targets": sts_target(score), "label": score})
    return out


register("klue_sts", klue_sts_records, float_postprocessor, [metrics.sts_metrics],
         "KLUE-STS (dev split 2/3-1/3) -> similarity 0-5 as a number string")
register("korsts", korsts_records, float_postprocessor, [metrics.sts_metrics],
         "KorSTS (train / dev+test) -> similarity 0-5 as a number string")

# ---- KorQuAD (generative QA)


def korquad_records(split: str) -> List[dict]:
    with open(corpora.shared_file("korquad_v1/KorQuAD_v1.0_dev.json"), encoding="utf-8") as f:
        data = json.load(f)["data"]
    out = []
    for article in data:
        held_out = zlib.crc32(article["title"].encode()) % 5 == 0
        if held_out != (split == "validation"):
            continue
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = [a["text"] for a in qa["answers"] if a["text"].strip()]
                if answers:
                    out.append({"inputs": f"korquad 제목: {article['title']} 지문: {paragraph['context']} "
                                          f"질문: {qa['question']}",
                                "targets": answers[0], "answers": "\x1f".join(answers)})
    return out


register("korquad", korquad_records, answers_postprocessor, [metrics.squad],
         "KorQuAD 1.0 generative QA (dev split by article 4/5-1/5) -> answer text")

# ---- Summarization proxies


def wikinews_title_records(split: str) -> List[dict]:
    out = []
    for line, row in corpora.read_csv_records(corpora.WIKINEWS_CSV):
        title, body = (row.get("제목") or "").strip(), (row.get("내용") or "").strip()
        if title and body and corpora.split_of(body) == split:
            out.append({"inputs": f"요약: {body}", "targets": title})
    return out


def petitions_title_records(split: str) -> List[dict]:
    out = []
    for path in sorted(corpora.shared_data_dir().glob("petitions/petitions_*.jsonl.gz")):
        for number, obj, skips in corpora.read_jsonl(path, "petition", unit="petitions"):
            title, content = str(obj.get("title", "")).strip(), str(obj.get("content", "")).strip()
            if not title or not content:
                skips.skip(number, "petition", "empty_document")
            elif corpora.split_of(str(obj.get("petition_idx", content))) == split:
                out.append({"inputs": f"요약: {content}", "targets": title})
    if not out and not list(corpora.shared_data_dir().glob("petitions/*.jsonl.gz")):
        corpora.shared_file("petitions/petitions_2017-08.jsonl.gz")
    return out


def sae4k_records(split: str) -> List[dict]:
    out = []
    for number, row, skips in corpora.read_tsv(corpora.shared_file("sae4k/sae4k_v1.txt"), header=False):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            skips.skip(number, "row", "bad_record: expected utterance, argument, label")
        elif corpora.split_of(row[0]) == split:
            out.append({"inputs": f"sae4k: {row[0].strip()}", "targets": row[1].strip()})
    return out


def summary_metrics(targets, predictions):
    return metrics.rouge(targets, predictions)


def sae4k_metrics(targets, predictions):
    return {**metrics.squad(targets, predictions), **metrics.rouge(targets, predictions)}


register("wikinews_title", wikinews_title_records, text_postprocessor, [summary_metrics],
         "embedded Wikinews: '요약: body' -> title (summarization proxy)")
register("petitions_title", petitions_title_records, text_postprocessor, [summary_metrics],
         "petitions: '요약: content' -> title (summarization proxy)")
register("sae4k", sae4k_records, text_postprocessor, [sae4k_metrics],
         "sae4k: question/command -> intent argument")

# ---- Translation


def _parallel(split: str) -> List[tuple]:
    names = (["korean-english-park.test", "jhe-koen-eval"] if split == "train"
             else ["korean-english-park.dev", "jhe-koen-dev"])
    pairs = []
    for name in names:
        with open(corpora.shared_file(f"ko_en_parallel/{name}.ko"), encoding="utf-8") as f:
            ko = f.read().splitlines()
        with open(corpora.shared_file(f"ko_en_parallel/{name}.en"), encoding="utf-8") as f:
            en = f.read().splitlines()
        pairs += [(k.strip(), e.strip()) for k, e in zip(ko, en) if k.strip() and e.strip()]
    return pairs


def ko_en_records(split):
    return [{"inputs": f"번역 한영: {k}", "targets": e} for k, e in _parallel(split)]


def en_ko_records(split):
    return [{"inputs": f"번역 영한: {e}", "targets": k} for k, e in _parallel(split)]


register("ko_en_translation", ko_en_records, text_postprocessor, [metrics.bleu_multi],
         "Korean -> English translation (news + JHE)")
register("en_ko_translation", en_ko_records, text_postprocessor, [metrics.bleu_multi],
         "English -> Korean translation (news + JHE)")
