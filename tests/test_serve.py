"""serve.py: every endpoint and every bad input through Flask's test client; the official openai
client, 8 concurrent streams, clients that hang up and clients that send half a request against a
real server (waitress) on 127.0.0.1; the CLI loading a checkpoint; the chat page in headless
Chromium. Tiny random models (or a scripted fake) on CPU; a real BPE tokenizer trained on generated
text."""
import json
import logging
import os
import random
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import pytest
import requests
import torch

import engine
import serve
import tok
import train

WORDS = ("the cat dog sat on mat red blue green house tree river stone bird sings under over and then a big "
         "small old new runs jumps apple bread water fire light dark hello world").split()
CONTEXT = 128


# ----------------------------------------------------------------------------- models and helpers

@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(30)) + " 12*7 = 84. Let me compute. The answer is 84."
             for _ in range(300)]
    return tok.train_tokenizer(texts, 500)


def tiny_gpt(tokenizer, seed=0, sequence_len=CONTEXT):
    torch.manual_seed(seed)
    model = train.GPT(train.GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.vocab_size, n_layer=2,
                                      n_head=2, n_kv_head=1, n_embd=64, window_pattern="SL"))
    with torch.no_grad():  # init zeroes the output projections: make every block do something
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith(("wte", "value_embeds")):
                p.uniform_(-1.0, 1.0).mul_(p.size(1) ** -0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_gpt(tokenizer)


class NeverStops(torch.nn.Module):
    """A real model that never writes a special token (so never stops or calls a tool) and takes
    `delay` seconds a step: long generations for the disconnect and queue tests."""

    def __init__(self, inner, n_plain, delay=0.0):
        super().__init__()
        self.inner, self.config, self.n_plain, self.delay, self.calls = inner, inner.config, n_plain, delay, 0
        self.max_positions = inner.max_positions

    def forward(self, idx, targets=None, kv_cache=None, last_only=False):
        self.calls += 1
        time.sleep(self.delay)
        logits = self.inner(idx, kv_cache=kv_cache)
        logits[..., self.n_plain:] = -1e9
        return logits


class ScriptedModel(torch.nn.Module):
    """Writes `script` token by token, skipping over the tool outputs the engine forces in."""

    def __init__(self, script, tokenizer, sequence_len=CONTEXT):
        super().__init__()
        self.script, self.V = script, tokenizer.vocab_size
        self.o_start, self.o_end = tokenizer.special("<|output_start|>"), tokenizer.special("<|output_end|>")
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(n_layer=1, sequence_len=sequence_len)
        self.max_positions = sequence_len
        self.prompts, self.delay = [], 0.0  # every prompt it was given; seconds per step

    def forward(self, idx, targets=None, kv_cache=None, last_only=False):
        B, T = idx.shape
        time.sleep(self.delay)
        if kv_cache.pos == 0:
            self.prompts.append(idx[0].tolist())
            self.own, self.inside = 0, False
        else:
            for t in idx[0].tolist():
                self.inside = (self.inside or t == self.o_start) and t != self.o_end
                self.own += not self.inside and t != self.o_end
        kv_cache.advance(T)
        logits = torch.full((B, T, self.V), -10.0)
        logits[:, -1, self.script[min(self.own, len(self.script) - 1)]] = 10.0
        return logits


def tool_script(t):
    sp = t.special
    return (t.encode("Let me compute.") + [sp("<|python_start|>")] + t.encode("12*7") + [sp("<|python_end|>")]
            + t.encode(" The answer is 84.") + [sp("<|assistant_end|>")])


TOOL_REPLY = "Let me compute.<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|> The answer is 84."


def app_for(model, tokenizer, n_workers=1, tool=None, **kw):
    eng = engine.Engine(model, tokenizer, tool=tool)
    return serve.create_app([eng] * n_workers, **kw)


def events(data: bytes):
    """Server-sent events -> list of data strings; checks the framing on the way."""
    text = data.decode()
    assert text.endswith("\n\n")
    blocks = text[:-2].split("\n\n")
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks
    return [b[len("data: "):] for b in blocks]


def stream_reply(data: bytes):
    """An OpenAI stream -> (the content, its finish_reason, the usage chunk or None)."""
    raw = events(data)
    assert raw[-1] == "[DONE]"
    chunks = [json.loads(e) for e in raw[:-1]]
    with_choices = [c for c in chunks if c["choices"]]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices)
    usage = next((c["usage"] for c in chunks if not c["choices"]), None)
    return content, with_choices[-1]["choices"][0]["finish_reason"], usage


