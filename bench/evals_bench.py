"""
bench/evals_bench.py: evaluation throughput for evals.py (prints figures; not a test).

    python bench/evals_bench.py                                    # CPU, a tiny random model, synthetic data
    python bench/evals_bench.py --device cuda --depth 12           # GPU, d12 shapes, random weights
    python bench/evals_bench.py --device cuda --source base        # GPU, the newest base checkpoint
    python bench/evals_bench.py --device cuda --source base --real-core --max-per-task 500

Measures items/s of:
  CORE          evaluate_core over a synthetic bundle with the real one's shapes (multiple choice with
                4 choices and 10 shots, schema with 2 options and 5 shots, language modeling with 10
                shots), or the real DCLM bundle with --real-core (downloaded once)
  categorical   evaluate_chat_task on 4-way lettered questions (one forward per batch of 8)
  generative    evaluate_chat_task on SpellingBee through engine.py (KV cache, greedy,
                --max-new-tokens per item; a random model rarely stops, so this is the worst case)
Speed does not depend on the weights, so random ones are fine. Ends with one JSON line of the figures.
"""
import argparse, json, os, random, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

import evals
import tok
import train
from engine_bench import build_model  # noqa: E402 (bench/ is on sys.path as the script's folder)

SYL = "ba be bi bo ka ke ki ko la le li lo ma me mi mo na ne ni no ra re ri ro sa se si so ta te ti to".split()


def words(rng, n):
    return " ".join("".join(rng.choice(SYL) for _ in range(rng.randint(1, 3))) for _ in range(n))


