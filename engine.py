"""
engine.py: inference for speedchat models.

KV-cache generation with temperature / top-k / top-p sampling, streaming, tool use (the model's
<|python_start|> ... <|python_end|> blocks run in a sandbox and the result is forced back into the
stream), the code sandbox itself, and a terminal chat.

    python engine.py chat --source sft                  # multi-turn chat, streams tokens
    python engine.py chat --source base -p "Once upon"  # a base model does plain completion
    python engine.py exec "12*7"                        # run code in the sandbox: prints 84

Reads top to bottom: constants, the sandbox, the KV cache, sampling, the streamer, the tool state
machine, the Engine (the main loop), the chat CLI, __main__. What other stages call:
    Engine(model, tokenizer).generate(...) / .generate_batch(...), load_engine(source, tag, step),
    KVCache, sample_next_token, TextStreamer, execute_code, eval_arithmetic, run_tool, STOP_TOKENS.
"""

import argparse
import ast
import codecs
import contextlib
import inspect
import json
import math
import operator
import os
import signal
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass

import torch

import tok

# ---------------------------------------------------------------------------------------------
# Constants

SANDBOX_TIMEOUT = 5.0             # wall-clock seconds before the sandbox process group is killed
SANDBOX_MEMORY = 512 * 2**20      # bytes of address space (RLIMIT_AS)
SANDBOX_OUTPUT = 16_000           # characters of stdout kept; more stops the program
SANDBOX_THREADS = 16              # threads the code may start (RLIMIT_NPROC above what its user runs)
SANDBOX_FILE_BYTES = 16 * 2**20   # largest file it may write (RLIMIT_FSIZE), only in its private directory
TOOL_OUTPUT_CHARS = 1_000         # characters of a tool result forced into the model's context
ARITH_MAX_INT = 10**100           # the arithmetic fast path gives up (falls back) beyond this
STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")

# ---------------------------------------------------------------------------------------------
# The sandbox: run model-written code in a separate, limited process.

# The child is a fresh interpreter (-I -S: no site, no env, no cwd on sys.path; starts in ~25 ms,
# and a fresh exec does not inherit the parent's torch threads, CUDA context or address space).
# It reads {code, limits} as JSON on stdin, limits itself, disables the dangerous parts of the
# standard library, runs the code like a REPL (the value of a last expression is printed, through
# display_value) and writes {stdout, stderr, error} as JSON to a private dup of its stdout.


def display_value(value):
    """How a tool shows a value: like the Python REPL (repr), except that floats read the way a
    calculator (and GSM8K's <<48/2=24>> annotations) shows them: 10/2 -> 5, 0.1+0.2 -> 0.3."""
    if isinstance(value, float) and math.isfinite(value):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return repr(value)


