"""train.py: model, optimizer, loader, loop, checkpoints, distributed equivalence (CPU, tiny)."""
import copy, json, math

import pytest
import torch

import train
from _helpers_train import SimpleKVCache, tiny_model, scramble

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


# ----------------------------------------------------------------------------- model

def test_causality_earlier_logits_never_see_later_tokens():
    model = scramble(tiny_model(window_pattern="SL")).eval()
    x = torch.randint(0, 300, (2, 32))
    base = model(x)
    for t in (5, 17, 30):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 300
        out = model(x2)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0, msg=f"logits before {t} changed")
        assert (out[:, t + 1:] - base[:, t + 1:]).abs().amax() > 1e-4  # later positions do see it


def test_sliding_window_layer_attends_to_exactly_its_window():
    cfg = train.GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    attn = train.CausalSelfAttention(cfg, 0)
    torch.nn.init.normal_(attn.c_proj.weight)  # zero-initialised: would hide every dependency
    model = train.GPT(cfg)
    cos, sin = model.rope_cos[:, :, :32], model.rope_sin[:, :, :32]
    w = 8
    x = torch.randn(1, 32, 64)
    for impl in ("sdpa", "flex"):
        bm = train.make_block_mask(32, w, "cpu") if impl == "flex" else None
        with torch.no_grad():
            base = attn(x, None, cos, sin, w, block_mask=bm)
            for j in (0, 5, 12, 31):  # perturb input j: exactly the queries j..j+w-1 may change
                x2 = x.clone()
                x2[0, j] += 1.0
                changed = ((attn(x2, None, cos, sin, w, block_mask=bm) - base).abs().sum(-1)[0] > 1e-6).nonzero().flatten().tolist()
                assert changed == list(range(j, min(32, j + w))), (impl, j, changed)


def test_window_pattern_and_padding():
    cfg = train.GPTConfig(sequence_len=64, vocab_size=301, n_layer=8, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SSSL")
    assert train.window_sizes(cfg) == [16, 16, 16, 64, 16, 16, 16, 64]
    cfg2 = train.GPTConfig(sequence_len=64, vocab_size=301, n_layer=3, n_head=2, n_kv_head=2, n_embd=64, window_pattern="S")
    assert train.window_sizes(cfg2) == [16, 16, 64]  # the last layer always sees the whole training length
    m = train.GPT(cfg)
    assert m.wte.weight.shape[0] == m.lm_head.weight.shape[0] == 320
    assert m(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 301)
    assert sorted(int(k) for k in m.value_embeds) == [1, 3, 5, 7]  # alternating, last included
    assert all(b.attn.c_proj.weight.abs().sum() == 0 and b.mlp.c_proj.weight.abs().sum() == 0 for b in m.blocks)
    assert all(p.ndim > 0 for p in m.parameters()) and not any("bias" in n for n, _ in m.named_parameters())
    with pytest.raises(ValueError, match="--window-pattern"):
        train.GPTConfig(window_pattern="SXL").validate()
    with pytest.raises(ValueError, match="--n-kv-head"):
        train.GPTConfig(n_head=6, n_kv_head=4).validate()


def test_kv_cache_decoding_matches_full_forward():
    model = scramble(tiny_model(sequence_len=32, window_pattern="SL")).eval()  # window 8 on layer 0
    x = torch.randint(0, 300, (2, 24))
    full = model(x)
    cache = SimpleKVCache(model.config.n_layer)
    parts = [model(x[:, :10], kv_cache=cache)]     # prefill
    parts.append(model(x[:, 10:13], kv_cache=cache))  # a chunk
    for t in range(13, 24):                          # one token at a time
        parts.append(model(x[:, t:t + 1], kv_cache=cache))
    assert cache.pos == 24
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-4)


