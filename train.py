"""
train.py: the GPT model, the Muon+AdamW optimizer, the token loader and the pretraining loop.

  python train.py --depth 12                                   # CPU (fp32) or one GPU (bf16, compiled)
  torchrun --standalone --nproc_per_node=8 train.py --depth 20 # many GPUs: the same math
  python train.py --depth 1 --n-embd 64 --n-head 2 --max-seq-len 64 --device-batch-size 4 \
      --total-batch-size 256 --num-iterations 50 --data PATH    # a tiny CPU run on local text

One dial: --depth sets the width (depth x 64, heads of 128), the learning rates and the training
horizon (tokens = --target-param-data-ratio x scaling params). Checkpoints: $SPEEDCHAT_HOME/checkpoints/base/<tag>/.

Reads top to bottom: constants, the model, the optimizer, the token loader, evaluation, the pretraining
loop, then (one banner) the plumbing the later stages import too: checkpoints, resume, compute setup.
"""
import argparse, bisect, contextlib, functools, hashlib, itertools, json, math, os, queue, random, shlex, shutil, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.attention.flex_attention import flex_attention, create_block_mask

import tok

# ----------------------------------------------------------------------------- constants

LOGIT_SOFTCAP = 15.0      # logits = cap * tanh(logits / cap): keeps early training from blowing up
VOCAB_MULTIPLE = 64       # pad the embedding/lm_head rows so matmuls tile nicely
VE_GATE_CHANNELS = 32     # the value-embedding gate looks at this many input channels
ROPE_BASE = 10000.0
ROPE_CONTEXT_MULT = 10    # the rotary table covers 10x the training length: evaluation prompts (CORE's 10-shot) are longer
# Polar Express (Amsel et al. 2025) degree-5 coefficients, 5 iterations, safety factor 2e-2.
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
# dense bf16 peak FLOP/s by device-name substring, for MFU (first match wins)
PEAK_BF16_FLOPS = [("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GB200", 2500e12), ("B200", 2250e12),
                   ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
                   ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("A6000", 155e12)]
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "My favorite color is", "2 + 3 ="]


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------- the model

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768        # the tokenizer's; the tables are padded to VOCAB_MULTIPLE
    n_layer: int = 12
    n_head: int = 6                # query heads
    n_kv_head: int = 6             # key/value heads (GQA when < n_head)
    n_embd: int = 768
    window_pattern: str = "SSSL"   # per layer, tiled: S = a quarter of the context, L = all of it; last layer always L

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def validate(self):
        """Raise ValueError naming the flag when the shapes cannot work."""
        if self.n_layer < 1:
            raise ValueError(f"--depth {self.n_layer}: need at least one layer")
        if self.n_head < 1 or self.n_embd % self.n_head:
            raise ValueError(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} (--n-embd / --n-head) must be even for rotary embeddings")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"--n-head {self.n_head} is not a multiple of --n-kv-head {self.n_kv_head}")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise ValueError(f"--window-pattern {self.window_pattern!r}: use only the letters S (short) and L (long)")
        if self.sequence_len < 2:
            raise ValueError(f"--max-seq-len {self.sequence_len}: must be at least 2")
        return self