STREAM = {"stream": True, "stream_options": {"include_usage": True}}


USER = [{"role": "user", "content": "the cat sat"}]


def last_log(caplog):
    """serve.py's log line of the last generation, parsed."""
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "speedchat.serve"]
    return [r for r in records if "finish" in r][-1]


def wait_for(cond, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


# ----------------------------------------------------------------------------- endpoints (test client)

def test_page_is_self_contained_and_has_its_controls(model, tokenizer):
    r = app_for(model, tokenizer).test_client().get("/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    page = r.get_data(as_text=True)
    for needle in ('id="stop"', 'id="temperature"', 'id="topk"', 'id="new"', "Regenerate", '"/v1/chat/completions"',
                   'name="viewport"', "getReader", "AbortController", "python_output", '"/info"'):
        assert needle in page, needle
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing from elsewhere
    assert "innerHTML" not in page  # model text is set with textContent only


def test_stream_matches_the_engine(model, tokenizer):
    client = app_for(model, tokenizer).test_client()
    r = client.post("/v1/chat/completions", json={"messages": USER, "temperature": 0, "max_tokens": 12, **STREAM})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    content, finish, usage = stream_reply(r.data)
    prompt = tokenizer.render_for_completion(USER)
    seqs, _ = engine.Engine(model, tokenizer, tool=None).generate_batch(prompt, max_tokens=12, temperature=0.0)
    reply = seqs[0][len(prompt):]
    assert usage["prompt_tokens"] == len(prompt) and usage["completion_tokens"] == len(reply)
    assert usage["total_tokens"] == len(prompt) + len(reply)
    assert finish == ("stop" if reply[-1] in (tokenizer.bos_id, tokenizer.special("<|assistant_end|>")) else "length")
    plain = [i for i in reply if i < len(tokenizer.vocab)]
    if "<|" not in content:
        assert content == tokenizer.decode(plain)
    # the same seed gives the same reply; /chat/completions is the same endpoint
    body = {"messages": USER, "temperature": 1.0, "max_tokens": 12, "seed": 7}
    a, b = (client.post(path, json=body).json for path in ("/v1/chat/completions", "/chat/completions"))
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"]


def test_a_secret_in_the_servers_environment_never_reaches_a_client(tokenizer, monkeypatch, speedchat_home, tmp_path):
    """A prompt steers the model into a python block that hunts for the server's secrets: its
    environment, its /proc, a token file in $SPEEDCHAT_HOME. The client gets the tool's output, never
    the secret, streaming or not (engine.run_tool, the real sandbox)."""
    secret = "hf_" + "S3CR3T" * 4
    monkeypatch.setenv("HF_TOKEN", secret)
    (speedchat_home / "token").parent.mkdir(parents=True, exist_ok=True)
    (speedchat_home / "token").write_text(secret)
    code = (f"import os\nout = [dict(os.environ)]\nfor p in ['/proc/%d/environ' % os.getppid(), '/proc/{os.getpid()}/environ',"
            f" '{speedchat_home / 'token'}', '/proc/self/environ']:\n    try: out.append(open(p, 'rb').read())\n"
            f"    except Exception as e: out.append(repr(e))\nprint(out)")
    sp = tokenizer.special
    script = [sp("<|python_start|>")] + tokenizer.encode(code) + [sp("<|python_end|>")] + tokenizer.encode(" done") + [sp("<|assistant_end|>")]
    client = app_for(ScriptedModel(script, tokenizer, sequence_len=4096), tokenizer, tool=engine.run_tool).test_client()
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={"messages": USER, "stream": stream, "max_tokens": 2000})
        if stream:
            text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events(r.data) if e != "[DONE]")
        else:
            text = r.json["choices"][0]["message"]["content"]
        assert r.status_code == 200 and "TMPDIR" in text  # the tool ran and answered
        assert secret not in text and "S3CR3T" not in r.data.decode()


def test_require_sandbox_refuses_the_tool_where_a_layer_is_missing(monkeypatch):
    full = {name: "yes" for name in engine.SANDBOX_LAYERS}
    monkeypatch.setattr(engine, "sandbox_layers", lambda: full)
    assert serve.python_tool(True) is engine.run_tool and serve.python_tool(False) is engine.run_tool
    monkeypatch.setattr(engine, "sandbox_layers", lambda: {**full, "landlock": "no: kernel 5.4"})
    assert serve.python_tool(False) is engine.run_tool
    assert serve.python_tool(True) is engine.refuse_tool and engine.refuse_tool("12*7").startswith("Error:")


