"""chat_sft.py: masks reach the loss, mid packing keeps conversations whole, ranks split the data,
resume is exact, bad flags fail in one line, and a toy mid -> sft run reports and measures."""
import json
from dataclasses import asdict

import pytest
import torch

import chat_sft
import evals
import tok
import train
from _helpers_train import exit_rank, free_port, spawn_ranks

_TOKENIZER = []


def toy_tokenizer():
    """A small BPE trained on toy-world documents (once per session), saved into this test's home."""
    if not _TOKENIZER:
        world = tok.ToyWorld(0)
        _TOKENIZER.append(tok.train_tokenizer([world.document(i) for i in range(800)], 400))
    t = _TOKENIZER[0]
    t.save(tok.home() / "tokenizer")
    return t


def tiny_base(tag="t", seq_len=128, seed=0):
    """A tiny random 'base' checkpoint under checkpoints/base/<tag>, as train.py would write it."""
    tokenizer = toy_tokenizer()
    cfg = train.GPTConfig(sequence_len=seq_len, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                          n_embd=64, window_pattern="L")
    torch.manual_seed(seed)
    model = train.GPT(cfg)
    meta = {"step": 0, "model_config": asdict(cfg), "tokenizer_hash": tokenizer.hash}
    train.save_checkpoint(train.checkpoint_root("base") / tag, 0, model.state_dict(), None, meta)
    return model, tokenizer


TINY = ["--mixture", "toy", "--device-batch-size", "4", "--max-seq-len", "64", "-a", "none", "--init-lr-frac", "1"]


def _log(stage, tag):
    path = train.checkpoint_root(stage) / tag / "log.jsonl"
    return [(e["step"], e["loss"]) for e in map(json.loads, path.read_text().splitlines())]


# ----------------------------------------------------------------------------- masks and packing

def _tool_conversation():
    return tok.ToyWorld(0).math_item(3)["messages"]  # user turn, text, python call, its output, text


def test_sft_targets_are_exactly_the_masked_tokens():
    tokenizer = toy_tokenizer()
    convs = [_tool_conversation(), tok.ToyWorld(0).fact_item(1)["messages"]]
    rendered = [tokenizer.render_conversation(c) for c in convs]
    x, y = chat_sft.collate_sft(rendered, tokenizer.bos_id)
    assert x.shape == y.shape == (2, max(len(ids) for ids, _ in rendered) - 1)
    for r, (ids, mask) in enumerate(rendered):
        assert x[r, :len(ids) - 1].tolist() == ids[:-1]
        for t in range(y.size(1)):
            inside = t + 1 < len(ids)
            want = ids[t + 1] if inside and mask[t + 1] else -1  # padding and mask-0 tokens are never targets
            assert y[r, t].item() == want
    ids, mask = rendered[0]
    out_start, py_start = tokenizer.special("<|output_start|>"), tokenizer.special("<|python_start|>")
    assert mask[ids.index(out_start)] == 0 and mask[ids.index(py_start)] == 1  # tool output forced, the call learned
    assert y[0, ids.index(out_start) - 1] == -1 and y[0, ids.index(py_start) - 1] == py_start
    assert ids[-1] == tokenizer.special("<|assistant_end|>") and y[0, len(ids) - 2] == ids[-1]


def test_tokens_outside_the_mask_never_reach_the_loss_or_gradients():
    """Changing what the user said / what the tool printed in the *targets* (mask 0), or the padding,
    changes neither the loss nor any gradient; changing an assistant token does."""
    model, tokenizer = tiny_base()
    # at init the output projections are zero, which hides every dependency between positions
    for b in model.blocks:
        torch.nn.init.normal_(b.attn.c_proj.weight, std=0.05)
        torch.nn.init.normal_(b.mlp.c_proj.weight, std=0.05)
    ids, mask = tokenizer.render_conversation(_tool_conversation())
    short_ids, short_mask = tokenizer.render_conversation(tok.ToyWorld(0).fact_item(2)["messages"])

    def loss_and_grads(target_ids, target_mask, pad_id=tokenizer.bos_id):
        x, _ = chat_sft.collate_sft([(ids, mask), (short_ids, short_mask)], pad_id)
        _, y = chat_sft.collate_sft([(target_ids, target_mask), (short_ids, short_mask)], pad_id)
        model.zero_grad()
        n = (y >= 0).sum()
        loss = model(x, y, loss_reduction="sum") / n
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        return loss.item(), grads

    base_loss, base_grads = loss_and_grads(ids, mask)
    g = torch.Generator().manual_seed(0)
    corrupted = [t if m else int(torch.randint(0, 256, (1,), generator=g)) for t, m in zip(ids, mask)]
    assert corrupted != ids
    loss2, grads2 = loss_and_grads(corrupted, mask)
    assert loss2 == base_loss and all(torch.equal(a, b) for a, b in zip(base_grads, grads2))
    loss3, grads3 = loss_and_grads(ids, mask, pad_id=7)  # another padding token: same
    assert loss3 == base_loss
    k = max(i for i, m in enumerate(mask) if m and i < len(ids) - 1)
    changed = list(ids)
    changed[k] = (changed[k] + 1) % 256
    assert loss_and_grads(changed, mask)[0] != base_loss  # an assistant token does count

    # the training step computes the same token-weighted loss
    x, y = chat_sft.collate_sft([(ids, mask), (short_ids, short_mask)], tokenizer.bos_id)
    opt = train.setup_optimizer(model)
    step_loss = chat_sft.train_step(model, opt, [(x[:1], y[:1]), (x[1:], y[1:])])
    assert step_loss.item() == pytest.approx(base_loss, rel=1e-5)


