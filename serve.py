"""
serve.py: a trained speedchat model in front of people and programs.

    python serve.py                                   # the newest sft checkpoint, http://127.0.0.1:8000/
    python serve.py --source rl --port 8080           # another stage; --tag / --step pick a checkpoint
    python serve.py --workers 8 --host 0.0.0.0        # one model per GPU (0: every GPU), each batching its requests
    python serve.py --max-rows 32 --cache-tokens 65536  # conversations decoded together per device, and their KV memory

Endpoints:
    GET  /                      the chat page (serve.html, beside this file), which talks to /v1/chat/completions
    POST /v1/chat/completions   OpenAI-compatible: stream true (server-sent events) or false, n=1, usage counts
    POST /chat/completions      the same endpoint, for clients that leave out /v1
    GET  /v1/models             the one model served
    GET  /info                  the model (name, stage, tag, step) and, for a toy-world model, example questions
    GET  /health                rows decoding, requests waiting, KV pages in use (in all and per worker)
    GET  /?q=hello&autosend=1   the page, with a message typed in (and sent); also temperature=, top_k=

Reads top to bottom: limits, the workers (one engine.Batcher per device), request checking, generation, the stream, the Flask app
(create_app(workers): what tests and benchmarks use), the HTTP server, __main__. Tool calls travel in
the content as <|python_start|>code<|python_end|><|output_start|>result<|output_end|>; sent back (so,
or as parts {"type": "text" | "python" | "python_output"}) they round-trip. Every request is logged as
one JSON line (tokens, latency, finish: stop | length | disconnected | error), text only if asked.
"""

import argparse
import collections
import json
import logging
import math
import re
import resource
import secrets
import threading
import time
import types
import uuid
from pathlib import Path

import torch
from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

import engine
import tok
import train

# ---------------------------------------------------------------------------------------------
# Limits. Out-of-range numbers are clamped to these ranges; wrong types and oversized input are
# refused with HTTP 400 and a JSON error that names the field.

MAX_MESSAGES = 500               # messages per request
MAX_MESSAGE_CHARS = 8_000        # characters in one message
MAX_TOTAL_CHARS = 32_000         # characters in all messages of a request
MAX_BODY_BYTES = 1 << 20         # a larger request body is refused (413)
TEMPERATURE_RANGE = (0.0, 2.0)   # 0 = greedy
TOP_K_RANGE = (0, 200)           # 0 = no top-k
TOP_P_RANGE = (0.01, 1.0)        # 1 = no top-p
MAX_TOKENS_RANGE = (1, 4096)     # and never past the model's context
DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, max_tokens=4096)  # OpenAI's (the page sends its own)
MAX_ROWS = engine.MAX_ROWS        # conversations one device decodes together
MAX_QUEUE = 32                   # requests per device that may wait for a row; more get 503
QUEUE_TIMEOUT = 60.0             # seconds a request waits for a row before 503
RETRY_AFTER = 2                  # seconds, the Retry-After of a 503
CONNECTIONS = 10_000             # connections held at once; more wait in the kernel's backlog
IDLE_TIMEOUT = 30                # seconds a connection may send nothing (a half-sent request included)
EXTRA_THREADS = 4                # handler threads beyond rows + queue: /health, /info, 503s stay quick

ROLES = ("system", "user", "assistant")
MARKERS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")  # tool calls, in the content
MARKER_RE = re.compile("(" + "|".join(re.escape(m) for m in MARKERS) + ")")
OPENS = {"<|python_start|>": "python", "<|output_start|>": "python_output"}  # the part a marker opens (the rest: text)
PAGE = Path(__file__).with_name("serve.html")

log = logging.getLogger("speedchat.serve")

# ---------------------------------------------------------------------------------------------
# The workers: one engine.Batcher per device, decoding every conversation it holds in each step. A
# request goes to the device holding the fewest rows; when every device's rows and queue are full it
# gets 503 at once, and one that waits past queue_timeout for a row gets 503 too.


Worker = collections.namedtuple("Worker", "engine name")


