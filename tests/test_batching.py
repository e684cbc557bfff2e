"""engine.Batcher, continuous batching: every row's greedy output equals the single-request Engine's
token for token whatever else is in the batch (rows joining and leaving, prompts prefilled in chunks,
sliding windows, rows preempted when the page pool runs dry), a sample's tokens depend on its seed
only, cancelled rows free their pages, the caps hold, and a python call in one row stalls no other."""
import threading
import time
import types

import pytest
import torch

import engine
from test_engine import CONFIGS, ByteTokenizer, random_model

TOK = ByteTokenizer()


def prompts(n, lengths):
    g = torch.Generator().manual_seed(n)
    return [[TOK.bos_id] + torch.randint(0, 256, (L,), generator=g).tolist() for L in lengths[:n]]


def reference(eng, prompt, **settings):
    return eng.generate_batch(prompt, 1, **settings)[0][0]


def wait_until(cond, timeout=10.0):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.005)


@pytest.mark.heavy(4)
@pytest.mark.parametrize("name", ["sliding_window", "gqa"])
def test_greedy_rows_equal_the_single_request_engine_under_mixed_arrivals(name):
    model = random_model(**CONFIGS[name]).double()  # fp64: a different batch order may not flip a near tie
    eng = engine.Engine(model, TOK, tool=None)
    ctx = model.max_positions
    # prompt lengths across page edges, one longer than a prefill chunk, one that ends near the context
    lengths = [1, 5, 17, 40, engine.PREFILL_CHUNK + 30, 3, ctx - 26, 60]
    ps = prompts(len(lengths), lengths)
    max_tokens = [40, 30, 50, 20, 24, 45, 40, 33]
    refs = [reference(eng, p, max_tokens=m, temperature=0.0) for p, m in zip(ps, max_tokens)]
    with engine.Batcher(eng, max_rows=3) as b:
        first = b.submit(ps[0], max_tokens=max_tokens[0], temperature=0.0)
        stream = first.stream(0)
        head = [next(stream)[0] for _ in range(7)]  # the first row is mid-generation when the others arrive
        reqs = [b.submit(p, max_tokens=m, temperature=0.0) for p, m in zip(ps[1:], max_tokens[1:])]
        got = [ps[0] + head + [t for t, _ in stream]] + [r.result()[0][0] for r in reqs]
        assert b.stats()["rows"] == 0 and b.stats()["cache_pages"] == 0  # every finished row gave its pages back
    for g, r in zip(got, refs):
        assert g == r


def test_preempted_rows_are_recomputed_and_still_equal():
    model = random_model(**CONFIGS["sliding_window"]).double()
    eng = engine.Engine(model, TOK, tool=None)
    ps = prompts(4, [30, 50, 20, 70])
    refs = [reference(eng, p, max_tokens=120, temperature=0.0) for p in ps]
    with engine.Batcher(eng, max_rows=4, cache_tokens=1) as b:  # the smallest pool: one row at the full context
        got = [s[0] for s, _ in b.generate_batch(ps, max_tokens=120, temperature=0.0)]
        assert b.preemptions > 0 and b.pool.total == engine.pages_for(model.max_positions + engine.PAGE_TOKENS)
    assert got == refs


def test_a_samples_tokens_depend_on_its_seed_not_on_its_batch_mates():
    model = random_model(**CONFIGS["gqa"]).double()
    model.lm_head.weight.data.mul_(1 / 30.0)  # flat distributions: samples differ
    eng = engine.Engine(model, TOK, tool=None)
    p = prompts(1, [9])[0]
    settings = dict(max_tokens=30, temperature=1.0, top_k=50, top_p=0.9)
    alone = reference(eng, p, seed=5, **settings)  # Engine.generate, one sample
    with engine.Batcher(eng, max_rows=8) as b:
        solo = b.submit(p, seed=5, **settings).result()[0][0]
        crowd = [b.submit(q, seed=i, **settings) for i, q in enumerate(prompts(6, [3, 30, 12, 7, 50, 2]))]
        mid = b.submit(p, seed=5, **settings)
        crowd += [b.submit(q, n=3, seed=9, **settings) for q in prompts(2, [4, 11])]
        assert mid.result()[0][0] == solo == alone
        many, _ = b.submit(p, n=4, seed=5, **settings).result()
    assert many[0] == alone and len({tuple(s) for s in many}) == 4  # sample 0 is the seed's; the rest differ
    for r in crowd:
        r.result()


