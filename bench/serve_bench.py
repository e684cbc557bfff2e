"""
bench/serve_bench.py: serving figures for serve.py (prints them; not a test).

    python bench/serve_bench.py                                  # CPU, a tiny random model, 1 worker
    python bench/serve_bench.py --slow-clients 3000 --hold 30    # also: 3,000 half-sent requests held 30 s
    python bench/serve_bench.py --source sft                     # a real checkpoint (ends when it stops)
    python bench/serve_bench.py --concurrency 1,8,32,64 --servers waitress,before   # issue 24's table

Each server runs in a child process (create_app over the model, on 127.0.0.1), so the clients' Python
does not share its GIL: waitress (serve.py as `python serve.py` runs it: one engine.Batcher per device),
dev (the same app on Werkzeug's development server), before (serve.py of commit --before, c51823b: one
request at a time per worker, the design before continuous batching, loaded from git). Figures, per server:
  streams         for each level of concurrency, that many clients start together, each streaming one
                  reply from /v1/chat/completions: time to first token (request sent -> first content,
                  waiting for a row or a busy worker included; median, p99, max), tokens/s per stream
                  ((tokens - 1) / (end - first content)), aggregate tokens/s, the server's peak RSS
                  (/proc, every 50 ms). A random model is kept from writing special tokens, so every
                  reply is --max-tokens long.
  slow clients    --slow-clients connections each send half a request and wait --hold seconds, while
                  /health is asked every 50 ms (its latency: p50, p99, max, failures) and the server
                  process's threads and RSS are read from /proc every 0.5 s; then they close, and one
                  ordinary request is timed.
Ends with one JSON line of all the figures.
"""
import argparse
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("the cat dog sat on mat red blue green house tree river stone bird sings under over and then a big "
         "small old new runs jumps apple bread water fire light dark hello world").split()
QUEUE = 128  # requests that may wait: more than the largest level, so no level meets a 503


def load_before(rev):
    """serve.py as it was at commit `rev`, as a module (it runs on today's engine.py: Engine.generate stays)."""
    import types
    src = subprocess.run(["git", "show", f"{rev}:serve.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType("serve_before")
    mod.__file__ = os.path.join(ROOT, "serve_before.py")  # its page, serve.html, is found beside it
    exec(compile(src, f"{rev}:serve.py", "exec"), mod.__dict__)
    return mod


def serve_child(args):
    """The server process: build (or load) the model, print the URL, serve until killed."""
    import logging
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
    if args.serve == "before":
        mod = load_before(args.before)
        app = mod.create_app(engines, max_queue=QUEUE, queue_timeout=600)
        threads = args.workers + QUEUE + mod.EXTRA_THREADS
    else:
        mod = serve
        app = serve.create_app(engines, max_rows=args.max_rows, max_queue=QUEUE, queue_timeout=600)
        threads = args.workers * (args.max_rows + QUEUE) + serve.EXTRA_THREADS
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server, url = mod.start_server(app, threads=threads, dev=args.serve == "dev")
    print(url, flush=True)
    threading.Event().wait()


def PlainOnly(model, n_plain):
    """The model with special tokens masked out: a random model then never stops early."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config, self.max_positions = model, model.config, model.max_positions

        def forward(self, idx, targets=None, kv_cache=None, last_only=False):
            logits = self.inner(idx, kv_cache=kv_cache, last_only=last_only)
            logits[..., n_plain:] = float("-inf")
            return logits
    return Wrapped()


def one_stream(url, args, i, out, start):
    import requests
    body = {"messages": [{"role": "user", "content": f"tell me about the {WORDS[i % len(WORDS)]} {i}"}],
            "max_tokens": args.max_tokens, "temperature": 1.0, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    start.wait()
    t0 = time.perf_counter()
    t_first, tokens = None, 0
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            elif ev["choices"][0]["delta"].get("content") and t_first is None:
                t_first = time.perf_counter()
    t_end = time.perf_counter()
    out[i] = {"ttft": (t_first or t_end) - t0, "tokens": tokens,
              "tps": (tokens - 1) / (t_end - t_first) if t_first and t_end > t_first else 0.0, "end": t_end, "t0": t0}


def level(url, args, c, pid):
    out, start = [None] * c, threading.Event()
    threads = [threading.Thread(target=one_stream, args=(url, args, i, out, start)) for i in range(c)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    rss, done = [proc_status(pid)[1]], threading.Event()

    def watch():
        while not done.wait(0.05):
            rss.append(proc_status(pid)[1])
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start.set()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    wall = max(o["end"] for o in out) - min(o["t0"] for o in out)
    ttft = sorted(o["ttft"] for o in out)
    return {"concurrency": c, "streams_ok": sum(o["tokens"] > 0 for o in out),
            "ttft_median_ms": 1000 * statistics.median(ttft), "ttft_p99_ms": 1000 * ttft[min(c - 1, int(0.99 * c))],
            "ttft_max_ms": 1000 * ttft[-1], "peak_rss_mb": max(rss),
            "tps_per_stream_median": statistics.median(o["tps"] for o in out),
            "tps_aggregate": sum(o["tokens"] for o in out) / wall, "wall_s": wall}


def proc_status(pid):
    """(threads, RSS in MB) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) / 1024


def slow_clients(url, pid, n, hold):
    """n connections that send half a request and wait `hold` seconds; /health, threads and RSS meanwhile."""
    import requests
    host, port = url.split("//")[1].split(":")
    before = proc_status(pid)
    socks, refused, health, when, samples, stop = [], 0, [], [], [], threading.Event()
    t0 = time.time()

    def poll():
        while not stop.is_set():
            t = time.perf_counter()
            try:
                ok = requests.get(url + "/health", timeout=5).status_code == 200
            except requests.RequestException:
                ok = False
            health.append((time.perf_counter() - t) if ok else None)
            when.append(time.time() - t0)
            time.sleep(0.05)

    def watch():
        while not stop.is_set():
            samples.append(proc_status(pid))
            time.sleep(0.5)
    threads = [threading.Thread(target=f, daemon=True) for f in (poll, watch)]
    for t in threads:
        t.start()
    for _ in range(n):
        try:
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"messages\": [")
            socks.append(s)
        except OSError:
            refused += 1
    connect_s = time.time() - t0
    time.sleep(max(0.0, hold - (time.time() - t0)))
    for s in socks:
        s.close()
    t = time.perf_counter()
    try:
        after_ok = requests.post(url + "/v1/chat/completions", timeout=30,
                                 json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}).status_code == 200
    except requests.RequestException:
        after_ok = False
    after_s = time.perf_counter() - t
    stop.set()
    for t in threads:
        t.join(10)
    ok = sorted(h for h in health if h is not None)
    pct = lambda q: 1000 * ok[min(len(ok) - 1, int(q * len(ok)))] if ok else None  # noqa: E731
    return {"clients": n, "connected": len(socks), "refused": refused, "hold_s": hold,
            "health_asked": len(health), "health_failed": len(health) - len(ok), "health_p50_ms": pct(0.5),
            "health_p99_ms": pct(0.99), "health_max_ms": 1000 * ok[-1] if ok else None,
            "health_slowest_at_s": max(zip((h or 0 for h in health), when))[1] if health else None,
            "connect_s": connect_s,
            "threads_before": before[0], "threads_max": max(s[0] for s in samples),
            "rss_growth_mb": max(s[1] for s in samples) - before[1],
            "request_after_ok": after_ok, "request_after_s": after_s}