def test_inputs_longer_than_training_run_whole_up_to_the_rotary_table():
    model = scramble(tiny_model(sequence_len=16, window_pattern="L")).eval()  # 2 layers, window 16 each
    assert model.max_positions == 160 == model.rope_cos.size(2)
    x = torch.randint(0, 300, (1, 160))
    base = model(x)[0]  # the whole 160 tokens, 10x the training length
    for j, reaches in ((150, True), (129, True), (128, False), (0, False)):
        x2 = x.clone()
        x2[0, j] = (x2[0, j] + 1) % 300
        # each layer looks back 15 positions (its window is the training length), two layers 30
        assert ((model(x2)[0, 159] - base[159]).abs().amax() > 1e-6) == reaches, j
    cache = SimpleKVCache(model.config.n_layer)  # prefill and decode past the training length agree
    parts = [model(x[:, :100], kv_cache=cache)] + [model(x[:, t:t + 1], kv_cache=cache) for t in range(100, 110)]
    torch.testing.assert_close(torch.cat(parts, 1)[0], base[:110], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="161 tokens is longer than the model can represent: 160 positions"):
        model(torch.randint(0, 300, (1, 161)))


def test_flex_attention_matches_sdpa():
    model = scramble(tiny_model()).eval()
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():  # flex has no CPU backward; on CUDA it runs compiled
        ref = model(x)
        model.set_attention("flex", "cpu")
        torch.testing.assert_close(model(x), ref, atol=2e-5, rtol=1e-4)


def test_flops_and_scaling_params():
    model = tiny_model()
    blocks = sum(p.numel() for p in model.blocks.parameters())
    assert model.num_scaling_params() == blocks + model.lm_head.weight.numel()
    assert model.estimate_flops() > 6 * model.num_scaling_params()


def test_tiny_model_overfits_one_batch():
    model = tiny_model()
    opt = train.setup_optimizer(model, embedding_lr=0.2, unembedding_lr=0.02, matrix_lr=0.04)
    x = torch.randint(0, 300, (4, 33))
    first = None
    for step in range(60):
        train.set_schedule(opt, 1.0, train.muon_momentum(step))
        loss = float(train.train_step(model, opt, lambda: (x[:, :-1], x[:, 1:]), 1))
        first = first if first is not None else loss
    assert first > 5.0 and loss < 0.5, (first, loss)


# ----------------------------------------------------------------------------- optimizer

def test_polar_express_is_near_orthogonal():
    torch.manual_seed(0)
    for shape in ((64, 128), (128, 64), (96, 96)):
        G = torch.randn(3, *shape)
        X = train.polar_express(G)
        s = torch.linalg.svdvals(X)
        assert s.min() > 0.7 and s.max() < 1.2, (shape, s.min(), s.max())


def test_muon_update_is_near_orthogonal():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128) * 0.02)
    opt = train.MuonAdamW([dict(kind="muon", params=[p], lr=0.01)])
    p.grad = torch.randn(64, 128)
    before = p.detach().clone()
    opt.step()
    s = torch.linalg.svdvals((before - p.detach()) / 0.01)
    assert s.min() > 0.7 and s.max() < 1.2
    assert "momentum_buffer" in opt.state[p]


def test_lr_schedule_warmup_constant_warmdown():
    f = lambda s: train.lr_multiplier(s, 100, warmup_ratio=0.1, warmdown_ratio=0.4, final_lr_frac=0.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == f(60) == 1.0
    assert f(80) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert train.muon_momentum(0) == pytest.approx(0.85) and train.muon_momentum(1000) == pytest.approx(0.95)


def test_setup_optimizer_groups_every_parameter_once():
    model = tiny_model()
    opt = train.setup_optimizer(model)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    muon = {id(p) for g in opt.param_groups if g["kind"] == "muon" for p in g["params"]}
    assert id(model.lm_head.weight) not in muon and id(model.wte.weight) not in muon
    assert all(p.ndim == 2 for g in opt.param_groups if g["kind"] == "muon" for p in g["params"])


def test_optimizer_state_dict_is_torch_optims_and_round_trips():
    """MuonAdamW is not a torch.optim.Optimizer (whose methods import torch._dynamo), but its state_dict is
    torch's: a file written before (by torch.optim's state_dict) loads, and a wrong one is refused."""
    def steps(model, opt, n, seed):
        for i in range(n):
            x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(seed + i))
            model.zero_grad(set_to_none=True)
            model(x, x).backward()
            opt.step()
    a = tiny_model()
    opt_a = train.setup_optimizer(a)
    steps(a, opt_a, 2, 0)
    as_torch = torch.optim.Optimizer([dict(g) for g in opt_a.param_groups], {})
    as_torch.state.update(opt_a.state)
    ours, theirs = opt_a.state_dict(), as_torch.state_dict()
    assert ours["param_groups"] == theirs["param_groups"] and ours["state"].keys() == theirs["state"].keys()
    b = copy.deepcopy(a)
    opt_b = train.setup_optimizer(b)
    opt_b.load_state_dict(theirs)
    steps(a, opt_a, 2, 10), steps(b, opt_b, 2, 10)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    theirs["param_groups"][0]["params"].pop()
    with pytest.raises(ValueError, match="parameter groups"):
        opt_b.load_state_dict(theirs)