def test_tool_calls_stream_as_kinds_and_round_trip(tokenizer):
    client = serve.create_app([engine.Engine(ScriptedModel(tool_script(tokenizer), tokenizer), tokenizer)]).test_client()
    msgs = [{"role": "user", "content": "What is 12*7?"}]
    content, finish, _ = stream_reply(client.post("/v1/chat/completions", json={"messages": msgs, "stream": True}).data)
    assert content == TOOL_REPLY and finish == "stop"  # the tool call between its markers, as generated
    assert serve.parse_assistant_text(content) == [
        {"type": "text", "text": "Let me compute."}, {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"}, {"type": "text", "text": " The answer is 84."}]
    r = client.post("/v1/chat/completions", json={"messages": msgs})
    assert r.json["choices"][0]["message"]["content"] == TOOL_REPLY
    # the reply, sent back as history (as a string or as parts), renders as the model wrote it
    as_parts = [{"type": "text", "text": "Let me compute."}, {"type": "python", "text": "12*7"},
                {"type": "python_output", "text": "84"}, {"type": "text", "text": " The answer is 84."}]
    ref = tokenizer.render_for_completion(msgs + [{"role": "assistant", "content": as_parts}, {"role": "user", "content": "ok"}])
    for content in (TOOL_REPLY, as_parts):
        turns = serve.parse_messages({"messages": msgs + [{"role": "assistant", "content": content}, {"role": "user", "content": "ok"}]})
        assert tokenizer.render_for_completion(turns) == ref


def test_openai_non_streaming_shape_and_usage(model, tokenizer):
    client = app_for(model, tokenizer, model_name="tiny").test_client()
    msgs = [{"role": "system", "content": "Be brief."}, *USER]
    r = client.post("/v1/chat/completions", json={"model": "whatever", "messages": msgs, "max_tokens": 5, "seed": 1})
    assert r.status_code == 200
    j = r.json
    assert j["object"] == "chat.completion" and j["model"] == "tiny" and j["id"].startswith("chatcmpl-")
    (choice,) = j["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = j["usage"]
    # the system message is folded into the first user turn
    assert u["prompt_tokens"] == len(tokenizer.render_for_completion([{"role": "user", "content": "Be brief.\n\nthe cat sat"}]))
    assert 1 <= u["completion_tokens"] <= 5 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["completion_tokens"] == 5 or choice["finish_reason"] == "stop"


def test_openai_streaming_chunks(model, tokenizer):
    client = app_for(model, tokenizer, model_name="tiny").test_client()
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 6, "stream": True, "seed": 3,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    raw = events(r.data)
    assert raw[-1] == "[DONE]"
    chunks = [json.loads(e) for e in raw[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *body, last, usage = chunks
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["choices"][0]["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in body)
    assert usage["choices"] == [] and 1 <= usage["usage"]["completion_tokens"] <= 6
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in body)
    same = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 6, "seed": 3}).json
    assert streamed == same["choices"][0]["message"]["content"]  # streaming or not: the same reply


def test_models_and_health(model, tokenizer):
    client = app_for(model, tokenizer, n_workers=2, model_name="tiny").test_client()
    m = client.get("/v1/models").json
    assert m["object"] == "list" and [d["id"] for d in m["data"]] == ["tiny"]
    h = client.get("/health").json
    assert h["status"] == "ok" and h["workers"] == 2 and h["rows"] == 0 and h["waiting"] == 0 and h["cache_pages"] == 0
    assert h["max_rows"] == 2 * serve.MAX_ROWS and [w["name"] for w in h["per_worker"]] == ["cpu#0", "cpu#1"]


def test_base_model_continues_the_last_user_message(model, tokenizer):
    client = app_for(model, tokenizer, completion=True).test_client()
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 3})
    assert r.json["usage"]["prompt_tokens"] == len(tokenizer.encode("the cat sat")) + 1


# ----------------------------------------------------------------------------- bad input and limits

def msg(content, role="user"):
    return {"role": role, "content": content}


BAD = [  # (body, the field the error must name)
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    (b"", "body"),
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [msg("x")] * (serve.MAX_MESSAGES + 1)}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [msg(5)]}, "messages[0].content"),
    ({"messages": [msg([{"type": "image_url", "text": "x"}])]}, "messages[0].content[0].type"),
    ({"messages": [msg([{"type": "python", "text": "1"}])]}, "messages[0].content[0].type"),
    ({"messages": [msg([{"type": "text"}])]}, "messages[0].content[0]"),
    ({"messages": [msg("x" * (serve.MAX_MESSAGE_CHARS + 1))]}, "messages[0].content"),
    ({"messages": [msg("x" * 7000), msg("y", "assistant")] * 5 + [msg("z")]}, "messages"),
    ({"messages": [msg("hi"), msg("hello", "assistant")]}, "messages"),
    ({"messages": [msg("hello", "assistant"), msg("hi")]}, "messages"),
    ({"messages": [msg("be nice", "system")]}, "messages"),
    ({"messages": [msg("hi")], "temperature": "hot"}, "temperature"),
    ({"messages": [msg("hi")], "temperature": float("nan")}, "temperature"),
    ({"messages": [msg("hi")], "top_k": 2.5}, "top_k"),
    ({"messages": [msg("hi")], "top_p": [1]}, "top_p"),
    ({"messages": [msg("hi")], "max_tokens": True}, "max_tokens"),
    ({"messages": [msg("hi")], "seed": "1"}, "seed"),
    ({"messages": [msg("hi")], "stream": "yes"}, "stream"),
    ({"messages": [msg("the cat " * 999)]}, "messages"),  # longer than the model's context (10 x 128 positions)
    (b"[" * 100_000 + b"]" * 100_000, "body"),  # nested too deeply for Python's parser
    (b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "body"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 5000 + b"}", "body"),  # a 5,000-digit int
]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_bad_input_is_a_400_naming_the_field(model, tokenizer, path, caplog):
    client = app_for(model, tokenizer).test_client()
    caplog.set_level(logging.INFO, logger="speedchat.serve")
    cases = BAD + ([({"messages": [msg("hi")], "n": 2}, "n"), ({"messages": [msg("hi")], "stream_options": 1}, "stream_options")]
                   if path.startswith("/v1") else [])
    for body, field in cases:
        kw = {"data": body, "content_type": "application/json"} if isinstance(body, bytes) else {"data": json.dumps(body),
                                                                                                  "content_type": "application/json"}
        r = client.post(path, **kw)
        assert r.status_code == 400, (body, r.data)
        err = r.json["error"]
        assert err["param"] == field and err["message"].startswith(field + ":"), (field, err)
    assert client.get("/health").json["rows"] == 0  # no row was taken
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "speedchat.serve"]
    assert [r["error"].split(":")[0] for r in logged if r["status"] == 400] == [field for _, field in cases]
    assert logged[-1]["path"] == "/health" and "latency_s" in logged[-1]  # every request is logged


