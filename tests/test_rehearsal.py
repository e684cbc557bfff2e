"""`bash run.sh rehearsal`: the d12/speedrun path (shards over HTTP, the tokenizer, torchrun pretraining
with CORE from the downloaded bundle, CORE over every item, midtraining and SFT on the default mixture
through the Hugging Face parquet API, chat evals, the report) on CPU with 2 gloo ranks, every remote
source a local stand-in of the real protocol and schemas (tests/standin.py). About a minute on 2 cores;
alone: pytest -m rehearsal."""
import json, os, re, subprocess, sys
from pathlib import Path

import pytest

import chat_sft
import evals
import standin
import tok

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub(monkeypatch, speedchat_home):
    srv = standin.StandIn()
    monkeypatch.setattr(tok, "HF_ENDPOINT", srv.url)
    yield srv
    srv.close()


def test_standin_rows_read_and_grade_as_the_real_ones(hub):
    """Each stand-in dataset goes through the parquet API (list, 302, file) into its Task, and its gold
    answer grades 1.0: the schemas are the ones the Task classes read."""
    tasks = [evals.ARC("ARC-Easy", "test"), evals.ARC("ARC-Challenge", "train"), evals.MMLU("all", "test"),
             evals.MMLU("auxiliary_train", "train"), evals.GSM8K("main", "test"), evals.HumanEval()]
    for task in tasks:
        assert len(task) > 0
        for item in task[:3]:
            gold = item["messages"][-1]["content"]
            gold = gold if isinstance(gold, str) else "".join(part["text"] for part in gold)
            assert task.evaluate(item, gold) == 1.0, (task.name, item)
    talk = chat_sft.SmolTalk("train")
    assert len(talk) == standin.ROWS["train"] and talk[0]["messages"][0]["role"] == "system"  # as some real rows open
    assert any("/0001.parquet" in h for h in hub.hits)  # a split of two files, both read
    with pytest.raises(evals.EvalError, match="no subset 'ARC-Hard'"):
        evals.hf_parquet("allenai/ai2_arc", "ARC-Hard", "test")
    bundle = evals.ensure_bundle(hub.url + "/eval_bundle.zip")
    core = evals.parse_core_yaml((bundle / "core.yaml").read_text())
    assert len(core) == 22 and evals.load_baselines(bundle / "eval_meta_data.csv").keys() == {t["label"] for t in core}
    assert sum(len(evals.load_jsonl(bundle / "eval_data" / t["dataset_uri"], t["icl_task_type"])) for t in core) == standin.core_item_count()


