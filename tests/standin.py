"""
tests/standin.py: a local stand-in for every remote source that run.sh's GPU presets read. It speaks
the same protocol as the real services and serves small files of the real schemas. For the tests and
`bash run.sh rehearsal` only; the stage files just take its address (HF_ENDPOINT, SPEEDCHAT_CORE_URL).

    python tests/standin.py --ready FILE      # serve on a free port until killed; FILE gets the base URL

What it serves, and the documentation each shape follows:
- Pretraining shards, as the Hub serves a file (https://huggingface.co/docs/hub/en/datasets-downloading):
  GET /datasets/karpathy/{climbmix-400b-shuffle,fineweb-edu-100b-shuffle}/resolve/main/shard_NNNNN.parquet
  answers 302 to the storage URL, which honours Range. Parquet with one `text` column in row groups, as
  the karpathy shards hold it (their dataset cards); the last shard (06542 / 01822) is the validation one.
- The Hub's parquet API (https://huggingface.co/docs/hub/en/api, "GET /api/datasets/{repo_id}/parquet/
  {subset}/{split}": a JSON list of URLs; each URL .../{split}/{n}.parquet answers 302 to the converted
  file, https://huggingface.co/docs/dataset-viewer/en/parquet). An unknown subset or split is a 404 with
  a JSON error. Rows have each dataset card's features: allenai/ai2_arc (id, question, choices {text,
  label}, answerKey), cais/mmlu (question, subject, choices, answer as a class index; auxiliary_train
  wraps each row in `train`), openai/gsm8k (question, answer with <<calc>> and "#### n"),
  openai/openai_humaneval (task_id, prompt, canonical_solution, test, entry_point),
  HuggingFaceTB/smol-smoltalk (messages [{content, role}], some opening with a system message; source).
- The DCLM eval bundle (https://github.com/mosaicml/llm-foundry/tree/main/scripts/eval: core.yaml's
  icl_tasks, eval_meta_data.csv, local_data in the ICL formats; ../shared/fixtures/core has real lines):
  GET /eval_bundle.zip holds eval_bundle/{core.yaml, eval_meta_data.csv, eval_data/<category>/<task>.jsonl}
  for the 22 CORE tasks, ITEMS_PER_TASK items each.
"""
import argparse, io, json, random, re, threading, zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SHARD_DOCS, ROW_GROUP = 240, 64      # documents a pretraining shard, per row group
VAL_SHARD = {"climbmix-400b-shuffle": 6542, "fineweb-edu-100b-shuffle": 1822}
ITEMS_PER_TASK = 12                  # more than the largest few-shot count (10): every item has its examples
ROWS = {"train": 48, "test": 16, "validation": 8, "dev": 8, "auxiliary_train": 48}  # rows per split

# ----------------------------------------------------------------------------- text

