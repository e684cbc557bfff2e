"""
bench/loader_bench.py: train.TokenLoader's time per step at the speedrun's shape, against a d24 step
(prints figures; not a test).

    python bench/loader_bench.py                                    # parquet made from ../shared/corpus
    python bench/loader_bench.py --data PATH --tokenizer DIR        # your own parquet text and tokenizer
    python /tmp/ade7889/bench/loader_bench.py --corpus ../shared/corpus/docs_corpus.jsonl.gz   # a copy of
        this file in an older tree (git archive ade7889 | tar -x -C /tmp/ade7889) times that tree's loader

The speedrun runs 8 ranks x 32 rows x 2048 tokens (524,288 tokens a step, no gradient accumulation),
so every step each rank packs one batch. This times rank 0 of 8 (it reads the units that are its own)
on real text in parquet row groups of 1024 documents, as the ClimbMix shards hold it: the first batch
(filling the buffer of --buffer-docs documents) apart, then --steps batches, sleeping a device step
between them (the loader's thread reads and tokenizes meanwhile, as during training). It times what
the training loop's own thread spends: packing (prefetch(), called while the device still works on
the step) and what stays on the step's critical path (next_batch(): the rows to a tensor and to the
device). The d24 step is an estimate: GPT.estimate_flops() x 524,288 tokens / (8 x 989 TFLOP/s bf16
x 50% MFU). A loader without prefetch() (before commit 1358e61) is timed as its training loop called it:
next_batch() alone, all of it on the critical path.
"""
import argparse, gzip, json, os, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
import torch

import tok
import train

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "docs_corpus.jsonl.gz"


def corpus_parquet(folder: Path, max_chars: int, copies: int = 4, corpus: Path = CORPUS) -> Path:
    """The first max_chars of the docs corpus as parquet, row groups of 1024 documents, written `copies`
    times (shards 0, 1, ...) so that rank 0 of 8 has units enough for the steps timed."""
    import pyarrow as pa, pyarrow.parquet as pq
    docs, n = [], 0
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["text"])
            n += len(docs[-1])
            if n >= max_chars:
                break
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        pq.write_table(pa.table({"text": docs}), folder / f"shard_{i:05d}.parquet", row_group_size=1024)
    return folder


def d24_step_seconds(mfu=0.5, gpus=8, peak=989e12, tokens=524288):
    cfg = train.GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=24, n_head=12, n_kv_head=12, n_embd=1536)
    with torch.device("meta"):
        flops = train.GPT(cfg).estimate_flops()
    return flops * tokens / (gpus * peak * mfu), flops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="parquet/jsonl text (default: 200 MB of the docs corpus as parquet)")
    ap.add_argument("--corpus", default=str(CORPUS), help="the .jsonl.gz that --data defaults to a parquet copy of")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: one trained here, vocab 32768)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--buffer-docs", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--device-ms", type=float, default=None,
                    help="the device's step, slept between batches (default: the d24 estimate; 0 = back to back)")
    args = ap.parse_args()
    step, flops = d24_step_seconds()
    device_s = step if args.device_ms is None else args.device_ms / 1e3
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(corpus_parquet(Path(tmp) / "shards", 200_000_000, corpus=Path(args.corpus)))
        if args.tokenizer:
            tokenizer = tok.Tokenizer.load(args.tokenizer)
        else:
            texts = list(tok.iter_documents(data, "train", max_chars=20_000_000))
            tokenizer = tok.train_tokenizer(texts, 32768)
        loader = train.TokenLoader(tokenizer, data, "train", args.batch_size, args.seq_len, rank=0,
                                   world_size=args.world_size, buffer_docs=args.buffer_docs)
        t0 = time.perf_counter()
        loader.next_batch()
        first = time.perf_counter() - t0
        pack, tail = [], []
        for _ in range(args.steps):
            time.sleep(device_s)                 # the device's step: the tokenizer thread works meanwhile
            t0 = time.perf_counter()
            if hasattr(loader, "prefetch"):
                loader.prefetch()                # what the training loop does before the step's sync
            t1 = time.perf_counter()
            loader.next_batch()                  # what stays on the critical path
            pack.append(t1 - t0)
            tail.append(time.perf_counter() - t1)
    pack_ms, tail_ms = 1e3 * float(np.mean(pack)), 1e3 * float(np.mean(tail))
    print(f"{torch.get_num_threads()} threads, {os.cpu_count()} cores | {args.world_size} ranks x {args.batch_size} x "
          f"{args.seq_len} | {args.steps} steps of rank 0, {device_s * 1e3:.0f} ms of device time slept between them")
    print(f"first batch (fills {args.buffer_docs} documents): {first * 1e3:.0f} ms")
    print(f"packing a batch: {pack_ms:.1f} ms mean, {1e3 * max(pack):.1f} ms max (done while the device works)")
    print(f"on the critical path: {tail_ms:.2f} ms mean, {1e3 * max(tail):.1f} ms max")
    print(f"d24 step estimate: {flops / 1e9:.2f} GFLOP/token x 524,288 tokens at 50% MFU on 8 x H100 = {step * 1e3:.0f} ms; "
          f"packing = {100 * pack_ms / 1e3 / step:.1f}% of it, critical path = {100 * tail_ms / 1e3 / step:.2f}%")
    print(json.dumps({"pack_ms": round(pack_ms, 2), "pack_max_ms": round(1e3 * max(pack), 2), "critical_ms": round(tail_ms, 3),
                      "critical_max_ms": round(1e3 * max(tail), 2),
                      "first_ms": round(first * 1e3), "d24_step_ms_estimate": round(step * 1e3)}))


if __name__ == "__main__":
    main()
