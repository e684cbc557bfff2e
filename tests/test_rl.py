"""chat_rl.py: advantages, masking of forced tokens, the direction of one update, the loop end to end,
exact resume, 2 ranks == 1 rank, and clear errors. A tiny model and tokenizer trained on toy text
stand in for the SFT checkpoint."""
import functools, json, os
from dataclasses import asdict

import pytest
import torch

import chat_rl, engine, evals, tok, train
from _helpers_train import exit_rank, free_port, spawn_ranks


@functools.lru_cache(maxsize=1)
def _tokenizer():
    world = tok.ToyWorld(0)
    texts = [world.document(i) for i in range(150)] + [m["question"] + " #### " + str(m["answer"]) for m in world.math_items("train", 100)]
    return tok.train_tokenizer(texts, 400, workers=1)


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    cfg = train.GPTConfig(sequence_len=96, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    model = train.GPT(cfg)
    with torch.no_grad():  # non-zero output projections: at init they hide every dependency between positions
        for b in model.blocks:
            torch.nn.init.normal_(b.attn.c_proj.weight, std=0.05)
            torch.nn.init.normal_(b.mlp.c_proj.weight, std=0.05)
    return model


def make_sft_checkpoint(tag="tiny", seed=0):
    """Tokenizer in $SPEEDCHAT_HOME/tokenizer, a tiny model as checkpoints/sft/<tag>."""
    tokenizer = _tokenizer()
    tokenizer.save(tok.home() / "tokenizer")
    model = tiny_model(tokenizer.vocab_size, seed)
    meta = {"step": 10, "model_config": asdict(model.config), "tokenizer_hash": tokenizer.hash, "world_size": 1}
    train.save_checkpoint(train.checkpoint_root("sft") / tag, 10, model.state_dict(), None, meta)
    return model, tokenizer


def group(tokenizer):
    """A prompt and two completions of it, as the engine returns them (mask 1 = sampled)."""
    item = evals.ToyMath("test", size=1)[0]
    prompt = tokenizer.render_for_completion(item["messages"])
    end = tokenizer.special("<|assistant_end|>")
    good = tokenizer.encode(f"#### {item['answer']}") + [end]
    bad = tokenizer.encode("I do not know the answer") + [end]
    seqs = [prompt + good, prompt + bad]
    masks = [[0] * len(prompt) + [1] * len(good), [0] * len(prompt) + [1] * len(bad)]
    return item, seqs, masks


def test_advantages_are_centered_not_scaled():
    assert torch.equal(chat_rl.advantages([1, 1, 1, 1]), torch.zeros(4))
    assert torch.equal(chat_rl.advantages([0.0, 0.0]), torch.zeros(2))
    assert torch.allclose(chat_rl.advantages([1, 0, 0, 0]), torch.tensor([0.75, -0.25, -0.25, -0.25]))  # no / std


def test_equal_rewards_give_no_gradient():
    tokenizer = _tokenizer()
    model = tiny_model(tokenizer.vocab_size)
    _, seqs, masks = group(tokenizer)
    for rewards in ([1.0, 1.0], [0.0, 0.0]):
        adv = chat_rl.advantages(rewards)
        chat_rl.pg_backward(model, seqs, masks, adv, 10, "cpu")
        assert all(p.grad is None for p in model.parameters())  # skipped: no forward at all
        loss = -(chat_rl.sampled_logprobs(model, seqs, masks, "cpu") * adv).sum()  # and had it run: exactly 0
        loss.backward()
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
        model.zero_grad(set_to_none=True)


def test_forced_and_prompt_tokens_carry_no_loss():
    tokenizer = _tokenizer()
    model = tiny_model(tokenizer.vocab_size)
    sp = tokenizer.special
    prompt = tokenizer.render_for_completion([{"role": "user", "content": "What is 6 times 7?"}])
    code, out = tokenizer.encode("6*7"), tokenizer.encode("42")
    tail = tokenizer.encode(" It is 42.") + [sp("<|assistant_end|>")]
    gen = [sp("<|python_start|>"), *code, sp("<|python_end|>"), sp("<|output_start|>"), *out, sp("<|output_end|>"), *tail]
    gmask = [1] * (len(code) + 2) + [0] * (len(out) + 2) + [1] * len(tail)  # the engine's mask for a tool call
    seq, mask = prompt + gen, [0] * len(prompt) + gmask
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq[:-1]])), -1)[0]
        per_token = lp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]  # log p(token t+1 | ..t)
        got = chat_rl.sampled_logprobs(model, [seq], [mask], "cpu")[0]
    want = per_token[torch.tensor(mask[1:], dtype=torch.bool)].sum()
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, per_token.sum(), atol=1e-3)
    # a different forced tool output at the very end changes nothing (it is only ever a target)
    seq2 = seq[:-1] + [sp("<|output_end|>")]
    mask2 = mask[:-1] + [0]
    with torch.no_grad():
        a = chat_rl.sampled_logprobs(model, [seq[:-1] + [seq[-1]]], [mask[:-1] + [0]], "cpu")
        b = chat_rl.sampled_logprobs(model, [seq2], [mask2], "cpu")
    assert torch.equal(a, b)
    # padding a short row next to a long one changes nothing either
    with torch.no_grad():
        both = chat_rl.sampled_logprobs(model, [seq, prompt + gen[:3]], [mask, mask[:len(prompt) + 3]], "cpu")
    assert torch.allclose(both[0], got, atol=1e-5)


