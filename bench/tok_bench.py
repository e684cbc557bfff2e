"""
Tokenizer benchmark: our numpy BPE trainer against rustbpe (nanochat's) and Hugging Face tokenizers.

  python bench/tok_bench.py [--corpus ../shared/corpus/docs_corpus.jsonl.gz] [--sizes 10 100] [--repeats 2]

Same text, same split pattern, vocab 32768. Each trainer runs in a fresh process; "run s" is that
process's wall clock (interpreter start and reading the corpus included), "train s" the training
call alone, "RSS MB" the process's peak resident memory (for ours also the peak of its largest
worker process). Slices are whole documents in file order from the corpus minus its last 813
documents, which are held out for bytes-per-token. MB = 10^6 UTF-8 bytes. Needs `pip install
rustbpe tokenizers` for the peers (skipped with a notice when missing).
"""
import argparse, gzip, json, resource, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tok  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus" / "docs_corpus.jsonl.gz"
HELD_OUT = 813
VOCAB = 32768


def load(corpus, mb):
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    pool, held = docs[:-HELD_OUT], docs[-HELD_OUT:]
    out, n = [], 0
    for d in pool:
        if mb is not None and n >= mb * 1e6:
            break
        out.append(d)
        n += len(d.encode())
    return out, held, n


def train_one(name, docs):
    """Returns (train seconds, tiktoken-style (pattern, mergeable ranks))."""
    t0 = time.time()
    if name == "ours":
        merges = tok.train_merges(iter(docs), VOCAB + len(tok.SPECIAL_TOKENS))  # 32512 merges, as the peers
        secs = time.time() - t0
        t = tok.Tokenizer(merges)
        return secs, {b: i for i, b in enumerate(t.vocab)}
    if name == "rustbpe":
        import rustbpe
        r = rustbpe.Tokenizer()
        r.train_from_iterator(iter(docs), VOCAB, pattern=tok.SPLIT_PATTERN)
        return time.time() - t0, dict(r.get_mergeable_ranks())
    if name == "tokenizers":
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
        t = Tokenizer(models.BPE(byte_fallback=False))
        t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(tok.SPLIT_PATTERN), "isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        t.decoder = decoders.ByteLevel()
        t.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False, min_frequency=0))
        return time.time() - t0, None
    raise ValueError(name)