def _fake_conversations(n, seed=0):
    import random
    rng = random.Random(seed)
    words = "alpha beta gamma delta kappa lambda omega".split()
    convs = []
    for i in range(n):
        k = rng.choice([1, 2, 3, 5, 8, 13, 40, 90])  # some longer than a row of 64
        convs.append({"messages": [{"role": "user", "content": f"q{i} " + " ".join(rng.choice(words) for _ in range(k))},
                                   {"role": "assistant", "content": f"a{i} done."}]})
    return convs


def test_mid_packing_keeps_whole_conversations():
    tokenizer = toy_tokenizer()
    convs, T = _fake_conversations(120), 64
    loader = chat_sft.PackedLoader(convs, tokenizer, 4, T, buffer=20)
    full = {i: tokenizer.render_conversation(c["messages"], max_tokens=1 << 30)[0] for i, c in enumerate(convs)}
    seen = []
    bos = tokenizer.bos_id
    for _ in range(10):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, T)
        for r in range(4):
            row = x[r].tolist() + [y[r, -1].item() if y[r, -1] >= 0 else bos]
            valid = [True] + [t >= 0 for t in y[r].tolist()]
            n = valid.index(False) if False in valid else T + 1
            assert row[0] == bos and all(not v for v in valid[n:])  # conversations, then only padding
            assert y[r, :n - 1].tolist() == row[1:n]                 # every conversation token is a target
            starts = [i for i in range(n) if row[i] == bos]
            for a, b in zip(starts, starts[1:] + [n]):
                seg = row[a:b]
                match = [i for i, ids in full.items() if ids[:len(seg)] == seg and (len(ids) == len(seg) or len(seg) == T + 1)]
                assert match, "a row holds a piece of a conversation"
                i = next(i for i in match if i not in seen)
                if len(full[i]) > len(seg):  # cropped: only a too-long conversation, alone in its row
                    assert len(full[i]) > T + 1 and len(seg) == T + 1
                seen.append(i)
    assert len(seen) == len(set(seen)) > 40  # no conversation is split over two rows or used twice
    assert any(len(full[i]) > T + 1 for i in seen)


def test_ranks_split_the_stream_and_state_resumes_the_packer():
    tokenizer = toy_tokenizer()
    convs = _fake_conversations(30)
    a, b = (chat_sft.RowLoader(convs, tokenizer, 3, 64, rank=r, world_size=2) for r in (0, 1))
    ga = [a.next()[0] for _ in range(15)]
    gb = [b.next()[0] for _ in range(15)]
    assert sorted(ga + gb) == list(range(30)) and a.epoch == 1.0
    p = chat_sft.PackedLoader(convs, tokenizer, 2, 64, buffer=8)
    p.next_batch()
    q = chat_sft.PackedLoader(convs, tokenizer, 2, 64, buffer=8)
    q.load_state_dict(p.state_dict())
    for _ in range(5):  # across the end of the first pass too
        (x1, y1), (x2, y2) = p.next_batch(), q.next_batch()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


# ----------------------------------------------------------------------------- the mixtures