def test_cancel_frees_the_row_and_its_pages_within_a_step():
    model = random_model(**CONFIGS["plain"])
    eng = engine.Engine(model, TOK, tool=None)
    with engine.Batcher(eng, max_rows=2) as b:
        long = b.submit(prompts(1, [10])[0], max_tokens=10_000, temperature=1.0)
        other = b.submit(prompts(1, [10])[0], max_tokens=10_000, temperature=1.0)
        stream = long.stream(0)
        [next(stream) for _ in range(5)]
        assert b.stats()["rows"] == 2
        long.cancel()
        rest = list(stream)  # the stream ends
        wait_until(lambda: b.stats()["rows"] == 1)
        assert len(rest) < 50 and len(long.rows[0].pages) == 0
        other.cancel()
        wait_until(lambda: b.stats()["cache_pages"] == 0)


def test_rows_and_queue_caps():
    model = random_model(**CONFIGS["plain"])
    eng = engine.Engine(model, TOK, tool=None)
    with engine.Batcher(eng, max_rows=2, max_waiting=1) as b:
        p = prompts(1, [4])[0]
        running = [b.submit(p, max_tokens=10_000) for _ in range(2)]
        wait_until(lambda: b.stats()["rows"] == 2)
        third = b.submit(p, max_tokens=5)  # no row free: it waits in the queue
        time.sleep(0.05)
        assert b.stats()["waiting"] == 1 and not third.admitted.is_set()
        with pytest.raises(engine.QueueFull):
            b.submit(p, max_tokens=5, wait=False)
        with pytest.raises(ValueError, match="at most 2 rows"):
            b.submit(p, n=3)
        with pytest.raises(ValueError, match="leaves no room"):
            b.submit([1] * model.max_positions)
        running[0].cancel()
        assert len(third.result()[0][0]) == len(p) + 5  # admitted into the freed row
        running[1].cancel()


class SuccessorModel(torch.nn.Module):
    """A fake GPT with no state: the next token is succ[last token fed], whatever the cache holds,
    so any batch composition gives every row the same tokens. Calls the cache's attend once, as a
    layer would (writing pages), so the paging runs too."""

    def __init__(self, succ, default):
        super().__init__()
        self.table = torch.full((TOK.vocab_size,), default)
        for a, b in succ.items():
            self.table[a] = b
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(n_layer=1, sequence_len=256)
        self.max_positions = 256

    def forward(self, idx, kv_cache=None, last_only=False):
        B, T = idx.shape
        q = torch.zeros(B, 1, T, 4)
        kv_cache.attend(0, q, q, q, 256)
        kv_cache.advance(T)
        return torch.nn.functional.one_hot(self.table[idx[:, -1:]], TOK.vocab_size).float() * 20


def test_a_python_call_in_one_row_stalls_no_other():
    sp = TOK.special
    t, a, x = ord("t"), ord("a"), ord("x")
    succ = {t: sp("<|python_start|>"), sp("<|python_start|>"): ord("1"), ord("1"): sp("<|python_end|>"),
            sp("<|output_end|>"): sp("<|assistant_end|>")}
    release, calls = threading.Event(), []

    def slow_tool(code):
        calls.append(code)
        assert release.wait(10)
        return "42"
    eng = engine.Engine(SuccessorModel(succ, x), TOK, tool=slow_tool)
    with engine.Batcher(eng, max_rows=4) as b:
        tool_row = b.submit([TOK.bos_id, t], max_tokens=20, temperature=0.0)
        wait_until(lambda: calls == ["1"])
        others = [b.submit([TOK.bos_id, a], max_tokens=40, temperature=0.0) for _ in range(2)]
        for r in others:  # they run to the end while the call is still out
            seqs, _ = r.result()
            assert seqs[0] == [TOK.bos_id, a] + [x] * 40
        assert not release.is_set() and b.stats()["rows"] == 1
        release.set()
        seqs, masks = tool_row.result()
    out = [sp("<|output_start|>"), ord("4"), ord("2"), sp("<|output_end|>")]
    assert seqs[0] == [TOK.bos_id, t, sp("<|python_start|>"), ord("1"), sp("<|python_end|>"), *out, sp("<|assistant_end|>")]
    assert masks[0] == [0, 0, 1, 1, 1, 0, 0, 0, 0, 1]
    # the same conversation through the single-request engine
    release.set()
    assert eng.generate_batch([TOK.bos_id, t], 1, max_tokens=20, temperature=0.0) == (seqs, masks)
