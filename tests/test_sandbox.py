"""engine.execute_code, the python tool's sandbox: what runs inside (the REPL, the standard library,
limits, output), and an attack suite: each case tries to get out and the test asserts that nothing
did (no secret in the answer, every outside file intact, the victim process alive, no connection
made). Most cases first undo the Python-level guards (RECOVER), so what holds is the kernel's layers.
The suite runs as the current user and, when the tests run as root, again with the caller itself
unprivileged (uid 65534, the sandbox's own path for an unprivileged server)."""
import dataclasses, json, os, secrets, shutil, socket, subprocess, sys, tempfile, threading, time

import pytest

import engine

NOBODY = engine.NOBODY
SECRET = "speedchat-secret-" + secrets.token_hex(8)

# Undo every Python-level guard the sandbox set up: modules back from sys.modules, the C functions
# behind os back from a fresh import of posix, io's originals back.
RECOVER = """
import sys, importlib
for _m in [m for m in list(sys.modules) if sys.modules[m] is None]:
    del sys.modules[_m]
del sys.modules['posix']
import posix, os, io, _io, builtins
importlib.reload(os)
io.open = builtins.open = _io.open
io.FileIO = _io.FileIO
"""


def _unprivileged_python():
    """An interpreter uid 65534 can run (this venv's may live under a root-only /root), or None."""
    for python in (sys.executable, "/usr/bin/python3"):
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([]), os.setresgid(NOBODY, NOBODY, NOBODY), os.setresuid(NOBODY, NOBODY, NOBODY)
                os.execv(python, [python, "-I", "-S", "-c", "import sys; sys.exit(sys.version_info < (3, 9))"])
            finally:
                os._exit(1)
        if os.waitpid(pid, 0)[1] == 0:
            return python
    return None


UNPRIVILEGED_PYTHON = _unprivileged_python() if os.geteuid() == 0 else None
CALLERS = ["current"] + (["unprivileged"] if os.geteuid() == 0 else [])