_SANDBOX_CHILD = r'''
import ast, builtins, io, json, math, os, posix, resource, signal, sys
req = json.loads(sys.stdin.read())
result_file = io.open(os.dup(1), "wb")            # private channel for the answer
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1); os.dup2(null, 2)                # stray writes to fd 1/2 go nowhere
cap, home = req["max_output"], os.path.realpath(os.getcwd())   # home: the private directory, removed afterwards

def user_tasks():                                 # RLIMIT_NPROC counts every task (thread) of our uid
    n = 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == os.getuid(): n += len(os.listdir(f"/proc/{pid}/task"))
        except OSError: pass
    return n
threads = user_tasks() + req["max_threads"]       # a few threads (threading, concurrent.futures); no fork bomb
for lim, soft, hard in ((resource.RLIMIT_AS, req["max_memory"], req["max_memory"]),
                        (resource.RLIMIT_CPU, req["cpu_seconds"], req["cpu_seconds"] + 1),
                        (resource.RLIMIT_NPROC, threads, threads),     # ignored for root
                        (resource.RLIMIT_FSIZE, req["max_file"], req["max_file"]),
                        (resource.RLIMIT_CORE, 0, 0)):
    try: resource.setrlimit(lim, (soft, hard))
    except (ValueError, OSError): pass
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # an oversize write raises instead of killing us

DISPLAY_VALUE_SOURCE
class OutputLimitExceeded(Exception): pass
class Capped(io.TextIOBase):                      # stdout that stops the program past `cap` chars
    def __init__(self): self.parts, self.n = [], 0
    def writable(self): return True
    def write(self, s):
        if self.n + len(s) > cap:
            self.parts.append(s[:cap - self.n]); self.n = cap
            raise OutputLimitExceeded(f"output over {cap} characters")
        self.parts.append(s); self.n += len(s); return len(s)
    def getvalue(self): return "".join(self.parts)

# Python-level guards (a second layer): no processes, signals or environment changes; writes, renames
# and deletions only inside `home` (where TMPDIR points, so tempfile works); reading is allowed.
def disabled(*args, **kwargs): raise PermissionError("disabled in the sandbox")
for name in ("system", "popen", "fork", "forkpty", "vfork", "execv", "execve", "execl", "execle",
             "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
             "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill",
             "killpg", "mkfifo", "mknod", "chmod", "chown", "lchown", "truncate", "symlink", "link",
             "putenv", "unsetenv", "chdir", "chroot", "setuid", "setgid"):
    for module in (os, posix):                    # posix: the C functions behind os
        if hasattr(module, name): setattr(module, name, disabled)
def inside(path, dir_fd=None):
    if isinstance(path, int): return True         # an open descriptor, checked when it was opened
    base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else home
    full = os.path.realpath(os.path.join(base, os.fsdecode(path)))
    return full == home or full.startswith(home + os.sep)
def writes_inside(fn, paths, fd_keys):            # fn(path, ...) may only touch paths inside home
    def guarded(*args, **kwargs):
        for path, key in zip(args[:paths], fd_keys):
            if not inside(path, kwargs.get(key)): raise PermissionError(f"writes outside the sandbox directory are disabled: {path!r}")
        return fn(*args, **kwargs)
    return guarded
for name, paths, keys in (("mkdir", 1, ["dir_fd"]), ("makedirs", 1, [None]), ("rmdir", 1, ["dir_fd"]),
                          ("remove", 1, ["dir_fd"]), ("unlink", 1, ["dir_fd"]), ("removedirs", 1, [None]),
                          ("rename", 2, ["src_dir_fd", "dst_dir_fd"]), ("replace", 2, ["src_dir_fd", "dst_dir_fd"]),
                          ("renames", 2, [None, None])):
    for module in (os, posix):
        if hasattr(module, name): setattr(module, name, writes_inside(getattr(module, name), paths, keys))
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
real_os_open = os.open
def checked_os_open(path, flags, *args, **kwargs):
    if flags & WRITE_FLAGS and not inside(path, kwargs.get("dir_fd")): raise PermissionError(f"file writes outside the sandbox directory are disabled: {path!r}")
    return real_os_open(path, flags, *args, **kwargs)
os.open = posix.open = checked_os_open
real_open = io.open
def checked_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not inside(file): raise PermissionError(f"file writes outside the sandbox directory are disabled: {file!r}")
    return real_open(file, mode, *args, **kwargs)
builtins.open = io.open = checked_open
class CheckedFileIO(io.FileIO):
    def __init__(self, file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file): raise PermissionError(f"file writes outside the sandbox directory are disabled: {file!r}")
        super().__init__(file, mode, *args, **kwargs)
io.FileIO = CheckedFileIO
for name in ("subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing", "socket",
             "_socket", "ssl", "_ssl", "select", "selectors", "asyncio", "ctypes", "_ctypes", "pty",
             "urllib.request", "http.client", "ftplib", "smtplib", "resource"):
    sys.modules[name] = None                      # `import socket` now raises ImportError

out, err = Capped(), Capped()
sys.stdout, sys.stderr = out, err
error = None
try:
    tree = ast.parse(req["code"], "<sandbox>")
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    env = {"__name__": "__main__", "__builtins__": builtins}
    exec(compile(tree, "<sandbox>", "exec"), env)
    if last is not None:                          # like a REPL: show the last expression's value
        value = eval(compile(ast.Expression(last.value), "<sandbox>", "eval"), env)
        if value is not None: print(display_value(value))
except BaseException as e:                        # SystemExit too: a program that exits early did not finish
    error = type(e).__name__ + (f": {e}" if str(e) else "")
sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
result_file.write(json.dumps({"stdout": out.getvalue(), "stderr": err.getvalue(), "error": error}).encode())
result_file.close()
'''


_SANDBOX_CHILD = _SANDBOX_CHILD.replace("DISPLAY_VALUE_SOURCE", inspect.getsource(display_value))


