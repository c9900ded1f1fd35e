"""Can a cheap predictor distilled from the lexicon replace Kiwi on the letter runs the lexicon lacks?

  python bench/cut_predictor.py [--out /tmp/t5k_vocab_corpus]     # last line is JSON; docs/vocab.md has the result

The shipped lexicon (Kiwi's own cuts of 180,624 training runs) is the only training data. Two predictors, each
answering only where it is confident and leaving the rest to Kiwi:

- `suffix`: a run = head + tail. The longest tail seen (as a proper suffix of lexicon runs) at least `n` times with
  one cut pattern in at least `share` of them, and a head seen (as a proper prefix) with one pattern just as
  confidently, whose patterns agree on whether a cut falls between them, give the run's cuts.
- `context`: each boundary between two letters is decided by the most specific character window around it
  (up to 3 letters each side, run start/end marked) seen at least `n` times; it must cut (or not) in at least
  `share` of them, and every boundary of the run must be decided.

Both are measured against live Kiwi (each run analysed on its own, as the splitter does) on the distinct held-out
runs missing from the lexicon (`test`: what a fresh process would send to Kiwi) and, for tuning, on 30,000 training
runs seen once (`tune`: also missing from the lexicon, never held out). Figures: coverage (share of the runs the
predictor answers; for `test` also weighted by occurrences), exact agreement of the cut tuple on the covered runs,
boundary F1, and boundary agreement |a∩b|/|a∪b| (the measure of `cache_context_agreement` in bench/vocab.py).
"""

import argparse
import collections
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WINDOWS = ((3, 3), (3, 2), (2, 3), (2, 2), (3, 1), (1, 3), (2, 1), (1, 2), (1, 1))


def confident(stats: dict, n: int, share: float) -> dict:
    """key -> its majority pattern, for keys seen >= n times whose majority holds >= share of them."""
    out = {}
    for key, patterns in stats.items():
        total = sum(patterns.values())
        pattern, count = patterns.most_common(1)[0]
        if total >= n and count >= share * total:
            out[key] = pattern
    return out


class Suffix:
    def __init__(self, lexicon: dict):
        self.tails, self.heads = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
        for run, cuts in lexicon.items():
            for i in range(1, len(run)):
                self.tails[run[i:]][(i in cuts, tuple(c - i for c in cuts if c > i))] += 1
                self.heads[run[:i]][(tuple(c for c in cuts if c < i), i in cuts)] += 1

    def predictor(self, n: int, share: float):
        tails, heads = confident(self.tails, n, share), confident(self.heads, n, share)

        def predict(run):
            for i in range(1, len(run)):  # longest tail first; a tail without a matching head: try a shorter one
                tail, head = tails.get(run[i:]), heads.get(run[:i])
                if tail is not None and head is not None and head[1] == tail[0]:
                    return head[0] + ((i,) if tail[0] else ()) + tuple(c + i for c in tail[1])
            return None

        return predict


class Context:
    def __init__(self, lexicon: dict):
        self.cut, self.total = collections.Counter(), collections.Counter()
        for run, cuts in lexicon.items():
            marked = f"^{run}$"
            for j in range(1, len(run)):
                for key in {marked[max(0, j + 1 - a) : j + 1] + "|" + marked[j + 1 : j + 1 + b] for a, b in WINDOWS}:
                    self.total[key] += 1
                    self.cut[key] += j in cuts

    def predictor(self, n: int, share: float):
        def predict(run):
            marked, cuts = f"^{run}$", []
            for j in range(1, len(run)):
                for a, b in WINDOWS:
                    key = marked[max(0, j + 1 - a) : j + 1] + "|" + marked[j + 1 : j + 1 + b]
                    seen = self.total.get(key, 0)
                    if seen >= n:
                        cut = self.cut[key]
                        if cut >= share * seen:
                            cuts.append(j)
                        elif cut > (1 - share) * seen:
                            return None
                        break
                else:
                    return None
            return tuple(cuts)

        return predict


def score(predict, gold: dict, weights: dict = None) -> dict:
    got = {run: predict(run) for run in gold}
    covered = [run for run in gold if got[run] is not None]
    tp = fp = fn = union = 0
    for run in covered:
        a, b = set(got[run]), set(gold[run])
        tp, fp, fn, union = tp + len(a & b), fp + len(a - b), fn + len(b - a), union + len(a | b)
    out = {"coverage": round(len(covered) / len(gold), 4),
           "exact": round(sum(got[r] == gold[r] for r in covered) / max(1, len(covered)), 4),
           "boundary_f1": round(2 * tp / max(1, 2 * tp + fp + fn), 4),
           "boundary_agreement": round(tp / max(1, union), 4)}
    if weights:
        out["coverage_occurrences"] = round(sum(weights[r] for r in covered) / sum(weights[r] for r in gold), 4)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/t5k_vocab_corpus", help="bench/vocab.py export directory")
    args = parser.parse_args(argv)
    from t5k import morph, vocab

    corpus = Path(args.out)
    lexicon = morph.read_lexicon(vocab.DEFAULT_DIR / vocab.LEXICON_FILE).entries
    with open(corpus / "train.txt", encoding="utf-8") as f:
        once = sorted(r for r, n in morph.count_runs(f).items() if n == 1 and r not in lexicon)
    random.Random(0).shuffle(once)
    held = collections.Counter()
    for c in ("news", "reviews", "dialogue"):
        held.update(morph.count_runs((corpus / f"heldout_{c}.txt").read_text(encoding="utf-8").splitlines()))
    sets = {"tune": morph.analyse_runs(once[:30000]),
            "test": morph.analyse_runs(sorted(r for r in held if r not in lexicon))}
    result = {"lexicon_runs": len(lexicon), "runs": {k: len(v) for k, v in sets.items()}, "predictors": {}}
    for name, model in (("suffix", Suffix(lexicon)), ("context", Context(lexicon))):
        for n, share in ((2, 0.98), (3, 0.95), (5, 0.98), (10, 0.98)):
            predict = model.predictor(n, share)
            row = {k: score(predict, gold, held if k == "test" else None) for k, gold in sets.items()}
            result["predictors"][f"{name} n={n} share={share}"] = row
            print(name, n, share, json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