def window_sizes(config: GPTConfig) -> list:
    """Per layer, w: query i sees keys i-w+1..i. L layers see the whole training length, which at that
    length is plain causal attention; on longer inputs (evaluation) no layer looks further back than it
    was trained to. Last layer always L."""
    short, full = max(1, config.sequence_len // 4), config.sequence_len
    pat = config.window_pattern.upper()
    sizes = [short if pat[i % len(pat)] == "S" else full for i in range(config.n_layer)]
    sizes[-1] = full
    return sizes


def rotary_table(length: int, head_dim: int):
    """(cos, sin), each (1, 1, length, head_dim/2) fp32, computed in fp64 so far positions stay exact."""
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return freqs.cos().float()[None, None], freqs.sin().float()[None, None]


def has_value_embed(layer_idx: int, n_layer: int) -> bool:
    """Value embeddings on alternating layers, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # parameter-free


def apply_rotary(x, cos, sin):
    """x (B, H, T, D); cos, sin (1, 1, T, D/2). Rotates the two halves of each head."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def attention_mask(Tq: int, Tk: int, window: int, device):
    """(Tq, Tk) bool, True = may attend. Queries are the last Tq of Tk positions (a KV cache holds the rest)."""
    q = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    k = torch.arange(Tk, device=device)[None, :]
    return (k <= q) & (q - k < window)


def attend(q, k, v, window: int, block_mask=None):
    """Causal attention in a sliding window: q (B, H, Tq, D) are the last Tq positions of k, v
    (B, Hkv, Tk, D) (a KV cache holds the earlier ones; Hkv < H is GQA) and query i sees keys
    i-window+1..i. With block_mask (the flex backend at the training length), flex attention skips
    whole blocks outside the window; otherwise SDPA reads only the keys some query can see, so a
    decode step reads just the last `window` cached keys and needs no mask."""
    gqa = q.size(1) != k.size(1)
    if block_mask is not None:
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    Tq, Tk = q.size(2), k.size(2)
    start = max(0, Tk - Tq - window + 1)  # keys older than every query's window
    k, v = k[:, :, start:], v[:, :, start:]
    if Tq == 1:  # decode: every key left is in the window
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if Tq == Tk and window >= Tq:  # the window covers the whole sequence: plain causal
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(Tq, Tk - start, window, q.device), enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C, hd = config.n_embd, config.head_dim
        self.c_q = nn.Linear(C, self.n_head * hd, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * hd, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * hd, bias=False)
        self.c_proj = nn.Linear(self.n_head * hd, C, bias=False)
        # per-head gate on the value embedding, from the first channels of the input
        self.ve_gate = nn.Linear(min(VE_GATE_CHANNELS, C), self.n_kv_head, bias=False) if has_value_embed(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos, sin, window, kv_cache=None, block_mask=None):
        B, T, C = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        q = self.c_q(x).view(B, T, nh, hd).transpose(1, 2)    # (B, nh, T, hd)
        dt = q.dtype  # the compute dtype: bf16 under autocast
        k = self.c_k(x).view(B, T, nkv, hd).transpose(1, 2)   # (B, nkv, T, hd)
        v = self.c_v(x).view(B, T, nkv, hd).transpose(1, 2)   # (B, nkv, T, hd)
        if ve is not None:  # v += gate * value_embedding(token), gate in (0, 2), 1 at init
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))  # (B, T, nkv)
            v = v + gate.transpose(1, 2).unsqueeze(-1) * ve.view(B, T, nkv, hd).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = norm(q).to(dt), norm(k).to(dt), v.to(dt)  # QK-norm; rotary, norm and ve may have promoted to fp32
        if kv_cache is not None:  # the cache holds the earlier keys, so it attends (engine.py: contiguous or paged)
            y = kv_cache.attend(self.layer_idx, q, k, v, window)
        else:
            y = attend(q, k, v, window, block_mask)            # (B, nh, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, kv_cache=None, block_mask=None):
        x = x + self.attn(norm(x), ve, cos, sin, window, kv_cache, block_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config.validate()
        V, C, L = config.padded_vocab_size, config.n_embd, config.n_layer
        self.window_sizes = window_sizes(config)
        self.wte = nn.Embedding(V, C)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(L)])
        self.lm_head = nn.Linear(C, V, bias=False)  # untied from wte
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(L) if has_value_embed(i, L)})
        # learned per-layer mix of the running residual and the (normed) token embedding x0
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.full((L,), 0.1))
        self.attention, self.block_masks = "sdpa", {}  # set_attention("flex"): window -> BlockMask at the training length
        self.max_positions = ROPE_CONTEXT_MULT * config.sequence_len  # the longest input it can represent
        cos, sin = rotary_table(self.max_positions, config.head_dim)
        self.register_buffer("rope_cos", cos, persistent=False)  # (1, 1, max_positions, head_dim/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        C = self.config.n_embd
        s = 3 ** 0.5 * C ** -0.5  # uniform with std 1/sqrt(C)
        nn.init.normal_(self.wte.weight, std=1.0)  # normed right after lookup, so the scale is free
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        for b in self.blocks:
            for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(b.attn.c_proj.weight)  # every block starts as the identity
            nn.init.zeros_(b.mlp.c_proj.weight)
            if b.attn.ve_gate is not None:
                nn.init.zeros_(b.attn.ve_gate.weight)  # gate = 2*sigmoid(0) = 1
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)

    def set_attention(self, backend: str, device="cpu"):
        """The attention backend, chosen once (before torch.compile): "sdpa", or "flex", whose block
        masks are built here for the training length (pretraining's every forward; CUDA, compiled:
        CPU torch has no flex backward). Other lengths and KV-cache steps always run SDPA in attend()."""
        if backend not in ("sdpa", "flex"):
            raise ValueError(f"attention backend {backend!r}: expected sdpa or flex")
        T = self.config.sequence_len
        self.block_masks = {w: make_block_mask(T, w, device) for w in set(self.window_sizes)} if backend == "flex" else {}
        self.attention = backend

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        """idx (B, T) -> logits (B, T, vocab_size) fp32 (fp64 for an fp64 model), or the loss against targets (B, T) (-1 = ignore).
        last_only: logits of the last position only (B, 1, vocab_size), all a prefill needs."""
        B, T = idx.shape
        pos = kv_cache.pos if kv_cache is not None else 0  # an int, or (B,) one start per row (the batched engine)
        if isinstance(pos, int) and pos + T > self.max_positions:  # never cropped: the caller learns the input is too long
            raise ValueError(f"{pos + T} tokens is longer than the model can represent: {self.max_positions} positions "
                             f"({ROPE_CONTEXT_MULT} x its training length {self.config.sequence_len})")
        cos, sin = self.rotary(pos, T)
        masks = self.block_masks if kv_cache is None and T == self.config.sequence_len else {}
        x = norm(self.wte(idx))  # (B, T, C)
        x0 = x
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            w = self.window_sizes[i]
            x = block(x, ve, cos, sin, w, kv_cache, masks.get(w))
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x[:, -1:] if last_only else x)
        logits = self.lm_head(x)[..., :self.config.vocab_size]  # (B, T, vocab_size)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 (tests) stays
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def rotary(self, pos, T: int):
        """cos, sin of T positions from pos: (1, 1, T, hd/2) for an int, (B, 1, T, hd/2) for a (B,) tensor
        of per-row starts (the caller has checked they fit the table)."""
        if isinstance(pos, int):
            return self.rope_cos[:, :, pos:pos + T], self.rope_sin[:, :, pos:pos + T]
        p = pos[:, None] + torch.arange(T, device=pos.device)  # (B, T)
        return self.rope_cos[0, 0, p].unsqueeze(1), self.rope_sin[0, 0, p].unsqueeze(1)

    def num_scaling_params(self) -> int:
        """Parameters that count for the tokens:params ratio: the block matrices and lm_head. Lookup
        tables (token and value embeddings) and the per-layer scalars cost no FLOPs per token, so not them."""
        return sum(p.numel() for p in self.blocks.parameters()) + self.lm_head.weight.numel()

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 x matmul params, plus attention scores and values
        (12 x heads x head_dim x attended length per layer, the window where one applies)."""
        cfg, T = self.config, self.config.sequence_len
        attn = sum(12 * cfg.n_head * cfg.head_dim * min(w, T) for w in self.window_sizes)
        return 6 * self.num_scaling_params() + attn


def make_block_mask(T: int, window: int, device):
    def mask_mod(b, h, q, k):
        return (k <= q) & (q - k < window)
    return create_block_mask(mask_mod, None, None, T, T, device=str(device))


# ----------------------------------------------------------------------------- the optimizer

# torch 2.13 renamed the tensor collectives; keep working on older versions (pyproject: torch>=2.5)
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def polar_express(G, steps: int = 5):
    """Nearest semi-orthogonal matrix to each G[i] (G: (N, rows, cols)), by a tuned odd polynomial
    iteration. bf16 on CUDA (fast, accurate enough), fp32 (or fp64 if given) elsewhere."""
    X = G.bfloat16() if G.is_cuda else G.to(torch.promote_types(G.dtype, torch.float32))
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT  # iterate on the wide side: X @ X.mT is the smaller Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # spectral norm <= 1
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)   # b*A + c*A@A: the scaling rides in the matmul's epilogue,
        X = torch.baddbmm(X, B, X, beta=a)            # a*X + B@X; compiled, no elementwise kernel is left
    return X.mT if tall else X


class MuonAdamW:
    """Muon for groups of same-shaped block matrices (kind="muon"), AdamW for the rest (kind="adamw").

    Gradients are *not* all-reduced before step(): with world_size > 1, step() reduce-scatters them.
    Muon: matrix j of a group belongs to rank j // k (k = ceil(N / world_size)); each rank keeps the
    momentum of its own k matrices, orthogonalizes them and all-gathers the new weights. AdamW: a
    large tensor whose first dim divides world_size is sharded along dim 0 the same way; small ones
    are all-reduced and updated on every rank. One process runs the same math with k = N.
    compiled=True compiles the orthogonalization (a graph per group shape, made in the first step).
    Not a torch.optim.Optimizer: its methods import torch._dynamo on first use, seconds of every CPU
    stage's start. It keeps the same param_groups, state and state_dict layout (older files load)."""

    def __init__(self, param_groups, rank: int = 0, world_size: int = 1, compiled: bool = False):
        defaults = dict(lr=0.0, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, momentum=0.95, ns_steps=5)
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in param_groups]
        self.state = {}  # param -> its state (a muon group's lives on its first param)
        for g in self.param_groups:
            g.setdefault("initial_lr", g["lr"])
            if g["kind"] == "muon":
                assert len({p.shape for p in g["params"]}) == 1 and g["params"][0].ndim == 2, "a muon group holds same-shaped matrices"
        self.rank, self.world_size = rank, world_size
        self.orthogonalize = torch.compile(polar_express, dynamic=False, fullgraph=True) if compiled else polar_express

    def params(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """torch.optim's layout: state and groups' "params" by each parameter's index across the groups."""
        index = {p: i for i, p in enumerate(self.params())}
        return {"state": {index[p]: st for p, st in self.state.items()},
                "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in self.param_groups]}

    def load_state_dict(self, state: dict):
        groups = state["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(f"its parameter groups ({[len(g['params']) for g in groups]} tensors) are not this "
                             f"model's ({[len(g['params']) for g in self.param_groups]})")
        params = self.params()
        on = lambda p, v: v.to(p.device, p.dtype, copy=True) if torch.is_tensor(v) and v.is_floating_point() else v
        self.state = {params[i]: {k: on(params[i], v) for k, v in st.items()} for i, st in state["state"].items()}
        for g, saved in zip(self.param_groups, groups):
            g.update({k: v for k, v in saved.items() if k != "params"})

    def _shardable(self, p):
        return self.world_size > 1 and p.ndim >= 1 and p.numel() >= 1024 and p.size(0) % self.world_size == 0

    @torch.no_grad()
    def step(self):
        # 1) launch every gradient reduction (async), 2) update my share as each lands, launch gathers, 3) wait
        reduced = [self._muon_reduce(g) if g["kind"] == "muon" else self._adamw_reduce(g) for g in self.param_groups]
        pending = []
        for g, red in zip(self.param_groups, reduced):
            pending += self._muon_update(g, red) if g["kind"] == "muon" else self._adamw_update(g, red)
        for handle, finish in pending:
            handle.wait()
            if finish is not None:
                finish()

    def _muon_reduce(self, group):
        params, ws = group["params"], self.world_size
        grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])  # (N, r, c)
        if ws == 1:
            return grads, None
        k = -(-len(params) // ws)
        if k * ws > len(params):
            grads = torch.cat([grads, grads.new_zeros(k * ws - len(params), *grads.shape[1:])])
        mine = grads.new_empty(k, *grads.shape[1:])   # (k, r, c): the summed grads of my matrices
        return mine, _reduce_scatter(mine, grads, async_op=True)

    def _muon_update(self, group, red):
        mine, handle = red
        params, ws, rank = group["params"], self.world_size, self.rank
        if handle is not None:
            handle.wait()
            mine.div_(ws)
        k = mine.size(0)
        own = params[rank * k:(rank + 1) * k]  # fewer than k (or none) on the last ranks: padding
        state = self.state.setdefault(params[0], {})  # the group's sharded momentum lives on its first param
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(mine)
        buf, beta = state["momentum_buffer"], group["momentum"]
        buf.lerp_(mine, 1 - beta)
        u = self.orthogonalize(mine.lerp_(buf, beta), group["ns_steps"])  # Nesterov, then orthogonalize
        rows, cols = params[0].shape
        lr, wd = group["lr"], group["weight_decay"]
        local = torch.stack(own) if own else mine.new_zeros(0, rows, cols)
        if len(own) < k:
            local = torch.cat([local, local.new_zeros(k - len(own), rows, cols)])
        if wd:
            local.mul_(1 - lr * wd)
        local.add_(u.to(local.dtype), alpha=-lr * max(1.0, rows / cols) ** 0.5)
        if ws == 1:
            torch._foreach_copy_(params, list(local.unbind(0)))
            return []
        full = local.new_empty(k * ws, rows, cols)
        handle = _all_gather(full, local, async_op=True)
        return [(handle, lambda: torch._foreach_copy_(params, list(full[:len(params)].unbind(0))))]

    def _adamw_reduce(self, group):
        out = []
        for p in group["params"]:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if self.world_size == 1:
                out.append((g, None))
            elif self._shardable(p):
                shard = g.new_empty(p.size(0) // self.world_size, *p.shape[1:])
                out.append((shard, _reduce_scatter(shard, g.contiguous(), async_op=True)))
            else:
                g = g.clone()
                out.append((g, dist.all_reduce(g, async_op=True)))
        return out

    def _adamw_update(self, group, red):
        (b1, b2), eps, lr, wd = group["betas"], group["eps"], group["lr"], group["weight_decay"]
        pending = []
        for p, (g, handle) in zip(group["params"], red):
            if handle is not None:
                handle.wait()
                g.div_(self.world_size)
            sharded = self._shardable(p)
            s = p.size(0) // self.world_size if sharded else None
            pv = p.data[self.rank * s:(self.rank + 1) * s] if sharded else p.data
            st = self.state.setdefault(p, {})
            if not st:
                st["step"], st["exp_avg"], st["exp_avg_sq"] = 0, torch.zeros_like(pv), torch.zeros_like(pv)
            st["step"] += 1
            st["exp_avg"].lerp_(g, 1 - b1)
            st["exp_avg_sq"].lerp_(g.square(), 1 - b2)
            denom = (st["exp_avg_sq"] / (1 - b2 ** st["step"])).sqrt_().add_(eps)
            if wd:
                pv.mul_(1 - lr * wd)
            pv.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1 ** st["step"]))
            if sharded:
                shard = pv.clone()  # the gather writes into p itself
                pending.append((_all_gather(p.data, shard, async_op=True), None))
        return pending