@dataclass
class ExecResult:
    success: bool
    stdout: str
    error: str | None = None
    stderr: str = ""
    timed_out: bool = False


def execute_code(code, timeout=SANDBOX_TIMEOUT, max_memory=SANDBOX_MEMORY, max_output=SANDBOX_OUTPUT):
    """Run Python `code` in a fresh, limited process; returns ExecResult(success, stdout, error).

    A guard against accidents (an infinite loop, a fork bomb, a huge allocation, a stray file
    write or network call, a flood of output), NOT a security boundary: the limits are rlimits plus
    a disabled os/subprocess/socket and writes confined to a private directory, which deliberate
    code can get around. Never run untrusted code with it outside a container or VM. The limits:
    wall clock `timeout` (the whole process group is killed), CPU time (RLIMIT_CPU), address space
    `max_memory` (RLIMIT_AS), a few threads and no new processes (RLIMIT_NPROC, which Linux ignores
    for root; the disabled os.fork/system/exec and subprocess/multiprocessing cover that case), files
    of at most SANDBOX_FILE_BYTES written only in the private directory (TMPDIR, the working
    directory; removed afterwards), stdout capped at `max_output` characters. The standard library
    works (random, threading, logging, tempfile, ...). Success means the code ran to its end: an
    exception or an early exit (sys.exit, SystemExit, os._exit) is a failure. The value of a last
    expression is printed, like a REPL: "12*7" -> "84".
    """
    request = json.dumps({"code": code, "max_memory": int(max_memory), "max_output": int(max_output),
                          "max_threads": SANDBOX_THREADS, "max_file": SANDBOX_FILE_BYTES,
                          "cpu_seconds": math.ceil(timeout) + 1})  # a backstop: the wall clock should fire first
    with tempfile.TemporaryDirectory(prefix="speedchat_sandbox_") as cwd:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _SANDBOX_CHILD], cwd=cwd, env={"TMPDIR": cwd},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)   # own process group: one kill gets all
        try:
            raw, _ = proc.communicate(request.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return ExecResult(False, "", f"TimeoutError: execution took over {timeout:g} seconds", timed_out=True)
        _kill_group(proc)  # anything it left behind in its group
    try:
        res = json.loads(raw)
    except ValueError:  # killed by a signal (CPU limit, segfault) before it could answer
        if proc.returncode == -signal.SIGXCPU:
            return ExecResult(False, "", f"TimeoutError: execution took over {timeout:g} seconds of CPU", timed_out=True)
        return ExecResult(False, "", f"the sandbox process died (exit status {proc.returncode})")
    return ExecResult(res["error"] is None, res["stdout"], res["error"], res["stderr"])


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# The fast path: tool calls in toy-world and GSM8K are almost all arithmetic ("12*7"). Evaluating
# those from the AST takes ~10 us in-process against ~25 ms for a sandbox process (measured by
# bench/engine_bench.py, 2 CPU cores), and every tool call stalls the whole decoding batch, so RL
# with thousands of calls would otherwise spend minutes just starting interpreters. It handles only numbers and + - * / // % ** and
# returns None (so the caller falls back to the sandbox) for anything else, for any error, and
# for numbers that get huge, so its answers are always exactly what the sandbox would print.
_ARITH_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
              ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def eval_arithmetic(code):
    """'12*7' -> '84' (display_value, as the sandbox prints it), or None if not plain arithmetic."""
    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _ARITH_OPS:
            return _ARITH_OPS[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH_OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 100 or abs(a) > 10**6):
                raise OverflowError  # 9**9**9 would hang this process; let the sandbox time it out
            v = _ARITH_OPS[type(node.op)](a, b)
            if isinstance(v, complex) or abs(v) > ARITH_MAX_INT:
                raise OverflowError
            return v
        raise ValueError
    try:
        tree = ast.parse(code.strip(), mode="eval")
        return display_value(ev(tree.body))
    except (SyntaxError, ValueError, ArithmeticError, TypeError, RecursionError, MemoryError):
        return None


def run_tool(code):
    """The text forced between <|output_start|> and <|output_end|> for a python block."""
    fast = eval_arithmetic(code)
    if fast is not None:
        return fast
    r = execute_code(code)
    text = r.stdout.strip() if r.success else (r.stdout + f"Error: {r.error}").strip()
    return text[:TOOL_OUTPUT_CHARS]

# ---------------------------------------------------------------------------------------------
# The KV cache: keys and values of every token seen so far, so each new token costs one step.


class KVCache:
    """Preallocated keys/values, (layers, batch, kv_heads, max_len, head_dim), written in place.

    The contract with train.GPT: in every layer the model calls insert(layer_idx, k, v) with the
    new tokens' k, v (B, n_kv_head, T, head_dim), after rotary and QK-norm, and attends over the
    returned views (B, n_kv_head, pos+T, head_dim); after its last layer it calls advance(T). The
    model itself offsets rotary and the causal mask by `pos` and applies sliding windows. Storage is
    allocated on the first insert, on the model's device, in `dtype` (default: that of k).
    """

    def __init__(self, batch_size, num_layers, max_len, dtype=None):
        self.batch_size, self.num_layers, self.max_len, self.dtype = batch_size, num_layers, max_len, dtype
        self.k = self.v = None
        self.pos = 0  # tokens already cached, the same for every row

    def _allocate(self, like):
        shape = (self.num_layers, self.batch_size, like.size(1), self.max_len, like.size(3))
        self.k = torch.empty(shape, dtype=self.dtype or like.dtype, device=like.device)
        self.v = torch.empty_like(self.k)

    def insert(self, layer_idx, k, v):
        if self.k is None:
            self._allocate(k)
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens > max_len {self.max_len}")
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, num_tokens):
        self.pos += num_tokens

    def reset(self):
        self.pos = 0

    def copy_from(self, other):
        """Take over another cache's tokens; a batch-1 cache is broadcast to every row (prefill once,
        sample many)."""
        assert other.num_layers == self.num_layers and other.pos <= self.max_len
        assert other.batch_size in (1, self.batch_size)
        if self.k is None and other.k is not None:
            self._allocate(other.k[0])  # one layer: (B, H, T, D)
        n = other.pos
        if n == 0 or other.k is None:
            self.pos = n
            return
        self.k[:, :, :, :n] = other.k[:, :, :, :n]
        self.v[:, :, :, :n] = other.v[:, :, :, :n]
        self.pos = n