def child(name, corpus, mb):
    docs, held, nbytes = load(corpus, mb)
    secs, ranks = train_one(name, docs)
    res = {"trainer": name, "mb": round(nbytes / 1e6, 2), "docs": len(docs), "train_s": round(secs, 2),
           "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    if ranks is not None:
        import tiktoken
        enc = tiktoken.Encoding("x", pat_str=tok.SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
        res["held_out_bytes_per_token"] = round(tok.bytes_per_token(lambda ts: enc.encode_ordinary_batch(ts), held), 4)
        if name == "ours":
            res["vocab_bytes"] = sorted(ranks)  # to compare vocabularies with the peers
    if name == "rustbpe":
        res["vocab_bytes"] = sorted(ranks)
    print("RESULT " + json.dumps(res, default=lambda b: b.hex()))


def encode_speed(corpus):
    """MB/s of our Tokenizer (tiktoken underneath) on a 10 MB slice, trained on the 100 MB slice's first 20 MB."""
    docs, held, _ = load(corpus, 20)
    t = tok.train_tokenizer(docs, VOCAB + len(tok.SPECIAL_TOKENS), doc_cap=None)
    ten, _, nbytes = load(corpus, 10)
    out = {}
    for threads in (1, 2):
        best = min(_timed(lambda: t.encode(ten, num_threads=threads)) for _ in range(3))
        out[f"encode_MBps_threads{threads}"] = round(nbytes / 1e6 / best, 1)
    return out


def _timed(f):
    t0 = time.time()
    f()
    return time.time() - t0


def memory_extrapolation(corpus, sizes=(10, 30, 100)):
    """Peak RSS of the streaming CLI path (python tok.py train) at a few sizes, and where it goes at
    2B characters: unique chunk bytes U grow as a power of the text size (Heaps' law, fitted here),
    and the trainer's state is linear in U; window buffers are a constant."""
    import math, tempfile
    tmp = Path(tempfile.mkdtemp())
    with gzip.open(corpus, "rt", encoding="utf-8") as f, open(tmp / "corpus.jsonl", "w") as g:
        docs = [json.loads(line)["text"] for line in f][:-HELD_OUT]
        g.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    pts = []
    for mb in sizes:
        code = ("import resource, tok, numpy as np; docs = tok.iter_documents({p!r}, 'train', {c}, None); "
                "data, lens, counts = tok.count_chunks(docs); tok.bpe_merges(data, lens, counts, {m}); "
                "print(len(data), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
                "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)").format(
                    p=str(tmp / "corpus.jsonl"), c=int(mb * 1e6), m=VOCAB - 256)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
        u, rss, wrss = int(out[0]), float(out[1]), float(out[2])
        pts.append((mb, u, rss, wrss))
        print(f"streaming train {mb:5.0f} M chars: unique chunk bytes {u:,}  peak RSS main {rss:.0f} MB, worker {wrss:.0f} MB")
    (m0, u0, r0, _), (m1, u1, r1, _) = pts[0], pts[-1]
    beta = math.log(u1 / u0) / math.log(m1 / m0)
    per_u = (r1 - r0) / (u1 - u0) * 1e6  # MB per million unique bytes
    u2b = u1 * (2000 / m1) ** beta
    est = r1 + (u2b - u1) / 1e6 * per_u
    print(f"Heaps' law exponent {beta:.2f}: at 2B chars about {u2b / 1e6:.0f}M unique chunk bytes; "
          f"main process {per_u:.0f} MB per million -> about {est / 1024:.1f} GB peak, plus {pts[-1][3]:.0f} MB per worker")
    return {"points": pts, "heaps_beta": beta, "est_2b_gb": est / 1024}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    ap.add_argument("--sizes", type=float, nargs="+", default=[10, 100])
    ap.add_argument("--trainers", default="ours,rustbpe,tokenizers")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="only the 2B-character memory extrapolation")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.corpus, float(args.child[1]))
    if args.memory:
        return memory_extrapolation(args.corpus)
    rows = []
    for mb in args.sizes:
        for name in args.trainers.split(","):
            for r in range(args.repeats):
                t0 = time.time()
                p = subprocess.run([sys.executable, __file__, "--corpus", args.corpus, "--child", name, str(mb)],
                                   capture_output=True, text=True)
                line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
                if not line:
                    print(f"{name} {mb} MB: skipped ({(p.stderr.strip().splitlines() or ['?'])[-1]})")
                    break
                res = json.loads(line[0][7:])
                res["run_s"] = round(time.time() - t0, 2)
                rows.append(res)
                print(f"{name:>10} {res['mb']:7.2f} MB  run {res['run_s']:6.2f}s  train {res['train_s']:6.2f}s  "
                      f"RSS {res['rss_mb']:5.0f} MB (workers {res['worker_rss_mb']:4.0f})  "
                      f"held-out {res.get('held_out_bytes_per_token', '-')} bytes/token", flush=True)
    for mb in args.sizes:  # same vocabulary as rustbpe?
        ours = next((r for r in rows if r["trainer"] == "ours" and r["mb"] >= mb * 0.99 and r["mb"] < mb * 1.1), None)
        rust = next((r for r in rows if r["trainer"] == "rustbpe" and ours and r["mb"] == ours["mb"]), None)
        if ours and rust:
            shared = len(set(ours["vocab_bytes"]) & set(rust["vocab_bytes"]))
            ratio = min(r["train_s"] for r in rows if r["trainer"] == "ours" and r["mb"] == ours["mb"]) / \
                min(r["train_s"] for r in rows if r["trainer"] == "rustbpe" and r["mb"] == ours["mb"])
            print(f"{ours['mb']} MB: ours/rustbpe train time {ratio:.2f}x (best of runs); vocabularies share {shared}/{len(ours['vocab_bytes'])} tokens")
    print(json.dumps(encode_speed(args.corpus)))


if __name__ == "__main__":
    main()
