"""
engine.py: inference for speedchat models.

KV-cache generation with temperature / top-k / top-p sampling, streaming, tool use (the model's
<|python_start|> ... <|python_end|> blocks run in a sandbox and the result is forced back into the
stream), the code sandbox itself, and a terminal chat.

    python engine.py chat --source sft                  # multi-turn chat, streams tokens
    python engine.py chat --source base -p "Once upon"  # a base model does plain completion
    python engine.py exec "12*7"                        # run code in the sandbox: prints 84
    python engine.py sandbox                            # which of the sandbox's layers this machine has
    python engine.py export --source sft --out DIR      # a Hugging Face folder (hf.py); --source hf:DIR reads one back

Reads top to bottom: constants, the sandbox, the KV cache, sampling, the streamer, the tool state
machine, the Engine (the main loop), the chat CLI, __main__.
"""

import argparse
import ast
import atexit
import codecs
import functools
import inspect
import json
import math
import operator
import os
import queue
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tok
import train

# ---------------------------------------------------------------------------------------------
# Constants

SANDBOX_TIMEOUT = 5.0             # wall-clock seconds before the sandbox process group is killed
SANDBOX_MEMORY = 512 * 2**20      # bytes of address space (RLIMIT_AS)
SANDBOX_OUTPUT = 16_000           # characters of stdout kept; more stops the program
SANDBOX_THREADS = 16              # threads the code may start (RLIMIT_NPROC above what its user runs)
SANDBOX_FILE_BYTES = 16 * 2**20   # largest file it may write (RLIMIT_FSIZE), only in its private directory
SANDBOX_DISK = 64 * 2**20         # all its files together (the private directory is a tmpfs of this size)
SANDBOX_PYTHON = sys.executable   # the sandbox's interpreter: any Python 3.9+ with its standard library
SANDBOX_STDLIB = ["random", "statistics", "threading", "logging", "queue", "concurrent.futures", "tempfile", "shutil",
                  "json", "re", "math", "fractions", "decimal", "datetime", "itertools", "collections", "heapq", "bisect",
                  "functools", "string", "operator", "copy", "typing", "dataclasses", "enum", "hashlib", "struct",
                  "textwrap", "numbers", "cmath", "calendar", "pprint", "zoneinfo", "importlib"]  # promised to work
TOOL_OUTPUT_CHARS = 1_000         # characters of a tool result forced into the model's context
ARITH_MAX_INT = 10**100           # the arithmetic fast path gives up (falls back) beyond this
STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")

# ---------------------------------------------------------------------------------------------
# The sandbox: run model-written code in a separate process, isolated by the kernel.
#
# serve.py puts the python tool one prompt away from anyone on the network, so the boundary is the
# kernel's, as in bubblewrap and nsjail; the Python-level guards are only a second layer. Layers:
#   namespaces  new user, PID, network, mount and IPC namespaces: the code sees no other process (its
#               own /proc), has no network, and its processes die with the namespace's first one
#   nobody      a server running as root runs the code as uid/gid 65534
#   landlock    the filesystem: read-only the interpreter, its standard library and the shared
#               libraries it loaded; read-write the private directory; nothing else (no /proc, home,
#               $SPEEDCHAT_HOME). ABI 4+: no TCP bind or connect; ABI 6+: no signal or abstract
#               socket reaches a process outside
#   seccomp     threads but no new processes, no socket but AF_UNIX, no ptrace, mount, namespaces,
#               kexec, bpf, keyctl, modules, io_uring
#   tmpfs       the private directory is a tmpfs of SANDBOX_DISK bytes, gone with the namespace
#   limits      wall clock (the parent kills it), CPU, address space, threads, file size, output
# Each layer is applied where the kernel allows it (a container may forbid namespaces, an old kernel
# lacks Landlock); what was applied comes back with every result (ExecResult.layers), the Engine logs
# it once, and `python engine.py sandbox` prints it.
#
# The child is a fresh interpreter (-I -S -B: no site, no env, no cwd on sys.path, no .pyc writes;
# it shares nothing with the parent's torch threads, CUDA context or address space). It runs the
# functions below, whose source is sent to it: it reads {code, limits} as JSON on stdin, isolates
# itself, runs the code like a REPL (a last expression's value is printed through display_value) and
# writes {stdout, stderr, error, layers} as JSON to a private dup of its stdout.

SANDBOX_LAYERS = ("namespaces", "nobody", "landlock", "seccomp", "tmpfs", "limits")
NOBODY = 65534


def display_value(value):
    """How a tool shows a value: like the Python REPL (repr), except that floats read the way a
    calculator (and GSM8K's <<48/2=24>> annotations) shows them: 10/2 -> 5, 0.1+0.2 -> 0.3."""
    if isinstance(value, float) and math.isfinite(value):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return repr(value)


