"""The Hugging Face side (hf.py, modeling_speedchat.py): safetensors checkpoints, the export that
transformers loads (logits, greedy tokens, tokenizer and chat template equal to speedchat's), hf:DIR
back into engine, serve and evals, lm-evaluation-harness on an export, damaged exports. Offline, CPU,
tiny models made here; the tests that need transformers / safetensors / lm_eval skip without them."""
import atexit, json, os, shutil, subprocess, sys, tempfile
from pathlib import Path

import pytest
import torch

# transformers copies a folder's modeling file into its modules cache at load: keep that out of ~/.cache
# (set before transformers is imported; one folder per process, as xdist workers load at once), and let
# nothing reach for the Hub.
_HF_HOME = Path(tempfile.mkdtemp(prefix="speedchat-test-hf-"))
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = str(_HF_HOME)
os.environ["HF_MODULES_CACHE"] = str(_HF_HOME / "modules")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import hf, tok, train
from _helpers_train import make_tokenizer, scramble, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def save_base(tokenizer, model, source="base", tag="tiny", step=3):
    meta = {"step": step, "model_config": train.asdict(model.config), "tokenizer_hash": tokenizer.hash}
    return train.save_checkpoint(train.checkpoint_root(source) / tag, step, model.state_dict(), None, meta)


# ----------------------------------------------------------------------------- safetensors checkpoints

def test_safetensors_round_trip_every_dtype(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f64": torch.randn(2, 2, 2, dtype=torch.float64),
               "i64": torch.arange(6).view(2, 3), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4),
               "bool": torch.tensor([True, False]), "noncontig": torch.randn(4, 6).t()}
    hf.save_safetensors(tensors, tmp_path / "x.safetensors", {"format": "pt"})
    back = hf.load_safetensors(tmp_path / "x.safetensors")
    assert list(back) == list(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    st = pytest.importorskip("safetensors.torch")  # the library reads ours, and we read its
    theirs = st.load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(theirs[k], v) for k, v in tensors.items())
    st.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "y.safetensors"))
    assert all(torch.equal(hf.load_safetensors(tmp_path / "y.safetensors")[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("cut", ["header", "body", "json"])
def test_damaged_safetensors_say_what_is_wrong(tmp_path, cut):
    path = hf.save_safetensors({"w": torch.randn(8, 8)}, tmp_path / "w.safetensors")
    b = path.read_bytes()
    path.write_bytes({"header": b[:6], "body": b[:len(b) - 10], "json": b[:8] + b"x" * (len(b) - 8)}[cut])
    with pytest.raises(ValueError, match={"header": "too short", "body": "cut short", "json": "not a JSON object"}[cut]):
        hf.load_safetensors(path)


def test_checkpoints_hold_safetensors_and_old_model_pt_still_loads(speedchat_home):
    t = make_tokenizer()
    model = scramble(tiny_model(vocab_size=t.vocab_size))
    d = save_base(t, model)
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "model.safetensors"]
    meta = json.loads((d / "meta.json").read_text())
    assert meta["files"]["model.safetensors"] == train._sha256(d / "model.safetensors")
    loaded, _, _ = train.load_model("base", "tiny")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    # a checkpoint from before safetensors: model.pt, its sha256 in meta.json
    old = d.parent / "step_000002"
    old.mkdir()
    torch.save(model.state_dict(), old / "model.pt")
    meta = {"step": 2, "model_config": meta["model_config"], "tokenizer_hash": t.hash, "files": {"model.pt": train._sha256(old / "model.pt")}}
    meta["files"]["meta.json"] = train._meta_digest(meta)
    (old / "meta.json").write_text(json.dumps(meta))
    again, _, m = train.load_model("base", "tiny", step=2)
    assert m["step"] == 2 and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    (old / "model.pt").write_bytes(b"nonsense")
    with pytest.raises(train.CheckpointError, match=f"{old / 'model.pt'}: damaged"):
        train.load_model("base", "tiny", step=2)
