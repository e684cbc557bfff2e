"""
serve.py: a trained speedchat model in front of people and programs.

    python serve.py                                   # the newest sft checkpoint, http://127.0.0.1:8000/
    python serve.py --source rl --port 8080           # another stage; --tag / --step pick a checkpoint
    python serve.py --num-gpus 8 --host 0.0.0.0       # one model per GPU, a request takes a free one

Endpoints:
    GET  /                      the chat page (self-contained: inline HTML, CSS and JS)
    POST /chat/completions      our own stream: server-sent events {"text", "kind"}, then {"done": true, ...}
    POST /v1/chat/completions   OpenAI-compatible (stream true/false, n=1), usage counts
    GET  /v1/models             the one model served
    GET  /health                workers free / busy, requests waiting
    GET  /?q=hello&autosend=1   the page, with a message typed in (and sent); also temperature=, top_k=

Reads top to bottom: limits, the worker pool, request checking, generation, the two streams,
the Flask app (create_app(workers) is what tests and benchmarks use), the page, __main__.
Python tool calls travel as parts {"type": "python" | "python_output", "text"} in our API and as
the literal markers <|python_start|> ... <|python_end|> <|output_start|> ... <|output_end|> inside
the content string of the OpenAI API; both are read back, so a conversation round-trips.
Limits (messages, characters, sampling ranges) are the constants below. Every request is logged
as one JSON line (time, tokens, latency); message text only with --log-conversations.
"""

import argparse
import json
import logging
import math
import re
import secrets
import threading
import time
import uuid

import torch
from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

import engine
import tok

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
DEFAULTS = {"chat": dict(temperature=0.6, top_k=50, top_p=1.0, max_tokens=512),      # the page's API
            "openai": dict(temperature=1.0, top_k=0, top_p=1.0, max_tokens=4096)}    # OpenAI's defaults
MAX_QUEUE = 32                   # requests that may wait for a busy worker; more get 503
QUEUE_TIMEOUT = 60.0             # seconds a request waits for a worker before 503
RETRY_AFTER = 2                  # seconds, the Retry-After of a 503

ROLES = ("system", "user", "assistant")
PART_TYPES = {"text": "text", "python": "python", "output": "python_output"}  # stream kind -> part type
KIND_OF_PART = {v: k for k, v in PART_TYPES.items()}
OPEN = {"text": "", "python": "<|python_start|>", "output": "<|output_start|>"}  # markers in OpenAI content
CLOSE = {"text": "", "python": "<|python_end|>", "output": "<|output_end|>"}
MARKER_RE = re.compile("(" + "|".join(re.escape(m) for m in (*OPEN.values(), *CLOSE.values()) if m) + ")")

log = logging.getLogger("speedchat.serve")

# ---------------------------------------------------------------------------------------------
# The worker pool: one Engine per device. A request takes a free worker, waiting in a bounded
# queue when all are busy; when the queue is full too, it gets 503 at once.


class Worker:
    def __init__(self, eng, name):
        self.engine, self.name = eng, name


class Pool:
    def __init__(self, workers, max_queue=MAX_QUEUE, queue_timeout=QUEUE_TIMEOUT):
        if not workers:
            raise ValueError("a pool needs at least one worker")
        self.workers, self.free = list(workers), list(workers)
        self.max_queue, self.queue_timeout = max_queue, queue_timeout
        self.waiting = 0
        self.cond = threading.Condition()

    def acquire(self):
        """A free worker, or None when the queue is full or the wait timed out."""
        with self.cond:
            if not self.free and self.waiting >= self.max_queue:
                return None
            self.waiting += 1
            try:
                if not self.cond.wait_for(lambda: self.free, timeout=self.queue_timeout):
                    return None
                return self.free.pop(0)
            finally:
                self.waiting -= 1

    def release(self, worker):
        with self.cond:
            self.free.append(worker)
            self.cond.notify()

    def stats(self):
        with self.cond:
            return {"workers": len(self.workers), "free": len(self.free), "busy": len(self.workers) - len(self.free),
                    "waiting": self.waiting, "max_queue": self.max_queue,
                    "free_workers": [w.name for w in self.free]}


# ---------------------------------------------------------------------------------------------
# Checking a request. Everything a client sends goes through here; what comes out is a
# conversation in tok.py's format and clamped sampling settings.


class BadRequest(Exception):
    def __init__(self, field, message, status=400):
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status


