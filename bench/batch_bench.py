"""
bench/batch_bench.py: a chat eval and RL steps before and after continuous batching (issue 24).

    bash run.sh smoke                      # once: a toy SFT checkpoint in $SPEEDCHAT_HOME (tag toy)
    python bench/batch_bench.py            # the eval and the RL steps in this tree and in commit --before

"Before" is a copy of commit --before (c51823b: each prompt generated on its own, one after another),
extracted with `git archive` into a temporary folder; "after" is this tree. Both run the same CLI
commands on the same checkpoint, one after the other, on this machine:
  eval   evals.py chat -a ToyMath --max-problems N: GSM8K-style word problems (the calculator tool,
         "#### answer" graded), greedy, N = 256 by default; the wall time of the whole command and
         the accuracy it prints (the two must agree: greedy decoding is the same either way)
  rl     chat_rl.py --task toy --num-steps 20 (8 prompts x 8 samples a step, no held-out evals), from
         the SFT checkpoint into a tag of its own; the whole command's wall time
Ends with one JSON line of all the figures.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(cmd, cwd, env):
    t = time.perf_counter()
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"batch_bench.py: {' '.join(cmd)} failed in {cwd}:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    return time.perf_counter() - t, run.stdout


def main(argv=None):
    p = argparse.ArgumentParser(description="a chat eval and RL steps, before and after continuous batching")
    p.add_argument("--before", default="c51823b", help="the commit that generates one prompt at a time")
    p.add_argument("--tag", default="toy", help="the SFT checkpoint's tag in $SPEEDCHAT_HOME")
    p.add_argument("--problems", type=int, default=256, help="ToyMath problems in the eval")
    p.add_argument("--rl-steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    home = os.environ.get("SPEEDCHAT_HOME", os.path.expanduser("~/.cache/speedchat"))
    if not os.path.isdir(os.path.join(home, "checkpoints", "sft", args.tag)):
        raise SystemExit(f"batch_bench.py: no SFT checkpoint '{args.tag}' in {home}: run `bash run.sh smoke` first")
    env = {**os.environ, "SPEEDCHAT_HOME": home, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    py = sys.executable
    figures = {"bench": "batch", "before": args.before, "problems": args.problems, "rl_steps": args.rl_steps}
    with tempfile.TemporaryDirectory() as tmp:
        before = os.path.join(tmp, "before")
        os.mkdir(before)
        archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
        for name, tree in (("before", before), ("after", ROOT)):
            eval_s, out = timed([py, "evals.py", "chat", "--source", "sft", "--tag", args.tag, "-a", "ToyMath",
                                 "--max-problems", str(args.problems), "--device", args.device], tree, env)
            acc = float(re.search(r"ToyMath\s+([\d.]+)", out).group(1))
            rl_s, _ = timed([py, "chat_rl.py", "--task", "toy", "--init-from", "sft", "--init-tag", args.tag,
                             "--tag", f"bench-{name}", "--num-steps", str(args.rl_steps), "--prompts-per-step", "8",
                             "--samples-per-prompt", "8", "--eval-examples", "0", "--eval-every", "0",
                             "--save-every", "0", "--device", args.device], tree, env)
            figures[name] = {"eval_s": round(eval_s, 1), "eval_acc": acc, "rl_s": round(rl_s, 1)}
            print(f"{name:>6}: eval of {args.problems} problems {eval_s:6.1f} s (ToyMath {acc:.4f}) | "
                  f"{args.rl_steps} RL steps {rl_s:6.1f} s", flush=True)
    b, a = figures["before"], figures["after"]
    print(f"speedup: eval {b['eval_s'] / a['eval_s']:.2f}x, RL {b['rl_s'] / a['rl_s']:.2f}x")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