class Pool:
    def __init__(self, workers, max_rows=MAX_ROWS, cache_tokens=None, max_queue=MAX_QUEUE, queue_timeout=QUEUE_TIMEOUT):
        if not workers:
            raise ValueError("a pool needs at least one worker")
        self.workers, self.max_queue, self.queue_timeout = list(workers), max_queue, queue_timeout
        self.batchers = [engine.Batcher(w.engine, max_rows, cache_tokens, max_queue) for w in self.workers]
        self.lock = threading.Lock()  # picking a device and queueing on it are one step

    def submit(self, prompt, s):
        """(worker, engine.Request) holding a row for this prompt, or None when every device is full
        or the wait for a row timed out."""
        with self.lock:
            load = [b.held() for b in self.batchers]
            for i in sorted(range(len(self.workers)), key=load.__getitem__):
                try:
                    req = self.batchers[i].submit(prompt, 1, s["max_tokens"], s["temperature"], s["top_k"] or None,
                                                  s["top_p"], s["seed"], wait=False)
                    break
                except engine.QueueFull:
                    continue
            else:
                return None
        if not req.admitted.wait(self.queue_timeout):
            req.cancel()
            return None
        return self.workers[i], req

    def stats(self):
        each = [{"name": w.name, **b.stats()} for w, b in zip(self.workers, self.batchers)]
        total = {k: sum(e[k] for e in each) for k in ("rows", "max_rows", "waiting", "cache_pages", "cache_pages_total")}
        return {"workers": len(each), **total, "max_queue": self.max_queue * len(each), "per_worker": each}

    def close(self):
        for b in self.batchers:
            b.close()


# ---------------------------------------------------------------------------------------------
# Checking a request. Everything a client sends goes through here; what comes out is a
# conversation in tok.py's format and clamped sampling settings.


class BadRequest(Exception):
    def __init__(self, field, message, status=400):
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status


