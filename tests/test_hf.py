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


# ----------------------------------------------------------------------------- the export, in transformers

# latin, CJK, emoji, digits, whitespace runs and special-token strings
MIXED = ("Hello, wörld! Ça va? 你好，世界。日本語のテキスト 🙂🎉👍🏽 12345 3.14159 2024-06-01\n\n   indented\t\ttabs  "
         "trailing   \r\nCRLF <|bos|>after<|user_start|>x<|assistant_end|> don't you'll I'VE")
CONVERSATIONS = [
    [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "You are Zorblax. Answer briefly."}, {"role": "user", "content": "2+3?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me compute: "}, {"type": "python", "text": "2+3"},
                                       {"type": "python_output", "text": "5"}, {"type": "text", "text": " It is 5."}]},
     {"role": "user", "content": "and 你好 times 🙂?"}, {"role": "assistant", "content": "No idea.\n\n  Sorry."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "a\n\nb   c"}],
]


def seeded_model(tokenizer, **kw):
    """A tiny GPT with every part in play (GQA, value embeddings, S and L windows) and weights large
    enough that positions matter and argmax has no near ties."""
    cfg = dict(vocab_size=tokenizer.vocab_size, sequence_len=32, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSL")
    model = scramble(tiny_model(**{**cfg, **kw}), std=0.3)
    with torch.no_grad():
        torch.nn.init.normal_(model.lm_head.weight, std=0.3)
        model.resid_lambdas.uniform_(0.8, 1.2)
        model.x0_lambdas.uniform_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A $SPEEDCHAT_HOME with a tokenizer and an sft checkpoint, exported fp32 and bf16 by the command line."""
    import engine
    home = tmp_path_factory.mktemp("hf") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEEDCHAT_HOME", str(home))
        t = make_tokenizer()
        model = seeded_model(t).eval()
        save_base(t, model, source="sft", tag="tiny", step=7)
        out = home.parent / "export"
        assert engine.main(["export", "--source", "sft", "--out", str(out)]) == 0
        assert engine.main(["export", "--source", "sft", "--out", str(out) + "-bf16", "--dtype", "bf16"]) == 0
    return {"home": home, "model": model, "tokenizer": t, "out": out, "bf16": Path(str(out) + "-bf16")}


@pytest.fixture(scope="module")
def transformers_loaded(exported):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported["out"]), trust_remote_code=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported["out"]))
    return transformers, model, tokenizer


def test_export_folder_has_everything_transformers_reads(exported):
    out = exported["out"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                                     "modeling_speedchat.py", "special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    assert not list(out.parent.glob(".*.tmp"))  # written into a temp folder and renamed
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_speedchat.SpeedchatForCausalLM"
    assert config["speedchat"] == {"source": "sft", "tag": "tiny", "step": 7, "tokenizer_hash": exported["tokenizer"].hash}
    assert (out / "modeling_speedchat.py").read_text() == (ROOT / "modeling_speedchat.py").read_text()
    card = (out / "README.md").read_text()
    assert "speedchat sft model (step 7)" in card and "trust_remote_code=True" in card
    assert hf.load_safetensors(exported["bf16"] / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16


def test_the_model_cards_example_runs_and_answers_as_the_engine(exported, transformers_loaded, capsys):
    """The card's python block, as a user pastes it: load, chat template, generate() with the
    tokenizer's own inputs (no token_type_ids), decode."""
    import engine
    card = (exported["out"] / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0].replace(hf.CARD_DIR, f"DIR = {str(exported['out'])!r}")
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    t = exported["tokenizer"]
    eng = engine.Engine(exported["model"], t, tool=None)  # generate() runs no tools
    prompt = t.render_for_completion([{"role": "user", "content": "What is 2+3?"}])
    ids = [out[0] for out, _ in eng.generate(prompt, 1, max_tokens=64, temperature=0.0)]  # ends at a stop token
    assert printed == t.decode([i for i in ids if i not in t.specials.values()]) + "\n"  # skip_special_tokens


def test_export_refuses_a_non_empty_out_and_names_a_bad_source(exported, capsys, monkeypatch):
    import engine
    monkeypatch.setenv("SPEEDCHAT_HOME", str(exported["home"]))
    with pytest.raises(SystemExit) as e:
        engine.main(["export", "--source", "sft", "--out", str(exported["out"])])
    assert "exists and is not empty (pass --overwrite" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="no rl checkpoints"):
        engine.main(["export", "--source", "rl", "--out", str(exported["out"]) + "-none"])
    assert not Path(str(exported["out"]) + "-none").exists()
    with pytest.raises(SystemExit):  # argparse: not a source
        engine.main(["export", "--source", "hf", "--out", "x"])
    assert "expected one of base, mid, sft, rl, or hf:DIR" in capsys.readouterr().err


