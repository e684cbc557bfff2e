"""
bench/serve_bench.py: serving figures for serve.py (prints them; not a test).

    python bench/serve_bench.py                                  # CPU, a tiny random model, 1 worker
    python bench/serve_bench.py --workers 2 --concurrency 1,4,16 # CPU workers sharing one model
    python bench/serve_bench.py --source sft                     # a real checkpoint (ends when it stops)

The server runs in a child process (python bench/serve_bench.py --serve ...: serve.create_app over
the model, on 127.0.0.1, a free port), so the clients' Python does not share its GIL. For each
level of concurrency, that many clients start together, each streaming one reply from
/chat/completions (or /v1/chat/completions with --api openai), and measure:
  time to first token   request sent -> first text event (includes waiting for a busy worker)
  tokens/s per stream   (tokens - 1) / (done - first text event) of each stream
  aggregate tokens/s    all tokens / wall time of the level
A random model is kept from writing special tokens, so every stream is --max-tokens long. With
one worker the streams take turns: time to first token grows with concurrency, per-stream tokens/s
does not. Ends with one JSON line of all the figures.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("the cat dog sat on mat red blue green house tree river stone bird sings under over and then a big "
         "small old new runs jumps apple bread water fire light dark hello world").split()


def serve_child(args):
    """The server process: build (or load) the model, print the URL, serve until killed."""
    import torch
    import engine
    import serve
    import tok
    import train
    torch.set_num_threads(args.threads)
    if args.source:
        eng, _ = engine.load_engine(args.source, None, None, "cpu")
        engines = [eng] * args.workers
    else:
        rng = random.Random(0)
        tokenizer = tok.train_tokenizer([" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(400)], args.vocab_size)
        torch.manual_seed(0)
        cfg = train.GPTConfig(sequence_len=args.max_seq_len, vocab_size=tokenizer.vocab_size, n_layer=args.depth,
                              n_head=max(1, args.n_embd // 64), n_kv_head=max(1, args.n_embd // 64), n_embd=args.n_embd)
        model = PlainOnly(train.GPT(cfg).eval(), len(tokenizer.vocab))
        engines = [engine.Engine(model, tokenizer, tool=None)] * args.workers
    app = serve.create_app(engines, max_queue=256, queue_timeout=600)
    import logging
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server, url = serve.start_server(app)
    print(url, flush=True)
    threading.Event().wait()


def PlainOnly(model, n_plain):
    """The model with special tokens masked out: a random model then never stops early."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, idx, targets=None, kv_cache=None):
            logits = self.inner(idx, kv_cache=kv_cache)
            logits[..., n_plain:] = float("-inf")
            return logits
    return Wrapped()


def one_stream(url, args, i, out, start):
    import requests
    path = "/v1/chat/completions" if args.api == "openai" else "/chat/completions"
    body = {"messages": [{"role": "user", "content": f"tell me about the {WORDS[i % len(WORDS)]} {i}"}],
            "max_tokens": args.max_tokens, "temperature": 1.0, "seed": i, "stream": True}
    start.wait()
    t0 = time.perf_counter()
    t_first = tokens = None
    with requests.post(url + path, json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            ev = json.loads(line[6:])
            text = ev.get("text") if args.api == "chat" else (ev.get("choices") or [{}])[0].get("delta", {}).get("content")
            if text and t_first is None:
                t_first = time.perf_counter()
            if ev.get("done"):
                tokens = ev["completion_tokens"]
            elif args.api == "openai" and (ev.get("choices") or [{}])[0].get("finish_reason"):
                tokens = args.max_tokens  # the random model is kept from stopping: always max_tokens
    t_end = time.perf_counter()
    out[i] = {"ttft": (t_first or t_end) - t0, "tokens": tokens or 0,
              "tps": ((tokens or 1) - 1) / (t_end - t_first) if t_first and t_end > t_first else 0.0, "end": t_end, "t0": t0}


def level(url, args, c):
    out, start = [None] * c, threading.Event()
    threads = [threading.Thread(target=one_stream, args=(url, args, i, out, start)) for i in range(c)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    start.set()
    for t in threads:
        t.join()
    wall = max(o["end"] for o in out) - min(o["t0"] for o in out)
    ttft = sorted(o["ttft"] for o in out)
    return {"concurrency": c, "streams_ok": sum(o["tokens"] > 0 for o in out),
            "ttft_median_ms": 1000 * statistics.median(ttft), "ttft_max_ms": 1000 * ttft[-1],
            "tps_per_stream_median": statistics.median(o["tps"] for o in out),
            "tps_aggregate": sum(o["tokens"] for o in out) / wall, "wall_s": wall}


def main(argv=None):
    p = argparse.ArgumentParser(description="time to first token and tokens/s per stream of serve.py")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated numbers of concurrent streams")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per reply")
    p.add_argument("--api", default="chat", choices=["chat", "openai"], help="/chat/completions or /v1/chat/completions")
    p.add_argument("--workers", type=int, default=1, help="CPU workers sharing the one model (the CLI serves 1 on CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--source", default=None, choices=["base", "sft", "rl"], help="serve a real checkpoint instead")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.serve:
        return serve_child(args)
    levels = [int(c) for c in args.concurrency.split(",")]
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", *(argv if argv is not None else sys.argv[1:])],
                             stdout=subprocess.PIPE, text=True)
    try:
        url = ""
        for line in child.stdout:  # tok.py may print a note first
            if line.startswith("http"):
                url = line.strip()
                break
        if not url:
            raise SystemExit("serve_bench.py: the server did not start")
        model = "checkpoint " + args.source if args.source else \
            f"random d{args.depth} n_embd {args.n_embd} seq {args.max_seq_len} vocab ~{args.vocab_size}"
        print(f"serve.py on CPU: {model}, {args.workers} worker(s), {args.threads} torch thread(s), "
              f"{args.max_tokens} tokens a reply, {args.api} API")
        for _ in range(3):  # warm-up
            level(url, args, 2)
        rows = []
        print(f"{'streams':>7} {'ok':>4} {'TTFT median':>12} {'TTFT max':>10} {'tok/s/stream':>13} {'tok/s total':>12}")
        for c in levels:
            r = level(url, args, c)
            rows.append(r)
            print(f"{c:>7} {r['streams_ok']:>4} {r['ttft_median_ms']:>10.1f}ms {r['ttft_max_ms']:>8.1f}ms "
                  f"{r['tps_per_stream_median']:>13.1f} {r['tps_aggregate']:>12.1f}")
        print(json.dumps({"bench": "serve", "workers": args.workers, "threads": args.threads, "max_tokens": args.max_tokens,
                          "api": args.api, "model": model,
                          "levels": [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}))
    finally:
        child.terminate()
        child.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