def setup_optimizer(model: GPT, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.02,
                    weight_decay=0.0, rank=0, world_size=1, compiled=False) -> MuonAdamW:
    """Muon for the 2-D block matrices, AdamW for embeddings, lm_head and scalars. AdamW rates are
    given for width 768 and scaled by (n_embd / 768) ** -0.5; Muon's update is already shape-aware."""
    scale = (model.config.n_embd / 768) ** -0.5
    by_shape = {}
    for p in model.blocks.parameters():
        by_shape.setdefault(tuple(p.shape), []).append(p)
    groups = [dict(kind="muon", params=ps, lr=matrix_lr, weight_decay=weight_decay) for _, ps in sorted(by_shape.items())]
    groups += [
        dict(kind="adamw", params=[model.lm_head.weight], lr=unembedding_lr * scale),
        dict(kind="adamw", params=[model.wte.weight, *model.value_embeds.parameters()], lr=embedding_lr * scale),
        dict(kind="adamw", params=[model.resid_lambdas, model.x0_lambdas], lr=scalar_lr),
    ]
    n_opt, n_model = sum(len(g["params"]) for g in groups), len(list(model.parameters()))
    assert n_opt == n_model, f"optimizer covers {n_opt} of {n_model} parameter tensors"
    return MuonAdamW(groups, rank=rank, world_size=world_size, compiled=compiled)


