"""Shared helpers for tests/test_train.py: a KV cache following engine.py's contract, a generated
corpus, a tiny tokenizer, and the worker for the 2-process (gloo) tests."""
import json, os, random, socket, sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class SimpleKVCache:
    """The engine contract: pos, attend(layer, q, k, v, window) over all keys/values so far, advance(T)."""

    def __init__(self, n_layer):
        self.k, self.v, self.pos = [None] * n_layer, [None] * n_layer, 0

    def insert(self, layer_idx, k, v):
        if self.k[layer_idx] is not None:
            k, v = torch.cat([self.k[layer_idx], k], 2), torch.cat([self.v[layer_idx], v], 2)
        self.k[layer_idx], self.v[layer_idx] = k, v
        return k, v

    def attend(self, layer_idx, q, k, v, window):
        import train
        return train.attend(q, *self.insert(layer_idx, k, v), window)

    def advance(self, T):
        self.pos += T


WORDS = ("the cat dog sat on mat red blue green house tree river stone bird sings loudly quietly under over "
         "and then a big small old new runs jumps sleeps eats apple bread water fire light dark").split()


def make_corpus(path: Path, n_docs: int, seed: int = 0, min_words=3, max_words=60) -> Path:
    """A .jsonl of {"text": ...} documents; document i starts with 'doc<i>' so tests can trace it."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n_docs):
            words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
            f.write(json.dumps({"text": f"doc{i} " + " ".join(words) + "."}) + "\n")
    return path


def make_tokenizer(vocab_size: int = 300, save: bool = True):
    """A tiny BPE tokenizer trained on generated text, saved to $SPEEDCHAT_HOME/tokenizer."""
    import tok
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(40)) + f" doc{i} 0123456789." for i in range(200)]
    t = tok.train_tokenizer(texts, vocab_size)
    if save:
        t.save(tok.home() / "tokenizer")
    return t


DTYPE = torch.float64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(seed=0, **kw):
    import train
    cfg = dict(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SL")
    cfg.update(kw)
    torch.manual_seed(seed)
    return train.GPT(train.GPTConfig(**cfg))


def scramble(model, std=0.05):
    """Non-zero output projections and gates: at init they are zero, which hides every
    dependency between positions."""
    for b in model.blocks:
        torch.nn.init.normal_(b.attn.c_proj.weight, std=std)
        torch.nn.init.normal_(b.mlp.c_proj.weight, std=std)
        if b.attn.ve_gate is not None:
            torch.nn.init.normal_(b.attn.ve_gate.weight, std=std)
    return model


def global_batches(steps, micro, B, T, vocab, seed=123):
    """(steps, micro, B, T+1) token rows: the same global batches for any number of ranks."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (steps, micro, B, T + 1), generator=g)


def run_optimizer_steps(rank, world_size, steps, micro_total, out_path, config=None):
    """Train tiny_model(**config) for `steps` steps; rank r takes micro-batches r*k..(r+1)*k-1 of each step."""
    import train
    torch.set_default_dtype(DTYPE)
    try:
        _run_optimizer_steps(train, rank, world_size, steps, micro_total, out_path, config or {})
    finally:
        torch.set_default_dtype(torch.float32)


def _run_optimizer_steps(train, rank, world_size, steps, micro_total, out_path, config):
    torch.manual_seed(0)
    model = tiny_model(**config)
    opt = train.setup_optimizer(model, rank=rank, world_size=world_size)
    data = global_batches(steps, micro_total, 2, 32, 300)
    k = micro_total // world_size
    losses = []
    for s in range(steps):
        mine = iter(data[s, rank * k:(rank + 1) * k])

        def next_batch():
            row = next(mine)
            return row[:, :-1], row[:, 1:]
        train.set_schedule(opt, train.lr_multiplier(s, steps), train.muon_momentum(s))
        losses.append(float(train.train_step(model, opt, next_batch, k)))
    if rank == 0:
        torch.save({"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "losses": losses}, out_path)


# Modules every rank needs, imported once by the fork server rather than once per rank.
RANK_PRELOAD = ["torch", "torch.distributed", "pytest", "tok", "train", "engine", "evals", "chat_sft", "chat_rl",
                "_helpers_train"]


def spawn_ranks(fn, args, nprocs=2, timeout=300):
    """mp.spawn through a fork server: the ranks are forked from a clean process that imported
    RANK_PRELOAD once (spawn would import torch in each, seconds apiece). Not forked from this process:
    a test worker has threads (torch's pool, servers of earlier tests) whose locks a fork can leave
    held forever (CI once hung 30 minutes in a gloo recv). fn(rank, *args) in each, importable by
    name; a rank that hangs fails the test after `timeout` seconds."""
    import multiprocessing
    import time
    import torch.multiprocessing as mp
    multiprocessing.set_forkserver_preload(RANK_PRELOAD)
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{fn.__module__}.{fn.__name__}: ranks still running after {timeout} s")


def dist_worker(rank, world_size, port, fn_name, args):
    """spawn_ranks entry: gloo process group on CPU, then helpers.<fn_name>(rank, world_size, *args)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        globals()[fn_name](rank, world_size, *args)
    finally:
        if dist.is_initialized():  # train.main cleans up after itself
            dist.barrier()  # nobody tears down gloo while the other rank still talks
            dist.destroy_process_group()
    exit_rank()


def exit_rank():
    """End a spawned gloo test rank that succeeded without interpreter teardown: gloo's threads can abort
    the process (SIGABRT, "terminate called without an active exception") while C++ statics are destroyed."""
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def run_main(rank, world_size, argv, home):
    """Run train.main(argv) inside a spawned rank (home: its $SPEEDCHAT_HOME)."""
    os.environ["SPEEDCHAT_HOME"] = str(home)
    import train
    train.main(argv)


class ByteTokenizer:
    """The Tokenizer contract at its simplest: one id per UTF-8 byte, then the 9 specials. Lets the
    loader tests check packing independently of BPE."""
    SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

    def __init__(self):
        import numpy as np
        self.vocab_size = 256 + len(self.SPECIALS)
        self.bos_id = 256
        self.token_bytes = np.array([1] * 256 + [0] * len(self.SPECIALS), dtype=np.int32)
        self.hash = "bytes-v1"

    def special(self, name):
        return 256 + self.SPECIALS.index(name)

    def encode(self, text, prepend=None, num_threads=8):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        pre = [] if prepend is None else [prepend if isinstance(prepend, int) else self.special(prepend)]
        return pre + list(text.encode("utf-8"))

    def encode_array(self, text, prepend=None):
        import numpy as np
        return np.asarray(self.encode(text, prepend), dtype=np.int32)

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
