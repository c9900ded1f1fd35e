"""`t5k corpus clean`: HyperCLOVA's corpus refinement for files of documents, before pre-training on them.

    t5k corpus clean --input crawl/*.txt.gz --out clean/corpus.txt.gz [--report clean/report.json]
                     [--threshold 0.8] [--min_chars 50]

Each document goes through, in this order:
1. the quality rules (`quality.QualityRules`: too short, not text, word lists, repetitive, profanity,
   promotional), on the raw text, since contact details are evidence of advertising;
2. de-identification (`deidentify.deidentify`): resident registration, card, phone and account numbers, e-mail
   and IP addresses become placeholders;
3. exact and near-duplicate removal (`dedup.NearDuplicateFilter`, MinHash LSH at Jaccard `threshold`) on the
   de-identified text; the first of each group, in input order, stays.

Input files are read by `corpora.read_documents` (blank-line separated `.txt[.gz]`, or `.jsonl[.gz]` with a
"text" field; bad lines are skipped and logged). The output is a blank-line separated `.txt.gz` (or `.txt`),
which `T5K_PRETRAIN_FILES` / `pretraining_files` read as they read the embedded prose. It is written to a temporary
file and renamed, and so is the report: the counts per rule, per identifier kind, and of duplicates.
"""

import collections
import dataclasses
import gzip
import hashlib
import json
import os
import sys
from typing import Counter, Iterable, Iterator, Optional

from tqdm import tqdm

from t5k import files
from t5k_tasks import corpora, dedup, deidentify, quality


@dataclasses.dataclass
class CleaningReport:
    documents: int = 0
    kept: int = 0
    rejected: Counter = dataclasses.field(default_factory=collections.Counter)  # by quality rule
    exact_duplicates: int = 0
    near_duplicates: int = 0
    identifiers: Counter = dataclasses.field(default_factory=collections.Counter)  # replaced, by kind

    def as_dict(self) -> dict:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, counting the pairs.
        return {k: dict(v) if isinstance(v, collections.Counter) else v for k, v in vars(self).items()}


def clean_documents(texts: Iterable[str], rules: quality.QualityRules = quality.QualityRules(),
                    near_duplicates: Optional[dedup.NearDuplicateFilter] = None,
                    report: Optional[CleaningReport] = None) -> Iterator[str]:
    """The kept documents, cleaned, in input order; `report` (if given) is filled in as they go."""
    near_duplicates = near_duplicates or dedup.NearDuplicateFilter()
    report = report if report is not None else CleaningReport()
    seen = set()
    for text in texts:
        report.documents += 1
        reason = rules.reject(text)
        if reason:
            report.rejected[reason] += 1
            continue
        text, found = deidentify.deidentify(text)
        report.identifiers.update(found)
        digest = hashlib.sha1(" ".join(text.split()).encode("utf-8")).digest()
        if digest in seen:
            report.exact_duplicates += 1
            continue
        seen.add(digest)
        if near_duplicates.check(text) is not None:
            report.near_duplicates += 1
            continue
        report.kept += 1
        yield text


def write_documents(texts: Iterable[str], path: str) -> int:
    """Blank-line separated documents streamed to `path` (gzip when it ends with .gz) through a temporary file
    renamed at the end; the number written."""
    count = 0
    opener = gzip.open if path.endswith(".gz") else open
    with files.replaced(path, opener, "wt", encoding="utf-8") as f:
        for text in texts:
            # A blank line inside a document would split it in two when read back.
            f.write("\n".join(line for line in text.splitlines() if line.strip()) + "\n\n")
            count += 1
    return count


def configure_parser(parser) -> None:
    parser.add_argument("command", choices=["clean"], help="clean: quality filter, de-identify, deduplicate")
    parser.add_argument("--input", nargs="+", required=True, help="document files (.txt[.gz] or .jsonl[.gz])")
    parser.add_argument("--out", required=True, help="the cleaned corpus (.txt.gz or .txt)")
    parser.add_argument("--report", default=None, help="the counts as JSON (default: OUT's name + .report.json)")
    parser.add_argument("--threshold", type=float, default=0.8, help="near-duplicate Jaccard similarity")
    parser.add_argument("--min_chars", type=int, default=50, help="shorter documents are rejected")


def run(args, bindings=()) -> int:
    from t5k import cli

    if bindings:
        print(cli.error_line("corpus", ValueError("takes no --gin bindings")), file=sys.stderr)
        return 2
    try:
        near = dedup.NearDuplicateFilter(threshold=args.threshold)
        rules = quality.QualityRules(min_chars=args.min_chars)
        for path in args.input:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--input {path}: no such file")
    except (ValueError, FileNotFoundError) as e:
        print(cli.error_line("corpus", e), file=sys.stderr)
        return 2
    report = CleaningReport()

    def texts():
        for path in args.input:
            yield from (doc.text for doc in corpora.read_documents(path))

    progress = tqdm(texts(), desc="clean", unit="doc", disable=not sys.stderr.isatty())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_documents(clean_documents(progress, rules, near, report), args.out)
    summary = report.as_dict()
    report_path = args.report or args.out + ".report.json"
    files.write_text(report_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(summary, ensure_ascii=False))
    return 0