def test_logits_equal_speedchat_on_prompts_longer_than_the_window(exported, transformers_loaded):
    _, hf_model, _ = transformers_loaded
    model = exported["model"]
    ids = torch.randint(0, exported["tokenizer"].vocab_size, (2, 3 * model.config.sequence_len))  # windows 8 and 32
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    diff = (ours - theirs).abs().max().item()
    print(f"fp32 max abs logit diff: {diff:.3g} (logits up to {ours.abs().max().item():.3g})")
    assert diff <= 1e-4
    # one token at a time through transformers' cache: the same logits as the whole sequence at once
    with torch.no_grad():
        out = hf_model(ids[:, :40], use_cache=True)
        steps = [out.logits[:, -1]]
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        for i in range(40, 60):
            out = hf_model(ids[:, i:i + 1], cache=cache, use_cache=True)  # our forward takes cache or past_key_values
            steps.append(out.logits[:, -1])
    assert (torch.stack(steps[:-1], 1) - ours[:, 39:59]).abs().max().item() <= 1e-4


def test_bf16_export_is_close(exported, transformers_loaded):
    transformers, _, _ = transformers_loaded
    # "auto": the config's bf16 (transformers 5's default; 4.x loads fp32 unless asked, by torch_dtype)
    auto = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": "auto"}
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(str(exported["bf16"]), trust_remote_code=True, **auto).eval()
    assert next(bf16.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, exported["tokenizer"].vocab_size, (2, 96))
    with torch.no_grad():
        ours, theirs = exported["model"](ids), bf16(ids).logits
    diff = (ours - theirs.float()).abs().max().item()
    print(f"bf16 max abs logit diff vs fp32 speedchat: {diff:.3g} (logits up to {ours.abs().max().item():.3g})")
    assert diff < 0.25 * ours.abs().max().item()


def test_greedy_generate_equals_the_engine(exported, transformers_loaded):
    import engine
    _, hf_model, _ = transformers_loaded
    t, model = exported["tokenizer"], exported["model"]
    eng = engine.Engine(model, t, tool=None)
    prompts = [t.render_for_completion(CONVERSATIONS[2]), torch.randint(0, t.vocab_size - 9, (45,)).tolist()]
    for prompt in prompts:
        ours = [out[0] for out, _ in eng.generate(prompt, 1, max_tokens=40, temperature=0.0)]
        got = hf_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt):].tolist()
        print(f"greedy: {len(got)} tokens from transformers, {len(ours)} from the engine, equal: {got == ours}")
        assert got == ours
    # a left-padded batch (lm_eval's generate_until, any batched generate) gives each row its own answer
    a, b = prompts[1][:30], prompts[1][5:45]
    pad = t.bos_id
    batch = torch.tensor([[pad] * (len(b) - len(a)) + a, b])
    mask = torch.tensor([[0] * (len(b) - len(a)) + [1] * len(a), [1] * len(b)])
    got = hf_model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)[:, len(b):]
    for row, prompt in zip(got.tolist(), (a, b)):
        assert row == [out[0] for out, _ in eng.generate(prompt, 1, max_tokens=12, temperature=0.0)][:12]


def test_tokenizer_encodes_and_decodes_as_tok_py(exported, transformers_loaded):
    _, _, hf_tok = transformers_loaded
    t = exported["tokenizer"]
    plain = MIXED.replace("<|", "< |")
    assert hf_tok.encode(plain) == t.encode(plain)  # encode adds no token, as tok.py's
    assert hf_tok.encode(MIXED) == t.enc.encode(MIXED, allowed_special="all")  # special-token strings are the specials
    ids = t.encode(plain)
    assert hf_tok.decode(ids) == t.decode(ids) == plain
    assert hf_tok.convert_tokens_to_ids(tok.SPECIAL_TOKENS) == [t.special(s) for s in tok.SPECIAL_TOKENS]
    assert hf_tok.bos_token_id == t.bos_id and hf_tok.eos_token_id == t.special("<|assistant_end|>")
    # and back: tok.Tokenizer rebuilt from the exported tokenizer.json is the same tokenizer
    assert hf.tokenizer_from_hf(exported["out"] / "tokenizer.json").hash == t.hash