def parse_body():
    """The request body as a JSON object (400 naming `body` otherwise, deep nesting included)."""
    raw = request.get_data(cache=True)
    try:
        body = json.loads(raw or b"")
    except RecursionError:  # [[[[...]]]] 100,000 deep: Python's parser gives up; say so
        raise BadRequest("body", "JSON nested too deeply") from None
    except ValueError as e:
        raise BadRequest("body", f"invalid JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest("body", f"expected a JSON object, got {type(body).__name__}")
    return body


def number(body, name, default, lo, hi, integer=False):
    """body[name] clamped to [lo, hi]; absent or null gives default."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise BadRequest(name, f"expected {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}")
    if isinstance(v, float) and not math.isfinite(v):
        raise BadRequest(name, f"expected a finite number, got {v}")
    return min(max(v, lo), hi)


def parse_assistant_text(text):
    """An assistant string (markers and all, as the API returns it) -> tok.py parts."""
    parts, kind = [], "text"
    for i, piece in enumerate(MARKER_RE.split(text)):
        if i % 2:  # a marker (re.split puts the separators at odd places)
            kind = OPENS.get(piece, "text")
        elif piece:
            parts.append({"type": kind, "text": piece})
    return parts


def parse_content(content, role, field):
    """A message's content -> str (system, user) or a list of parts (assistant)."""
    if isinstance(content, str):
        return parse_assistant_text(content) if role == "assistant" else content
    if not isinstance(content, list):
        raise BadRequest(field, f"expected a string or a list of parts, got {type(content).__name__}")
    allowed = ("text", "python", "python_output") if role == "assistant" else ("text",)
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            raise BadRequest(f"{field}[{j}]", "expected {\"type\": ..., \"text\": str}")
        if part.get("type") not in allowed:
            raise BadRequest(f"{field}[{j}].type", f"unsupported part type {json.dumps(part.get('type'))[:40]} for a "
                             f"{role} message; expected one of {', '.join(allowed)}")
        parts.append({"type": part["type"], "text": part["text"]})
    return parts if role == "assistant" else "".join(p["text"] for p in parts)


def parse_messages(body):
    """body["messages"] -> a conversation tok.py renders: system text folded into the first user
    turn, consecutive messages of one role merged, starting and ending with a user message."""
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("messages", "missing")
    if not isinstance(messages, list):
        raise BadRequest("messages", f"expected a list, got {type(messages).__name__}")
    if not messages:
        raise BadRequest("messages", "empty conversation")
    if len(messages) > MAX_MESSAGES:
        raise BadRequest("messages", f"{len(messages)} messages; at most {MAX_MESSAGES} per request")
    system, turns, total = [], [], 0
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(field, f"expected an object with role and content, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"{field}.role", f"unknown role {json.dumps(role)[:40]}; expected system, user or assistant")
        if "content" not in m or m["content"] is None:
            raise BadRequest(f"{field}.content", "missing")
        content = parse_content(m["content"], role, f"{field}.content")
        n = len(content) if isinstance(content, str) else sum(len(p["text"]) for p in content)
        if n > MAX_MESSAGE_CHARS:
            raise BadRequest(f"{field}.content", f"{n} characters; at most {MAX_MESSAGE_CHARS} per message")
        total += n
        if total > MAX_TOTAL_CHARS:
            raise BadRequest("messages", f"more than {MAX_TOTAL_CHARS} characters in all")
        if role == "system":
            system.append(content)
        elif turns and turns[-1]["role"] == role:  # two user (or assistant) messages in a row: one turn
            turns[-1]["content"] = turns[-1]["content"] + ("\n\n" + content if role == "user" else content)
        else:
            turns.append({"role": role, "content": content})
    if not turns or turns[0]["role"] != "user":
        raise BadRequest("messages", "the conversation must start with a user message (after any system message)")
    if turns[-1]["role"] != "user":
        raise BadRequest("messages", "the last message must be from the user")
    if system:
        turns[0]["content"] = "\n\n".join(system + [turns[0]["content"]])
    return turns


def parse_settings(body):
    """Sampling settings, clamped. Fields we do not know (tools, response_format, ...) are ignored, as
    OpenAI-compatible servers commonly do; top_k is ours."""
    d = DEFAULTS
    s = {"temperature": float(number(body, "temperature", d["temperature"], *TEMPERATURE_RANGE)),
         "top_k": number(body, "top_k", d["top_k"], *TOP_K_RANGE, integer=True),
         "top_p": float(number(body, "top_p", d["top_p"], *TOP_P_RANGE))}
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    s["max_tokens"] = number(body, name, d["max_tokens"], *MAX_TOKENS_RANGE, integer=True)
    for name, ok, what in (("seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
                           ("stream", lambda v: isinstance(v, bool), "true or false"),
                           ("stream_options", lambda v: isinstance(v, dict), "an object"),
                           ("n", lambda v: v == 1 and not isinstance(v, bool), "1 (only n=1 is supported)")):
        if body.get(name) is not None and not ok(body[name]):
            raise BadRequest(name, f"expected {what}, got {json.dumps(body[name])[:40]}")
    seed = body.get("seed")
    s["seed"] = secrets.randbits(62) if seed is None else seed % (1 << 62)
    s["stream"], s["include_usage"] = bool(body.get("stream")), bool((body.get("stream_options") or {}).get("include_usage"))
    return s


def prompt_tokens(tokenizer, turns, completion, context):
    """Token ids to generate from: the chat rendered for completion, or (a base model) the last
    user message as plain text to continue."""
    if completion:
        ids = tokenizer.encode(turns[-1]["content"], prepend=tokenizer.bos_id)
    else:
        try:
            ids = tokenizer.render_for_completion(turns)
        except ValueError as e:  # tok.py's own checks; parse_messages should have caught everything
            raise BadRequest("messages", str(e)) from None
    if len(ids) >= context:
        raise BadRequest("messages", f"the conversation is {len(ids)} tokens and the model's context is {context}; "
                         "start a new chat or send less")
    return ids


# ---------------------------------------------------------------------------------------------
# Generation: the engine's tokens as pieces of the reply's text, tool calls between their markers.


class Job:
    """One request holding one row of a worker's batch: what it generated, its timings, and its log
    line. It stops as soon as gone() says the client left (checked at every token, streaming or not).
    close() is idempotent: it frees the row (within the batcher's next step) and writes the log line,
    whichever of the stream's own end or the server closing the response (client gone) comes first."""

    def __init__(self, app_state, worker, req, path, prompt, turns, settings, t0, gone=lambda: False):
        self.state, self.worker, self.req, self.path, self.prompt, self.turns = app_state, worker, req, path, prompt, turns
        self.settings, self.gone = settings, gone
        self.t0 = t0                # when the request came in: time to first token includes any wait for a row
        self.t_first, self.completion_tokens = None, 0
        self.finish = None          # stop | length | disconnected | error
        self.content = ""           # the reply so far
        self.lock, self.closed = threading.Lock(), False

    def pieces(self):
        eng = self.worker.engine
        markers = {eng.tokenizer.special(m): m for m in MARKERS}
        streamer = engine.TextStreamer(eng.tokenizer)
        self.finish = "length"
        try:
            for token, _ in self.req.stream(0):
                self.completion_tokens += 1
                self.t_first = self.t_first or time.perf_counter()
                if self.gone():
                    self.finish = "disconnected"
                    return
                if token in eng.stop:
                    self.finish = "stop"
                    break
                text = streamer.flush() + markers[token] if token in markers else streamer.put(token)
                if token in markers:
                    streamer = engine.TextStreamer(eng.tokenizer)
                if text:
                    self.content += text
                    yield text
            rest = streamer.flush()
            if rest:
                self.content += rest
                yield rest
        finally:
            self.req.cancel()  # a no-op once the row has finished

    def usage(self):
        return {"prompt_tokens": len(self.prompt), "completion_tokens": self.completion_tokens,
                "total_tokens": len(self.prompt) + self.completion_tokens}

    def close(self):
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.req.cancel()
        now = time.perf_counter()
        decode = now - self.t_first if self.t_first else 0.0
        settings = {k: self.settings[k] for k in ("temperature", "top_k", "top_p", "max_tokens", "seed")}
        record = {"path": self.path, "status": 200, "worker": self.worker.name, "finish": self.finish or "disconnected",
                  **settings, **self.usage(), "ttft_s": round(self.t_first - self.t0, 4) if self.t_first else None,
                  "latency_s": round(now - self.t0, 4),
                  "tokens_per_s": round((self.completion_tokens - 1) / decode, 1) if decode > 0 else None}
        if self.state.log_conversations:
            record.update(messages=self.turns, reply=self.content)
        log_request(record)


def log_request(record):
    """One JSON line per request: time, path, status, tokens, latency (the text only with --log-conversations)."""
    log.info(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------
# The stream: server-sent events, as OpenAI sends them. The server closes the generator when the
# client goes away (the next write fails), which stops generation and frees the row.


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def generation_failed(job, e) -> str:
    """A generation that raised: the traceback to the log, one line for the client."""
    job.finish = "error"
    log.exception("generation failed")
    return f"{type(e).__name__}: {e}"


def openai_events(job, cid, created, model):
    """chat.completion.chunk events, the last with finish_reason, then [DONE]."""
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None}

    def chunk(delta, finish=None):
        return sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})
    try:
        yield chunk({"role": "assistant", "content": ""})
        for piece in job.pieces():
            yield chunk({"content": piece})
        yield chunk({}, job.finish)
        if job.settings["include_usage"]:
            yield sse({**head, "choices": [], "usage": job.usage()})
    except GeneratorExit:
        job.finish = "disconnected"
        raise
    except Exception as e:
        yield sse({"error": {"message": generation_failed(job, e), "type": "server_error", "param": None, "code": None}})
    finally:
        job.close()
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------
# The app: hooks that log and answer errors, the pieces of the chat endpoint, the routes, and
# create_app, which wires them together. Routes are plain functions; each finds its own app's state
# (the pool, the model's name, ...) in app.extensions["speedchat"], so several apps may share a process.


def error_response(status, message, field=None, headers=None):
    kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
            503: "overloaded_error"}.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": field, "code": None}}
    return Response(json.dumps(body), status=status, mimetype="application/json", headers=headers)