NAMES = ["Ada", "Bram", "Cleo", "Dov", "Ezra", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena"]
THINGS = ["apples", "books", "coins", "shells", "pencils", "stamps", "marbles", "cards"]
PLACES = ["the river", "the market", "the old mill", "the harbor", "the library", "the hill"]


_rng = random.Random("standin:lexicon")
WORDS = sorted({"".join(_rng.choice("bcdfghklmnprstvwz") + _rng.choice(["a", "e", "i", "o", "u", "ai", "ou"])
                        for _ in range(_rng.randint(1, 3))) for _ in range(800)})  # enough words for a 1K-token BPE


def sentence(rng) -> str:
    n, t, p, w = rng.choice(NAMES), rng.choice(THINGS), rng.choice(PLACES), rng.sample(WORDS, 3)
    return rng.choice([f"{n} walked to {p} with {rng.randint(2, 99)} {t}.", f"At {p}, {n} counted the {w[0]} {t} twice.",
                       f"The {w[0]} {t} near {p} belonged to {n}.", f"{n} said that the {w[0]} was {w[1]} and {w[2]}.",
                       f"In {1900 + rng.randint(0, 120)}, the {w[0]} of {w[1]} met {n} at {p}."])


def document(seed: str) -> str:
    rng = random.Random(seed)
    return " ".join(sentence(rng) for _ in range(rng.randint(4, 14)))


def shard_table(dataset: str, i: int) -> pa.Table:
    return pa.table({"text": [document(f"{dataset}:{i}:{j}") for j in range(SHARD_DOCS)]})

# ----------------------------------------------------------------------------- the chat datasets' rows


def arc_row(rng, i):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    choices = [str(a + b + d) for d in rng.sample(range(-3, 4), 4)]
    if str(a + b) not in choices:
        choices[rng.randrange(4)] = str(a + b)
    labels = ["1", "2", "3", "4"] if i % 7 == 3 else ["A", "B", "C", "D"]  # a few real rows number their choices
    return {"id": f"Standin_{i}", "question": f"{rng.choice(NAMES)} has {a} {rng.choice(THINGS)} and finds {b} more. How many now?",
            "choices": {"text": choices, "label": labels}, "answerKey": labels[choices.index(str(a + b))]}


def mmlu_row(rng, i):
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    choices = [str(a * b), str(a + b), str(a * b + 1), str(abs(a - b))]
    order = rng.sample(range(4), 4)
    return {"question": f"What is {a} times {b}?", "subject": "elementary_mathematics",
            "choices": [choices[k] for k in order], "answer": order.index(0)}


def gsm8k_row(rng, i):
    n, t, a, b = rng.choice(NAMES), rng.choice(THINGS), rng.randint(2, 12), rng.randint(2, 12)
    return {"question": f"{n} has {a} bags of {t} with {b} in each bag. How many {t} does {n} have?",
            "answer": f"{n} has {a} bags of {b}, so {a}*{b}=<<{a}*{b}={a * b}>>{a * b} {t}.\n#### {a * b}"}


def humaneval_row(rng, i):
    k = rng.randint(2, 9)
    name = f"add_{k}_{i}"
    return {"task_id": f"HumanEval/{i}",
            "prompt": f'def {name}(x: int) -> int:\n    """Return x plus {k}.\n    >>> {name}(1)\n    {1 + k}\n    """\n',
            "canonical_solution": f"    return x + {k}\n",
            "test": f"\n\nMETADATA = {{}}\n\n\ndef check(candidate):\n    assert candidate(0) == {k}\n    assert candidate(5) == {5 + k}\n",
            "entry_point": name}


def smoltalk_row(rng, i):
    messages = [{"content": "You are a helpful assistant.", "role": "system"}] if i % 5 == 0 else []
    for _ in range(rng.randint(1, 3)):
        messages += [{"content": f"Tell me about {rng.choice(PLACES)}.", "role": "user"},
                     {"content": sentence(rng) + " " + sentence(rng), "role": "assistant"}]
    return {"messages": messages, "source": "standin"}


HF_DATASETS = {  # repo -> (row maker, {subset: splits})
    "allenai/ai2_arc": (arc_row, {"ARC-Easy": ("train", "validation", "test"), "ARC-Challenge": ("train", "validation", "test")}),
    "cais/mmlu": (mmlu_row, {"all": ("test", "validation", "dev", "auxiliary_train"), "auxiliary_train": ("train",)}),
    "openai/gsm8k": (gsm8k_row, {"main": ("train", "test")}),
    "openai/openai_humaneval": (humaneval_row, {"openai_humaneval": ("test",)}),
    "HuggingFaceTB/smol-smoltalk": (smoltalk_row, {"default": ("train", "test")}),
}
FILES_PER_SPLIT = {("HuggingFaceTB/smol-smoltalk", "default", "train"): 2}  # a large split comes in several files


def hf_rows(repo: str, subset: str, split: str) -> list:
    make = HF_DATASETS[repo][0]
    rng = random.Random(f"{repo}:{subset}:{split}")
    n = ROWS["test"] if repo == "openai/openai_humaneval" else ROWS.get(split, ROWS["train"])
    rows = [make(rng, i) for i in range(n)]
    if (repo, subset) == ("cais/mmlu", "auxiliary_train"):
        rows = [{"train": r} for r in rows]
    return rows


def hf_files(repo: str, subset: str, split: str) -> list:
    """The split's converted parquet files, as bytes."""
    rows = hf_rows(repo, subset, split)
    k = FILES_PER_SPLIT.get((repo, subset, split), 1)
    return [parquet_bytes(pa.Table.from_pylist(rows[j::k])) for j in range(k)]

# ----------------------------------------------------------------------------- the eval bundle

CORE_TASKS = [  # label, path under eval_data, type, few-shot, continuation delimiter, random baseline (percent)
    ("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", "multiple_choice", 0, " ", 25),
    ("jeopardy", "world_knowledge/jeopardy_all.jsonl", "language_modeling", 10, "\nAnswer: ", 0),
    ("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", "language_modeling", 10, " ", 0),
    ("arc_easy", "world_knowledge/arc_easy.jsonl", "multiple_choice", 10, "\nAnswer: ", 25),
    ("arc_challenge", "world_knowledge/arc_challenge.jsonl", "multiple_choice", 10, "\nAnswer: ", 25),
    ("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice", 0, " ", 50),
    ("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", "multiple_choice", 10, "\nAnswer: ", 20),
    ("piqa", "commonsense_reasoning/piqa.jsonl", "multiple_choice", 10, "\nAnswer: ", 50),
    ("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", "multiple_choice", 0, " ", 25),
    ("lambada_openai", "language_understanding/lambada_openai.jsonl", "language_modeling", 0, " ", 0),
    ("hellaswag", "language_understanding/hellaswag.jsonl", "multiple_choice", 10, " ", 25),
    ("winograd", "language_understanding/winograd_wsc.jsonl", "schema", 0, " ", 50),
    ("winogrande", "language_understanding/winogrande.jsonl", "schema", 0, " ", 50),
    ("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl", "language_modeling", 10, " ", 0),
    ("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", "multiple_choice", 3, " ", 25),
    ("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", "language_modeling", 10, " ", 0),
    ("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", "language_modeling", 10, " ", 0),
    ("bigbench_repeat_copy_logic", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", "language_modeling", 10, " ", 0),
    ("squad", "reading_comprehension/squad.jsonl", "language_modeling", 10, " ", 0),
    ("coqa", "reading_comprehension/coqa.jsonl", "language_modeling", 0, " ", 0),
    ("boolq", "reading_comprehension/boolq.jsonl", "multiple_choice", 10, "\nAnswer: ", 62),
    ("bigbench_language_identification", "language_understanding/bigbench_language_identification.jsonl", "multiple_choice", 10, " ", 25),
]


def core_item(rng, kind: str) -> dict:
    """One item of the kind's real shape (../shared/fixtures/core): short, so that 10 shots fit a tiny context."""
    n, t, p = rng.choice(NAMES), rng.choice(THINGS), rng.choice(PLACES)
    if kind == "multiple_choice":
        return {"query": f"Where did {n} go with the {t}?", "choices": rng.sample(PLACES, 3), "gold": rng.randrange(3)}
    if kind == "schema":
        m = rng.choice([x for x in NAMES if x != n])
        return {"context_options": [f"{n} gave {m} the {t} because {n}", f"{n} gave {m} the {t} because {m}"],
                "continuation": "wanted them.", "gold": rng.randrange(2)}
    return {"context": f"{n} walked to", "continuation": p}


def core_yaml() -> str:
    out = ["icl_tasks:"]
    for label, path, kind, shots, delim, _ in CORE_TASKS:
        out += ["-", f"  label: {label}", f"  dataset_uri: {path}", f"  num_fewshot: [{shots}]", f"  icl_task_type: {kind}"]
        if delim != " ":
            out.append(f"  continuation_delimiter: {json.dumps(delim)}  # a comment, as the real file has")
    return "\n".join(out) + "\n"


def bundle_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("eval_bundle/core.yaml", core_yaml())
        z.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,"
                   "Centered Metric?,Description\n" + "".join(f"{label},cat,{kind},{shots},{ITEMS_PER_TASK},{base},Yes,stand-in\n"
                                                            for label, _, kind, shots, _, base in CORE_TASKS))
        written = set()
        for label, path, kind, _, _, _ in CORE_TASKS:
            if path in written:  # hellaswag and hellaswag_zeroshot read the same file
                continue
            written.add(path)
            rng = random.Random(f"core:{path}")
            z.writestr(f"eval_bundle/eval_data/{path}", "".join(json.dumps(core_item(rng, kind)) + "\n" for _ in range(ITEMS_PER_TASK)))
    return buf.getvalue()


def core_item_count() -> int:
    return ITEMS_PER_TASK * len(CORE_TASKS)

# ----------------------------------------------------------------------------- the server


def parquet_bytes(table: pa.Table, row_group_size=None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


class StandIn:
    """The server. hits: every (method, path) it answered, in order. Files are made once, on first request."""

    def __init__(self, port: int = 0, log=None, missing=None):
        self.hits, self.log, self.missing, self._files, self._lock = [], log, missing, {}, threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.hits.append(self.path)
                if outer.log:
                    with open(outer.log, "a") as f:
                        f.write(self.path + "\n")
                base = f"http://{self.headers['Host']}"
                try:
                    if outer.missing and re.search(outer.missing, self.path):  # a fault the tests ask for
                        raise KeyError(self.path)
                    kind, value = outer.route(self.path, base)
                except KeyError:
                    kind, value = 404, {"error": f"{self.path}: not found"}
                if kind == "redirect":
                    self.send_response(302)
                    self.send_header("Location", base + value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = value if isinstance(value, bytes) else json.dumps(value).encode()
                start = int(re.match(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if self.headers.get("Range") else 0
                self.send_response(kind if kind == 404 else 206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Type", "application/json" if not isinstance(value, bytes) else "application/octet-stream")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _file(self, key, make):
        with self._lock:
            if key not in self._files:
                self._files[key] = make()
            return self._files[key]

    def route(self, path: str, base: str):
        """(200, bytes or JSON) | (404, JSON) | ("redirect", path); KeyError for an unknown path."""
        m = re.fullmatch(r"/datasets/karpathy/([\w-]+)/resolve/main/shard_(\d{5})\.parquet", path)
        if m and m.group(1) in VAL_SHARD and int(m.group(2)) <= VAL_SHARD[m.group(1)]:
            return "redirect", f"/cdn/{m.group(1)}/{m.group(2)}"
        m = re.fullmatch(r"/cdn/([\w-]+)/(\d{5})", path)
        if m:
            return 200, self._file(path, lambda: parquet_bytes(shard_table(m.group(1), int(m.group(2))), ROW_GROUP))
        m = re.fullmatch(r"/api/datasets/([\w.-]+/[\w.-]+)/parquet/([\w.-]+)/([\w.-]+)(?:/(\d+)\.parquet)?", path)
        if m:
            repo, subset, split, n = m.groups()
            if split not in HF_DATASETS[repo][1].get(subset, ()):
                return 404, {"error": f"no parquet for {repo} {subset}/{split}"}
            if n is None:
                k = FILES_PER_SPLIT.get((repo, subset, split), 1)
                return 200, [f"{base}/api/datasets/{repo}/parquet/{subset}/{split}/{j}.parquet" for j in range(k)]
            return "redirect", f"/datasets/{repo}/resolve/refs%2Fconvert%2Fparquet/{subset}/{split}/{int(n):04d}.parquet"
        m = re.fullmatch(r"/datasets/([\w.-]+/[\w.-]+)/resolve/refs%2Fconvert%2Fparquet/([\w.-]+)/([\w.-]+)/(\d{4})\.parquet", path)
        if m:
            repo, subset, split, n = m.groups()
            return 200, self._file((repo, subset, split), lambda: hf_files(repo, subset, split))[int(n)]
        if path == "/eval_bundle.zip":
            return 200, self._file(path, bundle_bytes)
        raise KeyError(path)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="serve the stand-in until killed")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready", help="write the base URL to this file once serving")
    ap.add_argument("--log", help="append each request's path to this file")
    ap.add_argument("--missing", help="answer 404 to paths this regex matches")
    a = ap.parse_args()
    s = StandIn(a.port, a.log, a.missing)
    if a.ready:
        Path(a.ready + ".tmp").write_text(s.url)
        Path(a.ready + ".tmp").rename(a.ready)
    threading.Event().wait()