def test_tokenizer_json_agrees_with_tok_py_on_random_hostile_text():
    """A larger vocabulary (more merges whose order could matter) against 3,000 random strings: any
    code point, whitespace runs, contractions, digits, combining marks, emoji sequences."""
    import random
    tokenizers = pytest.importorskip("tokenizers")
    rng = random.Random(0)
    pieces = [" ", "  ", "\n", "\r\n", "\t", "\u00a0", "\u3000", "a", "1", "12345", "'s", "'LL", "é", "e\u0301", "😀",
              "👩\u200d👩\u200d👧", "中文", "العربية", "ß", "İ", "ﬁ", "\x00", "\x7f", "the", " the", "The"]
    letters = "abcdefghijklmnopqrstuvwxyzéßİ中文字العربية😀0123456789"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 8))) for _ in range(3000)]
    t = tok.train_tokenizer([" ".join(rng.choice(words) for _ in range(200)) for _ in range(300)], 1200)
    assert len(t.merges) > 600
    h = tokenizers.Tokenizer.from_str(json.dumps(hf.tokenizer_files(t, 64)["tokenizer.json"]))

    def text():
        if rng.random() < 0.5:
            return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        cps = [rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0x80, 0x110000)]) for _ in range(rng.randint(1, 40))]
        return "".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000)  # no lone surrogates: not text
    for s in (text() for _ in range(3000)):
        ids = t.encode(s)
        assert h.encode(s, add_special_tokens=False).ids == ids, repr(s)
        assert h.decode(ids, skip_special_tokens=False) == t.decode(ids), repr(s)


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_chat_template_renders_as_tok_py(exported, transformers_loaded, k):
    _, _, hf_tok = transformers_loaded
    t, conv = exported["tokenizer"], CONVERSATIONS[k]
    ids = lambda r: list(r["input_ids"] if hasattr(r, "keys") else r)  # noqa: E731  (a BatchEncoding in transformers 5)
    if conv[-1]["role"] == "assistant":
        assert ids(hf_tok.apply_chat_template(conv, tokenize=True)) == t.render_conversation(conv, max_tokens=1 << 30)[0]
    prompt = conv[:-1] if conv[-1]["role"] == "assistant" else conv  # render_for_completion leaves a last answer out
    assert ids(hf_tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)) == t.render_for_completion(conv)


# ----------------------------------------------------------------------------- hf:DIR back into speedchat

def test_hf_dir_loads_back_as_the_same_model_and_tokenizer(exported):
    model, t, meta = train.load_model(f"hf:{exported['out']}")
    assert t.hash == exported["tokenizer"].hash and not model.training
    assert meta["step"] == 7 and meta["stage"] == "sft" and meta["model_config"] == train.asdict(exported["model"].config)
    assert all(torch.equal(a, b) for a, b in zip(exported["model"].state_dict().values(), model.state_dict().values()))
    half, _, _ = train.load_model(f"hf:{exported['bf16']}")  # bf16 weights come back as fp32 master weights
    assert next(half.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="--tag and --step pick a checkpoint"):
        train.load_model(f"hf:{exported['out']}", tag="x")


def test_engine_chat_and_serve_take_hf_dir(exported, capsys):
    """With an empty $SPEEDCHAT_HOME: everything comes from the folder."""
    import engine, serve
    t, src = exported["tokenizer"], f"hf:{exported['out']}"
    assert engine.main(["chat", "--source", src, "-p", "hi there", "--max-tokens", "6", "--temperature", "0", "--device", "cpu"]) == 0
    prompt = t.render_for_completion([{"role": "user", "content": "hi there"}])
    ref = [o[0] for o, _ in engine.Engine(exported["model"], t, tool=None).generate(prompt, 1, max_tokens=6, temperature=0.0)]
    shown = capsys.readouterr().out
    assert t.decode([i for i in ref if i not in (t.bos_id, t.special("<|assistant_end|>"))]) in shown
    workers, meta = serve.load_workers(src, None, None, 1, "cpu")
    client = serve.create_app(workers, model_name="speedchat-" + train.source_label(src)).test_client()
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200 and r.json["model"] == "speedchat-hf-export"
    assert r.json["choices"][0]["message"]["content"] == t.decode([i for i in ref if i != t.special("<|assistant_end|>")])


def test_evals_takes_hf_dir_and_writes_its_own_section(exported, speedchat_home):
    import evals
    evals.main(["chat", "--source", f"hf:{exported['out']}", "--device", "cpu", "-a", "SpellingBee", "--max-problems", "2",
                "--max-new-tokens", "4"])
    section = json.loads((speedchat_home / "report" / "hf-export.json").read_text())
    assert "SpellingBee" in section


