"""Vocabulary benchmark and ablation (docs/vocab.md shows the results).

  python bench/vocab.py export --out DIR      # training text + held-out text from ../shared/data
  python bench/vocab.py [--vocabs DIR...]     # throughput + ablation table; last line is JSON

The export puts every 20th line of each source into held-out files (news, reviews, dialogue) and the rest into
train.txt, so the shipped vocabulary never saw the benchmark's text. The benchmark compares the shipped
morph_bbpe vocabulary with any others given (train them on the same train.txt: `--vocabs` takes their dirs).

Timed encoding runs in fresh processes. One process keeps Kiwi's default worker threads (one per core); the
processes of a multi-process case, one per core, each analyse in their own thread (T5K_KIWI_THREADS=0, see
`t5k.morph.analyser_threads`), as any process pool covering the cores should be configured. Every timed case
runs `--rounds` times (default 3), each time in new processes; the figures are the medians, and
`MB_per_s_rounds` lists each round's MB/s.
"""

import argparse
import csv
import gzip
import itertools
import json
import multiprocessing as mp
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
HELD_OUT_EVERY = 20
MAX_REVIEWS = 200_000


def _jsonl(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def sources():
    """(name, category, iterator of text lines) for the Korean prose and dialogue in shared/data."""
    d = DATA
    yield "wikinews", "news", (l for l in open(d / "boddari/wikinews.txt", encoding="utf-8").read().splitlines())
    for name in ("book_review01", "fairytale01", "unesco_report"):
        yield name, "prose", open(d / f"boddari/{name}.txt", encoding="utf-8").read().splitlines()
    yield "koconovel", "prose", (l for r in _jsonl(d / "koconovel/text.jsonl") for l in r["text"].split("\n"))
    yield "petitions", "prose", (l for p in sorted((d / "petitions").glob("*.jsonl.gz")) for r in _jsonl(p)
                                 for l in (r["title"], *r["content"].split("\n")))
    with gzip.open(d / "nsmc/raw_reviews.tsv.gz", "rt", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows)
        yield "nsmc_raw", "reviews", [r[4] for _, r in zip(range(MAX_REVIEWS), rows) if len(r) > 4]
    for name in ("hg_tods", "xpersona_ko"):
        yield name, "dialogue", (t["text"] for r in _jsonl(d / f"{name}/sessions.jsonl.gz") for t in r["turns"])
    with open(d / "chatbot_data/ChatbotData.csv", encoding="utf-8") as f:
        yield "chatbot", "dialogue", [x for r in csv.DictReader(f) for x in (r["Q"], r["A"])]


def export(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    held = {c: open(out / f"heldout_{c}.txt", "w", encoding="utf-8") for c in ("news", "reviews", "dialogue")}
    counts = {}
    with open(out / "train.txt", "w", encoding="utf-8") as train:
        for name, category, lines in sources():
            n = 0
            for i, line in enumerate(l for l in lines if l.strip()):
                line = line.replace("\r", "")
                if i % HELD_OUT_EVERY == 0:
                    if category in held:
                        held[category].write(line + "\n")
                else:
                    train.write(line + "\n")
                    n += len(line)
            counts[name] = n
    for f in held.values():
        f.close()
    return counts


# --------------------------------------------------------------------------------------------------------------
def _load(path, use_lexicon=True):
    """The vocabulary at `path` ("shipped": the default one); `use_lexicon=False` ignores its saved lexicon."""
    from t5k import vocab

    if path == "shipped":
        return vocab.default_vocabulary() if use_lexicon else vocab.BPEVocabulary(
            vocab.DEFAULT_DIR, vocab.DEFAULT_EXTRA_IDS, use_lexicon=False)
    meta = vocab.read_meta(path)
    if not use_lexicon and meta["variant"] in vocab.MORPH_VARIANTS:
        return vocab.BPEVocabulary(path, None, use_lexicon=False)
    return vocab.get_vocabulary(meta["variant"], path, None)


def _has_lexicon(path):
    from t5k import vocab

    return "lexicon" in vocab.read_meta(vocab.DEFAULT_DIR if path == "shipped" else path)


def _name(v):
    return getattr(v, "variant", "sentencepiece")


def _encode_all(v, lines):
    return v.encode_batch(lines) if hasattr(v, "encode_batch") else [v.encode(l) for l in lines]


def _unk_bytes(v, line, ids):
    """Bytes of `line` that the ids stand for only as <unk>."""
    if 2 not in ids:
        return 0
    if hasattr(v, "id_bytes"):
        return len(line.encode()) - sum(len(v.id_bytes[i]) for i in ids if i != 2)
    proto = v.tokenizer.encode(line, return_type="proto")  # begin/end: byte offsets into the UTF-8 input
    return sum(p.end - p.begin for p in proto.pieces if p.id == 2)


def ablation(v, lines, morphemes):
    ids = _encode_all(v, lines)
    tokens = sum(map(len, ids))
    n_bytes = sum(len(l.encode()) for l in lines)
    return {"tokens_per_char": round(tokens / sum(map(len, lines)), 4),
            "tokens_per_eojeol": round(tokens / sum(len(l.split()) for l in lines), 4),
            "unk_byte_rate": round(sum(_unk_bytes(v, l, x) for l, x in zip(lines, ids)) / n_bytes, 6),
            "pieces_per_morpheme": round(tokens / morphemes, 4)}


def _time_encode(v, lines, batch=None):
    """(wall seconds, CPU seconds of the whole process incl. Kiwi's and Rust's threads, tokens), encoding `lines`
    in one call or in calls of `batch` lines."""
    batch = batch or max(1, len(lines))
    t, c = time.perf_counter(), time.process_time()
    tokens = sum(len(ids) for i in range(0, len(lines), batch) for ids in _encode_all(v, lines[i : i + batch]))
    return time.perf_counter() - t, time.process_time() - c, tokens


_start_barrier = None  # set in each pool process (`_pool`): timing starts when every process is ready


def _worker(args):
    """Fresh process: `prime` (other text, untimed) fills the caches, then two timed passes over `lines` (in calls
    of `batch` lines if given, else one). The first pass starts when every process of the pool got here, so no
    timed window overlaps another process still loading Kiwi (~2-4 CPU seconds) or priming."""
    path, use_lexicon, prime, lines, *batch = args
    v = _load(path, use_lexicon)
    v.encode("가")  # load the tokenizer (and the lexicon, if any) outside the timing; the caches stay cold
    if getattr(v, "variant", None) in ("morph_bbpe", "char_bpe"):
        from t5k import morph

        morph._kiwi().tokenize("가")  # load the analyser outside the timing too (Kiwi finishes loading on its
        # first call; the lexicon may have answered "가" without it)
    for i in range(0, len(prime), 256):
        _encode_all(v, prime[i : i + 256])
    if _start_barrier is not None:
        _start_barrier.wait(timeout=900)
    return _time_encode(v, lines, *batch), _time_encode(v, lines, *batch)


def _init_pool_process(barrier, kiwi_threads):
    global _start_barrier
    _start_barrier = barrier
    if kiwi_threads is not None:
        from t5k import morph

        os.environ[morph.ANALYSER_THREADS_ENV] = kiwi_threads


def _pool(n):
    """n fresh processes that start timing together (one task each); with n > 1 (one per core) each analyses in
    its own thread, without Kiwi workers."""
    ctx = mp.get_context("spawn")
    return ctx.Pool(n, initializer=_init_pool_process, initargs=(ctx.Barrier(n), "0" if n > 1 else None))


def _rates(n_bytes, rounds):
    """MB/s, tokens/s and MB per CPU-second from `rounds` repeats of one case, each a list of per-process
    (wall, cpu, tokens): a round's wall time is its slowest process, its CPU time their sum. The figures are the
    medians over the rounds (each timed window is short, ~0.1-5 s, on a VM whose speed moves by 10-15%);
    `MB_per_s_rounds` lists every round's."""
    walls = [max(r[0] for r in res) for res in rounds]
    cpus = [sum(r[1] for r in res) for res in rounds]
    tokens = sum(r[2] for r in rounds[0])
    return {"MB_per_s": round(n_bytes / statistics.median(walls) / 1e6, 3),
            "tokens_per_s": round(tokens / statistics.median(walls)),
            "MB_per_cpu_s": round(n_bytes / statistics.median(cpus) / 1e6, 3),
            "MB_per_s_rounds": [round(n_bytes / w / 1e6, 3) for w in walls]}


def throughput(path, lines, prime, procs, rounds=1):
    """MB/s and tokens/s over `lines` (split across n processes, one per core), in these cache states, each case
    run `rounds` times with fresh processes (medians reported, see `_rates`):

    cold: fresh processes, empty in-process caches, the vocabulary's saved lexicon (if it has one) under them;
    cold_nolex (vocabularies with a lexicon): the same without the lexicon, every eojeol new to the analyser;
    primed: fresh processes that first encoded `prime` (other text, as a training stream would have);
    warm: a second pass over the same text.
    MB_per_cpu_s divides by the CPU time the processes used: on a machine shared with other jobs it is the
    figure that does not move with the load (an idle core gives about that much per second).
    """
    n_bytes = sum(len(l.encode()) + 1 for l in lines)
    # The lines go to the processes in a fixed random order: `lines` interleaves news, reviews and dialogue, and
    # every other line would give one process all the reviews (the most new runs) and the other all the dialogue,
    # so the slower of the two, not the cores, would set the wall time.
    order = list(range(len(lines)))
    random.Random(0).shuffle(order)
    out = {}
    for n in (1, procs):
        chunks = [[lines[j] for j in order[i::n]] for i in range(n)]
        phases = {}
        for _ in range(rounds):
            for phase, use_lexicon, prime_lines in (("cold", True, []), ("cold_nolex", False, []),
                                                     ("primed", True, prime)):
                if phase == "cold_nolex" and not _has_lexicon(path):
                    continue
                with _pool(n) as pool:
                    res = pool.map(_worker, [(path, use_lexicon, prime_lines, c) for c in chunks])
                phases.setdefault(phase, []).append([r[0] for r in res])
                if phase == "primed":
                    phases.setdefault("warm", []).append([r[1] for r in res])
        for phase, res in phases.items():
            out[f"{phase}_{n}proc"] = _rates(n_bytes, res)
    return out


def new_review_stream(megabytes):
    """NSMC raw reviews after the first MAX_REVIEWS (the only ones the vocabulary's training text holds): text of a
    known kind that neither the vocabulary nor its lexicon ever saw, in file order, about `megabytes` of it."""
    lines, size = [], 0
    with gzip.open(DATA / "nsmc/raw_reviews.tsv.gz", "rt", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows)
        for row in itertools.islice(rows, MAX_REVIEWS, None):
            if len(row) > 4 and row[4].strip():
                lines.append(row[4])
                size += len(row[4].encode()) + 1
                if size >= megabytes * 1e6:
                    break
    return lines


def stream_throughput(path, lines, procs, rounds=1):
    """A new corpus tokenized from scratch: fresh processes (one per core, each with every other line, in calls of
    256 lines), empty caches over the saved lexicon, the whole stream timed, `rounds` times (medians, see `_rates`).
    Between `cold` (the first 0.3 MB of new text) and `primed`: the in-process caches fill as the stream goes, as
    when a researcher tokenizes a corpus of their own."""
    n_bytes = sum(len(l.encode()) + 1 for l in lines)
    results = []
    for _ in range(rounds):
        with _pool(procs) as pool:
            results.append([r[0] for r in pool.map(_worker, [(path, True, [], lines[i::procs], 256)
                                                             for i in range(procs)])])
    return {"MB": round(n_bytes / 1e6, 3), "procs": procs, **_rates(n_bytes, results)}


def priming_text(corpus, megabytes):
    """An even sample of train.txt (every k-th line) of about `megabytes` MB: every source, none held out."""
    lines = (corpus / "train.txt").read_text(encoding="utf-8").splitlines()
    step = max(1, round(sum(len(l.encode()) + 1 for l in lines) / (megabytes * 1e6)))
    return lines[::step], lines


def piece_hit_rates(held_lines, samples):
    """Share of held-out stage-1 pieces (the id cache's keys) that already occur in each sample of training text."""
    from t5k import morph

    pieces = [p for l in held_lines for p in morph.pieces_by_pattern(l)]
    out = {}
    for name, lines in samples.items():
        seen = {p for l in lines for p in morph.pieces_by_pattern(l)}
        out[name] = round(sum(p in seen for p in pieces) / len(pieces), 4)
    return out


def lexicon_stats(path, lines):
    """Size and load time of the vocabulary's lexicon, and the share of `lines`' analysed letter runs it holds
    (each occurrence, and each distinct run: a fresh process pays Kiwi once per distinct run it misses)."""
    from t5k import morph, vocab

    meta = vocab.read_meta(vocab.DEFAULT_DIR if path == "shipped" else path).get("lexicon")
    if not meta:
        return None
    file = Path(vocab.DEFAULT_DIR if path == "shipped" else path) / meta["file"]
    start = time.perf_counter()
    entries = morph.read_lexicon(file).entries
    load_s = time.perf_counter() - start
    counts = morph.count_runs(lines)
    hits = {r: n for r, n in counts.items() if r in entries}
    return {"runs": len(entries), "min_count": meta["min_count"], "bytes": file.stat().st_size,
            "load_s": round(load_s, 3), "heldout_hit_rate": round(sum(hits.values()) / sum(counts.values()), 4),
            "heldout_distinct_hit_rate": round(len(hits) / len(counts), 4)}


def tf_pipeline(v, lines, seconds=10.0):
    """tokens/s of encode_tf in a tf.data map with AUTOTUNE (batched strings -> ragged ids)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(lines).repeat().batch(64)
    ds = ds.map(v.encode_tf, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    tokens, start = 0, time.perf_counter()
    for batch in ds:
        tokens += int(batch.flat_values.shape[0])
        if time.perf_counter() - start > seconds:
            break
    return round(tokens / (time.perf_counter() - start))


def analysers(max_sentences=1000):
    """Kiwi vs MeCab-ko: morpheme-boundary F1 against KLUE-DP gold, and µs per eojeol (analysed alone).

    Gold: pure-Hangul eojeols whose gold morphemes spell the surface exactly (no restored lemmas).
    """
    from t5k import morph

    with gzip.open(DATA / "klue/klue-dp-v1.1_dev.tsv.gz", "rt", encoding="utf-8") as f:
        rows = [l.split("\t") for l in f if l[:1].isdigit()]
    gold = {}
    for r in rows:
        word, parts = r[1], r[2].split()
        if re.fullmatch("[가-힣]+", word) and "".join(parts) == word:
            cuts, pos = set(), 0
            for p in parts[:-1]:
                pos += len(p)
                cuts.add(pos)
            gold[word] = cuts
    words = sorted(gold)[: max_sentences * 4]

    class _Tok:
        def __init__(self, start, length):
            self.start, self.len = start, length

    analysers = {"kiwipiepy": lambda w: morph._cuts(morph._kiwi().tokenize(w), len(w))}
    try:
        import mecab

        tagger = mecab.MeCab()
        analysers["python-mecab-ko"] = lambda w: morph._cuts(
            [_Tok(m.span.start, m.span.end - m.span.start) for m in tagger.parse(w)], len(w))
    except ImportError:
        pass
    out = {}
    for name, cut in analysers.items():
        cut(words[0])
        t = time.perf_counter()
        found = {w: set(cut(w)) for w in words}
        us = (time.perf_counter() - t) / len(words) * 1e6
        tp = sum(len(found[w] & gold[w]) for w in words)
        p, r = tp / max(1, sum(map(len, found.values()))), tp / max(1, sum(len(gold[w]) for w in words))
        out[name] = {"boundary_f1": round(2 * p * r / (p + r), 4), "precision": round(p, 4), "recall": round(r, 4),
                     "us_per_eojeol": round(us, 1), "eojeols": len(words)}
    return out


def cache_agreement(lines):
    """How often per-eojeol analysis (what the cache allows) cuts like analysis in sentence context."""
    from t5k import morph

    split = morph.MorphSplitter()
    agree = total = 0
    for line in lines:
        offsets, pos = set(), 0
        for piece in split.split(line):
            pos += len(piece)
            offsets.add(pos)
        context = set(morph.sentence_cuts(line))
        letters = {i for i in range(1, len(line)) if line[i - 1].isalpha() and line[i].isalpha()}
        a, b = offsets & letters, context & letters
        agree += len(a & b)
        total += len(a | b)
    return round(agree / max(1, total), 4)


TARGET_MB_PER_S = 1.0  # the target: morph_bbpe encodes >= 1 MB/s with both cores


def target_check(row, procs):
    """Whether each all-cores case of a variant reaches TARGET_MB_PER_S (medians), the new-text stream included;
    not `cold_nolex`, the reference with the artifact's lexicon switched off."""
    cases = {k: v["MB_per_s"] for k, v in row["throughput"].items()
             if k.endswith(f"_{procs}proc") and not k.startswith("cold_nolex")}
    cases["new_text_stream"] = row["new_text_stream"]["MB_per_s"]
    return {k: v >= TARGET_MB_PER_S for k, v in cases.items()}


def print_tables(result, procs):
    """The ablation and throughput tables of every variant (the figures of the JSON line that follows)."""
    print(f"{'variant':<22}{'held-out':<10}{'tok/char':>9}{'tok/eojeol':>11}{'unk bytes':>10}{'tok/morph':>10}")
    for name, row in result["variants"].items():
        for source, a in row["ablation"].items():
            print(f"{name:<22}{source:<10}{a['tokens_per_char']:>9.4f}{a['tokens_per_eojeol']:>11.4f}"
                  f"{a['unk_byte_rate']:>10.6f}{a['pieces_per_morpheme']:>10.4f}")
    print(f"\n{'variant':<22}{'case':<20}{'MB/s':>7}{'MB/cpu-s':>9}{'tokens/s':>11}  MB/s per round")
    for name, row in result["variants"].items():
        cases = {**row["throughput"], "new_text_stream": row["new_text_stream"]}
        for case, r in cases.items():
            print(f"{name:<22}{case:<20}{r['MB_per_s']:>7.3f}{r['MB_per_cpu_s']:>9.3f}{r['tokens_per_s']:>11,}  "
                  f"{r['MB_per_s_rounds']}")
        met = row["target_1MB_per_s_with_all_cores"]
        print(f"{name:<22}>= {TARGET_MB_PER_S} MB/s with {procs} cores: "
              + ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in met.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", default="bench", choices=("bench", "export"))
    parser.add_argument("--out", default="/tmp/t5k_vocab_corpus", help="export directory / held-out text location")
    parser.add_argument("--vocabs", nargs="*", default=[], help="more vocabulary dirs to compare (same train.txt)")
    parser.add_argument("--procs", type=int, default=os.cpu_count())
    parser.add_argument("--throughput_lines", type=int, default=4000, help="distinct held-out lines timed")
    parser.add_argument("--prime_mb", type=float, default=2.0, help="training text encoded before 'primed' timing")
    parser.add_argument("--stream_mb", type=float, default=4.0, help="new reviews tokenized from scratch ('stream')")
    parser.add_argument("--rounds", type=int, default=3, help="fresh-process repeats of each timed case (medians)")
    args = parser.parse_args(argv)
    corpus = Path(args.out)
    if args.action == "export" or not (corpus / "heldout_news.txt").exists():
        print("export:", export(corpus), file=sys.stderr)
        if args.action == "export":
            return
    from t5k import morph

    held = {c: (corpus / f"heldout_{c}.txt").read_text(encoding="utf-8").splitlines()[:1500]
            for c in ("news", "reviews", "dialogue")}
    morphemes = {c: sum(len(morph._kiwi().tokenize(l)) for l in ls) for c, ls in held.items()}
    # Throughput text: distinct held-out lines, the three sources interleaved (no line repeats, so cold is cold).
    everything = {c: (corpus / f"heldout_{c}.txt").read_text(encoding="utf-8").splitlines() for c in held}
    mixed = [l for ls in itertools.zip_longest(*everything.values()) for l in ls if l is not None]
    mixed = mixed[: args.throughput_lines]
    prime, train_lines = priming_text(corpus, args.prime_mb)
    stream = new_review_stream(args.stream_mb)
    result = {"analysers": analysers(), "cache_context_agreement": cache_agreement(held["news"][:150]),
              "heldout_lines": {c: len(ls) for c, ls in held.items()},
              "kiwi_threads_per_process": {"1proc": "one per core", f"{args.procs}proc": 0},
              "throughput_text": {"lines": len(mixed), "MB": round(sum(len(l.encode()) + 1 for l in mixed) / 1e6, 3),
                                  "prime_MB": round(sum(len(l.encode()) + 1 for l in prime) / 1e6, 3)},
              "piece_hit_rate": piece_hit_rates(mixed, {f"prime_{args.prime_mb}MB": prime, "train_all": train_lines}),
              "variants": {}}
    del train_lines
    for path in ["shipped", *args.vocabs]:
        v = _load(path)
        name = _name(v) + ("_shipped" if path == "shipped" else "")
        row = {"vocab_size": v.vocab_size, "ablation": {c: ablation(v, ls, morphemes[c]) for c, ls in held.items()},
               "lexicon": lexicon_stats(path, mixed),
               "throughput": throughput(path, mixed, prime, args.procs, args.rounds),
               "new_text_stream": stream_throughput(path, stream, args.procs, args.rounds),
               "tf_data_tokens_per_s": tf_pipeline(v, mixed)}
        row["target_1MB_per_s_with_all_cores"] = target_check(row, args.procs)
        result["variants"][name] = row
        print(name, json.dumps(row, ensure_ascii=False), file=sys.stderr)
    print_tables(result, args.procs)
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