@pytest.mark.heavy(4)
def test_mixtures_count_epochs_and_identity_is_varied():
    mid, sft = chat_sft.build_mixture("toy", "mid"), chat_sft.build_mixture("toy", "sft")
    facts = len(evals.ToyFacts("train"))
    count = lambda m, name: sum(1 for t, _ in m.index if m.tasks[t].name == name)
    assert count(mid, "ToyFacts") == 4 * facts and count(sft, "ToyFacts") == 2 * facts
    assert count(mid, "ToyMath") == 2000 and count(sft, "ToyMath") == 1000 and count(sft, "Identity") == 250
    assert [mid[i]["messages"] for i in range(20)] == [chat_sft.build_mixture("toy", "mid")[i]["messages"] for i in range(20)]
    heldout = {evals.ToyFacts("test")[i]["messages"][0]["content"] for i in range(len(evals.ToyFacts("test")))}
    assert not heldout & {mid[i]["messages"][0]["content"] for i in range(len(mid))}  # held-out facts never trained on
    idn = chat_sft.Identity()
    convs = [idn[i]["messages"] for i in range(len(idn))]
    assert len(convs) >= 300 and len({json.dumps(c) for c in convs}) > 0.9 * len(convs)
    assert sum(len(c) > 2 for c in convs) > 100  # multi-turn
    assert sum("speedchat" in json.dumps(c) for c in convs) > 0.5 * len(convs)
    tokenizer = toy_tokenizer()
    for c in convs:
        tokenizer.render_conversation(c)  # all well formed
    assert "--mixture nope: unknown mixture; known: default, toy" in str(pytest.raises(SystemExit, chat_sft.build_mixture, "nope", "sft").value)


# ----------------------------------------------------------------------------- the loop

@pytest.mark.parametrize("stage", ["mid", "sft"])
def test_resume_is_exact(stage):
    tiny_base()
    if stage == "sft":
        extra = ["--init-from", "base", "--total-batch-size", "8"]
    else:
        extra = ["--total-batch-size", "512", "--buffer-convs", "30"]
    args = ["--stage", stage, "--num-iterations", "5", "--save-every", "2"] + TINY + extra
    chat_sft.main(args + ["--tag", "straight"])
    chat_sft.main(args + ["--tag", "split", "--stop-at-step", "3"])
    assert train.last_step(train.checkpoint_root(stage) / "split") == 3
    chat_sft.main(args + ["--tag", "split", "--resume"])
    a, b = _log(stage, "straight"), _log(stage, "split")
    assert len(a) == 5 and a == b  # bit-exact on CPU
    sa, _, _, ma = train.load_checkpoint(train.checkpoint_root(stage) / "straight")
    sb, _, _, mb = train.load_checkpoint(train.checkpoint_root(stage) / "split")
    assert ma["step"] == mb["step"] == 5 and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("argv, message", [
    (["--stage", "sft", "--mixture", "nope"], "--mixture nope: unknown mixture; known: default, toy"),
    (["--stage", "sft", "--mixture", "toy", "-a", "ToyFacts,Nope"], "-a Nope: unknown task"),
    (["--stage", "sft", "--mixture", "toy"], "--init-from mid: no mid checkpoints"),
    (["--stage", "mid", "--mixture", "toy", "--init-from", "mid"], "--init-from mid: use base (or hf:DIR) for --stage mid"),
    (["--stage", "mid", "--mixture", "toy", "--resume"], "--resume: no checkpoint"),
    (["--stage", "sft", "--mixture", "toy", "--init-from", "base", "--device-batch-size", "3"], "--total-batch-size 32"),
    (["--stage", "sft", "--num-iterations", "0"], "--num-iterations 0"),
    (["--measure", "bas"], "--measure bas: unknown source"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, speedchat_home):
    tiny_base()
    with pytest.raises(SystemExit) as e:
        chat_sft.main(argv)
    assert message in str(e.value) and "\n" not in str(e.value)
    for stage in ("mid", "sft"):
        assert not (speedchat_home / "checkpoints" / stage).exists()


def test_toy_mid_then_sft_reports_and_measures(speedchat_home):
    tiny_base(tag="toy")
    chat_sft.main(["--stage", "mid", "--num-iterations", "2", "--total-batch-size", "256"] + TINY)
    out = chat_sft.main(["--stage", "sft", "--num-iterations", "2", "--total-batch-size", "4", "--mixture", "toy",
                         "--device-batch-size", "4", "-a", "ToyFacts,ToyMath", "--max-problems", "2", "--max-new-tokens", "8"])
    assert out["step"] == 2 and out["ckpt_dir"] == train.checkpoint_root("sft") / "toy"  # the source's tag
    report = json.loads((speedchat_home / "report" / "sft.json").read_text())
    assert report["init_from"] == "mid/toy" and report["num_iterations"] == 2 and report["batch_unit"] == "conversations"
    assert 0 <= report["ToyFacts"] <= 1 and "ChatCORE" in report and report["final_loss"] > 0
    assert json.loads((speedchat_home / "report" / "mid.json").read_text())["batch_unit"] == "tokens"
    model, tokenizer, meta = train.load_model("sft", "toy")
    assert meta["train"]["init_from"] == "mid" and meta["train"]["mixture"] == "toy"
    figures = chat_sft.measure_toy(model, tokenizer, max_problems=2, max_tokens=8)
    assert set(figures) == {"ToyFacts", "ToyMath", "ToyMath_rare", "ends_turn", "python_calls"}
    assert all(0 <= v <= 1 for v in figures.values())
    table = chat_sft.main(["--measure", "base,sft:toy", "--model-tag", "toy", "--max-problems", "1"])
    assert set(table) == {"base/toy", "sft/toy"}
    assert json.loads((speedchat_home / "report" / "toy_chat.json").read_text()) == table


def test_measure_counts_turn_ends_and_tool_calls(monkeypatch):
    """A fake model that answers every question with the reference: all figures are 1."""
    model, tokenizer = tiny_base()
    answers = {}

    def scripted(eng, prompts, n=1, **kw):  # engine.generate_all's contract: [(seqs, masks)] per prompt
        return [([p + answers[tuple(p)]], None) for p in prompts]
    for task in (evals.ToyFacts("test"), evals.ToyMath("test")):
        for item in task[:12]:
            ids, _ = tokenizer.render_conversation(item["messages"])
            prompt = tokenizer.render_for_completion(item["messages"])
            answers[tuple(prompt)] = ids[len(prompt):]
    monkeypatch.setattr(chat_sft.engine, "generate_all", scripted)
    assert any(item["rare"] for item in evals.ToyMath("test")[:12])
    assert chat_sft.measure_toy(model, tokenizer, max_problems=12) == {"ToyFacts": 1.0, "ToyMath": 1.0, "python_calls": 1.0,
                                                                       "ToyMath_rare": 1.0, "ends_turn": 1.0}


def _rank_main(rank, world_size, port, home, argv):
    """spawn_ranks entry: one torchrun-style rank running chat_sft.main (gloo on CPU)."""
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), SPEEDCHAT_HOME=home)
    torch.set_default_dtype(torch.float64)  # fp32 noise would hide the comparison (Adam amplifies tiny gradients)
    chat_sft.main(argv)
    exit_rank()


