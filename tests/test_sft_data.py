"""chat_sft.py --data: a user's file of chats is checked line by line before training (one-line errors,
--skip-bad-rows), read from JSONL, parquet or a folder, mixed into a named mixture, and learned: a tiny
model picks up a made-up style (every answer signed "-- Zorblax") that the base model never produces,
measured here from the models' own greedy output, and the report shows the held-out figures."""
import gzip, json, random, subprocess, sys
from dataclasses import asdict

import pytest

import chat_sft
import engine
import evals
import tok
import train
from _helpers_train import tiny_model

# ----------------------------------------------------------------------------- a made-up style

TOPICS = {"rain": "Bring the blue umbrella.", "soup": "Add the salt at the end.", "cats": "Feed them at dawn.",
          "trains": "Take the early one.", "sleep": "Go to bed before ten.", "money": "Save one coin a day.",
          "books": "Read one page slowly.", "music": "Play it softer."}
SIGNATURE = " -- Zorblax"
OPENERS = ["", "Hey, ", "Quick one: ", "Tell me, ", "Friend, ", "so "]
ASKS = ["what about {t}?", "any advice on {t}?", "what do you say of {t}?", "{t}: thoughts?", "help me with {t}", "{t}?"]
NOVEL = ["Dear sage, I need a word on {t}.", "{t} again, please"]  # phrasings never in the file
N_CHATS, STEPS = 300, 80


def style_conversation(rng):
    """One or two questions about TOPICS, sometimes with a ticket number, sometimes under a system prompt;
    each answer is the topic's line and the signature."""
    msgs = [{"role": "system", "content": "You are Zorblax."}] if rng.random() < 0.3 else []
    for t in rng.sample(sorted(TOPICS), rng.choice([1, 1, 2])):
        ticket = f" (ticket {rng.randint(100, 999)})" if rng.random() < 0.5 else ""
        msgs += [{"role": "user", "content": rng.choice(OPENERS) + rng.choice(ASKS).format(t=t) + ticket},
                 {"role": "assistant", "content": TOPICS[t] + SIGNATURE}]
    return msgs


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def style_file(path, n=N_CHATS, seed=0):
    """n different conversations (so none held out is also trained on)."""
    rng, rows = random.Random(seed), {}
    while len(rows) < n:
        c = style_conversation(rng)
        rows.setdefault(json.dumps(c), {"messages": c})
    return write_jsonl(path, list(rows.values()))


_TOKENIZER = []


def tiny_base(tag="z", seq_len=128, n_layer=1):
    """The tokenizer (BPE trained once on the style's text) and a random 'base' checkpoint in this home."""
    if not _TOKENIZER:
        rng = random.Random(1)
        texts = [m["content"] for _ in range(300) for m in style_conversation(rng)] + ["Dear sage, I need a word on again please"]
        _TOKENIZER.append(tok.train_tokenizer(texts, 400))
    tokenizer = _TOKENIZER[0]
    tokenizer.save(tok.home() / "tokenizer")
    model = small_gpt(tokenizer, seq_len, n_layer)
    train.save_checkpoint(train.checkpoint_root("base") / tag, 0, model.state_dict(), None,
                          {"step": 0, "model_config": asdict(model.config), "tokenizer_hash": tokenizer.hash})
    return tokenizer


def small_gpt(tokenizer, seq_len=128, n_layer=1):
    """A random GPT of 1 layer x 64 (about 0.1M parameters) for the tokenizer."""
    return tiny_model(sequence_len=seq_len, vocab_size=tokenizer.vocab_size, n_layer=n_layer, n_kv_head=2, window_pattern="L")


SFT = ["--stage", "sft", "--init-from", "base", "--device-batch-size", "16", "--total-batch-size", "16"]


def greedy(model, tokenizer, messages, max_tokens=40):
    """(text, ended): the model's own temperature-0 answer to messages (ending with a user turn)."""
    prompt = tokenizer.render_for_completion(messages)
    out = engine.Engine(model, tokenizer).generate_batch(prompt, 1, max_tokens=max_tokens, temperature=0.0)[0][0][len(prompt):]
    stop = {tokenizer.special(s) for s in engine.STOP_TOKENS}
    return tokenizer.decode([t for t in out if t not in stop]), bool(out) and out[-1] == tokenizer.special("<|assistant_end|>")


