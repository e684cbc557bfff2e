"""The GPU configuration, rehearsed on CPU: what train.py runs on CUDA (torch.compile of the model
with fullgraph and of the Muon orthogonalization, bf16 autocast, flex attention with sliding-window
block masks, GQA at head_dim 128), as far as CPU torch can run it. What CPU torch cannot run:
flex attention's backward (so training here compiles the SDPA path; flex is checked forward only,
compiled), NCCL (the sharded optimizer runs on gloo: test_train's two-process tests, one at head_dim
128 with GQA), CUDA graphs and the GPU kernels themselves (triton). The sizes are small: compiling
costs about a minute on 2 cores."""
import json

import pytest
import torch

import engine
import train
from _helpers_train import make_corpus, make_tokenizer, scramble, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# head_dim 128 and GQA (2 query heads, 1 key/value head), a sliding-window layer then a full one
GPU_LIKE = ["--depth", "2", "--n-embd", "256", "--n-head", "2", "--n-kv-head", "1", "--window-pattern", "SL",
            "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512", "--num-iterations", "6",
            "--eval-every", "2", "--eval-tokens", "512", "--sample-every", "-1", "--core-metric-every", "0"]


def _log(tag):
    return [json.loads(l) for l in (train.checkpoint_root("base") / tag / "log.jsonl").read_text().splitlines()]


@pytest.mark.heavy(80)
def test_compiled_bf16_training_matches_eager_fp32_without_breaks_or_recompiles(tmp_path, speedchat_home):
    make_tokenizer()
    corpus = str(make_corpus(tmp_path / "corpus.jsonl", 1100, max_words=20))
    train.main(GPU_LIKE + ["--data", corpus, "--tag", "eager", "--compile", "off", "--dtype", "fp32"])
    counters = torch._dynamo.utils.counters
    breaks, graphs = sum(counters["graph_break"].values()), train.compiled_graphs()
    train.main(GPU_LIKE + ["--data", corpus, "--tag", "gpu", "--compile", "on", "--dtype", "bf16"])
    report = json.loads((speedchat_home / "report" / "base.json").read_text())
    assert report["compiled"] and report["dtype"] == "bf16" and report["attention"] == "sdpa"
    # the model (training and evaluation) and every Muon group shape were compiled once, as whole graphs
    assert train.compiled_graphs() - graphs >= 3 and sum(counters["graph_break"].values()) == breaks
    # no recompilation after the first step: 6 training steps, evaluations at steps 0, 2, 4 and 6
    assert report["recompiles"] == 0
    eager, gpu = _log("eager"), _log("gpu")
    for a, b in zip(eager, gpu):
        assert a["step"] == b["step"]
        for key in ("loss", "val_bpb"):
            if key in a:  # bf16 autocast against fp32: within bf16's tolerance
                assert b[key] == pytest.approx(a[key], rel=0.02), (key, a["step"], a[key], b[key])
    assert sum("val_bpb" in e for e in gpu) == 4 and sum("loss" in e for e in gpu) == 6