def test_numbers_are_clamped_to_the_documented_ranges(model, tokenizer):
    s = serve.parse_settings({"temperature": 99, "top_k": -5, "top_p": 0, "max_tokens": 10 ** 9})
    assert (s["temperature"], s["top_k"], s["top_p"], s["max_tokens"]) == (2.0, 0, 0.01, 4096)
    s = serve.parse_settings({"temperature": -1, "top_k": 10 ** 6, "top_p": 7, "max_tokens": 0})
    assert (s["temperature"], s["top_k"], s["top_p"], s["max_tokens"]) == (0.0, 200, 1.0, 1)
    assert serve.parse_settings({"max_completion_tokens": 3, "max_tokens": 9})["max_tokens"] == 3
    short = tiny_gpt(tokenizer, sequence_len=16)  # represents 160 positions
    client = app_for(NeverStops(short, len(tokenizer.vocab)), tokenizer).test_client()
    one = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 0}).json
    assert one["usage"]["completion_tokens"] == 1 and one["choices"][0]["finish_reason"] == "length"
    full = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 10 ** 9, "temperature": 50}).json
    assert full["usage"]["total_tokens"] == short.max_positions == 160  # never past the context


def test_oversized_body_and_unknown_paths_are_json_errors(model, tokenizer):
    client = app_for(model, tokenizer).test_client()
    r = client.post("/v1/chat/completions", data=b"x" * (serve.MAX_BODY_BYTES + 1), content_type="application/json")
    assert r.status_code == 413 and r.json["error"]["param"] == "body"
    assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json
    assert client.get("/v1/chat/completions").status_code == 405


# ----------------------------------------------------------------------------- workers, queue, disconnects

