"""Bad data and damaged checkpoints: one line that names the file (and the line, row or field),
exit status 2, nothing half-written; evaluation sized to the data it has."""
import gzip, json, os, pickle, re, shutil, subprocess, sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import engine, hf, serve, tok, train
from _helpers_train import make_corpus, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--depth", "1", "--n-embd", "64", "--n-head", "2", "--max-seq-len", "32", "--device-batch-size", "4",
        "--total-batch-size", "128", "--eval-every", "-1", "--eval-tokens", "256", "--sample-every", "-1",
        "--core-metric-every", "0", "--buffer-docs", "20"]


def exits(main, capsys) -> tuple[int, str]:
    """(exit status, stderr) of a stage's main run as its __main__ runs it (tok.run_main)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        tok.run_main(main)
    return e.value.code, capsys.readouterr().err


def one_line_naming(err: str, where: str):
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: ") and where in lines[-1], err


# ----------------------------------------------------------------------------- local data

def _gz_cut(p):
    data = gzip.compress("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(3000)).encode())
    p.write_bytes(data[:len(data) // 2])


BAD_DATA = {  # file -> (writer, what the error names after the path)
    "binary.jsonl": (lambda p: p.write_bytes(bytes(range(256)) * 8), ":1: not UTF-8"),
    "int.jsonl": (lambda p: p.write_text('{"text": "fine"}\n{"text": 42}\n'), ":2: 'text' is int 42"),
    "null.jsonl": (lambda p: p.write_text('{"text": "fine"}\n\n{"text": null}\n'), ":3: 'text' is null"),
    "notext.jsonl": (lambda p: p.write_text('{"body": "x"}\n'), ":1: 'text' is missing"),
    "array.jsonl": (lambda p: p.write_text('[1, 2]\n'), ":1: a JSON list, not an object"),
    "null.parquet": (lambda p: pq.write_table(pa.table({"text": ["fine", "ok", None]}), p), ": row index 2: 'text' is null"),
    "int.parquet": (lambda p: pq.write_table(pa.table({"text": [1, 2]}), p), ": column 'text' holds int64"),
    "cut.jsonl.gz": (_gz_cut, ": unreadable after line"),
}


@pytest.mark.parametrize("name", BAD_DATA)
def test_tokenizer_training_names_the_bad_file_and_row(tmp_path, speedchat_home, capsys, name):
    write, expect = BAD_DATA[name]
    write(tmp_path / name)
    code, err = exits(lambda: tok.main(["train", "--data", str(tmp_path / name), "--vocab-size", "300"]), capsys)
    assert code == 2
    one_line_naming(err, f"{tmp_path / name}{expect}")
    assert not (speedchat_home / "tokenizer").exists()


@pytest.mark.parametrize("name", BAD_DATA)
def test_pretraining_names_the_bad_file_and_row(tmp_path, speedchat_home, capsys, name):
    make_tokenizer()
    write, expect = BAD_DATA[name]
    write(tmp_path / name)
    code, err = exits(lambda: train.main(TINY + ["--num-iterations", "2", "--data", str(tmp_path / name)]), capsys)
    assert code == 2
    one_line_naming(err, f"{tmp_path / name}{expect}")
    assert not list(speedchat_home.glob("checkpoints/base/*/*step_*"))  # a fault found mid-run leaves its log, no checkpoint


def test_pretraining_without_documents_is_one_line(tmp_path, capsys):
    make_tokenizer()
    (tmp_path / "empty.jsonl").write_text("\n")
    code, err = exits(lambda: train.main(TINY + ["--num-iterations", "2", "--data", str(tmp_path / "empty.jsonl")]), capsys)
    assert code == 2
    one_line_naming(err, f"--data {tmp_path / 'empty.jsonl'}: no train documents")


def test_bad_rows_skipped_only_with_the_flag_and_counted(tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    rows = [{"text": f"good document {i} about cats and mats."} for i in range(30)]
    rows[5], rows[17] = {"text": None}, {"text": 7}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    with pytest.raises(tok.DataError, match=f"{path}:6: 'text' is null"):
        list(tok.iter_documents(str(path)))
    capsys.readouterr()
    docs = list(tok.iter_documents(str(path), skip_bad=True))
    assert len(docs) == 30 - 2 - 1  # 30 good-looking rows, 2 bad, document 0 goes to validation
    assert f"{path}: skipped 3 bad rows" in capsys.readouterr().err
    make_tokenizer()
    result = train.main(TINY + ["--num-iterations", "2", "--data", str(path), "--skip-bad-rows"])
    assert result["step"] == 2


def test_one_document_corpus_trains(tmp_path, speedchat_home, capsys):
    path = tmp_path / "book.txt"
    path.write_text(" ".join(f"The cat number {i} sat on the mat." for i in range(300)))
    tok.main(["train", "--data", str(path), "--vocab-size", "300"])
    out = capsys.readouterr().out
    assert "trained 300 tokens" in out and "held-out" in out and "none" in out
    result = train.main(TINY + ["--num-iterations", "3", "--data", str(path)])
    out = capsys.readouterr().out
    assert result["step"] == 3 and "no validation documents" in out and "of the train split" in out
    assert json.loads((speedchat_home / "report" / "base.json").read_text())["val_split"] == "train"


# ----------------------------------------------------------------------------- evaluation

def test_evaluation_makes_one_pass_over_a_small_validation_split(tmp_path, capsys):
    t = make_tokenizer()
    path = make_corpus(tmp_path / "c.jsonl", 300, max_words=8)  # validation: documents 0, 100, 200
    batches, split, tokens = train.validation_batches(t, str(path), 2, 64, 0, 1, "cpu", max_batches=10 ** 6)
    assert split == "val" and len(batches) == 1  # three short documents fill one row (the last one cropped)
    x, y = batches[0]
    texts = [t.decode([i for i in row if i not in (t.bos_id, 0, -1)]) for row in torch.cat([x, y[:, -1:]], 1).tolist()]
    assert sorted(re.findall(r"doc\d+", "".join(texts))) == ["doc0", "doc100", "doc200"]
    assert tokens == int((y >= 0).sum()) and (y[1] == -1).all()  # the second row is all padding
    assert "one whole pass" in capsys.readouterr().out
    capped, _, _ = train.validation_batches(t, str(make_corpus(tmp_path / "big.jsonl", 5000)), 2, 64, 0, 1, "cpu", max_batches=3)
    assert len(capped) == 3 and "capped by --eval-tokens" in capsys.readouterr().out
    model = train.GPT(train.GPTConfig(sequence_len=64, vocab_size=t.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    token_bytes = torch.as_tensor(t.token_bytes, dtype=torch.int64)
    assert 0 < train.evaluate_bpb(model, capped, token_bytes, progress_every=0.0) < 20
    assert "evaluating: batch 2/3" in capsys.readouterr().out


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def trained_home(tmp_path_factory):
    """A $SPEEDCHAT_HOME with a tokenizer and a 2-step base run (tag t: model, optimizer and loader state)."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEEDCHAT_HOME", str(home))
        make_tokenizer()
        corpus = make_corpus(home / "corpus.jsonl", 300, max_words=12)
        train.main(TINY + ["--num-iterations", "2", "--data", str(corpus), "--tag", "t"])
    return home