def printable(text: str) -> str:
    """Text that encodes as UTF-8 whatever it held: lone surrogates come back as \\udXXX escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _sandbox_isolate(home, disk, visible, preload, namespaces=True):
    """[child] New PID, network, mount, IPC and user namespaces: the process forks once (what follows
    runs as PID 1 of the new PID namespace; the outer process waits and ends as it ends) and pivots
    into a new root, a tmpfs that holds only `visible` (bound read-only at the same paths), its own
    /proc, and the private directory: a fresh tmpfs of `disk` bytes at `home`. As bubblewrap does,
    unprivileged. Root builds the root first, then becomes nobody in a user namespace of its own.
    Returns {layer: what was applied, or "no: why"}."""
    import ctypes, os, signal
    NEWNS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    layers = {"nobody": f"uid {NOBODY}" if root else f"not root: runs as uid {os.getuid()}"}

    def mount(src, target, fstype, flags, data=None):
        enc = lambda s: s.encode() if s else None  # noqa: E731
        if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
            raise OSError(f"mount {target}: {os.strerror(ctypes.get_errno())}")

    def map_ids(uid, gid):  # inside, uid and gid 0; outside, ours
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)

    def new_root():
        mount(None, "/", None, REC | PRIVATE)
        new = home  # a tmpfs on the private directory's path (which stays empty outside)
        mount("tmpfs", new, "tmpfs", NOSUID | NODEV, "size=1048576,mode=0755")
        for path in visible:
            target = new + path
            if os.path.isdir(path):
                os.makedirs(target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "w").close()
            mount(path, target, None, BIND | REC)
            st = os.statvfs(target).f_flag  # flags a user namespace may not drop: keep them, add read-only
            kept = sum(m for bit, m in ((2, NOSUID), (4, NODEV), (8, NOEXEC), (1024, 1024), (2048, 2048), (4096, 1 << 21)) if st & bit)
            mount(None, target, None, REMOUNT | BIND | RDONLY | kept)
        os.makedirs(new + home)
        owner = f",uid={NOBODY},gid={NOBODY}" if root else ""
        mount("tmpfs", new + home, "tmpfs", NOSUID | NODEV, f"size={disk},nr_inodes=4096,mode=0700{owner}")
        layers["tmpfs"] = f"{disk // 2**20} MB"
        os.makedirs(new + "/proc")
        try:
            mount("proc", new + "/proc", "proc", NOSUID | NODEV | NOEXEC)
        except OSError as e:  # containers that mask parts of /proc refuse a new one: none then
            layers["namespaces"] += f" (no /proc: {e})"
        os.chdir(new)
        if libc.syscall({"x86_64": 155, "aarch64": 41}[os.uname().machine], b".", b".") != 0:  # pivot_root(".", ".")
            raise OSError(f"pivot_root: {os.strerror(ctypes.get_errno())}")
        libc.umount2(b".", 2)  # MNT_DETACH: the old root, gone
        mount(None, "/", None, REMOUNT | RDONLY | NOSUID | NODEV)  # the new root itself, read-only
        os.chdir(home)
        layers["namespaces"] += f", a new root with {len(visible)} paths read-only"

    uid, gid = os.getuid(), os.getgid()
    if not namespaces:
        layers.update(namespaces="no: left out", tmpfs="no: needs a mount namespace")
    elif libc.unshare(NEWNS | NEWPID | NEWNET | NEWIPC | (0 if root else NEWUSER)) != 0:
        layers.update(namespaces=f"no: unshare: {os.strerror(ctypes.get_errno())}", tmpfs="no: needs a mount namespace")
    else:
        if not root:
            map_ids(uid, gid)
        pid = os.fork()
        if pid:  # the outer process: wait for the namespace's first process and end as it ended
            os.closerange(3, 4096)  # not a holder of the answer channel: its end is the child's
            status = os.waitpid(pid, 0)[1]
            if os.WIFSIGNALED(status):
                signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
                os.kill(os.getpid(), os.WTERMSIG(status))
            os._exit(os.waitstatus_to_exitcode(status))
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the wall clock kills the outer process, this dies too
        layers["namespaces"] = "pid, net, mount, ipc" + ("" if root else ", user")
        try:
            new_root()
        except OSError as e:  # half-way: what was built stays; root still becomes nobody below
            layers["namespaces"] += f" (no new root: {e})"
    if root:
        if "tmpfs" not in layers or layers["tmpfs"].startswith("no:"):
            os.chown(home, NOBODY, NOBODY)  # no tmpfs: the private directory itself becomes nobody's
            stdlib = os.path.dirname(os.__file__).split("/")  # and no new root: can nobody still read Python?
            if not all(os.stat("/".join(stdlib[:i]) or "/").st_mode & 1 for i in range(1, len(stdlib) + 1)):
                for name in preload:  # no (it lives under /root, say): what the tool promises, imported now
                    try:
                        __import__(name)
                    except ImportError:
                        pass
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        libc.prctl(4, 1)  # PR_SET_DUMPABLE: the setuid made /proc/self root's; our uid_map is ours to write
    # last, a user namespace of its own that owns none of the namespaces above: no capability over its
    # mounts, network or processes is left (and RLIMIT_NPROC counts only its own threads)
    if layers["namespaces"].startswith("pid") and libc.unshare(NEWUSER) == 0:
        try:
            map_ids(os.getuid(), os.getgid())
            layers["namespaces"] = layers["namespaces"].replace(", user", "") + ", user (owning none of them)"
        except OSError:
            pass
    libc.prctl(4, 0)
    return layers


def _sandbox_landlock(read_only, read_write):
    """[child] Landlock: the paths in read_only may be read and executed, those in read_write used in
    every way, the rest of the filesystem not at all; ABI 4+ also denies TCP bind and connect, ABI 6+
    signals and abstract unix sockets to processes outside. Returns the ABI version applied."""
    import ctypes, os, struct
    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        raise OSError(f"no: {os.strerror(ctypes.get_errno())}")
    fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    attr = struct.pack("QQQ", fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)[:8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = libc.syscall(444, attr, len(attr), 0)
    if ruleset < 0:
        raise OSError(f"no: landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    read, file_rights = 1 << 0 | 1 << 2 | 1 << 3, 1 << 0 | 1 << 1 | 1 << 2 | 1 << 14 | 1 << 15  # execute, read file/dir
    for paths, access in ((read_only, read), (read_write, fs)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            allowed = access & fs & (file_rights if not os.path.isdir(path) else ~0)
            ok = libc.syscall(445, ruleset, 1, struct.pack("=Qi", allowed, fd), 0) == 0  # LANDLOCK_RULE_PATH_BENEATH
            os.close(fd)
            if not ok:
                raise OSError(f"no: landlock_add_rule {path}: {os.strerror(ctypes.get_errno())}")
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if libc.syscall(446, ruleset, 0) != 0:
        raise OSError(f"no: landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    os.close(ruleset)
    return abi


def _sandbox_seccomp():
    """[child] The last layer, a seccomp filter: clone only with CLONE_THREAD and no namespace flag
    (threads, no processes; clone3 answers ENOSYS so that libc falls back to clone), socket only
    AF_UNIX, and none of ptrace, mount, namespaces, kexec, bpf, keyctl, modules, io_uring, reboot,
    swap, clocks, accounting. x86-64 and aarch64."""
    import ctypes, os, struct
    EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97
    tables = {  # machine: (audit arch, clone, clone3, socket, denied syscalls)
        "x86_64": (0xC000003E, 56, 435, 41, [57, 58, 101, 103, 134, 155, 161, 163, 164, 165, 166, 167, 168, 169, 170,
                                             171, 172, 173, 175, 176, 179, 212, 227, 246, 248, 249, 250, 272, 298, 303,
                                             304, 308, 310, 311, 312, 313, 320, 321, 323, 425, 426, 427, 428, 429, 430,
                                             431, 432, 433, 442]),
        "aarch64": (0xC00000B7, 220, 435, 198, [18, 39, 40, 41, 51, 58, 60, 89, 97, 104, 105, 106, 112, 116, 117, 142,
                                                161, 162, 170, 217, 218, 219, 224, 225, 241, 264, 265, 268, 270, 271, 272,
                                                273, 280, 282, 294, 425, 426, 427, 428, 429, 430, 431, 432, 433, 442]),
    }
    machine = os.uname().machine
    if machine not in tables:
        raise OSError(f"no: no syscall table for {machine}")
    audit, clone, clone3, socket, denied = tables[machine]
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, ...|JGE|K, ...|JSET|K, BPF_RET|K
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    errno = lambda e: 0x00050000 | e
    op = lambda code, k, jt=0, jf=0: struct.pack("HBBI", code, jt, jf, k)
    prog = [op(LD, 4), op(JEQ, audit, 1, 0), op(RET, KILL), op(LD, 0)]  # seccomp_data.arch, then .nr
    if machine == "x86_64":
        prog += [op(JGE, 0x40000000, 0, 1), op(RET, errno(EPERM))]  # the x32 ABI
    for nr in denied:
        prog += [op(JEQ, nr, 0, 1), op(RET, errno(EPERM))]
    prog += [op(JEQ, clone3, 0, 1), op(RET, errno(ENOSYS)),
             op(JEQ, socket, 0, 4), op(LD, 16), op(JEQ, 1, 0, 1), op(RET, ALLOW), op(RET, errno(EAFNOSUPPORT)),
             op(JEQ, clone, 0, 6), op(LD, 16), op(JSET, 0x7E020000, 0, 1), op(RET, errno(EPERM)),  # CLONE_NEW* flags
             op(JSET, 0x10000, 0, 1), op(RET, ALLOW), op(RET, errno(EPERM)),  # CLONE_THREAD: a thread
             op(RET, ALLOW)]
    libc = ctypes.CDLL(None, use_errno=True)
    code = ctypes.create_string_buffer(b"".join(prog))
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(code)))
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if libc.prctl(22, 2, fprog, 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(f"no: {os.strerror(ctypes.get_errno())}")
    return f"{len(denied)} syscalls denied, no processes, AF_UNIX sockets only"


def _sandbox_guards(home):
    """[child] The second layer, in Python (undone by anyone who tries; the kernel's layers hold then):
    no processes, signals or environment changes; writes, renames and deletions only inside home;
    no subprocess, socket, ctypes or resource modules."""
    import builtins, io, os, posix, sys

    def disabled(*args, **kwargs):
        raise PermissionError("disabled in the sandbox")
    for name in ("system", "popen", "fork", "forkpty", "vfork", "execv", "execve", "execl", "execle", "execlp",
                 "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
                 "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "mkfifo", "mknod", "putenv",
                 "unsetenv", "chdir", "chroot", "setuid", "setgid"):
        for module in (os, posix):  # posix: the C functions behind os
            if hasattr(module, name):
                setattr(module, name, disabled)

    def inside(path, dir_fd=None):
        if isinstance(path, int):
            return True  # an open descriptor, checked when it was opened
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else home
        full = os.path.realpath(os.path.join(base, os.fsdecode(path)))
        return full == home or full.startswith(home + os.sep)

    def refuse(path):
        raise PermissionError(f"writes outside the sandbox directory are disabled: {path!r}")

    def writes_inside(fn, checks):  # checks: (argument position, its dir_fd keyword) of each path changed
        def guarded(*args, **kwargs):
            for i, key in checks:
                if i < len(args) and not inside(args[i], kwargs.get(key)):
                    refuse(args[i])
            return fn(*args, **kwargs)
        return guarded
    one, two = [(0, "dir_fd")], [(0, "src_dir_fd"), (1, "dst_dir_fd")]
    for name, checks in (("mkdir", one), ("makedirs", one), ("rmdir", one), ("remove", one), ("unlink", one),
                         ("removedirs", one), ("chmod", one), ("chown", one), ("lchown", one), ("truncate", one),
                         ("utime", one), ("rename", two), ("replace", two), ("renames", two), ("link", two),
                         ("symlink", [(1, "dir_fd")])):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, writes_inside(getattr(module, name), checks))
    write_flags, os_open, io_open = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, os.open, io.open

    def checked_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not inside(path, kwargs.get("dir_fd")):
            refuse(path)
        return os_open(path, flags, *args, **kwargs)

    def checked_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            refuse(file)
        return io_open(file, mode, *args, **kwargs)

    class CheckedFileIO(io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and not inside(file):
                refuse(file)
            super().__init__(file, mode, *args, **kwargs)
    os.open = posix.open = checked_os_open
    builtins.open = io.open = checked_open
    io.FileIO = CheckedFileIO
    for name in ("subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing", "socket", "_socket", "ssl",
                 "_ssl", "select", "selectors", "asyncio", "ctypes", "_ctypes", "pty", "urllib.request", "http.client",
                 "ftplib", "smtplib", "resource"):
        sys.modules[name] = None  # `import socket` now raises ImportError


def _sandbox_main():
    """[child] The sandbox process, start to end."""
    import ast, builtins, io, json, os, resource, signal, sys
    req = json.loads(sys.stdin.read())
    result_file = io.open(os.dup(1), "wb")  # the private channel for the answer
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1), os.dup2(null, 2)  # stray writes to fd 1/2 go nowhere
    home, layers = os.path.realpath(os.getcwd()), {}
    with open("/proc/self/maps") as f:  # the shared libraries' directories: extension modules load from them
        libs = {os.path.dirname(line.split()[-1]) for line in f if line.rstrip().endswith(".so") or ".so." in line}
    visible = {p for p in sys.path if p and os.path.exists(p)} | libs | {"/usr/share/zoneinfo", "/etc/localtime"}
    visible = sorted(p for p in visible if os.path.exists(p) and not any(p.startswith(q + "/") for q in visible))
    devices = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"]
    try:
        layers.update(_sandbox_isolate(home, req["max_disk"], visible + devices, req["stdlib"], "namespaces" not in req["without"]))
    except OSError as e:  # a step the kernel refused half-way: the layers below still apply
        layers["namespaces"] = f"no: {e}"
    in_userns = "user" in layers.get("namespaces", "")
    threads = req["max_threads"]
    if not in_userns:  # RLIMIT_NPROC counts every task of the uid: allow ours on top of those
        threads += sum(len(os.listdir(f"/proc/{p}/task")) for p in os.listdir("/proc") if p.isdigit()
                       and os.path.exists(f"/proc/{p}/task") and os.stat(f"/proc/{p}").st_uid == os.getuid())
    for lim, soft, hard in ((resource.RLIMIT_AS, req["max_memory"], req["max_memory"]),
                            (resource.RLIMIT_CPU, req["cpu_seconds"], req["cpu_seconds"] + 1),
                            (resource.RLIMIT_NPROC, threads, threads),
                            (resource.RLIMIT_FSIZE, req["max_file"], req["max_file"]),
                            (resource.RLIMIT_CORE, 0, 0)):
        try:
            resource.setrlimit(lim, (soft, hard))
        except (ValueError, OSError):
            pass
    layers["limits"] = f"{req['max_memory'] // 2**20} MB, {req['cpu_seconds']} s CPU, {req['max_threads']} threads"
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversize write raises instead of killing us
    for name, apply in (("landlock", lambda: f"ABI {_sandbox_landlock(visible + devices, [home, '/dev/null'])}"),
                        ("seccomp", _sandbox_seccomp)):
        try:
            layers[name] = "no: left out" if name in req["without"] else apply()
        except OSError as e:
            layers[name] = str(e) if str(e).startswith("no:") else f"no: {e}"
    _sandbox_guards(home)

    cap = req["max_output"]

    class OutputLimitExceeded(Exception):
        pass

    class Capped(io.TextIOBase):  # stdout that stops the program past `cap` characters
        def __init__(self):
            self.parts, self.n = [], 0

        def writable(self):
            return True

        def write(self, s):
            if self.n + len(s) > cap:
                self.parts.append(s[:cap - self.n])
                self.n = cap
                raise OutputLimitExceeded(f"output over {cap} characters")
            self.parts.append(s)
            self.n += len(s)
            return len(s)

        def getvalue(self):
            return "".join(self.parts)
    out, err = Capped(), Capped()
    sys.stdout, sys.stderr = out, err
    error = None
    try:
        tree = ast.parse(req["code"], "<sandbox>")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        env = {"__name__": "__main__", "__builtins__": builtins}
        exec(compile(tree, "<sandbox>", "exec"), env)
        if last is not None:  # like a REPL: show the last expression's value
            value = eval(compile(ast.Expression(last.value), "<sandbox>", "eval"), env)
            if value is not None:
                print(display_value(value))
    except BaseException as e:  # SystemExit too: a program that exits early did not finish
        error = type(e).__name__ + (f": {e}" if str(e) else "")
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    answer = {"stdout": printable(out.getvalue()), "stderr": printable(err.getvalue()),
              "error": None if error is None else printable(error), "layers": layers}
    result_file.write(json.dumps(answer).encode())
    result_file.close()
    os._exit(0)  # now, whatever threads the code left running


_SANDBOX_CHILD = "\n\n".join(["import math, os", f"NOBODY = {NOBODY}"] + [inspect.getsource(f) for f in (
    display_value, printable, _sandbox_isolate, _sandbox_landlock, _sandbox_seccomp, _sandbox_guards, _sandbox_main)]
    + ["_sandbox_main()"])


@dataclass
class ExecResult:
    success: bool
    stdout: str
    error: str | None = None
    stderr: str = ""
    timed_out: bool = False
    layers: dict | None = None  # the sandbox's layers as applied ({layer: what, or "no: why"})


def execute_code(code, timeout=SANDBOX_TIMEOUT, max_memory=SANDBOX_MEMORY, max_output=SANDBOX_OUTPUT, without=()):
    """Run Python `code` in a fresh process isolated by the kernel (the layers above, as far as this
    machine allows); returns ExecResult(success, stdout, error, ..., layers). Limits: wall clock
    `timeout` (the process group is killed, and with it the PID namespace), CPU time, address space
    `max_memory`, SANDBOX_THREADS threads and no processes, files of SANDBOX_FILE_BYTES in a private
    directory of SANDBOX_DISK bytes (its TMPDIR and working directory, removed afterwards), stdout
    capped at `max_output` characters. The standard library works (random, threading, logging,
    tempfile, ...). Success means the code ran to its end: an exception or an early exit (sys.exit,
    SystemExit, os._exit) is a failure. The value of a last expression is printed, like a REPL:
    "12*7" -> "84". Output that is not valid UTF-8 comes back escaped. `without`: layers to leave out,
    as on a machine that lacks them (the tests' degraded machines)."""
    request = json.dumps({"code": code, "max_memory": int(max_memory), "max_output": int(max_output), "without": list(without),
                          "stdlib": SANDBOX_STDLIB,
                          "max_threads": SANDBOX_THREADS, "max_file": SANDBOX_FILE_BYTES, "max_disk": SANDBOX_DISK,
                          "cpu_seconds": math.ceil(timeout) + 1})  # a backstop: the wall clock should fire first
    with tempfile.TemporaryDirectory(prefix="speedchat_sandbox_") as cwd:
        proc = subprocess.Popen([SANDBOX_PYTHON, "-I", "-S", "-B", "-c", _SANDBOX_CHILD], cwd=cwd, env={"TMPDIR": cwd},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)   # own process group: one kill gets all
        try:
            raw = _read_answer(proc, request.encode(), timeout, limit=8 * max_output + 2**16)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return ExecResult(False, "", f"TimeoutError: execution took over {timeout:g} seconds", timed_out=True)
        _kill_group(proc)  # anything it left behind in its group
    try:
        res = json.loads(raw)
    except ValueError:  # killed by a signal (CPU limit, segfault) or flooded its answer channel
        if proc.returncode == -signal.SIGXCPU:
            return ExecResult(False, "", f"TimeoutError: execution took over {timeout:g} seconds of CPU", timed_out=True)
        return ExecResult(False, "", f"the sandbox process died (exit status {proc.returncode})")
    out = lambda key: printable(res[key]) if isinstance(res.get(key), str) else ""
    return ExecResult(res.get("error") is None, out("stdout"), out("error") or None, out("stderr"), layers=res.get("layers"))


def _read_answer(proc, request: bytes, timeout: float, limit: int) -> bytes:
    """Send the request, read the answer until EOF, within the wall clock and at most `limit` bytes
    (code that floods the answer channel gets a truncated, unreadable answer, not the server's memory)."""
    deadline = time.monotonic() + timeout
    try:
        proc.stdin.write(request)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    fd, chunks, n = proc.stdout.fileno(), [], 0
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while n <= limit:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise subprocess.TimeoutExpired(proc.args, timeout)
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
    proc.stdout.close()
    return b"".join(chunks)[:limit]


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# The fast path: tool calls in toy-world and GSM8K are almost all arithmetic ("12*7"). Evaluating
# those from the AST takes microseconds in-process against milliseconds for a sandbox process
# (bench/engine_bench.py), and every tool call stalls the whole decoding batch, so RL with thousands
# of calls would otherwise spend minutes just starting interpreters. It handles only numbers and + - * / // % ** and
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


_LAYER_ROLES = {"namespaces": "no other process, no network, a new root holding only the interpreter",
                "nobody": "a server running as root runs the code as uid/gid 65534",
                "landlock": "the filesystem: read-only the interpreter, read-write the private directory",
                "seccomp": "no processes, no sockets but AF_UNIX, no ptrace/mount/bpf/keyctl/kexec",
                "tmpfs": "the private directory's files capped in all",
                "limits": "wall clock, CPU, memory, threads, file size, output"}


@functools.lru_cache(maxsize=1)
def sandbox_layers() -> dict:
    """{layer: what is applied, or "no: why"} on this machine: one probe run of the sandbox, cached."""
    layers = execute_code("pass").layers or {}
    return {name: layers.get(name, "no: the sandbox did not answer") for name in SANDBOX_LAYERS}


def sandbox_complete(layers=None) -> bool:
    """Every layer applied ("nobody" applies to root only)."""
    return not any(v.startswith("no:") for v in (layers or sandbox_layers()).values())


def sandbox_summary(layers=None) -> str:
    layers = layers or sandbox_layers()
    missing = [f"{k} ({v[3:].strip() or 'unavailable'})" for k, v in layers.items() if v.startswith("no:")]
    return ("python tool sandbox: " + "; ".join(f"{k}: {v}" for k, v in layers.items() if not v.startswith("no:"))
            + (f" | MISSING: {', '.join(missing)}" if missing else " | every layer active"))


def refuse_tool(code):
    """The python tool where a server requires the full sandbox and this machine lacks part of it."""
    return "Error: the python tool is disabled on this server (its sandbox is incomplete on this machine)"


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

    The contract with train.GPT: the model offsets rotary by `pos` (an int here; the batched
    engine's PagedStep gives a (B,) tensor), in every layer calls attend(layer_idx, q, k, v, window)
    with the new tokens' q (B, n_head, T, head_dim) and k, v (B, n_kv_head, T, head_dim), after
    rotary and QK-norm, which stores k, v and returns the attention output (B, n_head, T, head_dim);
    after its last layer it calls advance(T). Storage is allocated on the first insert, on the
    model's device, in `dtype` (default: that of k).
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

    def attend(self, layer_idx, q, k, v, window):
        k, v = self.insert(layer_idx, k, v)  # (B, nkv, pos+T, hd): every key so far
        return train.attend(q, k, v, window)

    def advance(self, num_tokens):
        self.pos += num_tokens

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


_said_sandbox = False


def _say_sandbox():
    global _said_sandbox
    _said_sandbox = True
    print(sandbox_summary(), file=sys.stderr, flush=True)


class Engine:
    """Generation for one model + tokenizer. tool(code) -> str is what python blocks run (run_tool:
    the arithmetic fast path, else the sandbox); pass tool=None to turn tool use off."""

    def __init__(self, model, tokenizer, tool=run_tool, bf16=None):
        """bf16: bf16 autocast and a bf16 KV cache (None: as training does on the model's device)."""
        self.model, self.tokenizer, self.tool = model, tokenizer, tool
        if tool is run_tool and not _said_sandbox:  # once per process: what guards the python tool here
            _say_sandbox()
        self.device = next(model.parameters()).device
        self.bf16 = train.use_bf16(self.device) if bf16 is None else bf16
        sp = tokenizer.special
        self.stop = {sp(name) for name in STOP_TOKENS}
        self.bos = tokenizer.bos_id
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")

    def step_row(self, row, token):
        """Advance one row's state machine by the token it just emitted. Returns the code of a python
        block that just closed (when tool use is on): its caller runs tool_tokens(code) and forces them."""
        if token in self.stop:
            row.done = True
        elif token == self.python_start:
            row.python = []
        elif token == self.python_end and row.python is not None:
            code = self.tokenizer.decode(row.python)
            row.python = None
            return code if self.tool is not None else None
        elif row.python is not None:
            row.python.append(token)
        return None

    def budget(self, tokens, max_tokens=None) -> int:
        """Tokens a reply to `tokens` may take: max_tokens, clamped to what the context leaves (the
        whole prompt is kept, at any length the model can represent). ValueError if none."""
        if not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("generate: the prompt must be a non-empty list of token ids")
        room = self.model.max_positions - len(tokens)
        if room <= 0:
            raise ValueError(f"prompt of {len(tokens)} tokens leaves no room in a {self.model.max_positions}-token context")
        return room if max_tokens is None else min(max_tokens, room)

    def tool_tokens(self, code):
        """The tokens forced after a python block: <|output_start|> its result <|output_end|>."""
        return [self.output_start, *self.tokenizer.encode(self.tool(code)), self.output_end]

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
        device, max_tokens = self.device, self.budget(tokens, max_tokens)
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
                if (code := self.step_row(row, token)) is not None:
                    row.forced.extend(self.tool_tokens(code))
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


# ---------------------------------------------------------------------------------------------
# Continuous batching: many conversations on one device. Decoding is memory-bound (a step reads every
# weight once, whatever the batch), so a scheduler thread feeds every active row into each decode
# step and admits new requests at any step. Keys and values live in fixed-size pages of one pool, a
# row holding only the pages its tokens fill; a long prompt is prefilled in chunks between decode
# steps, so it never stalls the others. When the pool runs dry, the youngest request gives back its
# pages and is recomputed later (vLLM's recompute preemption): requests wait, they never run out of memory.

PAGE_TOKENS = 16       # tokens per KV page: small pages waste little, the gather index stays cheap
PREFILL_CHUNK = 256    # prompt tokens prefilled per scheduler step, between two decode steps
MAX_ROWS = 64          # rows decoded together (a request with n samples holds n)
MAX_WAITING = 256      # rows that may wait beyond max_rows (queued requests' samples); more are refused (QueueFull)
TOOL_THREADS = 8       # python tool calls that run at once, off the decode loop


class QueueFull(Exception):
    """The batcher's waiting queue is at its limit (serve.py answers 503)."""


class PagedStep:
    """The KV-cache view of one forward over rows of a page pool (the same contract as KVCache): row b
    feeds T tokens from position pos[b]; `pages` (B, pages) are its pages' indices in the pool."""

    def __init__(self, pool, pages, pos, T):
        self.pool, self.T = pool, T
        dev = pool.device
        self.pages = torch.tensor(pages, dtype=torch.long, device=dev)  # (B, P), padded with page 0
        self.pos = torch.tensor(pos, dtype=torch.long, device=dev)      # (B,)
        self.length = self.pos + T                                       # (B,) keys after this step
        t = self.pos[:, None] + torch.arange(T, device=dev)              # (B, T) positions written
        self.write = self.slots(t).reshape(-1)                           # (B*T,) their slots in the pool
        self.views = {}  # window -> (gather slots (B, W), mask (B, 1, T, W))

    def slots(self, positions):
        """Pool slots of positions (B, ...) of each row."""
        flat = positions.reshape(positions.size(0), -1)
        page = self.pages.gather(1, (flat // PAGE_TOKENS).clamp(max=self.pages.size(1) - 1))
        return (page * PAGE_TOKENS + flat % PAGE_TOKENS).view_as(positions)

    def view(self, window):
        """Which keys each query reads: per row the last W = window + T - 1 positions (no query sees
        further back), masked to causal, in-window and existing."""
        if window not in self.views:
            W = min(int(self.length.max()), window + self.T - 1)
            start = (self.length - W).clamp(min=0)                                  # (B,)
            j = start[:, None] + torch.arange(W, device=self.pos.device)            # (B, W) key positions
            q = self.pos[:, None] + torch.arange(self.T, device=self.pos.device)    # (B, T) query positions
            jj, qq = j[:, None, :], q[:, :, None]
            mask = (jj <= qq) & (qq - jj < window)                                  # (B, T, W)
            self.views[window] = (self.slots(j), mask[:, None])
        return self.views[window]

    def attend(self, layer_idx, q, k, v, window):
        B, nkv, T, hd = k.shape
        K, V = self.pool.layer(layer_idx, k)
        K.index_copy_(0, self.write, k.transpose(1, 2).reshape(B * T, nkv, hd).to(K.dtype))
        V.index_copy_(0, self.write, v.transpose(1, 2).reshape(B * T, nkv, hd).to(V.dtype))
        idx, mask = self.view(window)
        keys, values = K[idx].transpose(1, 2), V[idx].transpose(1, 2)  # (B, nkv, W, hd)
        return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                              enable_gqa=q.size(1) != nkv)

    def advance(self, num_tokens):
        pass  # the scheduler keeps each row's length


class PagePool:
    """k, v of `pages` pages: (layers, pages * PAGE_TOKENS, kv_heads, head_dim), allocated on first use."""

    def __init__(self, num_layers, pages, device, dtype=None):
        self.num_layers, self.device, self.dtype = num_layers, device, dtype
        self.free = list(range(pages - 1, -1, -1))  # a stack: the last freed is reused first
        self.total = pages
        self.k = self.v = None

    def layer(self, i, like):
        if self.k is None:
            shape = (self.num_layers, self.total * PAGE_TOKENS, like.size(1), like.size(3))
            self.k = torch.zeros(shape, dtype=self.dtype or like.dtype, device=like.device)
            self.v = torch.zeros_like(self.k)
        return self.k[i], self.v[i]

    def take(self, n):
        """n free pages, or None (and nothing taken) when fewer are left."""
        if n > len(self.free):
            return None
        return [self.free.pop() for _ in range(n)]

    def give(self, pages):
        self.free.extend(reversed(pages))
        pages.clear()

    def copy(self, src, dst, n):
        """The first n tokens of pages src into pages dst (a sample of a prompt prefilled once)."""
        if self.k is None or n == 0:
            return
        pos = torch.arange(n, device=self.device)
        a = torch.tensor(src, device=self.device)[pos // PAGE_TOKENS] * PAGE_TOKENS + pos % PAGE_TOKENS
        b = torch.tensor(dst, device=self.device)[pos // PAGE_TOKENS] * PAGE_TOKENS + pos % PAGE_TOKENS
        self.k[:, b], self.v[:, b] = self.k[:, a], self.v[:, a]


def pages_for(tokens):
    return -(-tokens // PAGE_TOKENS)


def row_seed(seed, i):
    """Sample i of a request draws from its own generator: sample 0 from the request's seed (as
    Engine.generate with one sample), the others from seeds no other request's sample 0 uses."""
    return seed if i == 0 else hash((seed, i)) % (1 << 62)


class Row:
    """One sample of a request: its tokens (prompt and emitted), how many are cached (None: a sample
    waiting to copy the prompt its first sample prefills), its pages, tool state, generator, and the
    queue its tokens go to."""

    def __init__(self, request, i, device):
        self.request, self.i = request, i
        self.tokens, self.cached, self.pages, self.clones = list(request.tokens), 0, [], []
        self.state, self.generated, self.tool = RowState(), 0, None  # tool: the Future of a python call
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(row_seed(request.settings["seed"], i))
        self.events = queue.SimpleQueue()  # (token, sampled) ..., then None (or an exception)
        self.finished = False

    def order(self):
        return self.request.order, self.i



class Request:
    """What Batcher.submit returns: stream(i) yields sample i's (token, sampled) as they come,
    result() waits for every sample and gives (sequences, masks) as Engine.generate_batch."""

    def __init__(self, tokens, n, settings, wake):
        self.tokens, self.n, self.settings, self.wake = tokens, n, settings, wake
        self.rows = []
        self.admitted = threading.Event()  # set once it holds its rows
        self.cancelled = False
        self.order = None  # admission order: preemption takes the youngest

    def cancel(self):
        """Stop generating (a client left): the scheduler frees its rows at its next step."""
        self.cancelled = True
        self.wake()

    def stream(self, i=0):
        self.admitted.wait()
        while (event := self.rows[i].events.get()) is not None:
            if isinstance(event, BaseException):
                raise event
            yield event

    def result(self):
        seqs, masks = [], []
        for i in range(self.n):
            seq, mask = list(self.tokens), [0] * len(self.tokens)
            for token, sampled in self.stream(i):
                seq.append(token)
                mask.append(int(sampled))
            seqs.append(seq)
            masks.append(mask)
        return seqs, masks


class Batcher:
    """Continuous batching over one Engine: submit() requests from any thread; one scheduler thread
    runs every forward. Caps: max_rows rows at once, cache_tokens tokens of KV pages (default: every
    row at the training length, and never less than one row at the full context), max_waiting rows
    (a request's samples) waiting beyond those."""

    def __init__(self, eng, max_rows=MAX_ROWS, cache_tokens=None, max_waiting=MAX_WAITING):
        self.eng, self.max_rows, self.max_waiting = eng, max_rows, max_waiting
        model = eng.model
        cache_tokens = max(cache_tokens or max_rows * model.config.sequence_len, model.max_positions + PAGE_TOKENS)
        self.pool = PagePool(model.config.n_layer, pages_for(cache_tokens), eng.device,
                             torch.bfloat16 if eng.bf16 else None)
        self.waiting, self.preempted, self.active = deque(), [], []  # requests; rows; rows
        self.admitted, self.closed, self.preemptions = 0, False, 0
        self.cond = threading.Condition()
        self.tools = ThreadPoolExecutor(TOOL_THREADS, thread_name_prefix="speedchat-tool")
        self.thread = threading.Thread(target=self.run, daemon=True, name="speedchat-batcher")
        self.thread.start()
        atexit.register(self.close)  # a scheduler thread still inside torch at interpreter exit aborts it

    def close(self):
        """Stop the scheduler: what is in flight ends with an error; later submits raise."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread is not threading.current_thread():
            self.thread.join()
        self.tools.shutdown(wait=False, cancel_futures=True)
        atexit.unregister(self.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the client side

    def submit(self, tokens, n=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42, wait=True):
        """Queue n samples of a prompt (settings as Engine.generate). A prompt that can never fit
        raises ValueError at once; when its samples would take the rows and queue past max_rows +
        max_waiting, wait=False raises QueueFull and wait=True blocks until rows finish."""
        max_tokens = self.eng.budget(tokens, max_tokens)
        if not 1 <= n <= self.max_rows:
            raise ValueError(f"{n} samples: the batcher holds at most {self.max_rows} rows")
        if n * pages_for(len(tokens) + 1) > self.pool.total:
            raise ValueError(f"{n} samples of a {len(tokens)}-token prompt need more KV cache than the batcher's cap")
        settings = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        req = Request(list(tokens), n, settings, self.wake)
        with self.cond:
            if self.closed:
                raise RuntimeError("the batcher is closed")
            full = lambda: self.held() + n > self.max_rows + self.max_waiting
            if full():
                if not wait:
                    raise QueueFull(f"{len(self.waiting)} requests are waiting")
                self.cond.wait_for(lambda: not full() or self.closed)
                if self.closed:
                    raise RuntimeError("the batcher is closed")
            self.waiting.append(req)
            self.cond.notify_all()
        return req

    def generate_batch(self, prompts, n=1, **settings):
        """[(sequences, masks), ...]: n samples of each prompt (as Engine.generate_batch), every prompt
        submitted at once (waiting for room as rows finish). A setting is one value for all or a list
        of one per prompt (seed, max_tokens). A prompt that cannot fit raises before any starts."""
        each = [{k: v[i] if isinstance(v, (list, tuple)) else v for k, v in settings.items()} for i in range(len(prompts))]
        for i, (p, s) in enumerate(zip(prompts, each)):
            try:
                self.eng.budget(p, s.get("max_tokens"))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        reqs = [self.submit(p, n, **s) for p, s in zip(prompts, each)]
        return [r.result() for r in reqs]

    def held(self):
        """Rows running, preempted or asked for by waiting requests."""
        with self.cond:
            return len(self.active) + len(self.preempted) + sum(r.n for r in self.waiting)

    def wake(self, *_):
        with self.cond:
            self.cond.notify_all()

    def stats(self):
        with self.cond:
            return {"rows": len(self.active), "max_rows": self.max_rows, "waiting": len(self.waiting),
                    "preempted": len(self.preempted), "preemptions": self.preemptions, "max_waiting": self.max_waiting,
                    "cache_pages": self.pool.total - len(self.pool.free), "cache_pages_total": self.pool.total,
                    "page_tokens": PAGE_TOKENS}

    # -- the scheduler: each step drops cancelled rows, admits what fits, prefills one chunk, decodes
    # every row that has its next token to feed

    def run(self):
        with torch.inference_mode():
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.waiting or self.active or self.preempted or self.closed)
                    if self.closed:
                        break
                try:
                    worked = self.step()
                except Exception as e:  # a failed forward fails the requests in flight, not the batcher
                    for row in self.active + self.preempted:
                        self.finish(row, e)
                    continue
                if not worked:  # every row waits on a tool call (its callback wakes us) or for pages
                    with self.cond:
                        self.cond.wait(0.05)
            closed = RuntimeError("the batcher was closed")
            for row in self.active + self.preempted:
                self.finish(row, closed)
            for req in self.waiting:
                req.rows = [Row(req, i, self.eng.device) for i in range(req.n)]
                for row in req.rows:
                    self.finish(row, closed)
                req.admitted.set()

    def step(self) -> bool:
        with self.cond:
            for row in [r for r in self.active + self.preempted if r.request.cancelled]:
                self.finish(row)
            self.admit()
        return self.prefill() | self.decode()

    def admit(self):
        """Preempted rows first, then waiting requests, oldest first, while rows and pages are free."""
        for row in sorted(self.preempted, key=Row.order):
            if len(self.active) >= self.max_rows or not self.place(row):
                return
            self.preempted.remove(row)
        while self.waiting:
            req = self.waiting[0]
            if req.cancelled:  # never started: its streams end at once
                self.waiting.popleft()
                req.rows = [Row(req, i, self.eng.device) for i in range(req.n)]
                for row in req.rows:
                    row.finished = True
                    row.events.put(None)
                req.admitted.set()
                continue
            if len(self.active) + req.n > self.max_rows or req.n * pages_for(len(req.tokens) + 1) > len(self.pool.free):
                return
            self.waiting.popleft()
            req.order, self.admitted = self.admitted, self.admitted + 1
            req.rows = [Row(req, i, self.eng.device) for i in range(req.n)]
            for row in req.rows:
                self.place(row)
            req.rows[0].clones = req.rows[1:]  # one prefill of the prompt; the other samples copy it
            for row in req.rows[1:]:
                row.cached = None
            req.admitted.set()

    def place(self, row) -> bool:
        """Pages for the row's tokens (and the next) and a place in the batch, if the pool has them."""
        pages = self.pool.take(pages_for(len(row.tokens) + 1))
        if pages is None:
            return False
        row.pages = pages
        self.active.append(row)
        return True

    def finish(self, row, error=None):
        """The row is done (stop token, max tokens, cancelled or failed): its pages go back at once."""
        for r in (self.active, self.preempted):
            if row in r:
                r.remove(row)
        self.pool.give(row.pages)
        for clone in row.clones:  # samples that never copied the prompt end with it
            self.finish(clone, error)
        row.clones = []
        if not row.finished:
            row.finished = True
            row.events.put(error)
        with self.cond:  # room for a submit that waits (the lock is reentrant: callers may hold it)
            self.cond.notify_all()

    def grow(self, rows, T):
        """Pages for T more tokens in each row, oldest first; while the pool is short the youngest
        other row gives its pages back and waits to be recomputed. Returns the rows that go on."""
        for row in sorted(rows, key=Row.order):
            if row not in self.active:
                continue
            need = pages_for(row.cached + T) - len(row.pages)
            while need > len(self.pool.free) and len(self.active) > 1:
                self.preempt(max((r for r in self.active if r is not row), key=Row.order))
            if need > 0:
                row.pages += self.pool.take(need)
        return [r for r in rows if r in self.active]

    def preempt(self, row):
        with self.cond:
            self.preemptions += 1
            self.active.remove(row)
            self.pool.give(row.pages)
            if row.cached is None:  # a sample waiting for its first sample's prefill prefills itself
                for r in row.request.rows:
                    if row in r.clones:
                        r.clones.remove(row)
            row.cached = 0
            self.preempted.append(row)

    def forward(self, rows, ids):
        """Logits (B, V) of the last fed position of each row, after feeding ids (B, T)."""
        T, width = len(ids[0]), max(len(r.pages) for r in rows)
        step = PagedStep(self.pool, [r.pages + [0] * (width - len(r.pages)) for r in rows], [r.cached for r in rows], T)
        logits = self.eng.forward(torch.tensor(ids, dtype=torch.long, device=self.eng.device), step)
        for r in rows:
            r.cached += T
        return logits

    def prefill(self) -> bool:
        """Up to PREFILL_CHUNK prompt tokens, oldest rows first, one forward a row: many short prompts
        that arrive together all start within a step or two, and a long one is fed in chunks."""
        budget, worked = PREFILL_CHUNK, False
        while budget > 0:
            rows = [r for r in self.active if r.cached is not None and len(r.tokens) - r.cached > 1]
            if not rows:
                break
            row = min(rows, key=Row.order)
            T = min(budget, len(row.tokens) - row.cached)
            if not self.grow([row], T):
                break
            logits = self.forward([row], [row.tokens[row.cached:row.cached + T]])
            if row.cached == len(row.tokens):
                self.emit([row], logits)
            budget, worked = budget - T, True
        return worked

    def decode(self) -> bool:
        """One token for every row with exactly its last token to feed (and no tool call pending)."""
        rows = self.grow([r for r in self.active if r.cached is not None and len(r.tokens) - r.cached == 1
                          and self.tool_done(r)], 1)
        if rows:
            self.emit(rows, self.forward(rows, [[r.tokens[-1]] for r in rows]))
        return bool(rows)

    def tool_done(self, row) -> bool:
        """No python call pending (a finished one's result is now forced); a call that raised ends its row."""
        if row.tool is None or not row.tool.done():
            return row.tool is None
        try:
            row.state.forced.extend(row.tool.result())
        except Exception as e:
            self.finish(row, e)
            return False
        row.tool = None
        return True

    def emit(self, rows, logits):
        """Each row's next token from its logits (B, V); a first sample's clones copy its prompt and
        sample from the same logits, each with its own generator."""
        for row, lg in zip(rows, logits):
            clones, row.clones = row.clones, []
            for clone in clones:
                self.pool.copy(row.pages, clone.pages, row.cached)
                clone.cached = row.cached
            for r in [row, *clones]:
                self.sample(r, lg[None])

    def sample(self, row, logits):
        """As Engine.generate: draw (so the generator advances every step), let a forced token override."""
        s = row.request.settings
        token = int(sample_next_token(logits, row.rng, s["temperature"], s["top_k"], s["top_p"])[0])
        forced = bool(row.state.forced)
        if forced:
            token = row.state.forced.popleft()
        if (code := self.eng.step_row(row.state, token)) is not None:
            row.tool = self.tools.submit(self.eng.tool_tokens, code)
            row.tool.add_done_callback(self.wake)
        row.tokens.append(token)
        row.generated += 1
        row.events.put((token, not forced))
        if row.state.done or row.generated >= s["max_tokens"]:
            self.finish(row)


def generate_all(eng, prompts, n=1, max_rows=MAX_ROWS, **settings):
    """Batcher.generate_batch in one pass over a Batcher made for it: KV pages for every row at the
    longest prompt plus its reply (not the whole context), closed after. The chat evals, SFT's
    held-out checks and RL's rollouts go through here."""
    if not prompts:
        return []
    reply = settings.get("max_tokens")
    reply = max(reply) if isinstance(reply, (list, tuple)) else reply or eng.model.max_positions
    max_rows = max(max_rows, n)
    rows = min(max_rows, len(prompts) * n)
    with Batcher(eng, max_rows, rows * min(eng.model.max_positions, max(map(len, prompts)) + reply + 1)) as b:
        return b.generate_batch(prompts, n, **settings)


def completion_text(tokenizer, ids) -> str:
    """What a grader reads of a reply: its tokens decoded, the stop tokens left out."""
    stop = {tokenizer.special(s) for s in STOP_TOKENS}
    return tokenizer.decode([t for t in ids if t not in stop])


def for_inference(model):
    """The model in eval mode and, where inference runs in bf16, with bf16 weights: a decode step reads
    every weight once, so this halves its memory traffic (fp32 master weights only matter to training).
    The rotary tables stay fp32. Only for a model nobody trains afterwards (serve, chat, benchmarks)."""
    if train.use_bf16(next(model.parameters()).device):
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    return model.eval()


def load_engine(source="sft", tag=None, step=None, device=None):
    """A checkpoint as (Engine, meta), through train.load_model(source, tag, step, device)."""
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

    def checkpoint(parser, source_help):
        parser.add_argument("--source", default="sft", type=train.source_type, help=source_help)
        parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
        parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    c = sub.add_parser("chat", help="chat with a checkpoint in the terminal (streams tokens)")
    checkpoint(c, "checkpoint stage: base (plain completion), mid, sft, rl, or hf:DIR")
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
    sub.add_parser("sandbox", help="which of the sandbox's protections this machine provides")
    e = sub.add_parser("export", help="a checkpoint as a Hugging Face folder (transformers, trust_remote_code; hf.py)")
    checkpoint(e, "base, mid, sft, rl (or hf:DIR)")
    e.add_argument("--out", required=True, help="the folder to write (written whole, or not at all)")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="of the exported weights")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    if args.command == "chat" and args.max_tokens < 1:
        parser.error(f"--max-tokens {args.max_tokens}: must be at least 1")
    if args.command == "chat" and args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p {args.top_p}: must be in (0, 1]")

    if args.command == "sandbox":
        layers = sandbox_layers()
        print(f"{'layer':<11} {'active':<7} {'protects':<76} applied")
        for name, what in layers.items():
            print(f"{name:<11} {'no' if what.startswith('no:') else 'yes':<7} {_LAYER_ROLES[name]:<76} {what}")
        print("every layer is active" if sandbox_complete(layers) else "some layers are missing: see 'applied'")
        return 0
    if args.command == "exec":
        code = sys.stdin.read() if args.code == "-" else args.code
        r = execute_code(code, timeout=args.timeout)
        print(r.stdout, end="")
        if not r.success:
            print(f"Error: {r.error}", file=sys.stderr)
        return 0 if r.success else 1
    if args.command == "export":
        import hf
        try:
            out = hf.export(args.source, args.tag, args.step, args.out, args.dtype, args.overwrite)
        except (OSError, ValueError, tok.DataError) as e:
            raise SystemExit(f"engine.py export: {e}") from None
        print(f"exported {args.source} to {out}: load it with transformers' AutoModelForCausalLM.from_pretrained"
              f"({str(out)!r}, trust_remote_code=True), or here with --source hf:{out}")
        return 0
    try:
        eng, meta = load_engine(args.source, args.tag, args.step, args.device)
    except (OSError, ValueError, tok.DataError) as e:  # no checkpoint, wrong tokenizer, ...
        raise SystemExit(f"engine.py chat: {e}") from None
    chat(eng, completion=(meta.get("stage") or args.source) == "base", prompt=args.prompt, temperature=args.temperature,
         top_k=args.top_k, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    return 0


if __name__ == "__main__":
    tok.run_main(main)