def lr_multiplier(step: int, num_iterations: int, warmup_ratio=0.0, warmdown_ratio=0.4, final_lr_frac=0.0) -> float:
    """Warmup (linear from 0), constant, then linear warmdown to final_lr_frac at the last step."""
    warmup, warmdown = round(warmup_ratio * num_iterations), round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown or warmdown == 0:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int) -> float:
    """Muon's momentum, 0.85 -> 0.95 over a run's first 300 steps. Every stage, fine-tuning included, starts
    its optimizer with empty momentum buffers and warms up the same way (fine-tuning at 0.95 from its first
    step learnt less: BENCHMARKS.md, issue 20)."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def set_schedule(optimizer, lrm: float, momentum: float):
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * lrm
        if g["kind"] == "muon":
            g["momentum"] = momentum


def start_step(optimizer, lrm: float, momentum: float, device) -> float:
    """The schedule set for a step about to run; returns its start time, taken after the device has
    finished the previous step (so a step's seconds are its own)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    set_schedule(optimizer, lrm, momentum)
    return time.time()


def train_step(model, optimizer, next_batch, grad_accum: int, autocast_ctx=contextlib.nullcontext):
    """One optimizer step over grad_accum micro-batches from next_batch(); returns this rank's mean
    loss (a 0-d tensor, not synced). The optimizer averages gradients across ranks."""
    loss_sum = 0.0
    for _ in range(grad_accum):
        x, y = next_batch()
        with autocast_ctx():
            loss = model(x, y)
        (loss / grad_accum).backward()
        loss_sum = loss_sum + loss.detach()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return loss_sum / grad_accum


# ----------------------------------------------------------------------------- the token loader

EPOCH_END = "epoch end"  # what tokenize_ahead yields between two passes over the data
DATA_END = "data end"    # the background thread's last item when `passes` is finite


def tokenize_ahead(tokenizer, passes, depth: int = 2, threads: int = 4):
    """(unit, [int32 token array per document, each starting with <|bos|>]) for each (unit, texts) of
    each pass in `passes` (an iterator of (unit, texts) iterators), EPOCH_END after each pass (the
    generator ends after the last), made by a background thread up to `depth` units ahead, in order,
    so reading and tokenizing never stall the training loop, not even at an epoch's end. Parquet reads and tiktoken's encoding (on `threads`
    threads) release the GIL. An error there is raised here; dropping the generator stops the thread."""
    out, stop = queue.Queue(maxsize=depth), threading.Event()
    encode = functools.partial(tokenizer.encode_array, prepend=tokenizer.bos_id)

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            with ThreadPoolExecutor(threads) as pool:
                for units in passes:
                    for unit, texts in units:
                        if not put((unit, list(pool.map(encode, texts)))):
                            return
                    if not put(EPOCH_END):
                        return
            put(DATA_END)
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            put(e)

    threading.Thread(target=work, daemon=True, name="tokenize_ahead").start()
    try:
        while True:
            item = out.get()
            if isinstance(item, BaseException):
                raise item
            if item is DATA_END:
                return
            yield item
    finally:
        stop.set()


class BestFit:
    """The packers' buffer (pretraining's documents, midtraining's conversations): items kept sorted by
    length, ties in arrival order; take(room) removes the longest that fits, None if none does."""

    def __init__(self, lens=(), items=()):
        self.lens, self.items = list(lens), list(items)

    def __len__(self):
        return len(self.items)

    def add(self, length: int, item):
        i = bisect.bisect_right(self.lens, length)
        self.lens.insert(i, length)
        self.items.insert(i, item)

    def take(self, room: int, or_shortest: bool = False):
        i = bisect.bisect_right(self.lens, room) - 1
        if i < 0 and not (or_shortest and self.items):
            return None
        self.lens.pop(max(i, 0))
        return self.items.pop(max(i, 0))


class TokenLoader:
    """Rows of T+1 tokens, each starting with <|bos|>, packed from whole documents (best fit: the
    longest buffered document that still fits; a document is cropped only when none fits).
    Reads the units of tok.iter_batches that belong to this rank, so ranks never share a document.
    Never stalls the device: a background thread reads and tokenizes units ahead (tokenize_ahead), and
    prefetch() packs the next batch (the training loop calls it while the device is busy).
    Deterministic: state_dict() (epoch, next unit, the buffered documents, a prefetched batch)
    resumes exactly. passes=None cycles over the data forever (training); passes=1 makes one pass
    (evaluation): the last rows are padded with -1 (ignored targets) and next_batch() then returns None."""

    def __init__(self, tokenizer, data: str, split: str, batch_size: int, seq_len: int, rank=0, world_size=1,
                 device="cpu", buffer_docs=1000, state=None, passes: int | None = None, skip_bad=False):
        self.tokenizer, self.data, self.split, self.passes, self.skip_bad = tokenizer, data, split, passes, skip_bad
        self.B, self.T, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.device, self.buffer_docs = torch.device(device), buffer_docs
        self.bos = tokenizer.bos_id
        self.epoch, self.next_unit = 0, 0
        self.buffer = BestFit()  # documents waiting to be packed
        self._units, self._next = None, None  # _next: a prefetched (B, T+1) batch
        self.exhausted = False  # the last of `passes` is over
        if state is not None:
            self.load_state_dict(state)

    def _pull_unit(self) -> bool:
        """Move the next tokenized unit of this rank into the buffer. False at the end of an epoch."""
        if self._units is None:
            start = self.next_unit  # this pass resumes there; the next ones start at unit 0
            passes = (tok.iter_batches(self.data, self.split, self.rank, self.world_size, start if e == 0 else 0, self.skip_bad)
                      for e in (itertools.count() if self.passes is None else range(self.passes)))
            self._units = tokenize_ahead(self.tokenizer, passes)
        item = next(self._units, DATA_END)
        if item is DATA_END:
            self.exhausted = True
            return False
        if item is EPOCH_END:
            self.epoch, self.next_unit = self.epoch + 1, 0
            return False
        unit, docs = item
        self.next_unit = unit + 1
        for doc in docs:
            self.buffer.add(len(doc), doc)
        return True

    def _fill(self):
        """Top up the buffer; it stays empty only once the last pass is over."""
        epoch0 = self.epoch
        while len(self.buffer) < max(1, self.buffer_docs) and not self.exhausted:
            if not self._pull_unit() and (self.buffer or self.epoch - epoch0 > 1):
                if not self.buffer:
                    raise tok.NoDocuments(f"--data {self.data}: no {self.split} documents for rank {self.rank} of {self.world_size}")
                break

    def _row(self):
        row, n = np.full(self.T + 1, -1, dtype=np.int32), 0
        while n < self.T + 1:
            self._fill()
            if not self.buffer:  # the data is over: the rest of the row stays -1
                break
            room = self.T + 1 - n
            doc = self.buffer.take(room, or_shortest=True)  # nothing fits: crop the shortest (rows must start with BOS)
            take = min(len(doc), room)
            row[n:n + take] = doc[:take]
            n += take
        return row

    def prefetch(self):
        """Pack the next batch now (int64, pinned on CUDA), so that next_batch() only starts its copy."""
        if self._next is None:
            rows = np.stack([self._row() for _ in range(self.B)])
            if rows[0, 0] != -1:  # an empty first row: the last pass is over (training never gets here)
                self._stage(rows)

    def _stage(self, rows):
        self._next = rows  # (B, T+1) int32, as state_dict() keeps it
        self._next_rows = torch.from_numpy(rows.astype(np.int64))
        if self.device.type == "cuda":
            self._next_rows = self._next_rows.pin_memory()

    def next_batch(self):
        """(inputs, targets), both (B, T) int64 on the device; None after the last of `passes`."""
        self.prefetch()
        if self._next is None:
            return None
        rows = self._next_rows.to(self.device, non_blocking=True)
        self._next = self._next_rows = None
        return rows[:, :-1] if self.passes is None else rows[:, :-1].clamp(min=0), rows[:, 1:]  # padding: a valid input

    __call__ = next_batch

    def state_dict(self):
        flat = np.concatenate(self.buffer.items) if self.buffer else np.zeros(0, np.int32)
        return {"epoch": self.epoch, "next_unit": self.next_unit, "lens": torch.tensor(self.buffer.lens, dtype=torch.int64),
                "tokens": torch.from_numpy(flat.astype(np.int32)), "data": self.data, "split": self.split,
                "rank": self.rank, "world_size": self.world_size,
                "next": None if self._next is None else torch.from_numpy(self._next.copy())}

    def load_state_dict(self, state):
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"loader state is for rank {state['rank']} of {state['world_size']}, not {self.rank} of {self.world_size}")
        self.epoch, self.next_unit = state["epoch"], state["next_unit"]
        lens = state["lens"].tolist()
        flat = state["tokens"].numpy()
        offsets = np.cumsum([0] + lens)
        self.buffer = BestFit(lens, [flat[a:b].copy() for a, b in zip(offsets[:-1], offsets[1:])])
        self._units, self._next = None, None
        if state.get("next") is not None:
            self._stage(state["next"].numpy().copy())


# ----------------------------------------------------------------------------- evaluation

def validation_batches(tokenizer, data: str, batch_size: int, seq_len: int, rank: int, ws: int, device, max_batches: int,
                       buffer_docs: int = 100, skip_bad: bool = False):
    """What every evaluation of a run measures, read and packed once: one pass over the validation split
    of `data`, at most max_batches per rank. A source without validation documents (a corpus of one
    document) is measured on its training text instead, and says so. Returns (batches, split used,
    target tokens on all ranks)."""
    for split in ("val", "train"):
        loader = TokenLoader(tokenizer, data, split, batch_size, seq_len, rank, ws, device, buffer_docs, passes=1, skip_bad=skip_bad)
        batches = list(itertools.islice(iter(loader.next_batch, None), max_batches))
        counts = torch.tensor([sum(int((y >= 0).sum()) for _, y in batches), loader.next_batch() is not None], device=device)
        if dist.is_initialized():
            dist.all_reduce(counts)
        tokens, cut = counts.tolist()
        if tokens:
            break
        print0(f"validation: --data {data} has no validation documents (a file of one document is all training text)")
    else:
        raise tok.NoDocuments(f"--data {data}: no documents in it (an empty file?)")
    print0(f"validation: {tokens:,} tokens of the {split} split ({'the first; capped by --eval-tokens' if cut else 'one whole pass'})")
    return batches, split, tokens


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes, autocast_ctx=contextlib.nullcontext, progress_every: float = 5.0) -> float:
    """Bits per byte over batches of (inputs, targets): nats summed over target tokens / their UTF-8 bytes.
    Special tokens (0 bytes) and ignored targets (-1) count in neither sum. Summed across ranks (which
    may hold different numbers of batches). Shows progress when it takes longer than progress_every s."""
    nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    nbytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    t0 = shown = time.time()
    for i, (x, y) in enumerate(batches, 1):
        if time.time() - shown > progress_every:
            print0(f"  evaluating: batch {i}/{len(batches)}, {time.time() - t0:.0f}s")
            shown = time.time()
        with autocast_ctx():
            loss = model(x, y, loss_reduction="none").view(-1)   # (B*T,)
        y = y.reshape(-1)
        b = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)  # (B*T,)
        nats += (loss.double() * (b > 0)).sum()
        nbytes += b.sum()
    if dist.is_initialized():
        dist.all_reduce(nats)
        dist.all_reduce(nbytes)
    return float(nats / (math.log(2) * nbytes.clamp(min=1)))


@torch.no_grad()
def sample_greedy(model, tokenizer, prompts, max_new_tokens=16, device="cpu") -> list:
    """Greedy continuations with plain forwards (no KV cache): good enough for a progress glance."""
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend=tokenizer.bos_id)
        for _ in range(max_new_tokens):
            ctx = torch.tensor([ids], device=device)
            ids.append(int(model(ctx)[0, -1].argmax()))
        out.append(tokenizer.decode(ids[1:]))
    return out


def core_metric(model, tokenizer, device, max_per_task=500) -> dict | None:
    """CORE through evals.py (imported here: evals imports train), as report keys (evals.core_report:
    "CORE" when every item was scored, else "CORE_subsample"). None, with a notice, if it cannot run."""
    try:
        import evals
        return evals.core_report(evals.evaluate_core(model, tokenizer, device, max_per_task=max_per_task))
    except ImportError:
        print0("CORE: evals.py not found, skipping")
    except Exception as e:  # e.g. offline without the eval bundle: training results still stand
        print0(f"CORE: skipped ({type(e).__name__}: {e})")
    return None