@pytest.fixture
def ckpt(trained_home, speedchat_home):
    shutil.copytree(trained_home, speedchat_home)
    return speedchat_home / "checkpoints" / "base" / "t" / "step_000002"


def resume_args(home):
    return TINY + ["--num-iterations", "4", "--data", str(home / "corpus.jsonl"), "--tag", "t", "--resume"]


def damage(path: Path, how: str):
    b = path.read_bytes()
    if how == "truncated":
        path.write_bytes(b[:len(b) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(len(b)))
    elif how == "pickle":
        path.write_bytes(pickle.dumps({"lm_head.weight": [1, 2, 3]}))
    elif how == "wrong-shape":
        safetensors = path.suffix == ".safetensors"
        state = hf.load_safetensors(path) if safetensors else torch.load(path, weights_only=True)
        state["lm_head.weight"] = torch.zeros(3, 5)
        hf.save_safetensors(state, path) if safetensors else torch.save(state, path)
    elif how == "flipped-byte":
        path.write_bytes(b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 1]) + b[len(b) // 2 + 1:])


COMMANDS = {
    "chat": lambda home: engine.main(["chat", "--source", "base", "-p", "the cat", "--max-tokens", "3", "--device", "cpu"]),
    "serve": lambda home: serve.main(["--source", "base", "--device", "cpu", "--port", "0"]),
    "resume": lambda home: train.main(resume_args(home)),
}


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "pickle", "wrong-shape", "flipped-byte"])
@pytest.mark.parametrize("command", COMMANDS)
def test_damaged_weights_are_one_line_naming_the_file(ckpt, speedchat_home, capsys, command, how):
    damage(ckpt / train.WEIGHTS, how)
    before = sorted(p.name for p in ckpt.parent.iterdir())
    code, err = exits(lambda: COMMANDS[command](speedchat_home), capsys)
    assert code == 2
    one_line_naming(err, f"{ckpt / train.WEIGHTS}: damaged")
    assert sorted(p.name for p in ckpt.parent.iterdir()) == before  # nothing written, nothing half-written