@pytest.mark.heavy(40)
def test_flex_attention_with_sliding_windows_compiled_forward_matches_sdpa():
    torch.manual_seed(0)
    model = scramble(tiny_model(sequence_len=64, n_embd=256, n_head=2, n_kv_head=1, window_pattern="SL")).eval()
    x = torch.randint(0, 300, (2, 64))
    with torch.no_grad():
        ref = model(x)  # SDPA, eager, fp32
        model.set_attention("flex", "cpu")
        assert sorted(model.block_masks) == [16, 64]  # one block mask per window, at the training length
        flex = torch.compile(model, dynamic=False, fullgraph=True)
        torch.testing.assert_close(flex(x), ref, atol=2e-5, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert (flex(x) - ref).abs().max() < 0.05 * ref.abs().max()
        # another length (an evaluation prompt) runs SDPA in attend(), compiled or not
        torch.testing.assert_close(model(x[:, :40]), ref[:, :40], atol=2e-5, rtol=1e-4)


def test_engine_decode_in_bf16_matches_fp32(monkeypatch):
    import copy
    tokenizer = make_tokenizer(save=False)
    model = scramble(tiny_model(vocab_size=tokenizer.vocab_size, sequence_len=32, n_embd=256, n_head=2, n_kv_head=1)).eval()
    monkeypatch.setattr(engine.train, "use_bf16", lambda device: True)  # as on a bf16 GPU: serve loads bf16 weights
    served = engine.for_inference(copy.deepcopy(model))
    assert all(p.dtype == torch.bfloat16 for p in served.parameters()) and served.rope_cos.dtype == torch.float32
    prompt = torch.tensor([tokenizer.encode("the cat sat on the mat and then", prepend=tokenizer.bos_id)])
    fed, out = None, {}
    for name, m, bf16 in (("fp32", model, False), ("bf16", model, True), ("bf16 weights", served, True)):
        eng = engine.Engine(m, tokenizer, bf16=bf16)  # bf16 is fed the tokens fp32 chose: the same sequence
        kv = eng.new_cache(1, prompt.size(1) + 40)
        with torch.inference_mode():
            logits = [eng.forward(prompt, kv)]
            fed = fed or [int(logits[0].argmax())]
            for i in range(40):  # decode past the sliding window (8) and the training length (32)
                logits.append(eng.forward(torch.tensor([[fed[i]]]), kv))
                if len(fed) < 40:
                    fed.append(int(logits[-1].argmax()))
        assert (kv.k.dtype == torch.bfloat16) == bf16
        out[name] = torch.cat(logits).float()
    scale = out["fp32"].abs().max()
    assert (out["bf16"] - out["fp32"]).abs().max() < 0.03 * scale  # bf16's ~3 significant digits
    assert (out["bf16 weights"] - out["fp32"]).abs().max() < 0.05 * scale


@pytest.mark.heavy(45)
def test_gpu_bench_dry_run_runs_every_step_and_survives_a_failing_one(tmp_path):
    """bench/gpu.sh --dry-run: the GPU measurement's steps at tiny sizes on CPU, so the script cannot rot."""
    import os, subprocess, sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    corpus = make_corpus(tmp_path / "corpus.jsonl", 1500, max_words=40)
    env = {**os.environ, "SPEEDCHAT_PYTHON": sys.executable}
    run = lambda *args: subprocess.run(["bash", "bench/gpu.sh", "--dry-run", *args], cwd=root, env=env,
                                       capture_output=True, text=True, timeout=600)
    ok = run("--data", str(corpus), "--out", str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "gpu.json").read_text())
    steps = summary["steps"]
    assert list(steps) == ["tokenizer", "train_d12", "race_d12", "decode_d20", "core", "train_d20", "train_d24"]
    assert not [name for name, s in steps.items() if "error" in s], steps
    assert 0 < steps["race_d12"]["val_bpb"] < 8 and steps["race_d12"]["num_iterations"] >= 2
    assert steps["race_d12"]["train_time_s"] > 0  # the base section's duration key, as the report reads it
    assert steps["train_d12"]["configs"][0]["tok_s"] > 0 and steps["decode_d20"]["decode_b16_tok_s"] > 0
    assert steps["core"]["core_items_per_s"] > 0 and summary["dry_run"] is True
    assert "| race_d12 | val bpb " in ok.stdout
    # a step that fails (no data, no d12 step time) is reported, and the others still run
    bad = run("--only", "race_d12,core", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "bad"))
    assert bad.returncode == 0, bad.stdout[-3000:]
    steps = json.loads((tmp_path / "bad" / "gpu.json").read_text())["steps"]
    assert "error" in steps["race_d12"] and steps["core"]["core_items_per_s"] > 0
    assert "| race_d12 | FAILED" in bad.stdout