def parse_body():
    """The request body as a JSON object (400 naming `body` otherwise)."""
    raw = request.get_data(cache=True)
    try:
        body = json.loads(raw or b"")
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
    """An assistant string (markers and all, as the OpenAI API returns it) -> tok.py parts."""
    parts, kind = [], "text"
    for i, piece in enumerate(MARKER_RE.split(text)):
        if i % 2:  # a marker (re.split puts the separators at odd places)
            kind = {m: k for k, m in OPEN.items()}.get(piece, "text")
        elif piece:
            parts.append({"type": PART_TYPES[kind], "text": piece})
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


def chars(content):
    return len(content) if isinstance(content, str) else sum(len(p["text"]) for p in content)


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
        n = chars(content)
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


def parse_settings(body, api):
    """Sampling settings, clamped; `api` is "chat" or "openai" (different defaults). Fields we do not
    know (tools, response_format, ...) are ignored, as OpenAI-compatible servers commonly do."""
    d = DEFAULTS[api]
    s = {"temperature": float(number(body, "temperature", d["temperature"], *TEMPERATURE_RANGE)),
         "top_k": number(body, "top_k", d["top_k"], *TOP_K_RANGE, integer=True),
         "top_p": float(number(body, "top_p", d["top_p"], *TOP_P_RANGE))}
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    s["max_tokens"] = number(body, name, d["max_tokens"], *MAX_TOKENS_RANGE, integer=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("seed", f"expected an integer, got {json.dumps(seed)[:40]}")
    s["seed"] = secrets.randbits(62) if seed is None else seed % (1 << 62)
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise BadRequest("stream", f"expected true or false, got {json.dumps(body['stream'])[:40]}")
    s["stream"] = bool(body.get("stream"))
    if api == "openai":
        n = body.get("n", 1)
        if n is not None and (isinstance(n, bool) or n != 1):
            raise BadRequest("n", f"only n=1 is supported, got {json.dumps(n)[:40]}")
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise BadRequest("stream_options", "expected an object")
        s["include_usage"] = bool((opts or {}).get("include_usage"))
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
# Generation: the engine's tokens as pieces of text. Tool calls change the kind of the text
# (text, python, output); each change is announced with an empty piece.


class Job:
    """One request holding one worker: what it generated, its timings, and its log line. close()
    is idempotent: it frees the worker and writes the log line, whichever of the stream's own end
    or the server closing the response (client gone) comes first."""

    def __init__(self, app_state, worker, path, prompt, turns, settings, t0):
        self.state, self.worker, self.path, self.prompt, self.turns = app_state, worker, path, prompt, turns
        self.settings = settings
        self.t0 = t0                # when the request came in: time to first token includes any wait for a worker
        self.t_first = None
        self.completion_tokens = 0
        self.finish = None          # stop | length | disconnected | error
        self.parts = []             # the reply as tok.py parts
        self.lock, self.closed = threading.Lock(), False

    def pieces(self):
        eng = self.worker.engine
        sp = eng.tokenizer.special
        switch = {sp("<|python_start|>"): "python", sp("<|python_end|>"): "text",
                  sp("<|output_start|>"): "output", sp("<|output_end|>"): "text"}
        s = self.settings
        max_tokens = min(s["max_tokens"], self.state.context - len(self.prompt))
        streamer, kind = engine.TextStreamer(eng.tokenizer), "text"
        gen = eng.generate(self.prompt, 1, max_tokens, s["temperature"], s["top_k"] or None, s["top_p"], s["seed"])
        self.finish = "length"
        try:
            for out, _ in gen:
                token = out[0]
                self.completion_tokens += 1
                if self.t_first is None:
                    self.t_first = time.perf_counter()
                if token in eng.stop:
                    self.finish = "stop"
                    break
                if token in switch:
                    rest = streamer.flush()
                    if rest:
                        yield self._add(kind, rest)
                    kind, streamer = switch[token], engine.TextStreamer(eng.tokenizer)
                    yield self._add(kind, "")
                    continue
                text = streamer.put(token)
                if text:
                    yield self._add(kind, text)
            rest = streamer.flush()
            if rest:
                yield self._add(kind, rest)
        finally:
            gen.close()

    def _add(self, kind, text):
        last = self.parts[-1] if self.parts else None
        if last is not None and last["type"] == PART_TYPES[kind] and text:
            last["text"] += text
        elif text or not last or last["type"] != PART_TYPES[kind]:
            self.parts.append({"type": PART_TYPES[kind], "text": text})
        return kind, text

    def usage(self):
        return {"prompt_tokens": len(self.prompt), "completion_tokens": self.completion_tokens,
                "total_tokens": len(self.prompt) + self.completion_tokens}

    def close(self):
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.state.pool.release(self.worker)
        now = time.perf_counter()
        decode = now - self.t_first if self.t_first else 0.0
        settings = {k: self.settings[k] for k in ("temperature", "top_k", "top_p", "max_tokens", "seed")}
        record = {"path": self.path, "status": 200, "worker": self.worker.name, "finish": self.finish or "disconnected",
                  **settings, **self.usage(), "ttft_s": round(self.t_first - self.t0, 4) if self.t_first else None,
                  "latency_s": round(now - self.t0, 4),
                  "tokens_per_s": round((self.completion_tokens - 1) / decode, 1) if decode > 0 else None}
        log_request(record, (self.turns, self.parts) if self.state.log_conversations else None)


def content_string(parts):
    """tok.py parts -> one OpenAI content string, tool calls between their markers."""
    out = []
    for p in parts:
        kind = KIND_OF_PART[p["type"]]
        out.append(OPEN[kind] + p["text"] + CLOSE[kind])
    return "".join(out)


def log_request(record, conversation=None):
    """One JSON line per request: time, path, status, tokens, latency; the text (conversation:
    (turns, reply parts)) only with --log-conversations."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}
    if conversation is not None:
        record["messages"], record["reply"] = conversation[0], content_string(conversation[1])
    log.info(json.dumps(record, ensure_ascii=False))

# ---------------------------------------------------------------------------------------------
# The two streams. Each yields server-sent events; the server closes the generator when the
# client goes away (the next write fails), which stops generation and frees the worker.


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def chat_events(job):
    """Our stream: {"text", "kind"} per piece of text, then {"done": true, finish_reason, usage}."""
    try:
        for kind, text in job.pieces():
            yield sse({"text": text, "kind": kind})
        yield sse({"done": True, "finish_reason": job.finish, **job.usage(), "worker": job.worker.name})
    except GeneratorExit:
        job.finish = "disconnected"
        raise
    except Exception as e:  # the headers are sent: report it in the stream
        job.finish = "error"
        log.exception("generation failed")
        yield sse({"error": f"{type(e).__name__}: {e}"})
        yield sse({"done": True, "finish_reason": "error", **job.usage()})
    finally:
        job.close()


def openai_events(job, cid, created, model):
    """OpenAI's stream: chat.completion.chunk events, the last with finish_reason, then [DONE]."""
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None}

    def chunk(delta, finish=None):
        return sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})
    try:
        yield chunk({"role": "assistant", "content": ""})
        prev = "text"
        for kind, text in job.pieces():
            piece = (CLOSE[prev] + OPEN[kind] if kind != prev else "") + text
            prev = kind
            if piece:
                yield chunk({"content": piece})
        if prev != "text":
            yield chunk({"content": CLOSE[prev]})
        yield chunk({}, job.finish)
        if job.settings["include_usage"]:
            yield sse({**head, "choices": [], "usage": job.usage()})
    except GeneratorExit:
        job.finish = "disconnected"
        raise
    except Exception as e:
        job.finish = "error"
        log.exception("generation failed")
        yield sse({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error", "param": None, "code": None}})
    finally:
        job.close()
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------
# The app


class AppState:
    def __init__(self, pool, model_name, completion, context, log_conversations):
        self.pool, self.model_name, self.completion, self.context = pool, model_name, completion, context
        self.log_conversations = log_conversations
        self.created = int(time.time())


def error_response(status, message, field=None, headers=None):
    kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
            503: "overloaded_error"}.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": field, "code": None}}
    return Response(json.dumps(body), status=status, mimetype="application/json", headers=headers)


def create_app(workers, model_name="speedchat", completion=False, max_queue=MAX_QUEUE, queue_timeout=QUEUE_TIMEOUT,
               log_conversations=False):
    """The Flask app over `workers`: Engines (or Workers), one per device. completion=True serves a
    base model (the last user message is continued as plain text)."""
    workers = [w if isinstance(w, Worker) else Worker(w, f"{next(w.model.parameters()).device}#{i}")
               for i, w in enumerate(workers)]
    contexts = {w.engine.model.max_positions for w in workers}
    state = AppState(Pool(workers, max_queue, queue_timeout), model_name, completion, min(contexts), log_conversations)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["speedchat"] = state

    @app.before_request
    def start_clock():
        g.t0 = time.perf_counter()

    @app.after_request
    def log_plain_request(resp):  # a request that generated logs itself when its Job closes
        if not g.get("job"):
            log_request({"path": request.path, "status": resp.status_code,
                         "latency_s": round(time.perf_counter() - g.get("t0", time.perf_counter()), 4),
                         **({"error": g.error} if g.get("error") else {})})
        return resp

    @app.errorhandler(BadRequest)
    def bad_request(e):
        g.error = str(e)
        return error_response(e.status, str(e), e.field)

    @app.errorhandler(HTTPException)
    def http_error(e):
        g.error = e.name
        return error_response(e.code, f"{e.name}: {e.description}", "body" if e.code == 413 else None)

    def start(api):
        """Check the request, then take a worker: (Job, None), or (None, a 503 response)."""
        body = parse_body()
        turns, settings = parse_messages(body), parse_settings(body, api)
        worker0 = state.pool.workers[0]
        prompt = prompt_tokens(worker0.engine.tokenizer, turns, state.completion, state.context)
        worker = state.pool.acquire()
        if worker is None:
            g.error = "all workers busy"
            return None, error_response(503, "all workers are busy; retry later",
                                        headers={"Retry-After": str(RETRY_AFTER)})
        g.job = True
        return Job(state, worker, request.path, prompt, turns, settings, g.t0), None

    def stream(events, job):
        resp = Response(events, mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        resp.call_on_close(job.close)  # frees the worker even if the body was never read
        return resp

    @app.get("/")
    def index():
        return Response(PAGE, mimetype="text/html")

    @app.get("/health")
    def health():
        return {"status": "ok", "model": state.model_name, **state.pool.stats()}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "speedchat"}]}

    @app.post("/chat/completions")
    def chat_completions():
        job, err = start("chat")
        return err or stream(chat_events(job), job)

    @app.post("/v1/chat/completions")
    def openai_chat_completions():
        job, err = start("openai")
        if err:
            return err
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if job.settings["stream"]:
            return stream(openai_events(job, cid, created, state.model_name), job)
        try:
            for _ in job.pieces():
                pass
        except Exception as e:
            job.finish = "error"
            log.exception("generation failed")
            return error_response(500, f"{type(e).__name__}: {e}")
        finally:
            job.close()
        return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content_string(job.parts)},
                             "logprobs": None, "finish_reason": job.finish}],
                "usage": job.usage()}

    return app