def test_pool_queue_is_bounded(model, tokenizer):
    slow = NeverStops(model, len(tokenizer.vocab), delay=0.01)
    settings = dict(max_tokens=4000, temperature=1.0, top_k=0, top_p=1.0, seed=1)
    pool = serve.Pool([serve.Worker(engine.Engine(slow, tokenizer, tool=None), "w")], max_rows=1, max_queue=1,
                      queue_timeout=5.0)
    (_, first), got = pool.submit([1, 2, 3], settings), []
    waiter = threading.Thread(target=lambda: got.append(pool.submit([1, 2, 3], settings)))
    waiter.start()
    assert wait_for(lambda: pool.stats()["waiting"] == 1)
    assert pool.submit([1, 2, 3], settings) is None  # the row and the queue are full: no wait at all
    first.cancel()
    waiter.join(5)
    assert got[0][1].admitted.is_set() and pool.stats()["rows"] == 1 and pool.stats()["waiting"] == 0
    got[0][1].cancel()
    pool.close()
    quick = serve.Pool([serve.Worker(engine.Engine(slow, tokenizer, tool=None), "w")], max_rows=1, max_queue=4,
                       queue_timeout=0.05)
    _, held = quick.submit([1, 2, 3], settings)
    assert quick.submit([1, 2, 3], settings) is None  # waited, timed out, and gave its place up
    assert wait_for(lambda: quick.stats()["waiting"] == 0)
    held.cancel()
    quick.close()


def test_busy_server_says_503_with_retry_after(model, tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="speedchat.serve")
    slow = NeverStops(model, len(tokenizer.vocab), delay=0.01)
    client = app_for(slow, tokenizer, max_rows=1, max_queue=0).test_client()
    first = client.post("/chat/completions", json={"messages": USER, "max_tokens": 100, "stream": True}, buffered=False)
    stream = iter(first.response)
    next(stream)  # generating: the one worker is busy
    assert client.get("/health").json["rows"] == 1
    r = client.post("/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0 and r.json["error"]["type"] == "overloaded_error"
    assert '"status": 503' in caplog.messages[-1] and "busy" in caplog.messages[-1]
    first.close()  # the client goes away: generation stops, the row is free within a step
    assert wait_for(lambda: client.get("/health").json["rows"] == 0)
    assert client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200


def test_closing_the_response_stops_generation_and_logs_it(model, tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="speedchat.serve")
    slow = NeverStops(model, len(tokenizer.vocab), delay=0.005)
    client = app_for(slow, tokenizer).test_client()
    for path in ("/chat/completions", "/v1/chat/completions"):
        r = client.post(path, json={"messages": USER, "max_tokens": 100, "stream": True}, buffered=False)
        it = iter(r.response)
        for _ in range(3):
            next(it)
        r.close()
        assert wait_for(lambda: client.get("/health").json["rows"] == 0)
        calls = slow.calls
        time.sleep(0.05)
        assert slow.calls == calls
        rec = last_log(caplog)
        assert rec["path"] == path and rec["finish"] == "disconnected" and rec["completion_tokens"] < 100
    # a response whose body is never read frees its row too
    r = client.post("/chat/completions", json={"messages": USER, "stream": True}, buffered=False)
    assert client.get("/health").json["rows"] == 1
    r.close()
    assert wait_for(lambda: client.get("/health").json["rows"] == 0)


def test_requests_are_logged_without_text_unless_asked(model, tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="speedchat.serve")
    secret = [{"role": "user", "content": "my secret cat"}]
    for log_text in (False, True):
        client = app_for(model, tokenizer, log_conversations=log_text).test_client()
        client.post("/v1/chat/completions", json={"messages": secret, "max_tokens": 4})
        rec = last_log(caplog)
        assert rec["path"] == "/v1/chat/completions" and rec["status"] == 200 and rec["latency_s"] >= 0
        assert rec["prompt_tokens"] > 0 and rec["completion_tokens"] >= 1 and "time" in rec and "ttft_s" in rec
        assert ("my secret cat" in json.dumps(rec)) == log_text


# ----------------------------------------------------------------------------- a real server on 127.0.0.1

@pytest.fixture
def live(model, tokenizer):
    servers = []

    def start(app):
        server, url = serve.start_server(app)
        servers.append(server)
        return url
    yield start
    for s in servers:
        s.close()


def test_openai_client_streaming_and_not(model, tokenizer, live):
    openai = pytest.importorskip("openai")
    url = live(app_for(model, tokenizer, model_name="tiny"))
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == ["tiny"]
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, seed=5, temperature=0.7, top_p=0.9)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, seed=5, temperature=0.7,
                                            top_p=0.9, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])


def test_eight_concurrent_streams_all_complete(model, tokenizer, live, caplog):
    caplog.set_level(logging.INFO, logger="speedchat.serve")
    url = live(app_for(model, tokenizer, n_workers=2))

    def one(i):
        r = requests.post(url + "/v1/chat/completions", json={"messages": [msg(f"hello {i}")], "max_tokens": 16,
                                                              "seed": i, **STREAM}, stream=True, timeout=60)
        assert r.status_code == 200
        return stream_reply(r.raw.read())

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(8)))
    assert all(usage["completion_tokens"] >= 1 and finish in ("stop", "length") for _, finish, usage in results)
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "speedchat.serve"]
    assert {rec["worker"] for rec in logged if "worker" in rec} == {"cpu#0", "cpu#1"}
    assert wait_for(lambda: requests.get(url + "/health", timeout=5).json()["rows"] == 0)