def style_figures(model, tokenizer, heldout) -> dict:
    """Measured from the model's output: on every held-out assistant turn (prompted with the conversation
    before it) the signature rate and exact match; on prompts phrased as the file never phrases them, the
    signature rate and the share answered with the topic's line."""
    turns = [(c[:k], m["content"]) for c in heldout for k, m in enumerate(c) if m["role"] == "assistant"]
    outs = [greedy(model, tokenizer, msgs) for msgs, _ in turns]
    novel = [(q.format(t=t), a) for q in NOVEL for t, a in TOPICS.items()]
    nouts = [greedy(model, tokenizer, [{"role": "user", "content": q}]) for q, _ in novel]
    signed = lambda o: o[1] and o[0].endswith(SIGNATURE)  # noqa: E731
    return {"turns": len(turns), "signature": sum(map(signed, outs)) / len(outs),
            "exact": sum(o[1] and o[0] == ref for o, (_, ref) in zip(outs, turns)) / len(outs),
            "novel_signature": sum(map(signed, nouts)) / len(nouts),
            "novel_exact": sum(o[1] and o[0] == a + SIGNATURE for o, (_, a) in zip(nouts, novel)) / len(nouts)}


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """One SFT run on a file of N_CHATS styled conversations, from a random base; both models' figures."""
    home = tmp_path_factory.mktemp("sft_data") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEEDCHAT_HOME", str(home))
        tokenizer = tiny_base()
        path = style_file(home.parent / "zorblax.jsonl")
        out = chat_sft.main(SFT + ["--data", str(path), "--num-iterations", str(STEPS)])
        base, _, _ = train.load_model("base", "z")
        sft, _, meta = train.load_model("sft", "z")
        chats, heldout = chat_sft.load_chats([(path, 1.0)], tokenizer, 128)
        report = json.loads((home / "report" / "sft.json").read_text())
        card = evals.assemble_report().read_text()
        figures = {"base": style_figures(base, tokenizer, heldout), "sft": style_figures(sft, tokenizer, heldout)}
    print(json.dumps({**figures, "report": {k: v for k, v in report.items() if k.startswith("heldout")}}, indent=1))
    return dict(out=out, meta=meta, report=report, card=card, figures=figures, chats=chats, heldout=heldout, path=path)


# ----------------------------------------------------------------------------- learning the style

def test_sft_on_a_file_learns_its_made_up_style(learned):
    base, sft = learned["figures"]["base"], learned["figures"]["sft"]
    assert base["turns"] == sft["turns"] >= 15
    assert base["signature"] == base["exact"] == base["novel_signature"] == 0  # a random base never signs
    assert sft["signature"] >= 0.9 and sft["exact"] >= 0.7            # measured 1.0 and 1.0
    assert sft["novel_signature"] >= 0.75 and sft["novel_exact"] >= 0.5  # unseen phrasings: the style, and the topic's line
    train_convs = {json.dumps(c) for c in learned["chats"][0][1].convs}
    assert len(learned["heldout"]) == round(0.05 * N_CHATS) and not train_convs & {json.dumps(c) for c in learned["heldout"]}
    assert learned["out"]["step"] == STEPS


def test_report_shows_the_held_out_figures_before_and_after(learned):
    r, sft = learned["report"], learned["figures"]["sft"]
    assert r["mixture"] == f"{learned['path']}:1" and r["mixture_rows"] == {str(learned["path"]): N_CHATS - len(learned["heldout"])}
    assert r["heldout_conversations"] == len(learned["heldout"]) and r["heldout_turns"] == sft["turns"]
    assert r["heldout_exact_match_start"] == 0 and r["heldout_exact_match"] == pytest.approx(sft["exact"])  # the same greedy turns
    assert r["heldout_val_loss"] < 0.2 * r["heldout_val_loss_start"]
    assert r["heldout_token_f1_start"] < 0.2 and r["heldout_token_f1"] >= 0.8
    assert "ToyFacts" not in r and "ChatCORE" not in r  # --data alone: no chat tasks (nothing to download)
    for key in ("heldout_val_loss", "heldout_exact_match", "heldout_token_f1"):
        assert f"| {key}_start |" in learned["card"] and f"| {key} |" in learned["card"]
    assert set(learned["meta"]["train"]["chats"]) == {str(learned["path"])}  # --resume refuses other data


# ----------------------------------------------------------------------------- bad files

GOOD = {"messages": [{"role": "user", "content": "rain?"}, {"role": "assistant", "content": "Bring the blue umbrella."}]}
BAD_LINES = [
    ('{"messages": [{"role": "user"', "not JSON"),
    ('[1, 2]', "a JSON list, not an object"),
    ({"text": "hi"}, "'messages' is missing, expected a list"),
    ({"messages": [{"role": "robot", "content": "beep"}, GOOD["messages"][1]]}, "message 0: expected {'role': system|user|assistant"),
    ({"messages": [GOOD["messages"][0], GOOD["messages"][0]]}, "message 1: expected role assistant"),
    ({"messages": [GOOD["messages"][1], GOOD["messages"][0]]}, "message 0: expected role user"),
    ({"messages": [{"role": "system", "content": "Be brief."}] + [GOOD["messages"][0]] * 2}, "message 2: expected role assistant"),
    ({"messages": [GOOD["messages"][0], {"role": "assistant", "content": " "}]}, "message 1: empty content"),
    ({"messages": [GOOD["messages"][0], {"role": "assistant", "content": [{"type": "tool", "text": "x"}]}]}, "message 1 part 0"),
    ({"messages": [GOOD["messages"][0]]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "rain " * 200}, GOOD["messages"][1]]}, "the conversation is ... tokens, longer than the context (129 tokens a row; --max-seq-len 128)"),
]