def start_server(app, host="127.0.0.1", port=0):
    """Serve `app` from a thread (tests, benchmarks): (server, base URL). server.shutdown() stops it."""
    server = make_server(host, port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_port}"


# ---------------------------------------------------------------------------------------------
# The page: one self-contained document. The model's text is only ever set with textContent.

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1, viewport-fit=cover">
<title>speedchat</title><link rel="icon" href="data:,">
<style>
:root{--bg:#fff;--fg:#1d1d1f;--muted:#6e6e73;--line:#e3e3e8;--user:#f0f0f5;--accent:#2563eb;--code:#f6f8fa;
--py:#fff7e0;--pyline:#e0a800;--out:#eaf7ee;--outline:#2e9d57;--err:#c62828}
@media (prefers-color-scheme:dark){:root{--bg:#141416;--fg:#ececf1;--muted:#9a9aa3;--line:#2d2d33;--user:#24242a;
--accent:#4f8cff;--code:#1d1d22;--py:#2b2513;--pyline:#c89400;--out:#132a1c;--outline:#3fb96f;--err:#ff6b6b}}
*{box-sizing:border-box}
html,body{height:100%;margin:0}
body{display:flex;flex-direction:column;background:var(--bg);color:var(--fg);
font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header{display:flex;gap:.5rem;align-items:center;flex-wrap:wrap;padding:.5rem .75rem;border-bottom:1px solid var(--line)}
header h1{font-size:1.05rem;margin:0 auto 0 0}
header label{font-size:.8rem;color:var(--muted);display:flex;align-items:center;gap:.3rem}
header input{width:4.5rem;font:inherit;padding:.2rem .3rem;border:1px solid var(--line);border-radius:.35rem;
background:var(--bg);color:var(--fg)}
#chat{flex:1;overflow-y:auto;padding:1rem .75rem;-webkit-overflow-scrolling:touch}
.msg{max-width:46rem;margin:0 auto 1rem}
.user{display:flex;flex-direction:column;align-items:flex-end}
.user .bubble{background:var(--user);border-radius:1rem;padding:.45rem .85rem;white-space:pre-wrap;
overflow-wrap:anywhere;max-width:85%;cursor:pointer}
.user .bubble:hover{outline:1px dashed var(--muted)}
.assistant .text{white-space:pre-wrap;overflow-wrap:anywhere}
pre{background:var(--code);padding:.55rem .7rem;border-radius:.45rem;overflow-x:auto;margin:.4rem 0;
font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre}
pre[data-lang]::before{content:attr(data-lang);display:block;font-size:11px;color:var(--muted)}
.tool{margin:.4rem 0;border-left:3px solid;border-radius:.35rem;padding:.2rem .6rem}
.tool .label{font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.tool pre{background:transparent;padding:.2rem 0;margin:0}
.python{background:var(--py);border-color:var(--pyline)}
.python_output{background:var(--out);border-color:var(--outline)}
.meta{font-size:.78rem;color:var(--muted);margin-top:.25rem;display:flex;gap:.5rem;align-items:center}
.error{color:var(--err)}
.cursor::after{content:"\25CF";margin-left:.15rem;animation:blink 1s steps(2) infinite}
@keyframes blink{50%{opacity:0}}
footer{display:flex;gap:.5rem;padding:.5rem .75rem calc(.5rem + env(safe-area-inset-bottom));border-top:1px solid var(--line)}
textarea{flex:1;resize:none;font:inherit;padding:.5rem .65rem;border-radius:.6rem;border:1px solid var(--line);
background:var(--bg);color:var(--fg);max-height:40vh}
button{font:inherit;font-size:.9rem;padding:.4rem .8rem;border-radius:.55rem;border:1px solid var(--line);
background:var(--bg);color:var(--fg);cursor:pointer}
button.primary{background:var(--accent);border-color:var(--accent);color:#fff}
button.link{border:0;padding:0;background:none;color:var(--muted);font-size:.78rem;text-decoration:underline}
button:disabled{opacity:.5;cursor:default}
.edit{width:100%;display:flex;flex-direction:column;gap:.4rem;align-items:flex-end}
.edit textarea{width:100%;min-height:4rem}
@media (max-width:520px){body{font-size:15px}header h1{flex-basis:100%}.user .bubble{max-width:92%}}
</style></head>
<body>
<header><h1>speedchat</h1>
<label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.6"></label>
<label>top-k <input id="topk" type="number" min="0" max="200" step="1" value="50"></label>
<button id="new">New chat</button></header>
<main id="chat" data-state="idle" data-chunks="0"></main>
<footer><textarea id="input" rows="1" placeholder="Message speedchat"></textarea>
<button id="send" class="primary">Send</button><button id="stop" hidden>Stop</button></footer>
<script>
"use strict";
const $ = id => document.getElementById(id);
const chat = $("chat"), input = $("input");
let messages = [];        // {role: "user", content: str} | {role: "assistant", content: [{type, text}], note}
let controller = null;    // the running request's AbortController
const KIND = {text: "text", python: "python", output: "python_output"};

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function textView(parent, text) {   // prose, with ``` fenced code blocks shown as code
  text.split("```").forEach((piece, j) => {
    if (j % 2 === 0) { if (piece) parent.appendChild(el("span", "", piece)); return; }
    const nl = piece.indexOf("\n"), pre = el("pre");
    const lang = nl > 0 ? piece.slice(0, nl).trim() : "";
    if (lang && !/\s/.test(lang)) pre.dataset.lang = lang;
    pre.appendChild(el("code", "", nl >= 0 && (lang === "" || !/\s/.test(lang)) ? piece.slice(nl + 1) : piece));
    parent.appendChild(pre);
  });
}

function userView(m, i) {
  const box = el("div", "msg user"), bubble = el("div", "bubble", m.content);
  bubble.title = "Click to edit and regenerate from here";
  bubble.onclick = () => { if (!controller) editView(box, i); };
  box.appendChild(bubble);
  return box;
}

function editView(box, i) {
  box.textContent = "";
  const form = el("div", "edit"), area = el("textarea"), row = el("div");
  area.value = messages[i].content;
  const save = el("button", "primary", "Save & regenerate"), cancel = el("button", "", "Cancel");
  save.onclick = () => {
    const text = area.value.trim();
    if (!text) return;
    messages = messages.slice(0, i).concat([{role: "user", content: text}]);
    generate();
  };
  cancel.onclick = render;
  row.append(cancel, " ", save);
  form.append(area, row);
  box.appendChild(form);
  area.focus();
}

function assistantView(m, i) {
  const box = el("div", "msg assistant"), body = el("div", "body");
  for (const p of m.content) {
    if (p.type === "text") {
      if (p.text) { const t = el("div", "text"); textView(t, p.text); body.appendChild(t); }
      continue;
    }
    const tool = el("div", "tool " + p.type);
    tool.appendChild(el("div", "label", p.type === "python" ? "python" : "output"));
    const pre = el("pre"); pre.appendChild(el("code", "", p.text)); tool.appendChild(pre);
    body.appendChild(tool);
  }
  if (m.running) body.lastChild ? body.lastChild.classList.add("cursor") : body.appendChild(el("span", "cursor"));
  box.appendChild(body);
  const meta = el("div", "meta");
  if (m.error) meta.appendChild(el("span", "error", m.error));
  if (m.note) meta.appendChild(el("span", "", m.note));
  if (!m.running && !controller && i === messages.length - 1) {
    const again = el("button", "link", "Regenerate");
    again.onclick = () => { messages.pop(); generate(); };
    meta.appendChild(again);
  }
  box.appendChild(meta);
  return box;
}

function render() {
  chat.textContent = "";
  messages.forEach((m, i) => chat.appendChild(m.role === "user" ? userView(m, i) : assistantView(m, i)));
  chat.scrollTop = chat.scrollHeight;
}

function updateLast() {   // re-draw only the reply being streamed
  const i = messages.length - 1, atBottom = chat.scrollHeight - chat.scrollTop - chat.clientHeight < 40;
  if (chat.lastChild) chat.lastChild.replaceWith(assistantView(messages[i], i)); else render();
  if (atBottom) chat.scrollTop = chat.scrollHeight;
}

function setBusy(busy) {
  $("send").hidden = busy; $("stop").hidden = !busy;
  chat.dataset.state = busy ? "running" : "done";
}

function history() {   // what the server needs: roles and contents, nothing of the page's own
  return messages.map(m => ({role: m.role, content: m.content}));
}

async function generate() {
  const reply = {role: "assistant", content: [], running: true};
  const payload = {messages: history(), temperature: parseFloat($("temperature").value) || 0,
                   top_k: parseInt($("topk").value, 10) || 0};
  messages.push(reply);
  controller = new AbortController();
  setBusy(true); render();
  let chunks = 0;
  function onEvent(ev) {
    if (ev.error) { reply.error = ev.error; return; }
    if (ev.done) { if (ev.finish_reason === "length") reply.note = "(cut at the token limit)"; return; }
    const type = KIND[ev.kind] || "text", last = reply.content[reply.content.length - 1];
    if (last && last.type === type) last.text += ev.text; else reply.content.push({type: type, text: ev.text});
    chat.dataset.chunks = String(++chunks);
    updateLast();
  }
  try {
    const res = await fetch("/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
                                                  body: JSON.stringify(payload), signal: controller.signal});
    if (!res.ok) {
      const e = await res.json().catch(() => ({}));
      throw new Error((e.error && e.error.message) || res.status + " " + res.statusText);
    }
    const reader = res.body.getReader(), decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let k;
      while ((k = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, k); buf = buf.slice(k + 2);
        for (const line of block.split("\n")) if (line.startsWith("data: ")) onEvent(JSON.parse(line.slice(6)));
      }
    }
  } catch (e) {
    if (e.name === "AbortError") reply.note = "(stopped)"; else reply.error = String(e.message || e);
  }
  reply.running = false; controller = null;
  setBusy(false); render();
}

function send() {
  const text = input.value.trim();
  if (!text || controller) return;
  messages.push({role: "user", content: text});
  input.value = ""; input.style.height = "";
  generate();
}

$("send").onclick = send;
$("stop").onclick = () => { if (controller) controller.abort(); };
$("new").onclick = () => { if (controller) controller.abort(); messages = []; render(); input.focus(); };
const touch = matchMedia("(pointer: coarse)").matches;   // on a phone, Enter is a new line; Send sends
input.addEventListener("keydown", e => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing && !touch) { e.preventDefault(); send(); }
});
input.addEventListener("input", () => { input.style.height = ""; input.style.height = input.scrollHeight + "px"; });

// ?q=hello&autosend=1&temperature=0&top_k=5: prefill (and send) a message, e.g. from a bookmark
const params = new URLSearchParams(location.search);
if (params.has("temperature")) $("temperature").value = params.get("temperature");
if (params.has("top_k")) $("topk").value = params.get("top_k");
if (params.has("q")) { input.value = params.get("q"); if (params.get("autosend") === "1") send(); }
input.focus();
</script>
</body></html>
"""

# ---------------------------------------------------------------------------------------------
# __main__


def python_tool(require_sandbox: bool):
    """What the model's python blocks run: engine.run_tool, or, with --require-sandbox on a machine
    that lacks one of the sandbox's layers, engine.refuse_tool (the model is told the tool is off)."""
    if require_sandbox and not engine.sandbox_complete():
        print("python tool: refused (--require-sandbox, and the sandbox is incomplete here)", flush=True)
        return engine.refuse_tool
    return engine.run_tool


def load_workers(source, tag, step, num_gpus, device):
    """One Engine per device: num_gpus CUDA devices (0: all), or one CPU worker. (workers, meta)."""
    if device == "cuda" or (device is None and torch.cuda.is_available()):
        n = torch.cuda.device_count() if num_gpus == 0 else num_gpus
        devices = [f"cuda:{i}" for i in range(n)]
    else:
        if num_gpus > 1:
            print(f"note: no GPU in use; --num-gpus {num_gpus} ignored, one CPU worker")
        devices = ["cpu"]
    workers, meta = [], None
    for i, dev in enumerate(devices):
        eng, meta = engine.load_engine(source, tag, step, dev)
        workers.append(Worker(eng, f"{dev}#{i}" if dev == "cpu" else dev))
        print(f"loaded {source} checkpoint (step {meta.get('step')}) on {dev}")
    return workers, meta


def main(argv=None):
    p = argparse.ArgumentParser(description="speedchat server: the chat page, a streaming chat API, an OpenAI-compatible API")
    p.add_argument("--source", default="sft", choices=["sft", "rl", "base"], help="checkpoint stage (base: plain completion)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--num-gpus", type=int, default=1, help="models to load, one per GPU (0: every visible GPU)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE, help="requests that may wait for a worker; more get 503")
    p.add_argument("--queue-timeout", type=float, default=QUEUE_TIMEOUT, help="seconds a request waits for a worker")
    p.add_argument("--log-conversations", action="store_true", help="also log message text (off: only counts and times)")
    p.add_argument("--require-sandbox", action="store_true",
                   help="refuse the python tool unless every sandbox layer is active here (see python engine.py sandbox)")
    args = p.parse_args(argv)
    if args.num_gpus < 0:
        p.error(f"--num-gpus {args.num_gpus}: must be 0 (all) or more")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if torch.cuda.is_available() and args.device != "cpu" and args.num_gpus > torch.cuda.device_count():
        p.error(f"--num-gpus {args.num_gpus}: only {torch.cuda.device_count()} GPUs are visible")
    if not 0 <= args.port < 65536:
        p.error(f"--port {args.port}: must be in 0..65535")
    if args.max_queue < 0 or args.queue_timeout < 0:
        p.error("--max-queue and --queue-timeout must not be negative")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        workers, meta = load_workers(args.source, args.tag, args.step, args.num_gpus, args.device)
    except (OSError, ValueError, tok.DataError) as e:  # no checkpoint, wrong tokenizer, ...
        raise SystemExit(f"serve.py: {e}") from None
    for w in workers:
        w.engine.tool = python_tool(args.require_sandbox)
    name = "-".join(str(x) for x in ("speedchat", args.source, args.tag, meta.get("step") and f"step{meta['step']}") if x)
    app = create_app(workers, model_name=name, completion=args.source == "base", max_queue=args.max_queue,
                     queue_timeout=args.queue_timeout, log_conversations=args.log_conversations)
    try:
        server = make_server(args.host, args.port, app, threaded=True)
    except OSError as e:  # the port is taken, the host is not ours, ...
        raise SystemExit(f"serve.py: cannot listen on --host {args.host} --port {args.port}: {e}") from None
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"speedchat: {name} with {len(workers)} worker(s); open http://{shown}:{server.server_port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