def test_client_hanging_up_frees_the_worker(model, tokenizer, live):
    slow = NeverStops(model, len(tokenizer.vocab), delay=0.01)
    url = live(app_for(slow, tokenizer))
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"messages": USER, "max_tokens": 4000, "stream": True})
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        got = b""
        while got.count(b"data: ") < 3:
            got += s.recv(4096)
        assert requests.get(url + "/health", timeout=5).json()["rows"] == 1
    assert wait_for(lambda: requests.get(url + "/health", timeout=5).json()["rows"] == 0)
    calls = slow.calls
    time.sleep(0.1)
    assert slow.calls <= calls + 1  # generation stopped, not just the worker handed back
    assert requests.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=30).status_code == 200


def test_non_streaming_request_stops_when_its_client_hangs_up(model, tokenizer, live, caplog):
    caplog.set_level(logging.INFO, logger="speedchat.serve")
    slow = NeverStops(model, len(tokenizer.vocab), delay=0.01)  # 4,000 tokens would take 40 s
    url = live(app_for(slow, tokenizer))
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"messages": USER, "max_tokens": 4000})
    t0 = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        assert wait_for(lambda: slow.calls > 20)
    assert wait_for(lambda: requests.get(url + "/health", timeout=5).json()["rows"] == 0, timeout=5)
    assert time.time() - t0 < 6
    calls = slow.calls
    time.sleep(0.2)
    assert slow.calls <= calls + 1  # generation stopped with the client, not at max_tokens
    rec = last_log(caplog)
    assert rec["finish"] == "disconnected" and rec["completion_tokens"] < 1000


def test_half_sent_requests_hold_no_thread_and_time_out(model, tokenizer, caplog):
    """200 clients send half a request and wait (slowloris): the server (waitress) keeps answering
    /health and serving a request meanwhile, with no thread per connection; an idle one is closed."""
    server, url = serve.start_server(app_for(model, tokenizer), threads=4, idle_timeout=2)
    port = int(url.rsplit(":", 1)[1])
    try:
        threads = threading.active_count()
        slow = []
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"messages")
            slow.append(s)
        t0 = time.time()
        for _ in range(5):
            assert requests.get(url + "/health", timeout=5).json()["status"] == "ok"
        r = requests.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 4}, timeout=10)
        assert r.status_code == 200 and time.time() - t0 < 5
        assert threading.active_count() <= threads + 2  # connections are not threads
        slow[0].settimeout(10)
        t1 = time.time()
        assert slow[0].recv(100) == b"" and 1 < time.time() - t1 < 8  # the server closed the idle connection
        for s in slow:
            s.close()
    finally:
        server.close()


def test_load_workers_puts_one_model_on_each_gpu(monkeypatch):
    """--workers N: N GPUs (0: every visible one), each worker's model on its own device."""
    loaded = []

    def fake_load(source, tag, step, dev, wrong=None):
        loaded.append(dev)
        param = types.SimpleNamespace(device=torch.device(wrong or dev))
        return types.SimpleNamespace(model=types.SimpleNamespace(parameters=lambda: iter([param]))), {"step": 1}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(engine, "load_engine", fake_load)
    workers, _ = serve.load_workers("sft", None, None, 0, None)
    assert [w.name for w in workers] == ["cuda:0", "cuda:1"] == loaded
    assert [w.name for w in serve.load_workers("sft", None, None, 1, None)[0]] == ["cuda:0"]
    with pytest.raises(ValueError, match="--workers 3: only 2 GPUs"):
        serve.load_workers("sft", None, None, 3, None)
    monkeypatch.setattr(engine, "load_engine", lambda *a: fake_load(*a, wrong="cuda:0"))
    with pytest.raises(ValueError, match="worker 1: the model is on cuda:0, not cuda:1"):
        serve.load_workers("sft", None, None, 2, None)


