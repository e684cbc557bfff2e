"""
bench/gpu_rehearsal_check.py: the figures behind tests/test_gpu_rehearsal.py's first test, which only
asserts them: how far compiled bf16 training is from eager fp32, and what compiling costs on this CPU
(prints figures; not a test).

    python bench/gpu_rehearsal_check.py

Runs train.main twice with the test's own flags (GPU_LIKE: depth 2, head_dim 128 with GQA, 6 steps,
evaluations at steps 0, 2, 4, 6), its tokenizer and corpus helpers, in a temporary SPEEDCHAT_HOME:
`--compile off --dtype fp32`, then `--compile on --dtype bf16`. Prints, per step, both losses and
val bpb and their relative difference; each step's time (the compiled run's first step includes
compiling the training graph and Muon's groups) and each evaluation's time (the first compiled one
includes compiling the evaluation graph). torch.compile starts from an empty cache (a temporary
TORCHINDUCTOR_CACHE_DIR) unless --warm-cache. Ends with one JSON line of the figures.
"""
import argparse, json, os, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as tests/conftest.py runs the test

RUNS = {"eager fp32": ["--compile", "off", "--dtype", "fp32"], "compiled bf16": ["--compile", "on", "--dtype", "bf16"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm-cache", action="store_true", help="use torch.compile's usual cache (compiles may be cached)")
    args = ap.parse_args()
    cache = tempfile.TemporaryDirectory()
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name  # before torch is imported
    import train
    from _helpers_train import make_corpus, make_tokenizer  # tests/ is on sys.path
    from test_gpu_rehearsal import GPU_LIKE
    evals, evaluate_bpb = [], train.evaluate_bpb

    def timed_eval(*a, **kw):
        t0 = time.perf_counter()
        out = evaluate_bpb(*a, **kw)
        evals.append(round(time.perf_counter() - t0, 2))
        return out
    train.evaluate_bpb = timed_eval
    logs, figures = {}, {}
    with tempfile.TemporaryDirectory() as home:
        os.environ["SPEEDCHAT_HOME"] = home
        make_tokenizer()
        corpus = str(make_corpus(Path(home) / "corpus.jsonl", 1100, max_words=20))
        for name, flags in RUNS.items():
            evals.clear()
            tag = name.split()[0]
            t0 = time.perf_counter()
            train.main(GPU_LIKE + ["--data", corpus, "--tag", tag] + flags)
            lines = (train.checkpoint_root("base") / tag / "log.jsonl").read_text().splitlines()
            logs[name] = [json.loads(line) for line in lines]
            figures[name] = {"wall_s": round(time.perf_counter() - t0, 1), "eval_s": list(evals),
                             "step_s": [round(e["dt"], 2) for e in logs[name] if "dt" in e]}
    a, b = logs["eager fp32"], logs["compiled bf16"]
    worst = {"loss": 0.0, "val_bpb": 0.0}
    print(f"\n{'step':>4} {'what':>8} {'eager fp32':>11} {'compiled bf16':>14} {'difference':>11}")
    for x, y in zip(a, b):
        for key in worst:
            if key in x and key in y:
                rel = abs(y[key] - x[key]) / abs(x[key])
                worst[key] = max(worst[key], rel)
                print(f"{x['step']:>4} {key:>8} {x[key]:>11.4f} {y[key]:>14.4f} {100 * rel:>10.2f}%")
    print(f"largest difference: loss {100 * worst['loss']:.2f}%, val bpb {100 * worst['val_bpb']:.2f}%")
    for name, f in figures.items():
        print(f"{name}: {f['wall_s']} s in all; steps {f['step_s']} s; evaluations {f['eval_s']} s")
    figures["max_rel_diff"] = worst
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