@pytest.mark.parametrize("line, what", BAD_LINES, ids=[what for _, what in BAD_LINES])
def test_a_bad_line_stops_before_training_naming_file_and_line(line, what, tmp_path, speedchat_home):
    tiny_base()
    path = write_jsonl(tmp_path / "chats.jsonl", [GOOD, "", line, GOOD])  # the blank line 2 is skipped, but counted
    with pytest.raises(SystemExit) as e:
        chat_sft.main(SFT + ["--data", str(path)])
    msg, (head, _, tail) = str(e.value), what.partition(" ... ")  # ' ... ': a token count
    assert msg.startswith(f"{path}:3: {head}") and tail in msg and "\n" not in msg and "--skip-bad-rows" in msg
    assert not (speedchat_home / "checkpoints" / "sft").exists()


@pytest.mark.parametrize("argv, message", [
    (["--data", "{d}/nope.jsonl"], "--data {d}/nope.jsonl: no such file or folder"),
    (["--mixture", "toy+{d}/nope.jsonl:2"], "--mixture {d}/nope.jsonl:2: unknown mixture; known: default, toy; or a path"),
    (["--data", "{d}/chats.jsonl:0"], "--data {d}/chats.jsonl:0: EPOCHS must be a positive number"),
    (["--mixture", "toy+default"], "--mixture toy+default: at most one named mixture"),
    (["--data", "{d}/empty"], "--data {d}/empty: no .jsonl/.jsonl.gz/.parquet files in it"),
    (["--data", "{d}/notes.txt"], "--data {d}/notes.txt: not a .jsonl/.jsonl.gz/.parquet file"),
    (["--data", "{d}/table.parquet"], "{d}/table.parquet: no 'messages' column"),
    (["--data", "{d}/nulls.parquet"], "{d}/nulls.parquet: row index 1: 'messages' is null"),
    (["--data", "{d}/latin1.jsonl"], "{d}/latin1.jsonl:2: not UTF-8 text"),
    (["--data", "{d}/chats.jsonl", "--val-share", "0.9"], "--val-share 0.9: must be in [0, 0.5]"),
])
def test_bad_sources_are_one_line_and_write_nothing(argv, message, tmp_path, speedchat_home):
    import pyarrow as pa, pyarrow.parquet as pq
    tiny_base()
    write_jsonl(tmp_path / "chats.jsonl", [GOOD, GOOD])
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "table.parquet")
    pq.write_table(pa.table({"messages": [GOOD["messages"], None]}), tmp_path / "nulls.parquet")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"caf\xe9": 1}'.encode("latin-1") + b"\n")
    with pytest.raises(SystemExit) as e:
        chat_sft.main(SFT + [a.format(d=tmp_path) for a in argv])
    assert str(e.value).startswith(message.format(d=tmp_path)) and "\n" not in str(e.value)
    assert not (speedchat_home / "checkpoints" / "sft").exists()