@pytest.mark.parametrize("name", ["meta.json", train.WEIGHTS, "optim_rank0.pt", "state_rank0.pt"])
def test_one_flipped_byte_is_refused_on_load(ckpt, name):
    damage(ckpt / name, "flipped-byte")
    with pytest.raises(train.CheckpointError, match=f"{ckpt / name}: damaged"):
        train.load_checkpoint(ckpt.parent)


@pytest.mark.parametrize("name", ["optim_rank0.pt", "state_rank0.pt"])
def test_resume_names_a_damaged_training_state_file(ckpt, speedchat_home, capsys, name):
    damage(ckpt / name, "truncated")
    code, err = exits(lambda: train.main(resume_args(speedchat_home)), capsys)
    assert code == 2
    one_line_naming(err, f"{ckpt / name}: damaged")


@pytest.mark.parametrize("how, says", [("truncated", "unreadable"), ("garbage", "unreadable"), ("pickle", "unreadable"),
                                       ("wrong-shape", "cannot restore the weights")])
def test_checkpoints_without_checksums_still_fail_by_name(ckpt, how, says):
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["files"]  # as written before checksums
    (ckpt / "meta.json").write_text(json.dumps(meta))
    train.load_model("base", "t", device="cpu")  # loads
    damage(ckpt / train.WEIGHTS, how)
    with pytest.raises(train.CheckpointError, match=f"{ckpt / train.WEIGHTS}: {says}"):
        train.load_model("base", "t", device="cpu")


def test_inference_reads_only_weights_and_metadata(ckpt, capsys):
    (ckpt / "optim_rank0.pt").unlink()
    damage(ckpt / "state_rank0.pt", "garbage")
    assert engine.main(["chat", "--source", "base", "-p", "the cat", "--max-tokens", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    (ckpt / "state_rank0.pt").unlink()
    workers, meta = serve.load_workers("base", None, None, 1, "cpu")
    assert len(workers) == 1 and meta["step"] == 2


@pytest.mark.heavy(3)
@pytest.mark.parametrize("script, args", [("engine.py", ["chat", "--source", "base", "-p", "hi"]),
                                          ("serve.py", ["--source", "base", "--port", "0"]),
                                          ("train.py", None)])
def test_the_command_lines_exit_2_with_one_line(ckpt, speedchat_home, script, args):
    damage(ckpt / train.WEIGHTS, "truncated")
    env = dict(os.environ, SPEEDCHAT_HOME=str(speedchat_home), CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, script, *(args or resume_args(speedchat_home))], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    one_line_naming(r.stderr, f"{ckpt / train.WEIGHTS}: damaged")