def served():
    """The state of the app answering this request (see create_app)."""
    return current_app.extensions["speedchat"]


def start_clock():
    g.t0 = time.perf_counter()


def log_plain_request(resp):
    """The log line of a request that did not generate (one that did logs itself when its Job closes)."""
    if not g.get("job"):
        log_request({"path": request.path, "status": resp.status_code,
                     "latency_s": round(time.perf_counter() - g.get("t0", time.perf_counter()), 4),
                     **({"error": g.error} if g.get("error") else {})})
    return resp


def bad_request(e):
    g.error = str(e)
    return error_response(e.status, str(e), e.field)


def http_error(e):
    g.error = e.name
    return error_response(e.code, f"{e.name}: {e.description}", "body" if e.code == 413 else None)


def admit(state, prompt, turns, settings):
    """A Job holding a row for this request, or None when every row and queue place is taken or the
    wait timed out (the caller answers 503)."""
    got = state.pool.submit(prompt, settings)
    if got is None:
        g.error = "all rows busy"
        return None
    g.job = True  # the Job writes this request's log line, not log_plain_request
    # waitress keeps reading the connection while we generate and says when the client hung up (the
    # development server cannot: there a non-streaming request runs to its end)
    gone = request.environ.get("waitress.client_disconnected", lambda: False)
    return Job(state, *got, request.path, prompt, turns, settings, g.t0, gone)