def test_one_step_raises_the_rewarded_completion():
    tokenizer = _tokenizer()
    model = tiny_model(tokenizer.vocab_size)
    item, seqs, masks = group(tokenizer)
    task, n_prompt = evals.ToyMath("test", size=1), masks[0].index(1)
    rewards = [task.reward(item, engine.completion_text(tokenizer, s[n_prompt:])) for s in seqs]
    assert rewards == [1.0, 0.0]  # the grader agrees: the first is right, the second wrong
    opt = train.setup_optimizer(model, 0.2 * 0.05, 0.004 * 0.05, 0.02 * 0.05, 0.02 * 0.05)
    with torch.no_grad():
        before = chat_rl.sampled_logprobs(model, seqs, masks, "cpu")
    num_tokens = sum(sum(m) for m in masks)
    chat_rl.pg_backward(model, seqs, masks, chat_rl.advantages([1.0, 0.0]), num_tokens, "cpu", batch_rows=1)
    opt.step()
    with torch.no_grad():
        after = chat_rl.sampled_logprobs(model, seqs, masks, "cpu")
    assert after[0] > before[0] + 1e-3, (before, after)  # rewarded: more likely
    assert after[1] < before[1], (before, after)          # unrewarded, same group: less likely


def test_prompt_order_is_a_permutation_per_epoch():
    n, per = 10, 4
    idx = [chat_rl.prompt_index(s, j, per, n, seed=3) for s in range(5) for j in range(per)]  # 2 epochs
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))
    assert idx[:10] != idx[10:20]
    assert idx == [chat_rl.prompt_index(s, j, per, n, seed=3) for s in range(5) for j in range(per)]


ARGS = ["--task", "toy", "--init-from", "sft", "--prompts-per-step", "2", "--samples-per-prompt", "3", "--max-new-tokens", "6",
        "--eval-examples", "2", "--eval-samples", "2", "--eval-every", "-1", "--device", "cpu", "--init-lr-frac", "1.0"]