@pytest.mark.rehearsal
@pytest.mark.heavy(55)
def test_rehearsal_runs_the_gpu_path_end_to_end(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "SPEEDCHAT_HOME": str(home), "SPEEDCHAT_PYTHON": sys.executable}
    env.pop("HF_ENDPOINT", None), env.pop("SPEEDCHAT_CORE_URL", None)  # run.sh starts the stand-in itself
    run = subprocess.run(["bash", "run.sh", "rehearsal"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "Traceback" not in out and "chat with it:" in run.stdout
    section = lambda name: json.loads((home / "report" / f"{name}.json").read_text())
    tokenizer, base, mid, sft = (section(n) for n in ("tokenizer", "base", "mid", "sft"))

    # every remote source came from the stand-in, through the real URL shapes
    hits = (home / "standin.log").read_text().split()
    val = standin.VAL_SHARD["climbmix-400b-shuffle"]
    for i in (0, 1, val):
        assert f"/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_{i:05d}.parquet" in hits
    assert "/eval_bundle.zip" in hits
    for repo, subset, split in [("HuggingFaceTB/smol-smoltalk", "default", "train"), ("cais/mmlu", "auxiliary_train", "train"),
                                ("allenai/ai2_arc", "ARC-Easy", "train"), ("openai/gsm8k", "main", "train"),
                                ("allenai/ai2_arc", "ARC-Challenge", "test"), ("cais/mmlu", "all", "test"),
                                ("openai/gsm8k", "main", "test"), ("openai/openai_humaneval", "openai_humaneval", "test")]:
        assert f"/api/datasets/{repo}/parquet/{subset}/{split}" in hits, (repo, subset, split)

    # each stage ran on 2 ranks; the tokenizer trained on the downloaded shards
    assert tokenizer["data"] == "climbmix" and tokenizer["vocab_size"] == 1024
    assert base["world_size"] == mid["world_size"] == sft["world_size"] == 2 and "torchrun" in base["launcher"]

    # CORE: a subsample during training, then every item of every task of the bundle
    assert base["CORE_subsample_items"] == 4 * len(standin.CORE_TASKS)
    assert base["CORE_tasks"] == len(standin.CORE_TASKS) == 22 and base["CORE_items"] == standin.core_item_count()
    assert -1 <= base["CORE"] <= 1

    # mid and SFT trained on the default mixture, with the stand-in's rows where it names a Hub dataset
    hub_rows = {"SmolTalk": standin.ROWS["train"], "MMLU": standin.ROWS["train"], "ARC-Easy": standin.ROWS["train"],
                "ARC-Challenge": standin.ROWS["train"], "GSM8K": standin.ROWS["train"]}
    for sec, k in ((mid, 0), (sft, 1)):  # MIXTURES rows: (label, factory, epochs in mid, epochs in sft)
        want = {label: round(epochs[k] * hub_rows[label]) for label, _, *epochs in chat_sft.MIXTURES["default"]
                if label in hub_rows and epochs[k] > 0}
        assert {t: sec["mixture_rows"][t] for t in want} == want and sec["conversations"] >= sum(sec["mixture_rows"].values())
        assert sec["num_iterations"] == 3 and sec["final_loss"] == sec["final_loss"]  # finite (not NaN)
    assert sft["epochs"] * sft["conversations"] >= sft["num_iterations"] * sft["total_batch_size"]  # rows were consumed

    # the chat evals ran every task of the default list, after mid and after SFT
    for task in chat_sft.EVAL_TASKS["default"].split(","):
        assert 0 <= mid[task] <= 1 and 0 <= sft[task] <= 1, task
    assert "ChatCORE" in sft

    # the report renders every section, the leaderboard's CORE, and no GPU cost for a CPU run
    report = (home / "report" / "report.md").read_text()
    for title in ("## Tokenizer", "## Base model", "## Midtraining", "## SFT", "## Summary", "## Time to GPT-2", "## Loss curves"):
        assert title in report and f"{title}\n\n-\n" not in report, title
    assert re.search(r"\| CORE \| -?[\d.]+ \| - \| - \| - \|", report)
    assert re.search(r"\| ARC-Easy \| - \| [\d.]+ \| [\d.]+ \| - \|", report)
    assert f"(22 tasks, {standin.core_item_count()} items)" in report and "Estimated cost" not in report

    # the model it made chats, as the last line says
    chat = subprocess.run([sys.executable, "engine.py", "chat", "--source", "sft", "-p", "Hello", "--max-tokens", "8"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-2000:]

    # run again: every stage is found done and skipped
    again = subprocess.run(["bash", "run.sh", "rehearsal"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "step 00001" not in again.stdout, (again.stdout + again.stderr)[-4000:]


@pytest.mark.rehearsal
@pytest.mark.heavy(4)
def test_a_failed_background_download_stops_the_run_with_its_error(tmp_path):
    """The shards after the first download in the background while the tokenizer trains: when that fails,
    run.sh says so (and why) instead of stopping without a word."""
    env = {**os.environ, "SPEEDCHAT_HOME": str(tmp_path), "SPEEDCHAT_PYTHON": sys.executable,
           "STANDIN_FLAGS": "--missing shard_00001"}
    env.pop("HF_ENDPOINT", None), env.pop("SPEEDCHAT_CORE_URL", None)
    run = subprocess.run(["bash", "run.sh", "rehearsal"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "error: the background download failed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    assert "shard_00001.parquet" in run.stdout.strip().splitlines()[-1]  # the download's own one-line error
    assert not (tmp_path / "data" / "climbmix" / "shard_00001.parquet").exists() and not (tmp_path / "report" / "base.json").exists()
