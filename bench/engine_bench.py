"""
bench/engine_bench.py: inference figures for engine.py (prints them; not a test).

    python bench/engine_bench.py                                   # CPU, a tiny model, fp32
    python bench/engine_bench.py --device cuda --depth 12          # GPU, d12 in bf16
    python bench/engine_bench.py --device cuda --depth 20 --compile

Measures, on a model with random weights (speed does not depend on the weights):
  prefill tokens/s     one forward over a --prompt-len prompt into an empty KV cache, batch 1
  time to first token  Engine.generate: prefill + cache replication + the first sample
  decode tokens/s      Engine.generate at each --batch-sizes, tokens after the first / time after the
                       first (the whole engine: sampling, the tool state machine, host sync), and the
                       bare model forward on the same cache, to show what the Python loop costs
  tool calls           the arithmetic fast path (in-process AST) against a sandbox process, and a
                       sandbox process running a program that imports random and statistics
The model is prepared as serve.py and the chat CLI load it (engine.for_inference: bf16 weights on a
bf16 GPU). On CUDA, decode at batch 1 is compared with its memory-bandwidth floor: the bytes a step
must read (every weight, and the KV cache half-way through the decode) over the device's bandwidth.
Ends with one JSON line of all the figures.
"""
import argparse
import json
import os
import statistics
import sys
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

import engine
import train


# HBM bandwidth by device-name substring, bytes/s (datasheets; first match wins)
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H800", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
                  ("A100", 1.555e12), ("L40S", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12)]


STDLIB_PROGRAM = "import random, statistics\nstatistics.mean(random.Random(0).random() for _ in range(100))"


class StubTokenizer:
    """What Engine needs, with special ids outside the vocabulary so a random model never stops."""

    def __init__(self, vocab_size):
        self.vocab_size, self.bos_id = vocab_size, vocab_size

    def special(self, name):
        return self.vocab_size + 1 + hash(name) % 1000


