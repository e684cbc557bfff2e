"""
bench/bad_input_bench.py: how bad data and damaged checkpoints end (issue 18), and what the checksums cost
(prints figures; not a test).

    python bench/bad_input_bench.py schema          # tok.download against shards without a 'text' column
    python bench/bad_input_bench.py damage          # 4 checkpoint files x 6 damages x chat / serve / resume
    python bench/bad_input_bench.py damage --legacy # the same on a checkpoint whose meta.json has no checksums
    python bench/bad_input_bench.py hash            # sha256 throughput, and its cost per save of a d20 model

`schema` times the download until its error and counts the requests the server saw (a format error must
not be retried). `damage` trains a tiny model for 6 steps in a temporary SPEEDCHAT_HOME, then damages one
file of its checkpoint at a time and runs each command on it: a damaged model.safetensors or meta.json must end
in one line naming the file with exit status 2, for all three; a damaged optimizer or RNG state must
stop only `train.py --resume` (inference never reads it: serve then serves until the bench stops it).
"""
import argparse, hashlib, io, json, os, pickle, shutil, subprocess, sys, tempfile, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch

import hf, tok

FILES = ("model.safetensors", "meta.json", "optim_rank0.pt", "state_rank0.pt")
DAMAGES = ("truncated", "empty", "garbage", "pickle", "wrongshape", "flip")
TINY = ["--depth", "1", "--n-embd", "64", "--n-head", "2", "--max-seq-len", "64", "--device-batch-size", "4",
        "--total-batch-size", "256", "--num-iterations", "6", "--eval-every", "3", "--sample-every", "-1",
        "--core-metric-every", "0", "--tag", "one"]


def schema(shards: int, workers: int):
    import pyarrow as pa, pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.table({"body": ["x"] * 100}), buf)
    body, seen = buf.getvalue(), []

    class Shards(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_GET(self):
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Shards)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    t0 = time.perf_counter()
    try:
        tok.download(shards, "climbmix", workers=workers, base_url=f"http://127.0.0.1:{srv.server_port}")
        print("downloaded: the server's shards were taken as good")
    except tok.DataError as e:
        print(f"-n {shards} --workers {workers}: {time.perf_counter() - t0:.2f} s, {len(seen)} requests: {e}")


def damage(path: Path, how: str) -> bool:
    b = path.read_bytes()
    if how == "truncated": path.write_bytes(b[: len(b) // 2])
    elif how == "empty": path.write_bytes(b"")
    elif how == "garbage": path.write_bytes(os.urandom(len(b)))
    elif how == "pickle": path.write_bytes(pickle.dumps({"x": 1}))
    elif how == "flip": path.write_bytes(b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 1]) + b[len(b) // 2 + 1:])
    elif how == "wrongshape":  # a well-formed file holding a tensor of the wrong shape
        st = path.suffix == ".safetensors"
        sd = hf.load_safetensors(path) if st else torch.load(path, weights_only=True) if path.suffix == ".pt" else None
        key = next((k for k, v in sd.items() if torch.is_tensor(v)), None) if isinstance(sd, dict) else None
        if key is None:
            return False
        sd[key] = torch.zeros(3, 5)
        hf.save_safetensors(sd, path) if st else torch.save(sd, path)
    return True


def damage_matrix(legacy: bool, serve_seconds: float):
    home = Path(tempfile.mkdtemp(prefix="speedchat-damage-"))
    env = {**os.environ, "SPEEDCHAT_HOME": str(home)}
    data = home / "cats.jsonl"
    data.write_text("".join(json.dumps({"text": f"The cat number {i} sat on the mat. " * 30}) + "\n" for i in range(200)))
    run = lambda argv, **kw: subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, **kw)
    for argv in (["tok.py", "train", "--data", str(data), "--vocab-size", "300"], ["train.py", *TINY, "--data", str(data)]):
        r = run(argv)
        assert r.returncode == 0, r.stderr
    step = next((home / "checkpoints/base/one").glob("step_*"))
    pristine = home / "pristine"
    shutil.copytree(step, pristine)
    if legacy:  # as a checkpoint saved before checksums: the loaders' own checks must hold
        meta = json.loads((pristine / "meta.json").read_text())
        meta.pop("files")
        (pristine / "meta.json").write_text(json.dumps(meta))
    commands = {"chat": ["engine.py", "chat", "--source", "base", "--tag", "one", "-p", "the cat", "--max-tokens", "4"],
                "serve": ["serve.py", "--source", "base", "--tag", "one", "--port", "0"],
                "resume": ["train.py", *TINY, "--data", str(data), "--resume"]}
    n = good = 0
    for name in FILES:
        for how in DAMAGES:
            for cmd, argv in commands.items():
                shutil.rmtree(step.parent)  # a resume that succeeded saved later steps: back to this one alone
                shutil.copytree(pristine, step)
                if not damage(step / name, how):
                    continue
                try:
                    r = run(argv, timeout=serve_seconds if cmd == "serve" else 300)
                    rc, err = r.returncode, r.stderr
                except subprocess.TimeoutExpired:
                    rc, err = "serving", ""
                last = (err.strip().splitlines() or [""])[-1]
                if cmd != "resume" and name in ("optim_rank0.pt", "state_rank0.pt"):
                    ok = rc in (0, "serving")  # inference never reads the training state
                else:
                    ok = rc == 2 and name in last and "Traceback" not in err
                n, good = n + 1, good + ok
                print(f"{'ok ' if ok else 'BAD'} {name:15} {how:10} {cmd:6} rc={rc} {last[:140]}", flush=True)
    print(f"{good}/{n} as required{' (legacy: no checksums)' if legacy else ''}")
    shutil.rmtree(home)


def hash_cost(mb: int):
    blob = os.urandom(mb << 20)
    t0 = time.perf_counter()
    hashlib.sha256(blob).hexdigest()
    rate = mb / (time.perf_counter() - t0)
    import train
    cfg = train.GPTConfig(n_layer=20, n_embd=1280, n_head=10, n_kv_head=10, vocab_size=32768)
    with torch.device("meta"):
        params = sum(p.numel() for p in train.GPT(cfg).parameters())
    size = params * 4 / 2**20  # model.safetensors holds fp32 weights
    print(f"sha256: {rate:.0f} MB/s on this machine; a d20 model.safetensors ({params / 1e6:.0f} M params, {size:.0f} MB): "
          f"{size / rate:.2f} s to hash, once on save and once on load")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("schema")
    s.add_argument("-n", type=int, default=1)
    s.add_argument("--workers", type=int, default=1)
    d = sub.add_parser("damage")
    d.add_argument("--legacy", action="store_true")
    d.add_argument("--serve-seconds", type=float, default=25.0, help="how long a serve that starts may run")
    h = sub.add_parser("hash")
    h.add_argument("--mb", type=int, default=512)
    a = ap.parse_args()
    if a.what == "schema":
        schema(a.n, a.workers)
    elif a.what == "damage":
        damage_matrix(a.legacy, a.serve_seconds)
    else:
        hash_cost(a.mb)