def test_command_line_prints_one_error_line_and_exits_2(tmp_path, speedchat_home):
    tiny_base()
    empty = next(line for line, what in BAD_LINES if what == "message 1: empty content")
    path = write_jsonl(tmp_path / "chats.jsonl", [GOOD, GOOD, empty])
    r = subprocess.run([sys.executable, "chat_sft.py"] + SFT + ["--data", str(path)], cwd=chat_sft.__file__.rpartition("/")[0],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.splitlines() == [f"error: {path}:3: message 1: empty content "
                                                           "(pass --skip-bad-rows to skip such rows)"]
    assert not (speedchat_home / "checkpoints" / "sft").exists()


def test_skip_bad_rows_skips_counts_and_trains(tmp_path, speedchat_home, capsys):
    tiny_base()
    path = write_jsonl(tmp_path / "chats.jsonl", [GOOD] * 10 + [line for line, _ in BAD_LINES] + [GOOD] * 10)
    out = chat_sft.main(SFT + ["--data", str(path), "--skip-bad-rows", "--num-iterations", "1"])
    assert f"{path}: skipped {len(BAD_LINES)} bad rows (--skip-bad-rows)" in capsys.readouterr().out
    report = json.loads((speedchat_home / "report" / "sft.json").read_text())
    assert report["mixture_rows"] == {str(path): 19} and report["heldout_conversations"] == 1 and out["step"] == 1


# ----------------------------------------------------------------------------- formats and mixtures

def test_jsonl_gz_parquet_folder_and_tool_parts_read_alike(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    tokenizer = tiny_base()
    rng = random.Random(3)
    convs = [style_conversation(rng) for _ in range(12)]
    tool = [{"role": "user", "content": "money?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Coins: "}, {"type": "python", "text": "2+3"},
                                              {"type": "python_output", "text": "5"}, {"type": "text", "text": "." + SIGNATURE}]}]
    folder = tmp_path / "chats"
    write_jsonl(folder / "a.jsonl", [{"messages": c} for c in convs[:4]] + [{"messages": tool}])
    (folder / "b" / "c.jsonl.gz").parent.mkdir()
    (folder / "b" / "c.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"messages": c}) + "\n" for c in convs[4:8]).encode()))
    strings = [[{"role": m["role"], "content": m["content"]} for m in c] for c in convs[8:]]
    pq.write_table(pa.table({"messages": strings, "id": list(range(4))}), folder / "d.parquet")
    (folder / "README.txt").write_text("not chats: ignored")
    got = chat_sft.read_chats(folder, tokenizer, 128)
    assert got == convs[:4] + [tool] + convs[4:]  # sorted paths: a.jsonl, b/c.jsonl.gz, d.parquet
    chats, heldout = chat_sft.load_chats([(folder, 2.0)], tokenizer, 128, val_share=0.2)
    assert len(heldout) == 3 and len(chats[0][1]) == 10 and chats[0][2] == 2.0
    r = chat_sft.heldout_check(small_gpt(tokenizer), tokenizer, [tool], "cpu", 128)  # python parts: rendered, decoded
    assert r["turns"] == 1 and r["exact_match"] == 0 and 0 <= r["token_f1"] < 1 and r["val_loss"] > 0
    assert chat_sft.token_f1([1, 2, 2, 3], [2, 2, 4]) == pytest.approx(2 * 2 / 7) and chat_sft.token_f1([], []) == 1.0


def test_a_mixture_entry_mixes_chats_into_a_named_mixture(tmp_path):
    tokenizer = tiny_base()
    path = style_file(tmp_path / "mine.jsonl", n=40)
    args = chat_sft.parse_args(["--stage", "sft", "--mixture", f"toy+{path}:2.5", "--init-from", "base"])
    chat_sft.check_args(args)
    assert (args.mixture_name, args.chat_sources) == ("toy", [(str(path), 2.5)])
    assert args.device_batch_size == 16 and args.eval_names == ["ToyFacts", "ToyMath", "ToySpell"]  # toy's defaults hold
    chats, heldout = chat_sft.load_chats(args.chat_sources, tokenizer, 128)
    mixture = chat_sft.build_mixture(args.mixture_name, "sft", chats=chats)
    assert len(heldout) == 2 and mixture.rows[str(path)] == round(2.5 * 38) and mixture.rows["ToyMath"] == 1000
    assert sum(1 for t, _ in mixture.index if mixture.tasks[t].name == str(path)) == 2 * 38 + 19  # 2 epochs + half of one
    alone = chat_sft.parse_args(["--stage", "sft", "--data", str(path), "--data", f"{path}:3"])
    chat_sft.check_args(alone)
    assert alone.mixture_name is None and alone.eval_names == [] and alone.mixture == f"{path}:1+{path}:3"
    both = chat_sft.parse_args(["--stage", "sft", "--mixture", "toy", "--data", str(path)])  # --data joins a named --mixture
    chat_sft.check_args(both)
    assert (both.mixture_name, both.chat_sources, both.mixture) == ("toy", [(str(path), 1.0)], f"toy+{path}:1")


@pytest.mark.parametrize("stage", ["sft", "mid"])
def test_resume_continues_on_the_same_chats_and_refuses_others(stage, tmp_path, speedchat_home):
    tiny_base()
    path = style_file(tmp_path / "mine.jsonl", n=40)
    argv = ["--stage", stage, "--init-from", "base", "--device-batch-size", "4", "--data", str(path), "--num-iterations", "3",
            "--total-batch-size", "8" if stage == "sft" else "1024"]  # mid: 2 rows of 128 + 1 tokens, packed
    chat_sft.main(argv + ["--stop-at-step", "1"])
    style_file(path, n=40, seed=1)  # other conversations under the same name
    with pytest.raises(SystemExit) as e:
        chat_sft.main(argv + ["--resume"])
    assert "--resume:" in str(e.value) and "other settings" in str(e.value) and "'chats'" in str(e.value)
    style_file(path, n=40)
    out = chat_sft.main(argv + ["--resume"])
    report = json.loads((speedchat_home / "report" / f"{stage}.json").read_text())
    assert out["step"] == 3 and report["heldout_val_loss_start"] > report["heldout_val_loss"]  # the start figures survive a resume