@pytest.mark.heavy(5)
def test_two_ranks_match_one_rank_with_twice_the_accumulation(speedchat_home):
    """sft on 2 gloo ranks (each its slice of the conversations) == 1 rank accumulating 2 micro-batches:
    the same conversations per step, and the loss weighs every target token the same."""
    tiny_base()
    args = ["--stage", "sft", "--init-from", "base", "--num-iterations", "3", "--total-batch-size", "8"] + TINY
    torch.set_default_dtype(torch.float64)
    try:
        chat_sft.main(args + ["--tag", "one"])
    finally:
        torch.set_default_dtype(torch.float32)
    spawn_ranks(_rank_main, (2, free_port(), str(speedchat_home), args + ["--tag", "two"]))
    one, two = _log("sft", "one"), _log("sft", "two")
    assert [s for s, _ in one] == [s for s, _ in two] == [0, 1, 2]
    assert [l for _, l in one] == pytest.approx([l for _, l in two], rel=1e-9)  # only the summation order differs
    d = train.checkpoint_root("sft") / "two" / "step_000003"
    assert (d / "optim_rank1.pt").exists() and (d / "state_rank1.pt").exists()
    sa, sb = train.load_checkpoint(d.parent)[0], train.load_checkpoint(train.checkpoint_root("sft") / "one")[0]
    assert sa["wte.weight"].dtype == torch.float64 and all(torch.allclose(sa[k], sb[k], rtol=0, atol=1e-8) for k in sa)


def test_stage_defaults():
    def resolved(*argv):
        args = chat_sft.parse_args(["--stage", *argv])
        chat_sft.check_args(args)
        return args
    mid = resolved("mid")
    assert (mid.init_from, mid.total_batch_size, mid.device_batch_size, mid.init_lr_frac, mid.warmdown_ratio) == \
        ("base", 524288, 32, 1.0, 0.2)
    sft = resolved("sft")
    assert (sft.init_from, sft.total_batch_size, sft.init_lr_frac, sft.warmdown_ratio) == ("mid", 32, 0.02, 1.0)
    assert resolved("sft", "--init-from", "base").init_lr_frac == 1.0  # the special tokens are new to a base model
    assert resolved("mid", "--mixture", "toy").total_batch_size == 0    # toy: one micro-batch a step
    assert resolved("mid", "-a", "none").eval_names == [] and resolved("sft", "--mixture", "toy").eval_names == \
        ["ToyFacts", "ToyMath", "ToySpell"]
