"""
bench/core_fewshot_check.py: per CORE task, how scoring before issue 14 (commit ade7889) differed from
the reference's: which few-shot examples an item saw, and how many prompts the old code cropped to the
model's length (prints figures; not a test).

    SPEEDCHAT_HOME=... python bench/core_fewshot_check.py --seq-len 256 --max-per-task 200

Reads the bundle (--bundle, default $SPEEDCHAT_HOME/eval_bundle) and the tokenizer of $SPEEDCHAT_HOME.
For each task, over the items the reference keeps (evals.core_order):
  same examples   items the old rule also scored, with the same few-shot examples (the old rule: a
                  random.Random(1337) subset only when capped, examples drawn by file position from the
                  whole file with random.Random(1234 + file index)); zero-shot: items both keep
  prompts > len   prompts (one per option) longer than --seq-len tokens: the old code cropped them from
                  the left, the new one scores them whole
  mean tokens     mean prompt length whole, against what the old code kept (at most --seq-len)
Ends with one JSON line of the figures.
"""
import argparse, json, random, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evals
import tok


def old_fewshot(n, idx, k):
    """The old rule: k file positions other than idx, drawn from the whole file."""
    k = min(k, n - 1)
    return [] if k <= 0 else sorted(j + (j >= idx) for j in random.Random(1234 + idx).sample(range(n - 1), k))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None, help="default: $SPEEDCHAT_HOME/eval_bundle")
    ap.add_argument("--seq-len", type=int, default=256, help="the model's training length (what the old code cropped to)")
    ap.add_argument("--max-per-task", type=int, default=200, help="items per task (-1: all)")
    args = ap.parse_args()
    bundle = Path(args.bundle) if args.bundle else tok.home() / "eval_bundle"
    tokenizer = tok.get_tokenizer()
    rows, tot = [], {"same": 0, "items": 0, "long": 0, "prompts": 0}
    for task in evals.parse_core_yaml((bundle / "core.yaml").read_text()):
        data = evals.load_jsonl(bundle / "eval_data" / task["dataset_uri"], task["icl_task_type"])
        k, n = task["num_fewshot"], len(data)
        order = evals.core_order(n, args.max_per_task)
        ref = {order[i]: sorted(evals.fewshot_for(order, i, k)) for i in range(len(order))}  # file indices
        old_ids = list(range(n))
        if 0 < args.max_per_task < n:
            random.Random(1337).shuffle(old_ids)
            old_ids = old_ids[:args.max_per_task]
        same = sum(j in ref and (k == 0 or old_fewshot(n, j, k) == ref[j]) for j in old_ids)
        items = [data[j] for j in order]
        lens = [len(ids) for i, item in enumerate(items) for ids, _, _ in
                evals.core_sequences(task["icl_task_type"], item, evals.fewshot_for(items, i, k), task["continuation_delimiter"], tokenizer)]
        row = {"task": task["label"], "shots": k, "items": len(order), "same_examples": same,
               "prompts": len(lens), "longer_than_seq_len": sum(l > args.seq_len for l in lens), "longest": max(lens),
               "mean_tokens": round(sum(lens) / len(lens), 1), "mean_tokens_old": round(sum(min(l, args.seq_len) for l in lens) / len(lens), 1)}
        rows.append(row)
        print(f"{row['task']:<28} {k:>2}-shot  same examples {same:>4}/{len(order):<4}  prompts > {args.seq_len}: "
              f"{row['longer_than_seq_len']:>4}/{len(lens):<4} (longest {row['longest']:,})  mean tokens {row['mean_tokens']:,.0f} "
              f"against {row['mean_tokens_old']:,.0f} kept ({row['mean_tokens'] / row['mean_tokens_old']:.1f}x)")
        for key, v in (("same", same), ("items", len(order)), ("long", row["longer_than_seq_len"]), ("prompts", len(lens))):
            tot[key] += v
    print(f"all: same examples {tot['same']:,}/{tot['items']:,}; prompts > {args.seq_len}: {tot['long']:,}/{tot['prompts']:,}")
    print(json.dumps({"tasks": rows, "total": tot}))


if __name__ == "__main__":
    main()