def test_info_names_the_model_and_a_toy_model_gets_examples(model, tokenizer):
    assert serve.toy_model({"train": {"data": "toy"}}) and serve.toy_model({"train": {"mixture": "toy"}})
    assert serve.toy_model({"rl": {"task": "toy"}}) and not serve.toy_model({"train": {"data": "climbmix"}})
    info = {"source": "rl", "tag": "toy", "step": 120, "examples": tok.ToyWorld().example_questions()}
    got = app_for(model, tokenizer, model_name="speedchat-rl-step120", info=info).test_client().get("/info").json
    assert got["model"] == "speedchat-rl-step120" and (got["source"], got["step"]) == ("rl", 120)
    assert len(got["examples"]) == 5 and any("How many" in q for q in got["examples"])


# ----------------------------------------------------------------------------- the command line

def save_checkpoint(tokenizer, model, source="sft"):
    tokenizer.save(tok.home() / "tokenizer")
    meta = {"model_config": asdict(model.config), "tokenizer_hash": tokenizer.hash, "step": 3}
    train.save_checkpoint(train.checkpoint_root(source) / "tiny", 3, model.state_dict(), None, meta)


def test_cli_loads_a_checkpoint_and_serves(model, tokenizer, capsys):
    save_checkpoint(tokenizer, model)
    workers, meta = serve.load_workers("sft", None, None, 1, "cpu")
    assert meta["step"] == 3 and [w.name for w in workers] == ["cpu#0"]
    client = serve.create_app(workers).test_client()
    ref = app_for(model, tokenizer).test_client()
    body = {"messages": USER, "max_tokens": 6, "temperature": 0}
    assert client.post("/v1/chat/completions", json=body).json["choices"] == ref.post("/v1/chat/completions", json=body).json["choices"]
    # the real command: prints the URL, answers /health
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, os.path.join(root, "serve.py"), "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"open (http://\S+)", line)
            if m:
                break
        assert m, "".join(lines)
        assert "speedchat-sft-step3" in line
        h = requests.get(m.group(1) + "health", timeout=10).json()
        assert h["workers"] == 1 and h["model"] == "speedchat-sft-step3"
        with pytest.raises(SystemExit, match="cannot listen on .* in use"):  # the port is taken: one line
            serve.main(["--port", m.group(1).rstrip("/").rsplit(":", 1)[1], "--device", "cpu"])
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_errors_are_one_line():
    with pytest.raises(SystemExit, match="serve.py: no rl checkpoints"):
        serve.main(["--source", "rl", "--device", "cpu"])
    with pytest.raises(SystemExit):
        serve.main(["--workers", "-1"])


# ----------------------------------------------------------------------------- the page in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=390,844"]


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON
    messages ending in NUL, commands on fd 3, replies on fd 4), so no websocket library is needed."""

    def __init__(self, profile):
        script = 'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null'  # our stdin/stdout become its fds 3/4
        self.proc = subprocess.Popen(["sh", "-c", script, CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                      "--remote-debugging-pipe", "about:blank"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.buf, self.last_id, self.session = b"", 0, None

    def call(self, method, timeout=30, **params):
        self.last_id += 1
        msg = {"id": self.last_id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        self.proc.stdin.write(json.dumps(msg).encode() + b"\0")
        self.proc.stdin.flush()
        end = time.time() + timeout
        while True:
            while b"\0" not in self.buf:
                assert select.select([self.proc.stdout], [], [], max(0.0, end - time.time()))[0], f"{method}: no reply"
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                assert chunk, "chromium closed the pipe"
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.last_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def open(self, url):
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.wait("location.protocol === 'http:' && document.readyState === 'complete' && typeof chat === 'object'")

    def js(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def wait(self, expression, timeout=20):
        end, error = time.time() + timeout, None
        while time.time() < end:
            try:
                if self.js(expression):
                    return
            except AssertionError as e:  # e.g. evaluated while the page was still loading
                error = e
            time.sleep(0.03)
        raise AssertionError(f"timed out waiting for {expression} ({error})")

    def close(self):
        self.proc.stdin.close()
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium here: apt-get install -y chromium to run the browser test")
    # chromium's helper processes may still write to the profile as it is removed: not the test's concern
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        b = Browser(profile)
        yield b
        b.close()


DONE = "chat.dataset.state === 'done'"
MESSAGES = "JSON.stringify(messages.map(m => ({role: m.role, content: m.content})))"


def test_page_in_headless_chromium(tokenizer, live, browser, caplog):
    """Send (from the URL), stream, tool calls shown apart, regenerate, edit an earlier message,
    a follow-up turn with the tool calls in its history, the settings, stop, new chat."""
    caplog.set_level(logging.INFO, logger="speedchat.serve")
    scripted = ScriptedModel(tool_script(tokenizer), tokenizer)
    url = live(serve.create_app([engine.Engine(scripted, tokenizer)]))
    q = [{"role": "user", "content": "What is 12*7?"}]
    browser.open(url + "/?q=What%20is%2012*7%3F&autosend=1")
    browser.wait(DONE)
    assert int(browser.js("chat.dataset.chunks")) >= 4  # the reply arrived in pieces, as generated
    dom = browser.js("chat.innerText")
    assert "What is 12*7?" in dom and "Let me compute." in dom and "The answer is 84." in dom
    assert browser.js("document.querySelector('.tool.python code').textContent") == "12*7"
    assert browser.js("document.querySelector('.tool.python_output code').textContent") == "84"
    assert scripted.prompts == [tokenizer.render_for_completion(q)]
    # regenerate the last answer: the same prompt again, still one exchange on the page
    browser.js("[...document.querySelectorAll('button')].find(b => b.textContent === 'Regenerate').click()")
    browser.wait(DONE)
    assert len(scripted.prompts) == 2 and scripted.prompts[1] == scripted.prompts[0]
    assert len(json.loads(browser.js(MESSAGES))) == 2
    # edit the user message: the conversation restarts from it
    browser.js("document.querySelector('.user .bubble').click()")
    browser.js("document.querySelector('.edit textarea').value = 'What is 6*7?';"
               "[...document.querySelectorAll('.edit button')].find(b => b.textContent.startsWith('Save')).click()")
    browser.wait(DONE + " && messages.length === 2 && !messages[1].running")
    q = [{"role": "user", "content": "What is 6*7?"}]
    assert scripted.prompts[-1] == tokenizer.render_for_completion(q)
    # a follow-up turn, with the settings changed: the history carries the tool call and its output
    browser.js("document.getElementById('temperature').value = '0.3'; document.getElementById('topk').value = '7';"
               "input.value = 'thanks'; document.getElementById('send').click()")
    browser.wait(DONE + " && messages.length === 4 && !messages[3].running")
    parts = [{"type": "text", "text": "Let me compute."}, {"type": "python", "text": "12*7"},
             {"type": "python_output", "text": "84"}, {"type": "text", "text": " The answer is 84."}]
    assert scripted.prompts[-1] == tokenizer.render_for_completion(q + [{"role": "assistant", "content": parts},
                                                                        {"role": "user", "content": "thanks"}])
    rec = last_log(caplog)
    assert (rec["temperature"], rec["top_k"]) == (0.3, 7)
    # stop: a slow reply is cut off, the page says so, the server frees the worker
    scripted.delay = 0.3
    browser.js("input.value = 'slowly'; document.getElementById('send').click()")
    browser.wait("Number(chat.dataset.chunks) >= 1 && messages.length === 6 && messages[5].content.length > 0")
    browser.js("document.getElementById('stop').click()")
    browser.wait(DONE)
    assert "(stopped)" in browser.js("chat.innerText")
    assert wait_for(lambda: requests.get(url + "/health", timeout=5).json()["rows"] == 0)
    assert last_log(caplog)["finish"] == "disconnected"
    scripted.delay = 0.0
    # fenced code in a reply is shown as a code block
    browser.js("messages.push({role: 'assistant', content: [{type: 'text', text: 'see\\n```python\\nprint(1)\\n```\\nok'}]});"
               "render()")
    assert browser.js("document.querySelector('.assistant:last-child pre code').textContent") == "print(1)\n"
    assert browser.js("document.querySelector('.assistant:last-child pre').dataset.lang") == "python"
    # new chat: an empty page
    browser.js("document.getElementById('new').click()")
    assert browser.js("messages.length") == 0 and browser.js("chat.children.length") == 0
    assert browser.js("document.documentElement.scrollWidth <= window.innerWidth")  # fits a phone's width


def test_page_names_the_model_and_sends_an_example_in_one_click(tokenizer, live, browser):
    scripted = ScriptedModel(tool_script(tokenizer), tokenizer)
    info = {"source": "rl", "tag": "toy", "step": 120, "examples": ["What is 12*7?", "Spell the word forest."]}
    url = live(serve.create_app([engine.Engine(scripted, tokenizer)], model_name="speedchat-rl-step120", info=info))
    browser.open(url + "/")
    browser.wait("document.querySelectorAll('button.example').length === 2")
    assert browser.js("document.getElementById('model').textContent") == "speedchat-rl-step120 · rl · step 120"
    browser.js("document.querySelector('button.example').click()")
    browser.wait(DONE)
    assert scripted.prompts == [tokenizer.render_for_completion([{"role": "user", "content": "What is 12*7?"}])]
    assert "The answer is 84." in browser.js("chat.innerText") and not browser.js("document.querySelector('button.example')")
