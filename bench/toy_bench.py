"""
bench/toy_bench.py: the toy world's sizes, and what a randomly initialized model scores on its chat
tasks, the floor every trained stage is compared with (prints figures; not a test).

    python bench/toy_bench.py                  # sizes, then the floor on 100 test items a task
    python bench/toy_bench.py --items 0        # sizes only

Sizes (seed 0): facts, and how many are held out of every SFT/RL set; documents in one epoch of
`--data toy` (train and validation as tok.iter_batches splits them) and their mean length.
The floor: the toy tokenizer trained as run.sh trains it (`tok.py train --data toy --vocab-size 4096`,
in a temporary SPEEDCHAT_HOME; its own output is shown), a GPT of run.sh's cpu shape (depth 2, aspect
ratio 64, head dim 64, sequence 256) with seeded random weights, and evals.evaluate_chat on the first
--items test items of ToyFacts, ToyMath and ToySpell, greedy, --max-new-tokens tokens a reply.
Ends with one JSON line of the figures.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch

import evals
import tok
import train

RUN_SH_SHAPE = ["--depth", "2", "--aspect-ratio", "64", "--head-dim", "64", "--max-seq-len", "256"]


def sizes() -> dict:
    world = tok.ToyWorld(0)
    split = {s: sum(len(docs) for _, docs in tok.iter_batches("toy", s)) for s in ("train", "val")}
    chars = [len(world.document(i)) for i in range(tok.TOY_UNITS * tok.TOY_UNIT_DOCS)]
    out = {"people": len(world.people), "towns": len(world.towns), "facts": len(world.facts), "facts_held_out": len(world.heldout),
           "epoch_docs": len(chars), "train_docs": split["train"], "val_docs": split["val"],
           "mean_chars_per_doc": round(sum(chars) / len(chars), 1), "epoch_chars": sum(chars)}
    print(f"{out['people']} people, {out['towns']} towns: {out['facts']} facts, {out['facts_held_out']} held out | one epoch: "
          f"{out['epoch_docs']:,} documents ({out['train_docs']:,} train, {out['val_docs']} validation), "
          f"{out['mean_chars_per_doc']} characters each on average, {out['epoch_chars'] / 1e6:.2f} M characters")
    return out


def floor(items: int, max_new_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, SPEEDCHAT_HOME=home)
        t0 = time.time()
        subprocess.run([sys.executable, "tok.py", "train", "--data", "toy", "--vocab-size", "4096"], cwd=ROOT, env=env, check=True)
        print(f"(tok.py train: {time.time() - t0:.1f} s with interpreter start)")
        tokenizer = tok.get_tokenizer(Path(home) / "tokenizer")
    cfg = train.build_config(train.parse_args(RUN_SH_SHAPE), tokenizer.vocab_size)
    torch.manual_seed(0)
    model = train.GPT(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"random model: {n / 1e6:.2f} M parameters, vocab {tokenizer.vocab_size}; {items} test items a task, greedy, "
          f"{max_new_tokens} new tokens")
    gen = evals.engine_generate(model, tokenizer, max_new_tokens=max_new_tokens)
    res = evals.evaluate_chat(model, tokenizer, torch.device("cpu"), ["ToyFacts", "ToyMath", "ToySpell"], items, gen)
    return {"params": n, "vocab": tokenizer.vocab_size, **{k: round(v, 4) for k, v in res.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100, help="test items per task for the floor (0: sizes only)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (run.sh's cpu preset uses 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    figures = {"sizes": sizes()}
    if args.items > 0:
        figures["floor"] = floor(args.items, args.max_new_tokens)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