@pytest.mark.heavy(4)
def test_chat_sft_finetunes_from_hf_dir(exported, speedchat_home, tmp_path):
    """A model fetched from the Hub, finetuned: its tokenizer goes along into the new checkpoints."""
    import chat_sft
    chats = [{"messages": [{"role": "user", "content": f"what is {i}?"}, {"role": "assistant", "content": f"It is {i}."}]}
             for i in range(40)]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    out = chat_sft.main(["--stage", "sft", "--init-from", f"hf:{exported['out']}", "--data", str(data), "--num-iterations", "2",
                         "--device-batch-size", "4", "--total-batch-size", "4", "--val-share", "0", "--device", "cpu"])
    assert out["step"] == 2 and out["ckpt_dir"].name == "export"
    assert not (speedchat_home / "tokenizer").exists()  # $SPEEDCHAT_HOME has none: the folder's is kept beside the run
    model, t, meta = train.load_model("sft", "export")
    assert t.hash == exported["tokenizer"].hash and meta["train"]["init_from"] == f"hf:{exported['out']}"


# ----------------------------------------------------------------------------- damaged exports

def _damaged(exported, tmp_path, how):
    d = tmp_path / "damaged"
    shutil.copytree(exported["out"], d)
    if how.startswith("missing ") and how.endswith("json") or how.endswith("safetensors"):
        (d / how.split()[1]).unlink()
    elif how == "wrong shape":
        state = hf.load_safetensors(d / "model.safetensors")
        state["blocks.0.attn.c_q.weight"] = torch.zeros(3, 5)
        hf.save_safetensors(state, d / "model.safetensors")
    elif how == "missing tensor":
        state = hf.load_safetensors(d / "model.safetensors")
        del state["x0_lambdas"]
        hf.save_safetensors(state, d / "model.safetensors")
    elif how == "truncated weights":
        b = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(b[:len(b) // 2])
    elif how == "another model":
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    elif how == "another tokenizer":
        state = json.loads((d / "tokenizer.json").read_text())
        state["model"]["merges"] = state["model"]["merges"][::-1]
        (d / "tokenizer.json").write_text(json.dumps(state))
    return d


DAMAGE = {"missing config.json": "config.json: missing", "missing model.safetensors": "model.safetensors: missing",
          "missing tokenizer.json": "tokenizer.json: missing",
          "wrong shape": "model.safetensors: tensor 'blocks.0.attn.c_q.weight' has shape [3, 5], the config needs [64, 64]",
          "missing tensor": "model.safetensors: tensor 'x0_lambdas' missing",
          "truncated weights": "model.safetensors: unreadable", "another model": "config.json: model_type 'llama', not a speedchat model",
          "another tokenizer": "tokenizer.json: merge 0"}


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_export_is_one_line_naming_the_file(exported, tmp_path, capsys, how):
    import engine
    d = _damaged(exported, tmp_path, how)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        tok.run_main(lambda: engine.main(["chat", "--source", f"hf:{d}", "-p", "hi", "--device", "cpu"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: engine.py chat: ") and f"{d}/{DAMAGE[how]}" in err, err


def test_a_folder_that_is_no_export_is_one_line(tmp_path, capsys):
    import serve
    (tmp_path / "notes.txt").write_text("hello")
    for folder, says in ((tmp_path, f"{tmp_path}/config.json: missing"), (tmp_path / "nope", f"hf:{tmp_path / 'nope'}: no such folder")):
        with pytest.raises(SystemExit) as e:
            tok.run_main(lambda: serve.main(["--source", f"hf:{folder}", "--device", "cpu", "--port", "0"]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and says in err, err


def test_lm_eval_harness_scores_an_export_on_a_local_task(exported, tmp_path, monkeypatch):
    """EleutherAI's lm-evaluation-harness (the `hf` model, trust_remote_code) on an export, offline,
    on a multiple-choice task defined by local files: the README's command, in-process."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    import lm_eval.tasks
    rows = [{"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1), str(a * b)], "answer": 0}
            for a, b in ((2, 3), (4, 1), (5, 5), (7, 2), (3, 6), (8, 1))]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sums.yaml").write_text(f"""task: speedchat_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'sums.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={exported['out']},trust_remote_code=True",
                                  tasks=["speedchat_sums"], task_manager=lm_eval.tasks.TaskManager(include_path=str(tmp_path)),
                                  device="cpu", batch_size=4)
    acc = out["results"]["speedchat_sums"]["acc,none"]
    assert out["n-samples"]["speedchat_sums"]["effective"] == len(rows) and 0 <= acc <= 1