# ---------------------------------------------------------------------------------------------
# Sampling


def sample_next_token(logits, rng=None, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    order = None  # when set, `logits` holds the candidates best first and order their token ids
    if top_k is not None and 0 < top_k < logits.size(-1):
        logits, order = torch.topk(logits, top_k, dim=-1)  # sorted; sampling k, not V, is far cheaper
    elif top_p is not None and top_p < 1.0:
        logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of most likely tokens whose mass reaches top_p (always the first)
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    # argmax(p / Exp(1) noise) draws exactly from p (the exponential race); faster than multinomial.
    # The clamp: a noise of exactly 0 would make 0/0 = NaN, which argmax would pick.
    noise = torch.empty_like(probs).exponential_(generator=rng).clamp_(min=1e-30)
    choice = (probs / noise).argmax(dim=-1)
    return choice if order is None else order.gather(-1, choice[:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Streaming text: BPE tokens can split a character (an emoji is 4 bytes, often 2-3 tokens), so
# decoding token by token would print replacement characters. Feed the bytes of each token to an
# incremental UTF-8 decoder, which returns only characters that are complete.


class TextStreamer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def put(self, token):
        """Feed one token id; returns the text it completes (often '', sometimes several chars)."""
        return self.decoder.decode(self.tokenizer.id_to_bytes(token))

    def flush(self):
        """End of stream: whatever bytes are left, invalid ones as U+FFFD."""
        return self.decoder.decode(b"", final=True)


# ---------------------------------------------------------------------------------------------
# Tool use: one small state machine per row.
#   TEXT --<|python_start|>--> PYTHON --<|python_end|>--> (run the code; queue
#   <|output_start|> result <|output_end|> as forced tokens) --> TEXT
#   any state --<|assistant_end|> or <|bos|>--> DONE
# Forced tokens go into the stream instead of sampled ones and are marked as not sampled, so RL
# does not train on them.


class RowState:
    def __init__(self):
        self.forced = deque()  # tokens to emit next, instead of sampling
        self.python = None     # token ids of the code while inside a python block, else None
        self.done = False      # emitted a stop token


# ---------------------------------------------------------------------------------------------
# The Engine: prefill once, replicate, decode token by token.


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def use_bf16(device):
    """bf16 compute on CUDA SM80+ (as in training), plain fp32 elsewhere."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def autocast_for(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16(device) else contextlib.nullcontext()


class Engine:
    """Generation for one model + tokenizer. tool(code) -> str is what python blocks run (run_tool:
    the arithmetic fast path, else the sandbox); pass tool=None to turn tool use off."""

    def __init__(self, model, tokenizer, tool=run_tool, bf16=None):
        """bf16: bf16 autocast and a bf16 KV cache (None: as training does on the model's device)."""
        self.model, self.tokenizer, self.tool = model, tokenizer, tool
        self.device = next(model.parameters()).device
        self.bf16 = use_bf16(self.device) if bf16 is None else bf16
        sp = tokenizer.special
        self.stop = {sp(name) for name in STOP_TOKENS}
        self.bos = tokenizer.bos_id
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")

    def _step_row(self, row, token):
        """Advance one row's state machine by the token it just emitted."""
        if token in self.stop:
            row.done = True
        elif token == self.python_start:
            row.python = []
        elif token == self.python_end and row.python is not None:
            code = self.tokenizer.decode(row.python)
            row.python = None
            if self.tool is not None:
                result = self.tokenizer.encode(self.tool(code))
                row.forced.extend([self.output_start, *result, self.output_end])
        elif row.python is not None:
            row.python.append(token)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        # bf16 under autocast: its attention rounds k, v to bf16 anyway, so this halves cache memory
        # and traffic at no cost in accuracy
        return KVCache(batch_size, self.model.config.n_layer, max_len, torch.bfloat16 if self.bf16 else None)

    def forward(self, ids, kv_cache):
        """Logits (B, V) of the last position after feeding ids (B, T) into kv_cache."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(ids, kv_cache=kv_cache, last_only=True)[:, -1, :]

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Prefill `tokens` (a list of ids) once, then decode num_samples rows token by token.

        Yields, per step, (tokens, sampled): one entry per row, the row's new token id and whether
        it was sampled (True) or forced by a tool (False). A row that already stopped yields
        (None, False). Stops when every row has emitted <|assistant_end|> or <|bos|>, or after
        max_tokens steps (default: up to the model's context length).
        """
        if not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("generate: the prompt must be a non-empty list of token ids")
        device, context = self.device, self.model.max_positions  # the whole prompt, at any length it can represent
        budget = context - len(tokens)
        max_tokens = budget if max_tokens is None else min(max_tokens, budget)
        if max_tokens <= 0:
            raise ValueError(f"prompt of {len(tokens)} tokens leaves no room in a {context}-token context")
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)

        # prefill the prompt once, at batch 1, then replicate its cache into every row
        prefill = self.new_cache(1, len(tokens))
        logits = self.forward(torch.tensor([tokens], dtype=torch.long, device=device), prefill)
        kv = self.new_cache(num_samples, len(tokens) + max_tokens)
        kv.copy_from(prefill)
        del prefill
        logits = logits.expand(num_samples, -1)
        rows = [RowState() for _ in range(num_samples)]

        # decode: sample every row, let forced tokens override, advance the state machines
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p).tolist()
            out, was_sampled, feed = [], [], []
            for row, s in zip(rows, sampled):
                if row.done:  # keep its slot in the batch busy with a harmless token
                    out.append(None); was_sampled.append(False); feed.append(self.bos)
                    continue
                forced = bool(row.forced)
                token = row.forced.popleft() if forced else s
                self._step_row(row, token)
                out.append(token); was_sampled.append(not forced); feed.append(token)
            yield out, was_sampled
            if all(row.done for row in rows) or step == max_tokens - 1:
                break
            logits = self.forward(torch.tensor(feed, dtype=torch.long, device=device).unsqueeze(1), kv)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Non-streaming generate: (sequences, masks), one per row. A sequence is the prompt plus
        everything generated, the stop token included (RL should learn to stop); a mask is 0 for
        prompt and forced tokens and 1 for sampled ones."""
        seqs = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        for out, was_sampled in self.generate(tokens, num_samples, **kwargs):
            for i, (token, s) in enumerate(zip(out, was_sampled)):
                if token is not None:
                    seqs[i].append(token)
                    masks[i].append(int(s))
        return seqs, masks


def for_inference(model):
    """The model in eval mode and, where inference runs in bf16, with bf16 weights: a decode step reads
    every weight once, so this halves its memory traffic (fp32 master weights only matter to training).
    The rotary tables stay fp32. Only for a model nobody trains afterwards (serve, chat, benchmarks)."""
    if use_bf16(next(model.parameters()).device):
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    return model.eval()


def load_engine(source="sft", tag=None, step=None, device=None):
    """A checkpoint as (Engine, meta), through train.load_model(source, tag, step, device)."""
    import train  # lazily: the sandbox and the generation loop do not need the training stack
    model, tokenizer, meta = train.load_model(source, tag, step, device or default_device())
    return Engine(for_inference(model), tokenizer), meta


# ---------------------------------------------------------------------------------------------
# Terminal chat


def chat(eng, completion=False, prompt=None, temperature=0.6, top_k=50, top_p=None, max_tokens=1024, seed=42):
    """Multi-turn chat in the terminal, streaming the reply. completion=True (a base model) treats
    each line as text to continue. With `prompt`, answer it once and return."""
    tokenizer = eng.tokenizer
    sp = tokenizer.special
    conversation = [tokenizer.bos_id]
    if prompt is None:
        print("speedchat: 'clear' starts over, 'quit' or Ctrl-D leaves.")
    turn = 0
    while True:
        if prompt is not None:
            text = prompt
        else:
            try:
                text = input("\n> " if completion else "\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if text in ("quit", "exit"):
                return
            if text == "clear":
                conversation = [tokenizer.bos_id]
                continue
            if not text:
                continue
        if completion:
            ids = tokenizer.encode(text, prepend=tokenizer.bos_id)
            print(text, end="", flush=True)
        else:
            ids = conversation + [sp("<|user_start|>"), *tokenizer.encode(text), sp("<|user_end|>"), sp("<|assistant_start|>")]
            print("Assistant: ", end="", flush=True)
        streamer, reply = TextStreamer(tokenizer), []
        try:
            for out, _ in eng.generate(ids, 1, max_tokens, temperature, top_k, top_p, seed=seed + turn):
                reply.append(out[0])
                if out[0] not in eng.stop:  # python/output markers are shown as they are
                    print(streamer.put(out[0]), end="", flush=True)
        except ValueError as e:  # the conversation no longer fits in the context
            print(f"\n[{e}; type 'clear' to start over]")
            if prompt is not None:
                return
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            print(" [stopped]", end="")
        print(streamer.flush())
        turn += 1
        if not completion:
            if not reply or reply[-1] != sp("<|assistant_end|>"):
                reply.append(sp("<|assistant_end|>"))  # cut off by max_tokens: close the turn
            conversation = ids + reply
        if prompt is not None:
            return


def main(argv=None):
    parser = argparse.ArgumentParser(description="speedchat inference: terminal chat and the code sandbox")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("chat", help="chat with a checkpoint in the terminal (streams tokens)")
    c.add_argument("--source", default="sft", choices=["base", "sft", "rl"], help="checkpoint stage (base: plain completion)")
    c.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
    c.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    c.add_argument("-p", "--prompt", default=None, help="answer this once and exit")
    c.add_argument("--temperature", type=float, default=0.6)
    c.add_argument("--top-k", type=int, default=50)
    c.add_argument("--top-p", type=float, default=None)
    c.add_argument("--max-tokens", type=int, default=1024)
    c.add_argument("--seed", type=int, default=42)
    c.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    x = sub.add_parser("exec", help="run Python code in the sandbox and print the result")
    x.add_argument("code", help="the code; '-' reads it from stdin")
    x.add_argument("--timeout", type=float, default=SANDBOX_TIMEOUT)
    args = parser.parse_args(argv)
    if args.command == "chat" and args.max_tokens < 1:
        parser.error(f"--max-tokens {args.max_tokens}: must be at least 1")
    if args.command == "chat" and args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p {args.top_p}: must be in (0, 1]")

    if args.command == "exec":
        code = sys.stdin.read() if args.code == "-" else args.code
        r = execute_code(code, timeout=args.timeout)
        print(r.stdout, end="")
        if not r.success:
            print(f"Error: {r.error}", file=sys.stderr)
        return 0 if r.success else 1
    try:
        eng, meta = load_engine(args.source, args.tag, args.step, args.device)
    except (OSError, ValueError, tok.DataError) as e:  # no checkpoint, wrong tokenizer, ...
        raise SystemExit(f"engine.py chat: {e}") from None
    chat(eng, completion=args.source == "base", prompt=args.prompt, temperature=args.temperature,
         top_k=args.top_k, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