# ----------------------------------------------------------------------------- the pretraining loop

def add_lr_flags(a):
    """The optimizer's rates, for every stage's parser (the fine-tuning stages scale them by --init-lr-frac)."""
    a("--embedding-lr", type=float, default=0.2, help="AdamW, token and value embeddings (at width 768)")
    a("--unembedding-lr", type=float, default=0.004, help="AdamW, lm_head (at width 768)")
    a("--matrix-lr", type=float, default=0.02, help="Muon, block matrices")
    a("--scalar-lr", type=float, default=0.02, help="AdamW, per-layer residual/x0 scalars")
    a("--weight-decay", type=float, default=0.0, help="decoupled weight decay on the Muon matrices")


def accumulation(total: int, per_micro: int, spelled: str) -> int:
    """Micro-batches per optimizer step: a total batch is a whole number of micro-batches on every rank."""
    if total % per_micro:
        raise SystemExit(f"--total-batch-size {total} is not a multiple of {spelled} = {per_micro}")
    return total // per_micro


def keep_count(text: str) -> int:
    if int(text) == 0:
        raise argparse.ArgumentTypeError("0 would delete every checkpoint; use -1 to keep all")
    return int(text)


def add_checkpoint_flags(a, save_every=-1):
    """The checkpoint flags of every training stage (pretraining, mid/SFT, RL), spelled once."""
    a("--save-every", type=int, default=save_every, help="checkpoint every N steps (-1 = only at the end)")
    a("--keep-last", type=keep_count, default=2, help="keep the last K checkpoints (-1 = all)")
    a("--resume", action="store_true", help="continue from the last checkpoint of --tag")
    a("--overwrite", action="store_true", help="start afresh under a --tag that has checkpoints (deletes them)")
    a("--stop-at-step", type=int, default=-1, help="save and exit at this step (time-sliced jobs; resume later)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain a GPT (train.py)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data and model
    a("--data", default="climbmix", help="climbmix | fineweb-edu | toy | a local file/folder of .parquet/.jsonl/.txt")
    a("--tokenizer", default=None, help="tokenizer folder (default $SPEEDCHAT_HOME/tokenizer)")
    a("--depth", type=int, default=20, help="the one dial: layers; width = depth x --aspect-ratio")
    a("--aspect-ratio", type=int, default=64, help="width per layer")
    a("--head-dim", type=int, default=128, help="attention head dimension (n_head = width / head dim)")
    a("--n-embd", type=int, default=-1, help="override the width (tiny configs)")
    a("--n-head", type=int, default=-1, help="override the number of query heads")
    a("--n-kv-head", type=int, default=-1, help="key/value heads (GQA); default = n_head")
    a("--window-pattern", default="SSSL", help="sliding windows over layers: S = quarter context, L = full")
    a("--max-seq-len", type=int, default=2048)
    # horizon and batch
    a("--num-iterations", type=int, default=-1, help="optimizer steps; -1 = from --target-param-data-ratio")
    a("--target-param-data-ratio", type=float, default=10.5, help="training tokens per scaling param (block matrices + lm_head)")
    a("--total-batch-size", type=int, default=524288, help="tokens per optimizer step, all ranks")
    a("--device-batch-size", type=int, default=32, help="rows per micro-batch per rank")
    # optimization
    add_lr_flags(a)
    a("--warmup-ratio", type=float, default=0.0)
    a("--warmdown-ratio", type=float, default=0.4)
    a("--final-lr-frac", type=float, default=0.0)
    # evaluation, logging, checkpoints
    a("--eval-every", type=int, default=250, help="validation bpb every N steps (-1 = only at the end)")
    a("--eval-tokens", type=int, default=10 * 524288, help="validation tokens per evaluation, at most (never more than one pass)")
    a("--sample-every", type=int, default=2000, help="greedy samples every N steps (-1 = never)")
    a("--core-metric-every", type=int, default=-1, help="CORE every N steps, and at the end (-1 = only at the end, 0 = never)")
    a("--core-metric-max-per-task", type=int, default=500)
    a("--tag", default=None, help="checkpoint folder name (default d<depth>)")
    add_checkpoint_flags(a)
    a("--run", default="dummy", help="wandb run name (wandb only when installed and this is not 'dummy')")
    # compute
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--compile", default="auto", choices=["auto", "on", "off"],
      help="torch.compile: auto = on CUDA only; 'on' also helps CPU (~2x, needs a C++ compiler, ~30s to compile)")
    a("--attn", default="auto", choices=["auto", "sdpa", "flex"], help="auto = flex when compiled on CUDA, else sdpa")
    a("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
      help="auto = bf16 autocast on CUDA SM80+ (fp32 master weights), fp32 elsewhere; bf16 on CPU rehearses the GPU path")
    a("--seed", type=int, default=42)
    a("--buffer-docs", type=int, default=1000, help="documents the packer chooses from")
    a("--skip-bad-rows", action="store_true", help="skip (and count) data rows without text instead of stopping")
    return p.parse_args(argv)