def test_end_to_end_on_toy(capsys):
    make_sft_checkpoint()
    out = chat_rl.main(ARGS + ["--num-steps", "2", "--tag", "e2e"])
    text = capsys.readouterr().out
    assert "pass@1" in text and "pass@2" in text and "elapsed" in text
    assert out["step"] == 2 and len(out["rewards"]) == 2
    section = json.loads((tok.home() / "report" / "rl.json").read_text())
    assert section["task"] == "toy" and section["num_steps"] == 2 and len(section["reward_per_step"]) == 2
    assert {"pass@1_before", "pass@1_after", "pass@2_before", "pass@2_after"} <= set(section)
    lines = [json.loads(l) for l in (train.checkpoint_root("rl") / "e2e" / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "reward" in l] == [0, 1]
    model, _, meta = train.load_model("rl", "e2e")  # what engine.py / serve.py will load
    assert meta["step"] == 2 and isinstance(model, train.GPT)
    with pytest.raises(SystemExit, match="already has checkpoints"):  # no silent overwrite
        chat_rl.main(ARGS + ["--num-steps", "2", "--tag", "e2e"])


class ParityTask(evals.Task):
    """ToyMath prompts, rewarded when the completion has an even number of characters: a random tiny
    model gets mixed rewards, so every step has a gradient."""
    name = "Parity"

    def __init__(self, split, **kw):
        super().__init__(**kw)
        self.items = evals.ToyMath(split, size=8).items

    def num_examples(self):
        return len(self.items)

    def get_example(self, i):
        return dict(self.items[i])

    def evaluate(self, item, completion):
        return float(len(completion) % 2 == 0)


def params_of(tag):
    model, _, meta = train.load_model("rl", tag)
    return {k: v.clone() for k, v in model.state_dict().items()}, meta


def test_resume_is_exact(monkeypatch):
    monkeypatch.setitem(chat_rl.TASKS, "toy", (ParityTask, 6, 2))
    init, _ = make_sft_checkpoint()
    full = chat_rl.main(ARGS + ["--num-steps", "3", "--tag", "full"])
    chat_rl.main(ARGS + ["--num-steps", "3", "--tag", "cut", "--stop-at-step", "1"])
    part, meta = params_of("cut")
    assert meta["step"] == 1 and len(meta["loop"]["rewards"]) == 1
    with pytest.raises(SystemExit, match="other settings"):  # a resume must continue the same run
        chat_rl.main(ARGS + ["--num-steps", "4", "--tag", "cut", "--resume"])
    resumed = chat_rl.main(ARGS + ["--num-steps", "3", "--tag", "cut", "--resume"])
    a, _ = params_of("full")
    b, _ = params_of("cut")
    assert resumed["rewards"] == full["rewards"] and resumed["before"] == full["before"]
    assert any(not torch.equal(a[k], init.state_dict()[k]) for k in a)  # it learned something
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(l) for l in (train.checkpoint_root("rl") / "cut" / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "reward" in l] == [0, 1, 2]


def _rank_main(rank, world_size, port, home, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), SPEEDCHAT_HOME=str(home))
    chat_rl.TASKS["toy"] = (ParityTask, 6, 2)
    chat_rl.main(argv)
    exit_rank()


@pytest.mark.heavy(6)
def test_two_ranks_match_one(monkeypatch, speedchat_home):
    monkeypatch.setitem(chat_rl.TASKS, "toy", (ParityTask, 6, 2))
    make_sft_checkpoint()
    argv = ARGS + ["--num-steps", "1", "--prompts-per-step", "4"]
    chat_rl.main(argv + ["--tag", "one"])
    spawn_ranks(_rank_main, (2, free_port(), speedchat_home, argv + ["--tag", "two"]))
    a, _ = params_of("one")
    b, meta = params_of("two")
    assert meta["world_size"] == 2 and meta["loop"]["rewards"] == json.loads(
        (train.checkpoint_root("rl") / "one" / "step_000001" / "meta.json").read_text())["loop"]["rewards"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_clear_errors(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        chat_rl.main(["--task", "nope"])
    assert e.value.code == 2 and "--task" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        chat_rl.main(["--task", "toy", "--samples-per-prompt", "1"])
    assert e.value.code == 2 and "--samples-per-prompt 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--init-from sft: no sft checkpoints"):
        chat_rl.main(["--task", "toy", "--device", "cpu"])

    def offline(*a, **k):
        raise evals.EvalError("openai/gsm8k: download failed (offline)")
    monkeypatch.setattr(evals, "hf_rows", offline)
    with pytest.raises(SystemExit, match="--task gsm8k: openai/gsm8k"):
        chat_rl.main(["--task", "gsm8k", "--device", "cpu"])