def _spawn(fn_name, args, world_size=2):
    import _helpers_train as h
    h.spawn_ranks(h.dist_worker, (world_size, h.free_port(), fn_name, args), world_size)


# a GPU-like aspect: head_dim 128, GQA, several layers (3: odd Muon groups leave a rank padding)
GPU_ASPECT = dict(n_layer=3, n_head=2, n_kv_head=1, n_embd=256, window_pattern="SSSL")


@pytest.mark.heavy(7)
@pytest.mark.parametrize("config", [{}, GPU_ASPECT], ids=["tiny", "head_dim_128_gqa"])
def test_two_processes_match_one_process_with_twice_the_accumulation(tmp_path, config):
    """Same global batches: 2 gloo ranks x 2 micro-batches == 1 rank x 4 micro-batches (sharded
    Muon + AdamW state, reduce-scatter / all-gather). Run in fp64: in fp32 the different summation
    order is rounding noise that Adam's first, sign-like steps can blow up on near-zero gradients."""
    import _helpers_train as h
    steps, micro = 3, 4
    h.run_optimizer_steps(0, 1, steps, micro, tmp_path / "one.pt", config)
    _spawn("run_optimizer_steps", (steps, micro, str(tmp_path / "two.pt"), config))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["params"].keys() == two["params"].keys()
    for name, p in one["params"].items():
        assert p.dtype == torch.float64
        torch.testing.assert_close(two["params"][name], p, atol=1e-9, rtol=1e-9, msg=name)
    init = h.tiny_model(**config).double().state_dict()
    assert any(not torch.equal(init[n], p) for n, p in one["params"].items())  # training did something


# ----------------------------------------------------------------------------- loader

def _segments(row, bos):
    """Split a row at BOS tokens: the documents (or the cropped last one) it is packed from."""
    idx = [i for i, t in enumerate(row) if t == bos] + [len(row)]
    return [row[a:b] for a, b in zip(idx[:-1], idx[1:])]


def test_loader_rows_start_with_bos_and_pack_whole_documents(tmp_path):
    from _helpers_train import ByteTokenizer, make_corpus
    t = ByteTokenizer()
    path = make_corpus(tmp_path / "c.jsonl", 300, max_words=12)  # 20-90 bytes: most fit a row
    docs = {}
    for line in path.read_text().splitlines():
        text = json.loads(line)["text"]
        docs[text.split()[0]] = [t.bos_id] + list(text.encode())
    loader = train.TokenLoader(t, str(path), "train", batch_size=4, seq_len=128, buffer_docs=50)
    cropped = whole = 0
    for _ in range(20):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 128) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert (x[:, 0] == t.bos_id).all()
        rows = torch.cat([x, y[:, -1:]], 1).tolist()
        for row in rows:
            segs = _segments(row, t.bos_id)
            for j, seg in enumerate(segs):
                text = bytes(seg[1:]).decode(errors="replace")
                if " " not in text:  # too short to name: can only be a crop at the end of the row
                    assert j == len(segs) - 1
                    continue
                full = docs[text.split()[0]]
                assert seg == full[:len(seg)], "a segment is not a prefix of its document"
                if len(seg) < len(full):
                    assert j == len(segs) - 1, "only the last document of a row may be cropped"
                    cropped += 1
                else:
                    whole += 1
    assert whole > 5 * cropped  # best fit: crops are the exception


def test_loader_best_fit_crops_only_when_nothing_fits():
    import numpy as np
    from _helpers_train import ByteTokenizer
    loader = train.TokenLoader(ByteTokenizer(), "unused", "train", batch_size=1, seq_len=7, buffer_docs=0)
    for n in (3, 5, 9):  # documents of 3, 5 and 9 tokens; rows of 8
        loader.buffer.add(n, np.full(n, n, dtype=np.int32))
    assert loader._row().tolist() == [5] * 5 + [3] * 3  # longest that fits, then the 3 fills the gap
    assert loader._row().tolist() == [9] * 8            # nothing fits an empty row: crop
    assert loader.buffer.items == []