def main(argv=None):
    p = argparse.ArgumentParser(description="time to first token, tokens/s per stream and slow clients, serve.py")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated numbers of concurrent streams")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per reply")
    p.add_argument("--servers", default="waitress,before",
                   help="which servers: waitress (serve.py's), dev (Werkzeug's), before (serve.py at --before)")
    p.add_argument("--before", default="c51823b", help="the commit whose serve.py is 'before' (one request at a time)")
    p.add_argument("--max-rows", type=int, default=64, help="rows each batcher decodes together (serve.py --max-rows)")
    p.add_argument("--slow-clients", type=int, default=0, help="half-sent requests to hold (0: skip)")
    p.add_argument("--hold", type=float, default=30.0, help="seconds the slow clients wait")
    p.add_argument("--workers", type=int, default=1, help="CPU workers sharing the one model (the CLI serves 1 on CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--source", default=None, choices=["base", "sft", "rl"], help="serve a real checkpoint instead")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # the child process: waitress | dev
    args = p.parse_args(argv)
    if args.serve:
        return serve_child(args)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))  # the slow clients' sockets
    levels = [int(c) for c in args.concurrency.split(",")]
    model = "checkpoint " + args.source if args.source else \
        f"random d{args.depth} n_embd {args.n_embd} seq {args.max_seq_len} vocab ~{args.vocab_size}"
    print(f"serve.py on CPU: {model}, {args.workers} worker(s), {args.threads} torch thread(s), {args.max_tokens} tokens a reply")
    figures = {"bench": "serve", "workers": args.workers, "threads": args.threads, "max_tokens": args.max_tokens, "model": model}
    for kind in args.servers.split(","):
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", kind,
                                  *(argv if argv is not None else sys.argv[1:])], stdout=subprocess.PIPE, text=True)
        try:
            url = next((line.strip() for line in child.stdout if line.startswith("http")), "")  # tok.py may print first
            if not url:
                raise SystemExit("serve_bench.py: the server did not start")
            for _ in range(3):  # warm-up
                level(url, args, 2, child.pid)
            rows = []
            print(f"\n{kind}\n{'streams':>7} {'ok':>4} {'TTFT median':>12} {'TTFT p99':>10} {'TTFT max':>10} "
                  f"{'tok/s/stream':>13} {'tok/s total':>12} {'peak RSS':>9}")
            for c in levels:
                r = level(url, args, c, child.pid)
                rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()})
                print(f"{c:>7} {r['streams_ok']:>4} {r['ttft_median_ms']:>10.1f}ms {r['ttft_p99_ms']:>8.1f}ms "
                      f"{r['ttft_max_ms']:>8.1f}ms {r['tps_per_stream_median']:>13.1f} {r['tps_aggregate']:>12.1f} "
                      f"{r['peak_rss_mb']:>6.0f} MB", flush=True)
            figures[kind] = {"levels": rows}
            if args.slow_clients:
                s = slow_clients(url, child.pid, args.slow_clients, args.hold)
                figures[kind]["slow_clients"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()}
                fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
                print(f"{s['clients']} half-sent requests ({s['connected']} connected, {s['refused']} refused) held {s['hold_s']:.0f} s: "
                      f"/health p50 {fmt(s['health_p50_ms'])} ms, p99 {fmt(s['health_p99_ms'])} ms, max {fmt(s['health_max_ms'])} ms, "
                      f"(at {s['health_slowest_at_s']:.1f} s; connecting took {s['connect_s']:.1f} s), {s['health_failed']}/{s['health_asked']} failed | threads {s['threads_before']} -> max {s['threads_max']} | "
                      f"RSS +{s['rss_growth_mb']:.1f} MB | a request after they closed: "
                      f"{'ok' if s['request_after_ok'] else 'FAILED'} in {s['request_after_s']:.2f} s", flush=True)
        finally:
            child.kill()
            child.wait(10)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