def synthetic_bundle(root: Path, n: int, seed=0):
    """Three tasks shaped like the DCLM ones (query/choice lengths in words, shots)."""
    rng = random.Random(seed)
    (root / "eval_data").mkdir(parents=True, exist_ok=True)
    mc = [{"query": f"Question: {words(rng, 20)}?\nAnswer:", "choices": [words(rng, rng.randint(2, 8)) for _ in range(4)],
           "gold": rng.randrange(4)} for _ in range(n)]
    sc = [{"context_options": [f"{words(rng, 15)} because {words(rng, 2)}" for _ in range(2)],
           "continuation": words(rng, 6) + ".", "gold": rng.randrange(2)} for _ in range(n)]
    lm = [{"context": words(rng, 60), "continuation": words(rng, 3)} for _ in range(n)]
    for name, rows in (("mc.jsonl", mc), ("schema.jsonl", sc), ("lm.jsonl", lm)):
        (root / "eval_data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "core.yaml").write_text(
        "icl_tasks:\n- label: mc\n  dataset_uri: mc.jsonl\n  num_fewshot: [10]\n  icl_task_type: multiple_choice\n"
        "- label: schema\n  dataset_uri: schema.jsonl\n  num_fewshot: [5]\n  icl_task_type: schema\n"
        "- label: lm\n  dataset_uri: lm.jsonl\n  num_fewshot: [10]\n  icl_task_type: language_modeling\n"
        "  continuation_delimiter: \"\\nAnswer: \"\n")
    (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc,25\nschema,50\nlm,0\n")
    return root


class Lettered(evals.Task):
    name, eval_type = "Lettered", "categorical"

    def __init__(self, n, **kw):
        super().__init__(**kw)
        rng = random.Random(1)
        self.items = [evals._categorical_item(words(rng, 25) + "?", [words(rng, 5) for _ in range(4)], rng.randrange(4)) for _ in range(n)]

    def num_examples(self):
        return len(self.items)

    def get_example(self, i):
        return dict(self.items[i])

    def evaluate(self, item, completion):
        return evals._grade_letter(item, completion)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--source", default=None, help="load a checkpoint (base, mid, sft, rl) instead of a random model")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=128, help="width for the random model (0: depth x 64)")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--vocab-size", type=int, default=1024, help="tokenizer trained on synthetic text (random model only)")
    ap.add_argument("--core-items", type=int, default=32, help="items per synthetic CORE task")
    ap.add_argument("--real-core", action="store_true", help="the real DCLM bundle (downloads it once)")
    ap.add_argument("--max-per-task", type=int, default=-1, help="with --real-core")
    ap.add_argument("--batch-tokens", type=int, default=evals.CORE_BATCH_TOKENS)
    ap.add_argument("--cat-items", type=int, default=64)
    ap.add_argument("--gen-items", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_grad_enabled(False)

    if args.source:
        model, tokenizer, meta = train.load_model(args.source, None, None, device)
        what = f"{args.source} checkpoint ({meta.get('model_config')})"
    else:
        rng = random.Random(0)
        tokenizer = tok.train_tokenizer([words(rng, 200) + " Question? Answer: 0123456789 #### A. B. C. D." for _ in range(300)],
                                        args.vocab_size)
        model, cfg = build_model(args, device, tokenizer.vocab_size)
        what = f"random model depth {cfg.n_layer} width {cfg.n_embd} seq {cfg.sequence_len} vocab {cfg.vocab_size}"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}, torch {torch.__version__}, {what}")
    figs = {"device": name}

    with tempfile.TemporaryDirectory() as tmp:
        if args.real_core:
            bundle, mpt = evals.ensure_bundle(), args.max_per_task
        else:
            bundle, mpt = synthetic_bundle(Path(tmp), args.core_items), -1
        tasks = evals.parse_core_yaml((bundle / "core.yaml").read_text())
        n_items = n_tokens = 0  # the tokens forwarded (whole prompts, the items evaluate_core scores), for tokens/s
        for t in tasks:
            data = evals.load_jsonl(bundle / "eval_data" / t["dataset_uri"], t["icl_task_type"])
            items = [data[j] for j in evals.core_order(len(data), mpt)]
            n_items += len(items)
            for i, item in enumerate(items):
                for ids, _, _ in evals.core_sequences(t["icl_task_type"], item, evals.fewshot_for(items, i, t["num_fewshot"]),
                                                      t["continuation_delimiter"], tokenizer):
                    n_tokens += len(ids)
        evals.evaluate_core(model, tokenizer, device, max_per_task=2, bundle=bundle)  # warm-up
        res, dt = timed(lambda: evals.evaluate_core(model, tokenizer, device, mpt, bundle=bundle, batch_tokens=args.batch_tokens), device)
    figs["core_items_per_s"], figs["core_tokens_per_s"] = n_items / dt, n_tokens / dt
    print(f"CORE: {n_items} items over {len(tasks)} tasks in {dt:.2f}s = {n_items / dt:.1f} items/s, "
          f"~{n_tokens / dt:,.0f} tokens/s (CORE {res['CORE']:.4f})")

    cat = Lettered(args.cat_items)
    evals.evaluate_chat_task(model, tokenizer, cat[:8], device)
    acc, dt = timed(lambda: evals.evaluate_chat_task(model, tokenizer, cat, device), device)
    figs["categorical_items_per_s"] = len(cat) / dt
    print(f"categorical: {len(cat)} items in {dt:.2f}s = {len(cat) / dt:.1f} items/s (acc {acc:.3f})")

    bee = evals.SpellingBee(size=args.gen_items, split="test")
    gen = evals.engine_generate(model, tokenizer, max_new_tokens=args.max_new_tokens)
    evals.evaluate_chat_task(model, tokenizer, bee[:1], device, generate=gen)
    acc, dt = timed(lambda: evals.evaluate_chat_task(model, tokenizer, bee, device, generate=gen), device)
    figs["generative_items_per_s"] = len(bee) / dt
    print(f"generative (SpellingBee, up to {args.max_new_tokens} new tokens): {len(bee)} items in {dt:.2f}s = "
          f"{len(bee) / dt:.2f} items/s (acc {acc:.3f})")
    print(json.dumps(figs))


if __name__ == "__main__":
    main()