def build_config(args, vocab_size: int) -> GPTConfig:
    """The depth dial, with tiny-config overrides. Raises SystemExit naming the flag on bad values."""
    if args.depth < 1:
        raise SystemExit(f"--depth {args.depth}: must be >= 1")
    if args.n_embd > 0:
        n_embd = args.n_embd
    else:  # width = depth x aspect ratio, rounded up to whole heads
        n_embd = -(-args.depth * args.aspect_ratio // args.head_dim) * args.head_dim
    n_head = args.n_head if args.n_head > 0 else n_embd // args.head_dim
    if n_head < 1:
        raise SystemExit(f"--n-embd {n_embd} is narrower than --head-dim {args.head_dim}; set --n-head or --head-dim")
    n_kv_head = args.n_kv_head if args.n_kv_head > 0 else n_head
    cfg = GPTConfig(sequence_len=args.max_seq_len, vocab_size=vocab_size, n_layer=args.depth, n_head=n_head,
                    n_kv_head=n_kv_head, n_embd=n_embd, window_pattern=args.window_pattern)
    try:
        return cfg.validate()
    except ValueError as e:
        raise SystemExit(str(e)) from None


def check_args(args):
    for flag in ("max_seq_len", "device_batch_size", "total_batch_size", "eval_tokens"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.num_iterations == 0 or args.num_iterations < -1:
        raise SystemExit(f"--num-iterations {args.num_iterations}: must be >= 1 (or -1 for the data ratio)")
    if args.target_param_data_ratio <= 0 and args.num_iterations < 0:
        raise SystemExit(f"--target-param-data-ratio {args.target_param_data_ratio}: must be > 0")
    if not (0 <= args.warmup_ratio <= 1 and 0 <= args.warmdown_ratio <= 1 and args.warmup_ratio + args.warmdown_ratio <= 1):
        raise SystemExit(f"--warmup-ratio {args.warmup_ratio} / --warmdown-ratio {args.warmdown_ratio}: each in [0, 1], sum <= 1")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    try:
        return pretrain(args, shlex.join(["train.py", *(sys.argv[1:] if argv is None else argv)]))
    except tok.DataError as e:  # bad --data: one line, not a traceback from deep in the loader
        raise SystemExit(str(e)) from None
    finally:
        compute_cleanup()


@dataclass
class LoopState:
    """What the loop carries from step to step; each checkpoint saves it (meta["loop"]), a resume continues it."""
    smooth_loss: float = 0.0      # an exponential moving average of the loss, debiased when shown
    train_time: float = 0.0       # seconds in optimizer steps (a run's first step, compilation, excluded)
    timed_steps: int = 0
    val_bpb: float | None = None
    min_val_bpb: float | None = None


def pretrain(args, command="train.py"):
    rank, local_rank, ws, device = compute_init(args.device)
    master = rank == 0
    try:
        tokenizer = tok.get_tokenizer(args.tokenizer)
    except (FileNotFoundError, ValueError, tok.DataError) as e:
        raise SystemExit(f"--tokenizer: {e}") from None
    next(tok.iter_batches(args.data, "train", rank, ws, skip_bad=args.skip_bad_rows), None)  # a bad --data fails now, not after building the model
    config = build_config(args, tokenizer.vocab_size)
    tokens_per_micro = args.device_batch_size * args.max_seq_len * ws
    grad_accum = accumulation(args.total_batch_size, tokens_per_micro, "--device-batch-size x --max-seq-len x world size = "
                              f"{args.device_batch_size} x {args.max_seq_len} x {ws}")

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = GPT(config).to(device)
    num_scaling = model.num_scaling_params()
    num_iterations = args.num_iterations if args.num_iterations > 0 else \
        max(1, round(args.target_param_data_ratio * num_scaling / args.total_batch_size))
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and use_bf16(device))
    autocast_ctx = functools.partial(autocast, device, bf16)
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if args.attn == "flex" and device.type != "cuda":
        raise SystemExit("--attn flex needs CUDA (flex attention has no CPU backward); use --attn sdpa")
    model.set_attention("flex" if args.attn == "flex" or (args.attn == "auto" and compiled and device.type == "cuda") else "sdpa", device)
    optimizer = setup_optimizer(model, args.embedding_lr, args.unembedding_lr, args.matrix_lr, args.scalar_lr,
                                args.weight_decay, rank, ws, compiled)
    loader = TokenLoader(tokenizer, args.data, "train", args.device_batch_size, args.max_seq_len, rank, ws,
                         device, args.buffer_docs, skip_bad=args.skip_bad_rows)
    token_bytes = torch.as_tensor(np.asarray(tokenizer.token_bytes), dtype=torch.int64, device=device)
    ckpt_dir = checkpoint_root("base") / (args.tag or f"d{args.depth}")
    log_path = ckpt_dir / "log.jsonl"
    train_meta = {"total_batch_size": args.total_batch_size, "device_batch_size": args.device_batch_size,
                  "max_seq_len": args.max_seq_len, "data": args.data, "num_iterations": num_iterations}

    # resume: refuse anything that would not continue the same run
    start_step, state = 0, LoopState()
    if args.resume:
        meta = load_resume(ckpt_dir, config, tokenizer, "train", train_meta, device, rank, ws, model, optimizer, loader)
        start_step, state = meta["step"], LoopState(**meta["loop"])
        print0(f"resumed {ckpt_dir} at step {start_step}")
    prepare_run_dir(ckpt_dir, log_path, args.resume, args.overwrite, start_step, master)

    raw_model = model
    if compiled:
        model = torch.compile(model, dynamic=False, fullgraph=True)  # fullgraph: a graph break fails, never slows
    wandb_run = start_wandb(args) if master else None

    def log(entry):
        if master:
            append_jsonl(log_path, entry)
            if wandb_run is not None:
                wandb_run.log(entry, step=entry["step"])

    prov = provenance(device, ws, command)
    num_params = sum(p.numel() for p in raw_model.parameters())

    def save(step):
        meta = {"step": step, "model_config": asdict(config), "tokenizer_hash": tokenizer.hash, "world_size": ws,
                "train": train_meta, "args": vars(args), "provenance": prov, "num_params": num_params, "loop": asdict(state)}
        rank_state = {"loader": loader.state_dict(), "rng": rng_state(device)}
        path = save_checkpoint(ckpt_dir, step, raw_model.state_dict(), optimizer.state_dict(), meta, rank, ws,
                               rank_state, args.keep_last)
        print0(f"saved {path}")

    flops_per_token, peak = raw_model.estimate_flops(), peak_flops(device)
    print0(f"model: {config} | {num_params:,} params, {num_scaling:,} scaling | {flops_per_token:.3g} FLOPs/token")
    print0(f"code: git {prov['git_commit'][:12]}{' with uncommitted changes' if prov['git_dirty'] else ''} | "
           f"{prov['launcher']} | torch {prov['torch']}, CUDA {prov['cuda']} | GPU: {prov['gpu_count']} x {prov['gpu']}")
    print0(f"{num_iterations} steps x {args.total_batch_size:,} tokens = {num_iterations * args.total_batch_size:,} tokens "
           f"({num_iterations * args.total_batch_size / num_scaling:.1f} per scaling param) | grad accum {grad_accum} | "
           f"{ws} rank(s) on {device} | {'bf16' if bf16 else 'fp32'} | {'compiled' if compiled else 'eager'} | "
           f"attention: {raw_model.attention}{' (training length), sdpa elsewhere' if raw_model.attention == 'flex' else ''}")
    core, step, val, evaluated, recompiles, t_start = None, start_step, None, False, 0, time.time()

    def watch_compiles(graphs_before, what):  # after the first step and the first evaluation: never again
        nonlocal recompiles
        if compiled and compiled_graphs() > graphs_before:
            recompiles += 1
            print0(f"warning: {what}: torch.compile made a new graph (a recompile); TORCH_LOGS=recompiles says why")

    while True:
        last = step == num_iterations
        stop = last or step == args.stop_at_step
        if (args.eval_every > 0 and step % args.eval_every == 0) or last:
            if val is None:  # the same validation tokens every time: (batches, split, tokens)
                val = validation_batches(tokenizer, args.data, args.device_batch_size, args.max_seq_len, rank, ws, device,
                                         max(1, args.eval_tokens // tokens_per_micro), min(args.buffer_docs, 100), args.skip_bad_rows)
            model.eval()
            graphs = compiled_graphs() if evaluated else math.inf  # this process's first evaluation compiles
            state.val_bpb = evaluate_bpb(model, val[0], token_bytes, autocast_ctx)
            watch_compiles(graphs, f"step {step} evaluation")
            model.train()
            evaluated = True
            state.min_val_bpb = state.val_bpb if state.min_val_bpb is None else min(state.min_val_bpb, state.val_bpb)
            print0(f"step {step:05d} | val bpb {state.val_bpb:.4f}")
            log({"step": step, "val_bpb": state.val_bpb})
        if stop or (args.save_every > 0 and step % args.save_every == 0 and step > start_step):
            save(step)  # before samples and CORE: a failure there must not cost the weights
        if master and args.sample_every > 0 and step % args.sample_every == 0 and step > 0:
            with evaluating(raw_model, autocast_ctx):
                for s in sample_greedy(raw_model, tokenizer, SAMPLE_PROMPTS, device=device):
                    print0(f"  sample: {s!r}")
        if args.core_metric_every != 0 and ((args.core_metric_every > 0 and step % args.core_metric_every == 0 and step > 0) or last):
            with evaluating(raw_model, autocast_ctx):
                core = core_metric(raw_model, tokenizer, device, args.core_metric_max_per_task)
            if core is not None:
                log({"step": step, **core})
        if stop:
            break

        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        graphs = compiled_graphs() if step > start_step else math.inf
        loss, dt = optimizer_step(model, optimizer, loader, grad_accum, autocast_ctx, lrm, muon_momentum(step), ws, device)
        watch_compiles(graphs, f"step {step}")
        if not math.isfinite(loss):
            raise SystemExit(f"step {step}: loss is {loss}; stopping (the last good checkpoint in {ckpt_dir} is kept)")
        if step > start_step:  # the first step of a run includes compilation and warmup
            state.train_time, state.timed_steps = state.train_time + dt, state.timed_steps + 1
        state.smooth_loss = 0.9 * state.smooth_loss + 0.1 * loss
        shown = state.smooth_loss / (1 - 0.9 ** (step + 1))  # debiased
        tok_per_s = args.total_batch_size / dt
        mfu = 100 * flops_per_token * tok_per_s / (peak * ws) if (peak and bf16) else None
        eta = state.train_time / max(state.timed_steps, 1) * (num_iterations - step - 1)
        print0(f"step {step + 1:05d}/{num_iterations:05d} ({100 * (step + 1) / num_iterations:.1f}%) | loss {shown:.4f} | lrm {lrm:.2f} | "
               f"{dt * 1000:.0f}ms | {tok_per_s:,.0f} tok/s | mfu {f'{mfu:.1f}%' if mfu is not None else 'n/a'} | "
               f"elapsed {fmt_time(time.time() - t_start)} | eta {fmt_time(eta)}")
        log({"step": step, "loss": loss, "smooth_loss": shown, "lrm": lrm, "dt": dt, "tok_per_s": tok_per_s, "mfu": mfu,
             "train_time": state.train_time})  # step = the update's index: its loss, its lr
        step += 1

    if master and step == num_iterations:
        avg_tok_s = args.total_batch_size * state.timed_steps / state.train_time if state.train_time > 0 else None
        avg_mfu = 100 * flops_per_token * avg_tok_s / (peak * ws) if (avg_tok_s and peak and bf16) else None
        report = {"stage": "base", "tag": ckpt_dir.name, "val_bpb": state.val_bpb, "min_val_bpb": state.min_val_bpb,
                  "val_split": val[1], "val_tokens": val[2], **(core or {}),
                  "mfu": avg_mfu, "tok_per_s": avg_tok_s, "train_time_s": state.train_time, "num_params": num_params,
                  "num_scaling_params": num_scaling, "tokens": num_iterations * args.total_batch_size, "num_iterations": num_iterations,
                  "depth": args.depth, "flops_per_token": flops_per_token, "world_size": ws, "device": str(device),
                  "dtype": "bf16" if bf16 else "fp32", "compiled": compiled, "attention": raw_model.attention,
                  "recompiles": recompiles if compiled else None, **prov}
        tok.write_section("base", report, merge=False)  # a new model: the old one's scores no longer apply
    if wandb_run is not None:
        wandb_run.finish()
    return {"step": step, "val_bpb": state.val_bpb, "ckpt_dir": ckpt_dir}


def optimizer_step(model, optimizer, loader, grad_accum, autocast_ctx, lrm, momentum, ws, device) -> tuple:
    """One optimizer step at the schedule's lr multiplier and momentum: (mean loss over ranks, seconds)."""
    t0 = start_step(optimizer, lrm, momentum, device)
    loss = train_step(model, optimizer, loader, grad_accum, autocast_ctx)
    loader.prefetch()  # the next batch, packed while the device still works on this one
    if ws > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    loss = loss.item()  # syncs the device
    return loss, time.time() - t0


@contextlib.contextmanager
def evaluating(model, autocast_ctx):
    """A measurement in the middle of training (samples, CORE): eval mode at the run's precision, then
    train mode again."""
    model.eval()
    try:
        with autocast_ctx():
            yield
    finally:
        model.train()


def start_wandb(args):
    """A wandb run when wandb is installed and --run names one; None otherwise (log.jsonl always)."""
    if args.run == "dummy":
        return None
    try:
        import wandb
        return wandb.init(project="speedchat", name=args.run, config=vars(args), resume="allow")
    except ImportError:
        print0("wandb not installed: logging to log.jsonl only")
        return None


# ============================================================================= for the later stages
# Plumbing the pretraining loop uses and chat_sft.py, chat_rl.py, engine.py, evals.py and serve.py import:
# checkpoints (atomic, checksummed, sharded optimizer state), resume, run folders, compute setup, RNG.

# ----------------------------------------------------------------------------- checkpoints

def checkpoint_root(source: str = "base") -> Path:
    return tok.home() / "checkpoints" / source


def step_dirs(ckpt_dir: Path) -> list:
    """Finished checkpoints (step_NNNNNN folders), oldest first. Half-written .tmp folders are ignored."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit())


def newest_tag(source: str) -> str | None:
    """The tag under checkpoints/<source>/ whose last checkpoint is the newest; None if there is none."""
    root = checkpoint_root(source)
    tags = [d for d in root.iterdir() if d.is_dir() and step_dirs(d)] if root.is_dir() else []
    return max(tags, key=lambda d: step_dirs(d)[-1].stat().st_mtime).name if tags else None


def last_step(ckpt_dir) -> int | None:
    dirs = step_dirs(Path(ckpt_dir))
    return int(dirs[-1].name[5:]) if dirs else None


def _barrier():
    if dist.is_initialized():
        dist.barrier()


class CheckpointError(tok.DataError):
    """A checkpoint file that is missing, damaged or does not fit: named in one line."""


WEIGHTS = "model.safetensors"  # a checkpoint's weights (safetensors: no pickle, and what the HF ecosystem reads)


def weights_file(d: Path) -> Path:
    """The weights of checkpoint folder d: model.safetensors, or model.pt where an older checkpoint has only that."""
    return d / WEIGHTS if (d / WEIGHTS).exists() or not (d / "model.pt").exists() else d / "model.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _meta_digest(meta: dict) -> str:
    """meta.json's own checksum: over its content without the checksums (so a flipped byte in any value shows)."""
    return hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "files"}, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(ckpt_dir, step: int, model_state, optim_state, meta: dict, rank=0, world_size=1,
                    rank_state=None, keep_last: int = -1):
    """Write ckpt_dir/step_NNNNNN/ atomically: everything goes into a .tmp folder that rank 0 renames
    when all ranks are done. model.safetensors (WEIGHTS) and meta.json from rank 0; optim_rank{r}.pt (sharded state) and
    state_rank{r}.pt (loader position, RNG) from every rank; meta["files"] holds the sha256 of every
    file (load_checkpoint verifies them). Called by all ranks together; with several nodes ckpt_dir
    must be on a shared filesystem."""
    ckpt_dir = Path(ckpt_dir)
    final, tmp = ckpt_dir / f"step_{step:06d}", ckpt_dir / f".tmp_step_{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    import hf  # the safetensors writer (hf.py imports this file)
    mine = {WEIGHTS: model_state} if rank == 0 else {}
    mine.update({f"optim_rank{rank}.pt": optim_state, f"state_rank{rank}.pt": rank_state})
    sums = {}
    for name, obj in mine.items():
        if obj is not None:
            hf.save_safetensors(obj, tmp / name) if name == WEIGHTS else torch.save(obj, tmp / name)
            sums[name] = _sha256(tmp / name)  # read back: the checksum of what is on disk
    if dist.is_initialized():
        every = [None] * world_size
        dist.all_gather_object(every, sums)
        sums = {k: v for d in every for k, v in d.items()}
    if rank == 0:
        meta = {**meta, "files": dict(sorted(sums.items()))}
        meta["files"]["meta.json"] = _meta_digest(meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    _barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last > 0:
            for old in step_dirs(ckpt_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(ckpt_dir, step=None, device="cpu", rank=0, training_state=True):
    """(model_state, optim_state or None, rank_state or None, meta) of step (default: the last). Every file
    read is checked against its sha256 in meta.json first; training_state=False (inference) reads only
    the weights and meta.json. The weights are model.safetensors, or model.pt in a checkpoint written before
    it (both load). A damaged or missing file is a CheckpointError naming it."""
    ckpt_dir = Path(ckpt_dir)
    step = last_step(ckpt_dir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    d = ckpt_dir / f"step_{step:06d}"
    if not d.is_dir():
        raise FileNotFoundError(f"no checkpoint {d}")
    try:
        meta = json.loads((d / "meta.json").read_text())
        sums = meta.get("files")  # None: a checkpoint from before checksums
        assert isinstance(meta, dict) and (sums is None or sums.get("meta.json") == _meta_digest(meta)), "checksum mismatch"
    except (OSError, ValueError, AssertionError, AttributeError) as e:
        raise CheckpointError(f"{d / 'meta.json'}: damaged or missing ({type(e).__name__}: {e})") from None

    import hf  # the safetensors reader

    def load(name, map_location):
        path = d / name
        if not path.exists():
            raise CheckpointError(f"{path}: missing")
        if sums is not None and _sha256(path) != sums.get(name):
            raise CheckpointError(f"{path}: damaged (its sha256 differs from the one in meta.json)")
        try:
            if name == WEIGHTS:
                return {k: v.to(map_location) for k, v in hf.load_safetensors(path).items()}
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # truncated, not a torch file, a pickle of something else, ...
            first = str(e).strip().split("\n")[0].split(". ")[0][:200]  # torch's advice to drop weights_only is not ours
            raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {first})") from None
    model_state = load(weights_file(d).name, device)
    optim_state = rank_state = None
    if training_state and (d / f"optim_rank{rank}.pt").exists():
        optim_state = load(f"optim_rank{rank}.pt", device)
    if training_state and (d / f"state_rank{rank}.pt").exists():
        rank_state = load(f"state_rank{rank}.pt", "cpu")
    return model_state, optim_state, rank_state, meta


STAGES = ("base", "mid", "sft", "rl")  # the checkpoint sources; hf:DIR is an exported folder (hf.py)


def source_type(value: str) -> str:
    """argparse type of every --source / --init-from: a stage, or hf:DIR (a folder `engine.py export` wrote)."""
    if value in STAGES or (value.startswith("hf:") and len(value) > 3):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: expected one of {', '.join(STAGES)}, or hf:DIR (an exported folder)")


def source_label(source: str) -> str:
    """A source as a file name (report sections): the stage, or hf-<folder name>."""
    return f"hf-{Path(source[3:]).resolve().name}" if source.startswith("hf:") else source


def load_model(source="base", tag=None, step=None, device="cpu", tokenizer=None):
    """(model in eval mode, tokenizer, meta) from checkpoints/<source>/<tag>/; tag None = the tag with
    the newest checkpoint, step None = its last step. Refuses a tokenizer other than the one trained with.
    source hf:DIR: an exported folder, rebuilt by hf.py (its own tokenizer; no tag or step)."""
    if source.startswith("hf:"):
        if tag is not None or step is not None:
            raise ValueError(f"--source {source}: --tag and --step pick a checkpoint; an hf:DIR folder holds one model")
        import hf
        return hf.load_model(source[3:], device, tokenizer)
    root = checkpoint_root(source)
    tag = tag or newest_tag(source)
    if tag is None:
        raise FileNotFoundError(f"no {source} checkpoints under {root}")
    step = last_step(root / tag) if step is None else step
    model_state, _, _, meta = load_checkpoint(root / tag, step, device, training_state=False)
    own = root / tag / "tokenizer"  # a run finetuned from hf:DIR keeps that folder's tokenizer (keep_tokenizer)
    tokenizer = tokenizer or tok.get_tokenizer(own if own.is_dir() else None)
    check_tokenizer(meta, tokenizer, root / tag)
    d = root / tag / f"step_{step:06d}"
    with restoring(d / "meta.json", "model config"):
        model = GPT(GPTConfig(**meta["model_config"]).validate())
    with restoring(weights_file(d), "weights"):
        model.load_state_dict(model_state)
    return model.to(device).eval(), tokenizer, meta


def keep_tokenizer(ckpt_dir: Path, tokenizer, source: str, master: bool):
    """A run that starts from hf:DIR trains with that folder's tokenizer, not $SPEEDCHAT_HOME's: keep it beside
    the run's checkpoints (ckpt_dir/tokenizer), where load_model looks first."""
    if source.startswith("hf:") and master:
        tokenizer.save(Path(ckpt_dir) / "tokenizer")


@contextlib.contextmanager
def restoring(path: Path, what: str):
    """Turn an error while restoring `what` from a checkpoint file into a CheckpointError naming the file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"{path}: cannot restore the {what} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r})") from None


def check_tokenizer(meta, tokenizer, where):
    if meta.get("tokenizer_hash") != tokenizer.hash:
        raise ValueError(f"{where}: checkpoint was trained with tokenizer {meta.get('tokenizer_hash')}, "
                         f"but the current tokenizer is {tokenizer.hash}; use the matching tokenizer")


def load_resume(ckpt_dir: Path, config, tokenizer, section: str, settings: dict, device, rank: int, ws: int,
                model, optimizer, loader=None) -> dict:
    """--resume: restore model, optimizer, loader (when given) and RNG from the last checkpoint of
    ckpt_dir and return its meta, after refusing whatever would not continue the same run: no
    checkpoint, another tokenizer or model config, another world size (the optimizer state is sharded),
    other run settings (meta[section] vs settings), no optimizer or rank state for this rank, a state
    that does not fit (named by file)."""
    step = last_step(ckpt_dir)
    if step is None:
        raise SystemExit(f"--resume: no checkpoint in {ckpt_dir}")
    model_state, optim_state, rank_state, meta = load_checkpoint(ckpt_dir, step, device, rank)
    try:
        check_tokenizer(meta, tokenizer, ckpt_dir)
    except ValueError as e:
        raise SystemExit(f"--resume: {e}") from None
    changed = lambda old, new: {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}  # noqa: E731
    if meta["model_config"] != asdict(config):
        raise SystemExit(f"--resume: {ckpt_dir} has an incompatible model config (checkpoint vs now): "
                         f"{changed(meta['model_config'], asdict(config))}")
    if meta.get("world_size") != ws:
        raise SystemExit(f"--resume: {ckpt_dir} was written by {meta.get('world_size')} ranks, now {ws} (sharded optimizer state)")
    if diff := changed(meta.get(section, {}), settings):
        raise SystemExit(f"--resume: {ckpt_dir} was trained with other settings (checkpoint vs now): {diff}")
    if optim_state is None or rank_state is None:
        raise SystemExit(f"--resume: {ckpt_dir} step {meta['step']} has no optimizer/rank state for rank {rank}")
    d = ckpt_dir / f"step_{step:06d}"
    with restoring(weights_file(d), "weights"):
        model.load_state_dict(model_state)
    with restoring(d / f"optim_rank{rank}.pt", "optimizer state"):
        optimizer.load_state_dict(optim_state)
    with restoring(d / f"state_rank{rank}.pt", "loader position and RNG state"):
        if loader is not None:
            loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"], device)
    return meta


def prepare_run_dir(ckpt_dir: Path, log_path: Path, resume: bool, overwrite: bool, start_step: int, master: bool):
    """After a resume was loaded (or not): refuse to clobber another run's checkpoints, clear a fresh
    run's stale checkpoints and log, and drop log lines from beyond a resume point."""
    if not resume and last_step(ckpt_dir) is not None and not overwrite:
        raise SystemExit(f"--tag {ckpt_dir.name}: {ckpt_dir} already has checkpoints (last step {last_step(ckpt_dir)}); "
                         f"pass --resume to continue, --overwrite to start over, or another --tag")
    if not resume and master and ckpt_dir.exists():
        for d in step_dirs(ckpt_dir):
            shutil.rmtree(d)
        log_path.unlink(missing_ok=True)
    _barrier()
    if master and resume and log_path.exists():
        keep = [l for l in log_path.read_text().splitlines() if l and json.loads(l).get("step", 0) < start_step]
        tok.atomic_write(log_path, "".join(l + "\n" for l in keep))


def append_jsonl(path: Path, entry: dict):
    """One line of a run's log.jsonl (the report card reads these)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


# ----------------------------------------------------------------------------- compute setup

def compute_init(device_arg="auto"):
    """(rank, local_rank, world_size, device). Under torchrun: NCCL on CUDA, gloo on CPU."""
    ws = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if ws > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", **({"device_id": device} if use_cuda else {}))
    return rank, local_rank, ws, device


def use_bf16(device) -> bool:
    """Every stage's precision rule: bf16 autocast on CUDA SM80+ (master weights stay fp32), fp32 elsewhere
    (older GPUs have no fast bf16, and evaluation must see the precision training saw)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def autocast(device, bf16: bool | None = None):
    """The context one forward runs in: bf16 autocast where use_bf16(device) (or bf16=True), else none."""
    on = use_bf16(device) if bf16 is None else bf16
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process: after a run's first step and first evaluation the
    count should never grow again (a recompile per step is a silent slowdown). An eager run never imports
    torch._dynamo (seconds of imports), so it has made none."""
    if "torch._dynamo" not in sys.modules:
        return 0
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def compute_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def provenance(device, world_size: int, command: str) -> dict:
    """Where a run's figures come from, kept in its checkpoints and its report: the code (git commit, and
    whether tracked files differed from it), the command and launcher, torch and CUDA, the GPUs."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    cuda = device.type == "cuda"
    return {"git_commit": commit or "unknown", "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
            "command": command,
            "launcher": f"torchrun, {world_size // per_node} node(s) x {per_node}" if "TORCHELASTIC_RUN_ID" in os.environ else "python",
            "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "gpu": torch.cuda.get_device_name(device) if cuda else "none", "gpu_count": world_size if cuda else 0,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_BF16_FLOPS if key in name), None)


def rng_state(device):
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "python": random.getstate()}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


if __name__ == "__main__":
    tok.run_main(main)