def build_model(args, device, vocab_size=None):
    """A seeded random GPT of args.depth / args.max_seq_len / args.n_embd (0: train.py's width), in eval mode
    (evals_bench.py builds its models here too)."""
    argv = ["--depth", str(args.depth), "--max-seq-len", str(args.max_seq_len)]
    if args.n_embd > 0:
        argv += ["--n-embd", str(args.n_embd), "--n-head", str(max(1, args.n_embd // 64))]
    cfg = train.build_config(train.parse_args(argv), vocab_size or args.vocab_size)
    torch.manual_seed(0)
    with torch.device(device):
        model = train.GPT(cfg)
    return model.eval(), cfg


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description="engine.py inference benchmark")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--depth", type=int, default=-1, help="model depth (default: 4 on CPU, 12 on CUDA)")
    p.add_argument("--n-embd", type=int, default=-1, help="override the width (default: 256 on CPU, depth x 64 on CUDA)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--prompt-len", type=int, default=-1, help="prompt tokens (default: 256 on CPU, 1024 on CUDA)")
    p.add_argument("--decode-tokens", type=int, default=-1, help="tokens per decode run (default: 64 on CPU, 256 on CUDA)")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated decode batch sizes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile(model, dynamic=True) first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.depth = args.depth if args.depth > 0 else (12 if cuda else 4)
    args.n_embd = args.n_embd if args.n_embd > 0 or cuda else 256
    args.prompt_len = args.prompt_len if args.prompt_len > 0 else (1024 if cuda else 256)
    args.decode_tokens = args.decode_tokens if args.decode_tokens > 0 else (256 if cuda else 64)
    if args.prompt_len + args.decode_tokens > args.max_seq_len:
        raise SystemExit(f"--prompt-len + --decode-tokens must fit in --max-seq-len {args.max_seq_len}")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(args.device)
    model, cfg = build_model(args, device)
    model = engine.for_inference(model)
    nparams = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.compile:
        model = torch.compile(model, dynamic=True)
    eng = engine.Engine(model, StubTokenizer(args.vocab_size), tool=None)
    dtype = "bf16" if train.use_bf16(device) else "fp32"
    name = torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()} threads"
    print(f"device {name} | {dtype} | depth {cfg.n_layer} n_embd {cfg.n_embd} heads {cfg.n_head}/{cfg.n_kv_head} "
          f"vocab {cfg.vocab_size} | {nparams / 1e6:.1f}M params | prompt {args.prompt_len} | decode {args.decode_tokens}")
    prompt = torch.randint(0, args.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    figures = {"device": name, "dtype": dtype, "depth": cfg.n_layer, "n_embd": cfg.n_embd, "params_M": round(nparams / 1e6, 2),
               "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens, "compile": args.compile}

    # prefill
    ids = torch.tensor([prompt], device=device)
    def prefill():
        with torch.inference_mode(), train.autocast(device):
            model(ids, kv_cache=engine.KVCache(1, cfg.n_layer, args.prompt_len))
    prefill()  # warm up (allocator, kernels, compilation)
    t = median_time(prefill, device, args.repeats)
    figures["prefill_tok_s"] = round(args.prompt_len / t)
    print(f"prefill              {args.prompt_len / t:12,.0f} tokens/s   ({t * 1e3:.1f} ms for {args.prompt_len} tokens)")

    # time to first token
    def first_token():
        next(eng.generate(prompt, num_samples=1, max_tokens=2, temperature=1.0, top_k=50))
    t = median_time(first_token, device, args.repeats)
    figures["ttft_ms"] = round(t * 1e3, 2)
    print(f"time to first token  {t * 1e3:12.1f} ms")

    # decode, whole engine and bare forward
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        rates = []
        for r in range(args.repeats + 1):  # the first run warms up
            stamps = []
            for _ in eng.generate(prompt, num_samples=B, max_tokens=args.decode_tokens, temperature=1.0, top_k=50, seed=r):
                stamps.append(time.perf_counter())
            if r > 0:
                rates.append(B * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
        rate = statistics.median(rates)
        kv = engine.KVCache(B, cfg.n_layer, args.prompt_len + args.decode_tokens + 1)
        with torch.inference_mode(), train.autocast(device):
            kv1 = engine.KVCache(1, cfg.n_layer, args.prompt_len)
            model(ids, kv_cache=kv1)
            kv.copy_from(kv1)
            col = torch.zeros(B, 1, dtype=torch.long, device=device)
            model(col, kv_cache=kv)  # warm up
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.decode_tokens - 1):
                model(col, kv_cache=kv)
            sync(device)
            bare = B * (args.decode_tokens - 1) / (time.perf_counter() - t0)
        figures[f"decode_b{B}_tok_s"] = round(rate, 1)
        figures[f"decode_b{B}_forward_only_tok_s"] = round(bare, 1)
        print(f"decode batch {B:<3}     {rate:12,.1f} tokens/s   (bare forward {bare:,.1f} tokens/s, "
              f"{1e3 * B / rate:.2f} ms/step)")
        bandwidth = next((bw for key, bw in PEAK_BANDWIDTH if key in name), None) if cuda else None
        if bandwidth and B == 1:
            kv_bytes = kv1.k.numel() * kv1.k.element_size() * 2 * (args.prompt_len + args.decode_tokens // 2) / args.prompt_len
            floor = bandwidth / (weight_bytes + kv_bytes)  # tokens/s if each step only read its bytes once
            figures.update(decode_b1_floor_tok_s=round(floor, 1), decode_b1_over_floor=round(floor / rate, 2))
            print(f"  bandwidth floor     {floor:12,.1f} tokens/s   ({(weight_bytes + kv_bytes) / 1e9:.2f} GB a step at "
                  f"{bandwidth / 1e12:.2f} TB/s): the engine takes {floor / rate:.2f}x the floor's time")

    # tool calls: the arithmetic fast path against a sandbox process
    n = 20000
    fast = timeit.timeit(lambda: engine.eval_arithmetic("(123*45 + 6) / 7"), number=n) / n
    slow = statistics.median(timeit.repeat(lambda: engine.execute_code("(123*45 + 6) / 7"), number=1, repeat=20))
    figures["tool_fast_path_us"] = round(fast * 1e6, 2)
    figures["tool_sandbox_ms"] = round(slow * 1e3, 2)
    print(f"tool call            fast path {fast * 1e6:.1f} us, sandbox process {slow * 1e3:.1f} ms ({slow / fast:,.0f}x)")
    stdlib = statistics.median(timeit.repeat(lambda: engine.execute_code(STDLIB_PROGRAM), number=1, repeat=20))
    figures["tool_sandbox_stdlib_ms"] = round(stdlib * 1e3, 2)
    print(f"                     a program importing random and statistics: {stdlib * 1e3:.1f} ms")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