def test_loader_ranks_never_share_a_document(tmp_path):
    from _helpers_train import ByteTokenizer, make_corpus
    t = ByteTokenizer()
    path = make_corpus(tmp_path / "c.jsonl", 4 * 1024 + 100, max_words=8)  # 5 units of 1024 documents
    seen = []
    for rank in range(2):
        loader = train.TokenLoader(t, str(path), "train", batch_size=8, seq_len=64, rank=rank, world_size=2, buffer_docs=100)
        names = set()
        for _ in range(60):
            x, _ = loader.next_batch()
            for row in x.tolist():
                for seg in _segments(row, t.bos_id):
                    text = bytes(seg[1:]).decode(errors="replace")
                    if text.startswith("doc") and " " in text:
                        names.add(int(text.split()[0][3:]))
        assert {n // 1024 % 2 for n in names} == {rank}  # unit u = documents 1024u.. belongs to rank u % 2
        seen.append(names)
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_loader_state_resumes_exactly_across_epochs(tmp_path):
    from _helpers_train import ByteTokenizer, make_corpus
    t = ByteTokenizer()
    path = make_corpus(tmp_path / "c.jsonl", 60)
    a = train.TokenLoader(t, str(path), "train", batch_size=2, seq_len=48, buffer_docs=10)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    b = train.TokenLoader(t, str(path), "train", batch_size=2, seq_len=48, buffer_docs=10, state=state)
    for _ in range(40):  # long enough to wrap into the next epochs
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.epoch >= 1  # wrapped into a new epoch on the way
    with pytest.raises(ValueError, match="rank 0 of 1"):
        train.TokenLoader(t, str(path), "train", batch_size=2, seq_len=48, rank=1, world_size=2, state=state)


def test_bits_per_byte_counts_bytes_and_skips_specials():
    torch.manual_seed(0)
    model = tiny_model(vocab_size=300).eval()
    token_bytes = torch.randint(1, 4, (300,))
    token_bytes[290:] = 0  # specials
    x = torch.randint(0, 300, (2, 32))
    y = torch.randint(0, 300, (2, 32))
    y[0, :4] = 295   # a special target: neither nats nor bytes
    y[1, -3:] = -1   # ignored
    with torch.no_grad():
        nats = model(x, y, loss_reduction="none")
    keep = (y >= 0) & (token_bytes[y.clamp(min=0)] > 0)
    want = nats[keep].sum().item() / (math.log(2) * token_bytes[y[keep]].sum().item())
    got = train.evaluate_bpb(model, [(x, y)], token_bytes)
    assert got == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- the loop, checkpoints

TINY = ["--depth", "1", "--n-embd", "64", "--n-head", "2", "--max-seq-len", "32", "--device-batch-size", "4",
        "--total-batch-size", "256", "--eval-every", "5", "--eval-tokens", "256", "--sample-every", "10",
        "--core-metric-every", "0", "--buffer-docs", "50"]


@pytest.fixture
def corpus(tmp_path):
    from _helpers_train import make_corpus, make_tokenizer
    make_tokenizer()
    return str(make_corpus(tmp_path / "corpus.jsonl", 1100, max_words=20))  # 2 units of documents


def _log(tag):
    path = train.checkpoint_root("base") / tag / "log.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()]


def _params(tag, step=None):
    state, _, _, meta = train.load_checkpoint(train.checkpoint_root("base") / tag, step)
    return state, meta


def test_resume_is_exact_and_the_run_reports(corpus, speedchat_home):
    args = TINY + ["--data", corpus, "--num-iterations", "20", "--save-every", "5", "--keep-last", "2"]
    train.main(args + ["--tag", "straight"])
    train.main(args + ["--tag", "split", "--stop-at-step", "10"])
    assert train.last_step(train.checkpoint_root("base") / "split") == 10
    train.main(args + ["--tag", "split", "--resume"])
    a, b = _log("straight"), _log("split")
    loss = lambda log: [(e["step"], e["loss"]) for e in log if "loss" in e]
    bpb = lambda log: [(e["step"], e["val_bpb"]) for e in log if "val_bpb" in e]
    assert len(loss(a)) == 20 and loss(a) == loss(b)  # bit-exact on CPU
    assert bpb(a) == bpb(b) and len(bpb(a)) == 5      # steps 0, 5, 10, 15, 20
    assert bpb(a)[-1][1] < bpb(a)[0][1]               # it learned something
    (sa, ma), (sb, mb) = _params("straight"), _params("split")
    assert ma["step"] == mb["step"] == 20
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    steps = sorted(p.name for p in (train.checkpoint_root("base") / "straight").glob("step_*"))
    assert steps == ["step_000015", "step_000020"]    # --keep-last 2
    report = json.loads((speedchat_home / "report" / "base.json").read_text())
    assert report["val_bpb"] == bpb(a)[-1][1] and report["tokens"] == 20 * 256 and report["num_params"] > 0
    assert report["tok_per_s"] > 0 and report["mfu"] is None  # no bf16 peak on CPU
    model, tokenizer, meta = train.load_model("base", None, None, "cpu")  # newest tag, last step
    assert meta["step"] == 20 and not model.training and model.config.n_embd == 64
    assert meta["tokenizer_hash"] == tokenizer.hash


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(corpus, monkeypatch):
    train.main(TINY + ["--data", corpus, "--num-iterations", "3", "--tag", "t"])
    ckpt = train.checkpoint_root("base") / "t"
    model, _, meta = train.load_model("base", "t")
    calls, real_save = [], torch.save

    def dying_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 1:  # the optimizer state, after model.safetensors was written
            raise KeyboardInterrupt("killed mid-save")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(train.torch, "save", dying_save)
    opt = train.setup_optimizer(model)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(ckpt, 4, model.state_dict(), opt.state_dict(), dict(meta, step=4), keep_last=1)
    monkeypatch.setattr(train.torch, "save", real_save)
    assert train.last_step(ckpt) == 3 and (ckpt / ".tmp_step_000004").exists()
    again, _, meta2 = train.load_model("base", "t")
    assert meta2["step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    train.save_checkpoint(ckpt, 4, model.state_dict(), None, dict(meta, step=4))  # a later save cleans up
    assert train.last_step(ckpt) == 4 and not (ckpt / ".tmp_step_000004").exists()


def test_checkpoints_refuse_another_tokenizer_or_config(corpus):
    from _helpers_train import make_tokenizer, ByteTokenizer
    args = TINY + ["--data", corpus, "--num-iterations", "2", "--tag", "t"]
    train.main(args)
    with pytest.raises(ValueError, match="tokenizer"):
        train.load_model("base", "t", tokenizer=ByteTokenizer())
    with pytest.raises(SystemExit, match="incompatible model config.*n_embd"):
        train.main(args + ["--n-embd", "128", "--resume"])
    with pytest.raises(SystemExit, match="other settings.*total_batch_size"):
        train.main(args + ["--resume", "--total-batch-size", "128"])
    make_tokenizer(vocab_size=320)  # a different tokenizer at the default path
    with pytest.raises(SystemExit, match="tokenizer"):
        train.main(args + ["--resume"])


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(corpus, monkeypatch):
    real = train.train_step
    calls = []

    def exploding(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) > 3 else loss
    monkeypatch.setattr(train, "train_step", exploding)
    with pytest.raises(SystemExit, match="step 3: loss is nan"):
        train.main(TINY + ["--data", corpus, "--num-iterations", "10", "--save-every", "2", "--tag", "t"])
    assert train.last_step(train.checkpoint_root("base") / "t") == 2
    train.load_model("base", "t")


@pytest.mark.parametrize("extra, message", [
    (["--total-batch-size", "1000"], "--total-batch-size 1000 is not a multiple"),
    (["--window-pattern", "SXL"], "--window-pattern"),
    (["--n-kv-head", "3"], "--n-kv-head 3"),
    (["--n-head", "3"], "--n-head 3"),
    (["--depth", "0"], "--depth 0"),
    (["--device-batch-size", "0"], "--device-batch-size 0"),
    (["--num-iterations", "0"], "--num-iterations 0"),
    (["--warmdown-ratio", "1.5"], "--warmdown-ratio"),
    (["--resume"], "--resume: no checkpoint"),
    (["--attn", "flex"], "--attn flex needs CUDA"),
    (["--data", "/nonexistent/corpus.jsonl"], "/nonexistent/corpus.jsonl"),
])
def test_bad_flags_give_one_line_errors(corpus, extra, message):
    argv = TINY + ["--data", corpus, "--num-iterations", "2", "--tag", "t"] + extra
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not list(train.checkpoint_root("base").glob("t/step_*"))  # nothing half-written


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--tokenizer"):
        train.main(TINY + ["--data", str(tmp_path), "--num-iterations", "2"])


@pytest.mark.heavy(9)
def test_two_process_training_saves_sharded_state_and_resumes_exactly(corpus, speedchat_home):
    """torchrun-style run on 2 gloo ranks: per-rank optimizer/loader files, and a stop + resume
    gives the same losses and weights as the straight run."""
    import shutil
    args = TINY + ["--data", corpus, "--num-iterations", "4", "--eval-every", "2", "--save-every", "2", "--keep-last", "-1"]
    _spawn("run_main", (args + ["--tag", "straight"], str(speedchat_home)))
    root = train.checkpoint_root("base")
    files = sorted(p.name for p in (root / "straight" / "step_000002").iterdir())
    assert files == ["meta.json", "model.safetensors", "optim_rank0.pt", "optim_rank1.pt", "state_rank0.pt", "state_rank1.pt"]
    # "split": the straight run as if it had stopped at step 2
    shutil.copytree(root / "straight" / "step_000002", root / "split" / "step_000002")
    shutil.copy(root / "straight" / "log.jsonl", root / "split" / "log.jsonl")
    with pytest.raises(SystemExit, match="written by 2 ranks, now 1"):
        train.main(args + ["--tag", "split", "--resume"])
    _spawn("run_main", (args + ["--tag", "split", "--resume"], str(speedchat_home)))
    a, b = _log("straight"), _log("split")
    key = lambda log: [(e["step"], e.get("loss"), e.get("val_bpb")) for e in log]
    assert len([e for e in a if "loss" in e]) == 4 and key(a) == key(b)
    (sa, _), (sb, _) = _params("straight"), _params("split")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fresh_run_refuses_to_mix_with_old_checkpoints(corpus):
    args = TINY + ["--data", corpus, "--num-iterations", "2", "--tag", "t"]
    train.main(args)
    with pytest.raises(SystemExit, match="--tag t: .* already has checkpoints"):
        train.main(args)
    train.main(args[:-3] + ["1", "--tag", "t", "--overwrite"])  # 1 iteration now
    assert train.last_step(train.checkpoint_root("base") / "t") == 1
    assert not (train.checkpoint_root("base") / "t" / "step_000002").exists()


def test_core_metric_through_evals_or_a_notice(corpus, monkeypatch, capsys, speedchat_home):
    import shlex, sys, types
    import evals
    args = TINY + ["--data", corpus, "--num-iterations", "2", "--core-metric-every", "-1"]
    monkeypatch.setitem(sys.modules, "evals", None)  # evals.py missing: a notice, and training still ends well
    train.main(args + ["--tag", "a"])
    assert "CORE: evals.py not found, skipping" in capsys.readouterr().out
    calls = []
    fake = types.SimpleNamespace(core_report=evals.core_report, evaluate_core=lambda model, tokenizer, device, max_per_task:
                                 calls.append(max_per_task) or {"CORE": 0.125, "results": {"t": 0.5}, "items": 7, "all_items": 9})
    monkeypatch.setitem(sys.modules, "evals", fake)
    train.main(args + ["--tag", "b", "--core-metric-max-per-task", "7"])
    assert calls == [7]
    assert {"step": 2, "CORE_subsample": 0.125, "CORE_subsample_items": 7} in _log("b")  # labeled: not every item
    base = json.loads((speedchat_home / "report" / "base.json").read_text())
    assert base["CORE_subsample"] == 0.125 and "CORE" not in base
    assert base["command"] == shlex.join(["train.py", *args, "--tag", "b", "--core-metric-max-per-task", "7"])  # provenance
    assert base["launcher"] == "python" and base["gpu_count"] == 0 and (base["git_commit"] == "unknown" or len(base["git_commit"]) == 40)
    meta = json.loads(next((speedchat_home / "checkpoints" / "base" / "b").glob("step_*/meta.json")).read_text())
    assert meta["provenance"]["torch"] == torch.__version__ and meta["provenance"]["gpu_count"] == 0
