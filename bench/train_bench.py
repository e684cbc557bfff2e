"""
Training throughput of train.py's model + Muon/AdamW step on synthetic tokens (no data loading).

  python bench/train_bench.py                 # CPU: tiny configs (depth 2 and 4, width 128, seq 256), fp32
  python bench/train_bench.py --device cuda   # GPU: d12 and d20, seq 2048, bf16, compiled (flex attention)
  python bench/train_bench.py --depth 12 --batch-size 16 --steps 20   # one config of your choice

Prints, per config: tokens/s, ms/step, MFU (against the device's bf16 peak; n/a on CPU), peak
memory and compile time (the first step minus a steady one) on CUDA; then one JSON line. The model
and optimizer are compiled as train.py compiles them (fullgraph, flex attention, Muon's
orthogonalization), so a train.py run of the same shapes finds the compiled graphs in torch's cache.
"""
import argparse, contextlib, json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


def bench_one(depth, n_embd, n_head, seq, batch, vocab, steps, warmup, device, compile_model, window_pattern="SSSL"):
    cfg = train.GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=n_head, n_kv_head=n_head,
                          n_embd=n_embd, window_pattern=window_pattern)
    torch.manual_seed(0)
    model = train.GPT(cfg).to(device)
    cuda = device.type == "cuda"
    # as train.py runs it: flex attention when compiled on CUDA (no CPU backward), fullgraph, Muon compiled
    model.set_attention("flex" if cuda and compile_model else "sdpa", device)
    opt = train.setup_optimizer(model, compiled=compile_model)
    fwd = torch.compile(model, dynamic=False, fullgraph=True) if compile_model else model
    bf16 = train.use_bf16(device)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    rows = torch.randint(0, vocab, (batch, seq + 1), device=device)
    next_batch = lambda: (rows[:, :-1], rows[:, 1:])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        t = time.perf_counter()
        train.set_schedule(opt, 1.0, 0.95)
        train.train_step(fwd, opt, next_batch, 1, ctx)
        sync()
        return time.perf_counter() - t

    first = step()                      # compilation (CUDA) and allocator warmup
    for _ in range(max(0, warmup - 1)):
        step()
    times = [step() for _ in range(steps)]
    dt = sorted(times)[len(times) // 2]  # median: robust to a noisy neighbour
    tok_s = batch * seq / dt
    peak = train.peak_flops(device)
    mfu = 100 * model.estimate_flops() * tok_s / peak if (peak and bf16) else None
    return {
        "config": f"d{depth} w{n_embd} h{n_head} seq{seq} B{batch} V{vocab}", "depth": depth, "attention": model.attention,
        "params": sum(p.numel() for p in model.parameters()),
        "tok_s": tok_s, "ms": dt * 1000, "mfu": mfu,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
        "compile_s": (first - dt) if compile_model else None,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--depth", type=int, default=-1, help="one config at this depth (default: the preset list)")
    p.add_argument("--n-embd", type=int, default=-1, help="width (default depth x 64, at least 128 on CPU)")
    p.add_argument("--head-dim", type=int, default=-1, help="default 128 on CUDA, 64 on CPU")
    p.add_argument("--seq-len", type=int, default=-1, help="default 2048 on CUDA, 256 on CPU")
    p.add_argument("--batch-size", type=int, default=-1, help="rows per step (default 32 on CUDA, 4 on CPU)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--steps", type=int, default=-1, help="timed steps (default 20 on CUDA, 10 on CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="auto = on CUDA only")
    p.add_argument("--threads", type=int, default=-1, help="CPU threads (default: torch's)")
    args = p.parse_args(argv)

    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    seq = args.seq_len if args.seq_len > 0 else (2048 if use_cuda else 256)
    batch = args.batch_size if args.batch_size > 0 else (32 if use_cuda else 4)
    steps = args.steps if args.steps > 0 else (20 if use_cuda else 10)
    head_dim = args.head_dim if args.head_dim > 0 else (128 if use_cuda else 64)
    depths = [args.depth] if args.depth > 0 else ([12, 20] if use_cuda else [2, 4])
    compile_model = args.compile == "on" or (args.compile == "auto" and use_cuda)

    name = torch.cuda.get_device_name(device) if use_cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name} | torch {torch.__version__} | {'bf16' if use_cuda else 'fp32'}"
          f"{' compiled' if compile_model else ''} | median of {steps} steps after {args.warmup} warmup")
    print(f"{'config':<36} {'params':>12} {'tok/s':>12} {'ms/step':>9} {'MFU':>7} {'peak GB':>8} {'compile s':>9}")
    results = []
    for depth in depths:
        n_embd = args.n_embd if args.n_embd > 0 else max(depth * 64, 128 if not use_cuda else 0)
        n_embd = -(-n_embd // head_dim) * head_dim
        r = bench_one(depth, n_embd, n_embd // head_dim, seq, batch, args.vocab_size, steps, args.warmup, device, compile_model)
        f = lambda v, fmt: format(v, fmt) if v is not None else "n/a"
        print(f"{r['config']:<36} {r['params']:>12,} {r['tok_s']:>12,.0f} {r['ms']:>9.1f} {f(r['mfu'], '.1f') + ('%' if r['mfu'] else ''):>7} "
              f"{f(r['peak_mem_gb'], '.1f'):>8} {f(r['compile_s'], '.1f'):>9}", flush=True)
        results.append(r)
    print(json.dumps({"device": name, "configs": results}))


if __name__ == "__main__":
    main()