def run(caller, code, **kw):
    """execute_code(code) from this process, or from a fork of it that became uid 65534 first."""
    if caller == "current":
        return engine.execute_code(code, **kw)
    if UNPRIVILEGED_PYTHON is None:
        pytest.skip("no Python interpreter here that uid 65534 may run")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([]), os.setresgid(NOBODY, NOBODY, NOBODY), os.setresuid(NOBODY, NOBODY, NOBODY)
            engine.SANDBOX_PYTHON = UNPRIVILEGED_PYTHON
            os.write(w, json.dumps(dataclasses.asdict(engine.execute_code(code, **kw))).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return engine.ExecResult(**json.loads(data))


class World:
    """What an attack goes after, all of it reachable by uid 65534 were it not for the sandbox: a
    world-readable and -writable folder with a secret file and a target file, a secret in this
    process's environment and in $SPEEDCHAT_HOME, a victim process of uid 65534, a TCP server on
    127.0.0.1 and unix socket servers (a path and an abstract name) that count their connections."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="speedchat_attack_")
        os.chmod(self.dir, 0o777)
        self.secret_file, self.target = os.path.join(self.dir, "secret.txt"), os.path.join(self.dir, "target.txt")
        self.home = os.path.join(self.dir, "speedchat_home")
        os.makedirs(self.home)
        os.chmod(self.home, 0o777)
        self.home_secret = os.path.join(self.home, "token.txt")
        self.reset()
        user = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if os.geteuid() == 0 else []
        self.victim = subprocess.Popen(user + ["sleep", "600"])
        self.connections = []
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.unix_path = os.path.join(self.dir, "server.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)
        self.abstract_name = "speedchat-attack-" + secrets.token_hex(4)
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind("\0" + self.abstract_name)
        for server in (self.tcp, self.unix, self.abstract):
            server.listen()
            threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server):
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            self.connections.append(server)
            conn.close()

    def reset(self):
        for path, text in ((self.secret_file, SECRET), (self.target, "keep"), (self.home_secret, SECRET)):
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o666)

    def fill(self, code: str) -> str:
        for key, value in (("SECRET_FILE", self.secret_file), ("TARGET", self.target), ("WORLD", self.dir),
                           ("HOME_SECRET", self.home_secret), ("VICTIM", str(self.victim.pid)), ("PORT", str(self.port)),
                           ("UNIX_PATH", self.unix_path), ("ABSTRACT", self.abstract_name), ("CALLER", str(os.getpid()))):
            code = code.replace(key, value)
        return code

    def assert_contained(self, r, what):
        told = f"{r.stdout}\n{r.stderr}\n{r.error}"
        assert SECRET not in told, (what, told[:500])
        with open(self.target) as f:
            assert f.read() == "keep", what
        assert os.stat(self.target).st_mode & 0o777 == 0o666, what
        with open(self.home_secret) as f:
            assert f.read() == SECRET, what
        assert sorted(os.listdir(self.dir)) == ["secret.txt", "server.sock", "speedchat_home", "target.txt"], (what, os.listdir(self.dir))
        assert self.victim.poll() is None, f"{what}: the victim was killed"
        assert not self.connections, f"{what}: a connection reached a server outside"
        assert not [p for p in _sandbox_processes()], f"{what}: a sandbox process outlived the call"

    def close(self):
        self.victim.kill()
        self.victim.wait()
        for server in (self.tcp, self.unix, self.abstract):
            server.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _sandbox_processes():
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "_sandbox_main()" in line]


@pytest.fixture(scope="module")
def world():
    w = World()
    old = {k: os.environ.get(k) for k in ("SPEEDCHAT_ATTACK_SECRET", "SPEEDCHAT_HOME")}
    os.environ.update(SPEEDCHAT_ATTACK_SECRET=SECRET, SPEEDCHAT_HOME=w.home)  # the server's secrets
    yield w
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    w.close()


# (name, code): each must leave the world as it was and tell no secret, whatever it prints
ATTACKS = [
    # the server's environment and /proc
    ("environment", "import os\nprint(dict(os.environ))"),
    ("parent_environ", "import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())"),
    ("caller_environ", "print(open('/proc/CALLER/environ', 'rb').read())"),
    ("proc_1_environ", "print(open('/proc/1/environ', 'rb').read())"),
    ("proc_scan", "import os\nfor p in os.listdir('/proc'):\n    try: print(open(f'/proc/{p}/environ', 'rb').read())\n    except Exception: pass"),
    ("proc_recovered", RECOVER + "fd = posix.open('/proc/CALLER/environ', 0)\nprint(posix.read(fd, 100000))"),
    ("proc_cmdline_and_maps", "print(open('/proc/CALLER/cmdline', 'rb').read(), open('/proc/CALLER/maps').read()[:200])"),
    ("proc_ctypes", RECOVER + "import ctypes\nlibc = ctypes.CDLL(None)\nfd = libc.open(b'/proc/CALLER/environ', 0)\n"
                              "buf = ctypes.create_string_buffer(100000)\nn = libc.read(fd, buf, 100000)\nprint(fd, buf.raw[:max(n, 0)])"),
    # reading outside files
    ("read_file", "print(open('SECRET_FILE').read())"),
    ("read_os_open", RECOVER + "print(os.read(os.open('SECRET_FILE', os.O_RDONLY), 100))"),
    ("read_fileio", RECOVER + "print(io.FileIO('SECRET_FILE').read())"),
    ("read_speedchat_home", "import os\nprint(open(os.path.join('WORLD', 'speedchat_home', 'token.txt')).read())"),
    ("read_listdir", "import os\nprint(os.listdir('WORLD'), os.listdir('/'), os.listdir('/tmp'))"),
    ("read_etc", "print(open('/etc/passwd').read(), open('/etc/shadow').read())"),
    ("read_via_symlink", RECOVER + "posix.symlink('SECRET_FILE', 'link')\nprint(open('link').read())"),
    ("read_via_hardlink", RECOVER + "posix.link('SECRET_FILE', 'hard')\nprint(open('hard').read())"),
    # changing outside files, by every route
    ("write_open", "open('TARGET', 'w').write('x')"),
    ("write_open_recovered", RECOVER + "open('TARGET', 'w').write('x')"),
    ("write_fileio", "import io\nio.FileIO('TARGET', 'w')"),
    ("write_fileio_recovered", RECOVER + "io.FileIO('TARGET', 'w').write(b'x')"),
    ("write_os_open_trunc", RECOVER + "os.open('TARGET', os.O_WRONLY | os.O_TRUNC)"),
    ("write_os_open_rdwr", RECOVER + "fd = os.open('TARGET', os.O_RDWR)\nos.write(fd, b'xxxx')"),
    ("write_append", RECOVER + "open('TARGET', 'a').write('x')"),
    ("truncate", RECOVER + "posix.truncate('TARGET', 0)"),
    ("unlink", RECOVER + "posix.unlink('TARGET')"),
    ("rename_out", RECOVER + "posix.rename('TARGET', 'stolen')"),
    ("rename_in", RECOVER + "open('mine', 'w').write('x')\nposix.replace('mine', 'TARGET')"),
    ("chmod", RECOVER + "posix.chmod('TARGET', 0o600)"),
    ("utime_and_chown", RECOVER + "posix.utime('TARGET', (0, 0))\nposix.chown('TARGET', 0, 0)"),
    ("create_outside", RECOVER + "open('WORLD/new.txt', 'w').write('x')"),
    ("mkdir_outside", RECOVER + "posix.mkdir('WORLD/newdir')"),
    ("rmtree_outside", RECOVER + "import shutil\nshutil.rmtree('WORLD')"),
    ("write_ctypes", RECOVER + "import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.truncate(b'TARGET', 0), libc.unlink(b'TARGET'))"),
    ("write_tmp", RECOVER + "open('/tmp/speedchat_attack_escape', 'w').write('x')\nprint(posix.listdir('/tmp'))"),
    # signals
    ("kill_victim", "import os\nos.kill(VICTIM, 9)"),
    ("kill_victim_recovered", RECOVER + "posix.kill(VICTIM, 9)"),
    ("kill_all", RECOVER + "posix.kill(-1, 9)"),
    ("kill_parent", RECOVER + "posix.kill(os.getppid(), 9)\nposix.kill(CALLER, 9)"),
    ("kill_ctypes", RECOVER + "import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.kill(VICTIM, 9), libc.kill(CALLER, 9))"),
    ("killpg", RECOVER + "posix.killpg(posix.getpgid(VICTIM), 9)"),
    # sockets of every family
    ("tcp_connect", "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=1)"),
    ("tcp_recovered", RECOVER + "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=1)"),
    ("tcp6_recovered", RECOVER + "import socket\ns = socket.socket(socket.AF_INET6)\ns.settimeout(1)\ns.connect(('::ffff:127.0.0.1', PORT))"),
    ("udp_recovered", RECOVER + "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', PORT))"),
    ("netlink", RECOVER + "import socket\nsocket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)"),
    ("packet", RECOVER + "import socket\nsocket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)"),
    ("unix_path", RECOVER + "import socket\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(1)\ns.connect('UNIX_PATH')"),
    ("unix_abstract", RECOVER + "import socket\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(1)\ns.connect('\\0ABSTRACT')"),
    ("socket_ctypes", RECOVER + "import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.socket(2, 1, 0))"),
    # processes: forks, grandchildren, threads
    ("fork_bomb", "import os\nwhile True:\n    os.fork()"),
    ("fork_bomb_recovered", RECOVER + "while True:\n    posix.fork()"),
    ("subprocess", RECOVER + "import subprocess\nsubprocess.run(['kill', '-9', 'VICTIM'])"),
    ("posix_spawn", RECOVER + "posix.posix_spawn('/bin/sh', ['sh', '-c', 'kill -9 VICTIM'], {})"),
    ("exec", RECOVER + "posix.execv('/bin/sh', ['sh', '-c', 'kill -9 VICTIM'])"),
    ("setsid_grandchild", RECOVER + "pid = posix.fork()\nif pid == 0:\n    posix.setsid()\n    import time\n    time.sleep(60)"),
    ("threads_outlive", "import threading, time\nfor _ in range(8):\n    threading.Thread(target=time.sleep, args=(60,)).start()\ntime.sleep(60)"),
    ("threads_left_running", "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\nprint('done')"),
    # the guards' modules, recovered by other routes
    ("subclasses", "c = [k for k in ().__class__.__base__.__subclasses__() if k.__name__ in ('FileIO', 'Popen')]\n"
                   "print([k('TARGET', 'w') for k in c if k.__name__ == 'FileIO'])"),
    ("importlib", "import importlib.util, sys\nspec = importlib.util.find_spec('_posixsubprocess')\n"
                  "m = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(m)\nprint(m)"),
    ("ctypes_syscalls", RECOVER + "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                                  "print([libc.ptrace(16, VICTIM, 0, 0), libc.mount(b'none', b'/tmp', b'tmpfs', 0, None),\n"
                                  "       libc.unshare(0x10000000), libc.syscall(321, 0, 0, 0), libc.syscall(250, 0, 0),\n"
                                  "       libc.syscall(425, 1, 0), libc.syscall(246, 0, 0, 0, 0)])"),
    ("chroot_escape", RECOVER + "posix.mkdir('x')\nposix.chroot('x')\nposix.chdir('../../../../..')\nposix.chroot('.')\n"
                                "print(open('SECRET_FILE').read())"),
    # filling memory and disk
    ("memory", "x = bytearray(10 * 2**30)"),
    ("memory_threads", "import threading\nout = []\nts = [threading.Thread(target=lambda: out.append(bytearray(400 * 2**20))) for _ in range(8)]\n"
                       "[t.start() for t in ts]\n[t.join() for t in ts]\nprint(len(out))"),
    ("disk_one_file", "open('big', 'wb').write(b'x' * 200 * 2**20)"),
    ("disk_many_files", "for i in range(20):\n    open(f'f{i}', 'wb').write(b'x' * 15 * 2**20)"),
    # floods of output
    ("output_flood", "print('x' * 10**8)"),
    ("answer_channel_flood", RECOVER + "while True:\n    posix.write(3, b'x' * 65536)"),
]


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("name, code", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_contained(world, caller, name, code):
    world.reset()
    world.connections.clear()
    t0 = time.time()
    r = run(caller, world.fill(code), timeout=3.0)
    assert time.time() - t0 < 8, f"{name}: took {time.time() - t0:.1f}s"
    world.assert_contained(r, name)


@pytest.mark.parametrize("caller", CALLERS)
def test_recover_really_undoes_the_python_guards(caller):
    """So that the attacks above meet the kernel's layers, not only the Python ones."""
    r = run(caller, RECOVER + "open('a', 'w').write('x')\nposix.unlink('a')\n"
                              "import socket, ctypes\nprint(type(posix.kill).__name__, type(posix.fork).__name__, socket.socket, ctypes.CDLL)")
    assert r.success and "builtin_function_or_method builtin_function_or_method" in r.stdout, r


@pytest.mark.parametrize("caller", CALLERS)
def test_the_standard_library_works_inside(caller):
    code = ("import random, statistics, threading, logging, queue, tempfile, shutil, json, re, math, fractions, decimal\n"
            "import datetime, itertools, collections, heapq, bisect, functools, os\n"
            "from concurrent.futures import ThreadPoolExecutor\n"
            "r = []\nts = [threading.Thread(target=r.append, args=(i,)) for i in range(8)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "with ThreadPoolExecutor(4) as ex: assert list(ex.map(abs, [-1, -2])) == [1, 2]\n"
            "with tempfile.NamedTemporaryFile('w+') as f:\n    f.write('abc'); f.seek(0); assert f.read() == 'abc'\n"
            "d = tempfile.mkdtemp(); open(os.path.join(d, 'x'), 'w').write('y'); shutil.copy(os.path.join(d, 'x'), 'z'); shutil.rmtree(d)\n"
            "os.makedirs('a/b'); os.rename('a/b', 'a/c'); os.rmdir('a/c')\n"
            "logging.getLogger('t').warning('w'); q = queue.Queue(); q.put(1)\n"
            "print(sorted(r), statistics.median([3, 1, 2]), random.Random(1).randint(0, 9), fractions.Fraction(1, 3) * 3,\n"
            "      decimal.Decimal('0.1') + decimal.Decimal('0.2'), json.loads('[1]'), re.sub('a', 'b', 'aa'), math.comb(5, 2),\n"
            "      datetime.date(2026, 1, 1).isoformat(), list(itertools.islice(itertools.count(), 3)), heapq.nsmallest(1, [3, 1]),\n"
            "      bisect.bisect([1, 3], 2), functools.reduce(int.__add__, [1, 2]), collections.Counter('aab')['a'], q.get())\n"
            "os.getcwd()")
    r = run(caller, code)
    assert r.success, r.error
    out, cwd = r.stdout.splitlines()
    assert out == "[0, 1, 2, 3, 4, 5, 6, 7] 2 2 1 0.3 [1] bb 10 2026-01-01 [0, 1, 2] [1] 1 3 2 1"
    assert "speedchat_sandbox_" in cwd and not os.path.exists(cwd.strip("'"))  # the private directory is gone


def test_repl_semantics_errors_and_early_exits():
    r = engine.execute_code("x = 6\nprint('hello')\nx * 7")
    assert r.success and r.error is None and r.stdout == "hello\n42\n"
    assert engine.execute_code("12*7").stdout.strip() == "84"
    r = engine.execute_code("1/0")
    assert not r.success and r.error.startswith("ZeroDivisionError")
    r = engine.execute_code("def f(:\n")
    assert not r.success and r.error.startswith("SyntaxError")
    for code in ("import sys\nsys.exit(0)", "raise SystemExit", "import os\nos._exit(0)", "print('x')\nimport sys\nsys.exit()"):
        r = engine.execute_code(code)  # a program that ends early did not succeed
        assert not r.success and r.error, code
    r = engine.execute_code("import sys\nsys.setrecursionlimit(10**6)\ndef f(n): return f(n + 1)\nf(0)")
    assert not r.success and r.error  # a RecursionError or a dead process, never an exception here


def test_limits_time_memory_output():
    t0 = time.time()
    r = engine.execute_code("while True:\n    pass", timeout=1.0)
    assert time.time() - t0 < 5 and not r.success and r.timed_out and "Timeout" in r.error
    r = engine.execute_code("x = bytearray(10 * 2**30)\nprint('allocated')")
    assert not r.success and r.error.startswith("MemoryError") and "allocated" not in r.stdout
    r = engine.execute_code("print('x' * 100_000_000)", max_output=10_000)
    assert not r.success and "OutputLimitExceeded" in r.error and len(r.stdout) == 10_000
    r = engine.execute_code("import sys\nsys.__stdout__.write('y' * 10**7)\nprint('ok')")
    assert r.success and r.stdout == "ok\n"  # bytes past our capture never reach the parent
    r = engine.execute_code(f"with open('big', 'wb') as f:\n    f.write(b'x' * {engine.SANDBOX_FILE_BYTES + 1})")
    assert not r.success and "File too large" in r.error, r.error
    r = engine.execute_code("for i in range(8):\n    with open(f'f{i}', 'wb') as f:\n        f.write(b'x' * 15 * 2**20)")
    assert not r.success and "No space left" in r.error, r.error  # the private directory's cap, in all


def test_output_that_is_not_utf8_comes_back_escaped(capsys):
    r = engine.execute_code("print('\\ud800')\nimport sys\nsys.stdout.write(b'\\xff'.decode('utf-8', 'surrogateescape'))")
    assert r.success and r.stdout.startswith("\\ud800\n\\udcff")
    r.stdout.encode("utf-8")  # never raises
    assert engine.main(["exec", "print('\\udcff')"]) == 0
    assert capsys.readouterr().out == "\\udcff\n"


def test_every_layer_is_reported_and_the_command_prints_them(capsys):
    layers = engine.sandbox_layers()
    assert list(layers) == list(engine.SANDBOX_LAYERS) and all(isinstance(v, str) and v for v in layers.values())
    assert engine.main(["sandbox"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in engine.SANDBOX_LAYERS)
    if _kernel_has_everything():  # this project's machines: Linux with user namespaces, Landlock and seccomp
        assert engine.sandbox_complete(layers), layers
        assert "every layer is active" in out and "ABI" in layers["landlock"]


def _kernel_has_everything():
    import ctypes
    libc = ctypes.CDLL(None)
    userns = open("/proc/sys/user/max_user_namespaces").read().strip() != "0" if os.path.exists("/proc/sys/user/max_user_namespaces") else False
    return sys.platform == "linux" and userns and libc.syscall(444, None, 0, 1) >= 1


@pytest.mark.parametrize("without", [("namespaces",), ("landlock",), ("seccomp",), ("namespaces", "landlock", "seccomp")])
def test_a_missing_layer_degrades_to_the_others(world, without):
    """A machine that lacks a mechanism (a container without namespaces, an old kernel): the tool still
    runs and reports what is missing; with one layer gone, the others still contain these attacks."""
    r = engine.execute_code("import json\nprint(json.dumps({'ok': 1}))", without=without)
    assert r.success and r.stdout == '{"ok": 1}\n'
    assert all(r.layers[name] == "no: left out" for name in without)
    assert not any(v.startswith("no:") for k, v in r.layers.items() if k not in without and k != "tmpfs")
    if len(without) > 1:
        return  # only uid 65534's file modes and the Python guards are left: no containment to assert
    for name in ("read_file", "write_fileio_recovered", "unlink", "kill_victim_recovered", "tcp_recovered", "proc_recovered"):
        world.reset()
        world.connections.clear()
        world.assert_contained(engine.execute_code(world.fill(dict(ATTACKS)[name]), timeout=3.0, without=without), name)