def stream_reply(job, cid, created):
    """stream: true. The reply as server-sent events, generated as the client reads them."""
    resp = Response(openai_events(job, cid, created, job.state.model_name), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    resp.call_on_close(job.close)  # frees the row even if the body was never read
    return resp


def whole_reply(job, cid, created):
    """stream: false. The reply generated to its end, then one chat.completion object."""
    try:
        for _ in job.pieces():
            pass
    except Exception as e:
        return error_response(500, generation_failed(job, e))
    finally:
        job.close()
    return {"id": cid, "object": "chat.completion", "created": created, "model": job.state.model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": job.content},
                         "logprobs": None, "finish_reason": job.finish}],
            "usage": job.usage()}


def index():
    """GET /: the chat page."""
    return Response(served().page, mimetype="text/html")


def health():
    """GET /health: rows decoding, requests waiting, KV pages in use: in all and per worker."""
    state = served()
    return {"status": "ok", "model": state.model_name, **state.pool.stats()}


def model_info():
    """GET /info: the model (name, stage, tag, step) and any example questions."""
    return served().info


def models():
    """GET /v1/models: the one model served, as OpenAI lists models."""
    state = served()
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                        "owned_by": "speedchat"}]}


def chat_completions():
    """POST /v1/chat/completions (and /chat/completions): check the request, take a row (or 503), generate the reply."""
    state = served()
    body = parse_body()
    turns, settings = parse_messages(body), parse_settings(body)
    prompt = prompt_tokens(state.pool.workers[0].engine.tokenizer, turns, state.completion, state.context)
    job = admit(state, prompt, turns, settings)
    if job is None:
        return error_response(503, "every row is busy and the queue is full; retry later",
                              headers={"Retry-After": str(RETRY_AFTER)})
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if settings["stream"]:
        return stream_reply(job, cid, created)
    return whole_reply(job, cid, created)


def create_app(workers, model_name="speedchat", completion=False, max_rows=MAX_ROWS, cache_tokens=None,
               max_queue=MAX_QUEUE, queue_timeout=QUEUE_TIMEOUT, log_conversations=False, info=None):
    """The Flask app over `workers`: Engines (or Workers), one per device, each under a Batcher of
    max_rows rows and cache_tokens tokens of KV pages (see engine.Batcher). completion=True serves a
    base model (the last user message is continued as plain text). info: what /info says of the
    model (source, tag, step, examples). app.extensions["speedchat"].pool.close() stops the batchers."""
    workers = [w if isinstance(w, Worker) else Worker(w, f"{next(w.model.parameters()).device}#{i}")
               for i, w in enumerate(workers)]
    contexts = {w.engine.model.max_positions for w in workers}
    info = {"model": model_name, "source": None, "tag": None, "step": None, "examples": [], **(info or {})}
    state = types.SimpleNamespace(pool=Pool(workers, max_rows, cache_tokens, max_queue, queue_timeout), model_name=model_name,
                                  completion=completion, context=min(contexts), log_conversations=log_conversations,
                                  info=info, created=int(time.time()), page=PAGE.read_text(encoding="utf-8"))
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["speedchat"] = state
    app.before_request(start_clock)
    app.after_request(log_plain_request)
    app.register_error_handler(BadRequest, bad_request)
    app.register_error_handler(HTTPException, http_error)
    app.get("/")(index)
    app.get("/health")(health)
    app.get("/info")(model_info)
    app.get("/v1/models")(models)
    app.post("/v1/chat/completions")(chat_completions)
    app.post("/chat/completions")(chat_completions)  # for clients that leave out /v1
    return app


# ---------------------------------------------------------------------------------------------
# The HTTP server. waitress, chosen over Werkzeug's development server (a thread per connection and no
# timeouts: 3,000 half-sent requests made 3,001 threads and stalled it for 15 s) and over gunicorn (its
# threaded worker reads a request in a handler thread, so each slow client holds one; and one process
# must hold every GPU's model). waitress reads all connections in one non-blocking loop, hands only
# whole requests to a fixed set of threads, closes a connection idle for IDLE_TIMEOUT, and with
# send_bytes=1 sends each chunk as it is written (time to first token unchanged). Measured in
# BENCHMARKS.md (bench/serve_bench.py --slow-clients).


def make_server(app, host="127.0.0.1", port=0, threads=8, dev=False, idle_timeout=IDLE_TIMEOUT):
    """A server for `app` (not yet serving): .run() serves, .port, .close(). dev=True: Werkzeug's."""
    if dev:
        from werkzeug.serving import make_server as werkzeug_server
        server = werkzeug_server(host, port, app, threaded=True)
        server.port, server.run, server.close = server.server_port, server.serve_forever, server.shutdown
        return server
    import waitress  # production WSGI server: pure Python, bounded threads, non-blocking reads (see above)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = CONNECTIONS + 256 if hard == resource.RLIM_INFINITY else min(hard, CONNECTIONS + 256)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # a connection is a file descriptor
    server = waitress.create_server(app, host=host, port=port, threads=threads, connection_limit=CONNECTIONS,
                                    channel_timeout=idle_timeout, cleanup_interval=max(1, idle_timeout // 3),
                                    asyncore_use_poll=True, channel_request_lookahead=1, send_bytes=1,
                                    max_request_body_size=MAX_BODY_BYTES, backlog=4096, ident="speedchat",
                                    expose_tracebacks=False)
    server.port = server.effective_port
    accept_one = server.handle_accept

    def accept_waiting():  # waitress takes one new connection per turn of its loop, and a turn visits every
        for _ in range(256):  # connection: after a burst of thousands the next client waited seconds. Take all waiting.
            before = len(server._map)
            accept_one()
            if len(server._map) == before or len(server._map) >= CONNECTIONS:
                break
    server.handle_accept = accept_waiting
    return server


def start_server(app, host="127.0.0.1", port=0, threads=8, dev=False, idle_timeout=IDLE_TIMEOUT):
    """Serve `app` from a thread (tests, benchmarks): (server, base URL). server.close() stops it."""
    server = make_server(app, host, port, threads, dev, idle_timeout)
    threading.Thread(target=server.run, daemon=True).start()
    return server, f"http://{host}:{server.port}"


# ---------------------------------------------------------------------------------------------
# __main__


def python_tool(require_sandbox: bool):
    """What the model's python blocks run: engine.run_tool, or, with --require-sandbox on a machine
    that lacks one of the sandbox's layers, engine.refuse_tool (the model is told the tool is off)."""
    if require_sandbox and not engine.sandbox_complete():
        print("python tool: refused (--require-sandbox, and the sandbox is incomplete here)", flush=True)
        return engine.refuse_tool
    return engine.run_tool


def toy_model(meta) -> bool:
    """Was this checkpoint trained on the toy world (pretraining data, SFT mixture or RL task)?"""
    return "toy" in (meta.get("train", {}).get("data"), meta.get("train", {}).get("mixture"), meta.get("rl", {}).get("task"))


def load_workers(source, tag, step, workers, device):
    """One Engine per device: `workers` CUDA devices (0: every one), each model on its own GPU, or one
    CPU worker. (workers, meta)."""
    if device == "cuda" or (device is None and torch.cuda.is_available()):
        n = torch.cuda.device_count() if workers == 0 else workers
        if n > torch.cuda.device_count():
            raise ValueError(f"--workers {workers}: only {torch.cuda.device_count()} GPUs are visible")
        devices = [f"cuda:{i}" for i in range(n)]
    else:
        if workers > 1:
            print(f"note: no GPU in use; --workers {workers} ignored, one CPU worker")
        devices = ["cpu"]
    out, meta = [], None
    for i, dev in enumerate(devices):
        eng, meta = engine.load_engine(source, tag, step, dev)
        on = next(eng.model.parameters()).device
        if on != torch.device(dev):
            raise ValueError(f"worker {i}: the model is on {on}, not {dev}")
        out.append(Worker(eng, f"{dev}#{i}" if dev == "cpu" else dev))
        print(f"loaded {source} checkpoint (step {meta.get('step')}) on {on}")
    return out, meta


def main(argv=None):
    p = argparse.ArgumentParser(description="speedchat server: the chat page and an OpenAI-compatible API")
    p.add_argument("--source", default="sft", type=train.source_type,
                   help="checkpoint stage: base (plain completion), mid, sft, rl, or hf:DIR (an exported folder)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="models to load, one per GPU (0: every visible GPU); one on CPU")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--max-rows", type=int, default=MAX_ROWS, help="conversations each device decodes together")
    p.add_argument("--cache-tokens", type=int, default=None,
                   help="tokens of KV cache per device (default: every row at the training length)")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE, help="requests per device that may wait for a row; more get 503")
    p.add_argument("--queue-timeout", type=float, default=QUEUE_TIMEOUT, help="seconds a request waits for a row")
    p.add_argument("--log-conversations", action="store_true", help="also log message text (off: only counts and times)")
    p.add_argument("--require-sandbox", action="store_true",
                   help="refuse the python tool unless every sandbox layer is active here (see python engine.py sandbox)")
    p.add_argument("--dev-server", action="store_true", help="Werkzeug's development server instead of waitress (debugging)")
    args = p.parse_args(argv)
    for bad, why in ((args.workers < 0, f"--workers {args.workers}: must be 0 (every GPU) or more"),
                     (args.device == "cuda" and not torch.cuda.is_available(), "--device cuda: no CUDA device is available"),
                     (not 0 <= args.port < 65536, f"--port {args.port}: must be in 0..65535"),
                     (args.max_rows < 1, f"--max-rows {args.max_rows}: must be 1 or more"),
                     (args.cache_tokens is not None and args.cache_tokens < 1, f"--cache-tokens {args.cache_tokens}: must be 1 or more"),
                     (args.max_queue < 0 or args.queue_timeout < 0, "--max-queue and --queue-timeout must not be negative")):
        if bad:
            p.error(why)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        workers, meta = load_workers(args.source, args.tag, args.step, args.workers, args.device)
    except (OSError, ValueError, tok.DataError) as e:  # no checkpoint, wrong tokenizer, too many workers, ...
        raise SystemExit(f"serve.py: {e}") from None
    tool = python_tool(args.require_sandbox)
    for w in workers:
        w.engine.tool = tool
    label = train.source_label(args.source)  # hf:DIR as hf-<folder>
    name = "-".join(str(x) for x in ("speedchat", label, args.tag, meta.get("step") and f"step{meta['step']}") if x)
    info = {"source": args.source, "tag": args.tag, "step": meta.get("step")}
    if toy_model(meta):
        info.update(examples=tok.ToyWorld().example_questions(), note="A toy-world model: it knows its own world. Try:")
    app = create_app(workers, model_name=name, completion=(meta.get("stage") or args.source) == "base",
                     max_rows=args.max_rows, cache_tokens=args.cache_tokens, max_queue=args.max_queue,
                     queue_timeout=args.queue_timeout, log_conversations=args.log_conversations, info=info)
    threads = len(workers) * (args.max_rows + args.max_queue) + EXTRA_THREADS  # a request holds one while it runs or waits
    try:
        server = make_server(app, args.host, args.port, threads, args.dev_server)
    except OSError as e:  # the port is taken, the host is not ours, ...
        raise SystemExit(f"serve.py: cannot listen on --host {args.host} --port {args.port}: {e}") from None
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    kind = "Werkzeug's development server" if args.dev_server else "waitress"
    print(f"speedchat: {name} with {len(workers)} worker(s) of {args.max_rows} rows on {kind}; open http://{shown}:{server.port}/", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    tok.run_main(main)
