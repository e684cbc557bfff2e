"""evals.py: CORE prompts and scoring, chat tasks and grading, downloads (local HTTP server), the
report card. Fake models with known preferences stand in for GPT: fast and deterministic."""
import io, json, os, random, re, threading, zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import evals
import tok
from _helpers_train import exit_rank, free_port, spawn_ranks


# ----------------------------------------------------------------------------- fixtures and fakes

class NgramLM(torch.nn.Module):
    """Predicts, at each position, the token that followed the longest (<= n-1 tokens) matching context
    in its 'liked' sequences, with logit 10 (0 elsewhere). So a liked continuation has a low loss and
    greedy decoding reproduces it; anything else is surprising."""

    def __init__(self, liked, vocab_size, n=4, seq_len=4096):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(sequence_len=seq_len)
        self.max_positions = seq_len
        self.V, self.n, self.table, self.max_T = vocab_size, n, {}, 0
        for ids in liked:
            for t in range(1, len(ids)):
                for k in range(1, n):
                    if t - k >= 0:
                        nxt = self.table.setdefault(tuple(ids[t - k:t]), {})
                        nxt[ids[t]] = nxt.get(ids[t], 0) + 1

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        assert T <= self.max_positions, "evals must refuse what the model cannot represent"
        self.max_T = max(self.max_T, T)
        rows, bi, ti, vi = idx.tolist(), [], [], []
        for b in range(B):
            for t in range(T):
                for k in range(self.n - 1, 0, -1):
                    nxt = self.table.get(tuple(rows[b][t - k + 1:t + 1])) if t - k + 1 >= 0 else None
                    if nxt:
                        bi.append(b), ti.append(t), vi.append(max(nxt, key=nxt.get))
                        break
        out = torch.zeros(B, T, self.V)
        out[bi, ti, vi] = 10.0
        return out


def _word(rng):
    return "".join(rng.choice("bcdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))


def make_core_data(n=7, seed=0):
    """Items of each CORE type, plus the text the fake model likes for each. Items with i % 3 == 0
    like a wrong option: expected accuracy is (n - ceil(n/3)) / n for every type."""
    rng = random.Random(seed)
    W = lambda k: " ".join(_word(rng) for _ in range(k))
    mc, schema, lm, liked = [], [], [], []
    for i in range(n):
        gold = rng.randrange(4)
        item = {"query": f"Question: {W(3)}?", "choices": [W(2) for _ in range(4)], "gold": gold}
        like = gold if i % 3 else (gold + 1) % 4
        mc.append(item)
        liked.append(f"{item['query']} {item['choices'][like]}")
        a, x, y = W(3), _word(rng), _word(rng)
        item = {"context_options": [f"{a} because the {x}", f"{a} because the {y}"], "continuation": f"{W(3)}.", "gold": i % 2}
        like = item["gold"] if i % 3 else 1 - item["gold"]
        schema.append(item)
        liked.append(f"{item['context_options'][like]} {item['continuation']}")
        item = {"context": W(4), "continuation": W(2)}
        lm.append(item)
        liked.append(f"{item['context']} {item['continuation'] if i % 3 else W(2)}")
    return mc, schema, lm, liked


CORE_YAML = """icl_tasks:
-
  label: mc_task
  dataset_uri: mc/mc.jsonl # a comment
  num_fewshot: [2]
  icl_task_type: multiple_choice
  continuation_delimiter: ' '
-
  label: schema_task
  dataset_uri: schema.jsonl
  num_fewshot:
  - 1
  - 5
  icl_task_type: schema
- label: lm_task
  dataset_uri: lm.jsonl
  num_fewshot: [1]
  icl_task_type: language_modeling
  continuation_delimiter: " "
"""


def write_bundle(root: Path, n=7):
    mc, schema, lm, liked = make_core_data(n)
    (root / "eval_data" / "mc").mkdir(parents=True, exist_ok=True)
    (root / "core.yaml").write_text(CORE_YAML)
    (root / "eval_meta_data.csv").write_text("Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
                                             "mc_task,x,y,2,7,25,Yes,d\nschema_task,x,y,1,7,50.0,Yes,d\nlm_task,x,y,1,7,0,Yes,d\n")
    for path, rows in (("mc/mc.jsonl", mc), ("schema.jsonl", schema), ("lm.jsonl", lm)):
        (root / "eval_data" / path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return liked


def make_tokenizer(texts=(), vocab_size=600):
    rng = random.Random(3)
    base = [" ".join(_word(rng) for _ in range(30)) + " Question: why? because the 0123456789 #### ." for _ in range(50)]
    return tok.train_tokenizer(list(texts) * 3 + base, vocab_size)


@pytest.fixture(scope="module")
def core_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    liked = write_bundle(root)
    t = make_tokenizer(liked)
    model = NgramLM([t.encode(s, prepend=t.bos_id) for s in liked], t.vocab_size)
    return root, t, model, liked


class Server:
    """A local HTTP server: routes path -> bytes (or a callable returning bytes); counts hits."""

    def __init__(self):
        self.routes, self.hits, self.cuts = {}, [], {}  # cuts: path -> bytes sent before dropping the connection, once
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append((self.path, self.headers.get("Range")))
                body = outer.routes.get(self.path)
                if body is None:
                    self.send_response(404), self.end_headers()
                    return
                start = int(re.match(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = outer.cuts.pop(self.path, None)
                self.wfile.write(body[start:cut])
                if cut is not None:
                    self.close_connection = True

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


# ----------------------------------------------------------------------------- CORE: parsing and prompts

def test_parse_core_yaml_formats():
    tasks = evals.parse_core_yaml(CORE_YAML)
    assert [t["label"] for t in tasks] == ["mc_task", "schema_task", "lm_task"]
    assert tasks[0] == {"label": "mc_task", "dataset_uri": "mc/mc.jsonl", "icl_task_type": "multiple_choice",
                        "num_fewshot": 2, "continuation_delimiter": " "}
    assert tasks[1]["num_fewshot"] == 1 and tasks[1]["continuation_delimiter"] == " "  # block list; default delimiter
    # the real bundle's jeopardy entry: an escaped newline inside double quotes, a comment after it
    t = evals.parse_core_yaml('icl_tasks:\n-\n  label: jeopardy\n  dataset_uri: world_knowledge/jeopardy_all.jsonl\n'
                              '  num_fewshot: [10]\n  icl_task_type: language_modeling\n'
                              '  continuation_delimiter: "\\nAnswer: " # separates questions from answers\n'
                              '  has_categories: true\n')[0]
    assert t["continuation_delimiter"] == "\nAnswer: " and t["num_fewshot"] == 10
    assert evals.parse_core_yaml("icl_tasks:\n- label: a\n  dataset_uri: 'it''s.jsonl'\n  icl_task_type: schema\n")[0]["dataset_uri"] == "it's.jsonl"


@pytest.mark.parametrize("text, msg", [
    ("icl_tasks:\n- label: a\n  icl_task_type: schema\n", "no 'dataset_uri'"),
    ("icl_tasks:\n- label: a\n  dataset_uri: x\n  icl_task_type: generation\n", "icl_task_type 'generation'"),
    ("icl_tasks:\n", "no icl_tasks"),
    ("icl_tasks:\n- label: a\n  what is this\n", "core.yaml:3"),
])
def test_parse_core_yaml_errors(text, msg):
    with pytest.raises(evals.EvalError, match=re.escape(msg)):
        evals.parse_core_yaml(text)


def test_render_multiple_choice_with_fewshot():
    shots = [{"query": "Q: 1+1?", "choices": ["2", "3"], "gold": 0}, {"query": "Q: sky?", "choices": ["green", "blue"], "gold": 1}]
    item = {"query": "Q: grass?", "choices": ["green", "red"], "gold": 0}
    assert evals.render_mc(item, shots, "\nA: ") == [
        "Q: 1+1?\nA: 2\n\nQ: sky?\nA: blue\n\nQ: grass?\nA: green",
        "Q: 1+1?\nA: 2\n\nQ: sky?\nA: blue\n\nQ: grass?\nA: red"]
    assert evals.render_mc(item, [], " ") == ["Q: grass? green", "Q: grass? red"]


def test_render_schema_with_fewshot():
    shot = {"context_options": ["Tom hit Bob because Tom", "Tom hit Bob because Bob"], "continuation": "was angry.", "gold": 0}
    item = {"context_options": ["Ann met Sue since Ann", "Ann met Sue since Sue"], "continuation": "was lost.", "gold": 1}
    assert evals.render_schema(item, [shot], " ") == [
        "Tom hit Bob because Tom was angry.\n\nAnn met Sue since Ann was lost.",
        "Tom hit Bob because Tom was angry.\n\nAnn met Sue since Sue was lost."]


def test_render_language_modeling_with_fewshot():
    shot = {"context": "  HISTORY: first president ", "continuation": "Washington"}
    item = {"context": "SCIENCE: H2O\n", "continuation": "water"}
    without, with_ = evals.render_lm(item, [shot], "\nAnswer: ")
    assert without == "HISTORY: first president\nAnswer: Washington\n\nSCIENCE: H2O\nAnswer: "
    assert with_ == without + "water"


def test_item_order_and_fewshot_follow_the_reference():
    # literal lists, worked out once from the rule: shuffle with random.Random(1337), keep the first N,
    # item at kept position i draws random.Random(1234 + i).sample(the other kept positions, k)
    assert evals.core_order(10) == [0, 3, 7, 2, 1, 6, 4, 5, 8, 9]
    assert evals.core_order(50, 8) == [2, 1, 20, 17, 48, 29, 8, 18]
    assert evals.core_order(1000, 100)[:6] == [239, 310, 101, 624, 1, 628] and len(evals.core_order(1000, 100)) == 100
    for n, per_task, i, k, want in [(10, -1, 0, 3, [8, 7, 3]), (10, -1, 7, 5, [8, 2, 7, 4, 3]), (50, 8, 2, 5, [29, 48, 8, 17, 18]),
                                    (50, 8, 7, 7, [48, 8, 17, 1, 29, 20, 2]),
                                    (1000, 100, 42, 10, [610, 997, 834, 214, 915, 410, 737, 289, 457, 509])]:
        kept = evals.core_order(n, per_task)  # file indices stand in for the items
        assert evals.fewshot_for(kept, i, k) == want, (n, per_task, i, k)
        assert kept[i] not in want
    assert evals.fewshot_for([0, 1, 2], 0, 10) == [2, 1]  # asks for more than there are: all the others
    assert evals.fewshot_for(list(range(10)), 3, 0) == []


def test_a_subsample_scores_the_reference_items_with_their_examples(core_setup, monkeypatch):
    root, t, model, _ = core_setup
    task = evals.parse_core_yaml(CORE_YAML)[0]  # mc_task, 2-shot
    data = evals.load_jsonl(root / "eval_data" / "mc" / "mc.jsonl", "multiple_choice")
    seen, real = [], evals.core_sequences
    monkeypatch.setattr(evals, "core_sequences", lambda tt, item, shots, d, tk: seen.append((item, shots)) or real(tt, item, shots, d, tk))
    evals.evaluate_task(model, t, task, data, "cpu", max_per_task=3)
    want = [(0, [3, 5]), (5, [3, 0]), (3, [5, 0])]  # core_order(7, 3) and each position's draw
    assert seen == [(data[i], [data[j] for j in shots]) for i, shots in want]


def test_spans_cover_exactly_the_scored_text(core_setup):
    _, t, _, _ = core_setup
    mc = {"query": "Question: why?", "choices": ["bada kilo", "zepo"], "gold": 0}
    for (ids, s, e), choice in zip(evals.core_sequences("multiple_choice", mc, [], " ", t), mc["choices"]):
        assert ids[0] == t.bos_id and t.decode(ids[s:e]) == " " + choice and e == len(ids)
    sc = {"context_options": ["bada because the kilo", "bada because the zepo"], "continuation": "mana tiro.", "gold": 0}
    for ids, s, e in evals.core_sequences("schema", sc, [], " ", t):
        assert t.decode(ids[s:e]).endswith("mana tiro.") and "kilo" not in t.decode(ids[s:e]) and "zepo" not in t.decode(ids[s:e])
    (ids, s, e), = evals.core_sequences("language_modeling", {"context": "bada kilo ", "continuation": "zepo mana"}, [], " ", t)
    assert t.decode(ids[s:e]) == " zepo mana" and t.decode(ids[1:s]) == "bada kilo"


def test_centering():
    assert evals.centered(0.25, 0.25) == 0.0 and evals.centered(1.0, 0.25) == 1.0
    assert evals.centered(0.5, 0.0) == 0.5 and evals.centered(0.4, 0.5) == pytest.approx(-0.2)


# ----------------------------------------------------------------------------- CORE: scoring

def test_core_accuracy_with_a_fake_model(core_setup):
    root, t, model, _ = core_setup
    res = evals.evaluate_core(model, t, "cpu", bundle=root)
    expect = (7 - 3) / 7  # items 0, 3, 6 like a wrong option
    assert res["results"] == pytest.approx({"mc_task": expect, "schema_task": expect, "lm_task": expect})
    cent = [(expect - 0.25) / 0.75, (expect - 0.5) / 0.5, expect]
    assert res["centered"] == pytest.approx(dict(zip(["mc_task", "schema_task", "lm_task"], cent)))
    assert res["CORE"] == pytest.approx(sum(cent) / 3)
    # packing many rows per forward (and padding) or one row per forward gives the same answer
    one = evals.evaluate_core(model, t, "cpu", bundle=root, batch_tokens=1)
    assert one == res
    # --max-per-task: a seeded subset of that size
    sub = evals.evaluate_core(model, t, "cpu", bundle=root, max_per_task=3)
    assert all(round(a * 3, 6) in (0, 1, 2, 3) for a in sub["results"].values())


def test_scoring_agrees_with_a_plain_loop(core_setup):
    """score_sequences (sorted, packed, padded) against one unpadded forward per sequence."""
    _, t, model, liked = core_setup
    rng = random.Random(5)
    seqs = []
    for s in liked[:9]:
        ids = t.encode(s, prepend=t.bos_id)
        a = rng.randrange(1, len(ids) - 1)
        seqs.append((ids, a, rng.randrange(a + 1, len(ids) + 1)))
    got = evals.score_sequences(model, seqs, "cpu", batch_tokens=64)
    for (ids, s, e), (loss, ok) in zip(seqs, got):
        logits = model(torch.tensor([ids]))[0]
        lp = torch.log_softmax(logits, -1)
        want = -sum(lp[p - 1, ids[p]].item() for p in range(s, e)) / (e - s)
        assert loss == pytest.approx(want, rel=1e-5)
        assert ok == all(int(logits[p - 1].argmax()) == ids[p] for p in range(s, e))


class FirstTokenGate(NgramLM):
    """NgramLM that knows its answers only when the row starts with <|bos|>: cropping any prompt from
    the left (as a model's sequence_len would tempt) makes it guess."""

    def __init__(self, liked, tokenizer, seq_len, max_positions):
        super().__init__(liked, tokenizer.vocab_size, seq_len=seq_len)
        self.max_positions, self.bos = max_positions, tokenizer.bos_id

    def forward(self, idx, **kw):
        out = super().forward(idx, **kw)
        return out * (idx[:, :1] == self.bos).unsqueeze(-1)


def test_long_prompts_are_scored_whole_and_too_long_ones_stop(core_setup):
    root, t, _, liked = core_setup
    ids = [t.encode(s, prepend=t.bos_id) for s in liked]
    model = FirstTokenGate(ids, t, seq_len=12, max_positions=4096)
    res = evals.evaluate_core(model, t, "cpu", bundle=root)
    assert model.max_T > 12  # few-shot prompts are far longer than the training length, and ran whole
    assert res["results"] == pytest.approx({"mc_task": 4 / 7, "schema_task": 4 / 7, "lm_task": 4 / 7})
    tight = FirstTokenGate(ids, t, seq_len=12, max_positions=20)
    with pytest.raises(evals.EvalError, match=r"mc_task: item \d+ of mc/mc\.jsonl is \d+ tokens; this model represents at most 20"):
        evals.evaluate_core(tight, t, "cpu", bundle=root)
    assert tight.max_T == 0  # refused before any forward


def test_bad_bundle_files_are_named(tmp_path):
    write_bundle(tmp_path)
    (tmp_path / "eval_data" / "lm.jsonl").write_text('{"context": "a"}\n')
    t = make_tokenizer()
    model = NgramLM([], t.vocab_size)
    with pytest.raises(evals.EvalError, match=r"lm\.jsonl:1: language_modeling item has no 'continuation'"):
        evals.evaluate_core(model, t, "cpu", bundle=tmp_path)
    (tmp_path / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc_task,25\n")
    with pytest.raises(evals.EvalError, match="no random baseline for task 'schema_task'"):
        evals.evaluate_core(model, t, "cpu", bundle=tmp_path)


def _dist_worker(rank, port, root, tokdir, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        t = tok.Tokenizer.load(tokdir)
        liked = json.loads((Path(tokdir) / "liked.json").read_text())
        model = NgramLM([t.encode(s, prepend=t.bos_id) for s in liked], t.vocab_size)
        res = evals.evaluate_core(model, t, "cpu", bundle=root, batch_tokens=256)
        chat = evals.evaluate_chat_task(LetterModel(t), t, ListTask(t), "cpu")
        if rank == 0:
            Path(out).write_text(json.dumps({"core": res, "chat": chat}))
    finally:
        dist.destroy_process_group()
    exit_rank()


def test_distributed_scoring_equals_one_process(core_setup, tmp_path):
    root, t, model, liked = core_setup
    t.save(tmp_path / "tok")
    (tmp_path / "tok" / "liked.json").write_text(json.dumps(liked))
    spawn_ranks(_dist_worker, (free_port(), str(root), str(tmp_path / "tok"), str(tmp_path / "out.json")))
    got = json.loads((tmp_path / "out.json").read_text())
    single = evals.evaluate_core(model, t, "cpu", bundle=root)
    assert got["core"]["results"] == pytest.approx(single["results"])
    assert got["core"]["CORE"] == pytest.approx(single["CORE"])
    assert got["chat"] == pytest.approx(evals.evaluate_chat_task(LetterModel(t), t, ListTask(t), "cpu")) == 0.6


def test_bundle_download_unpacks_once(server, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("eval_bundle/core.yaml", CORE_YAML)
        z.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Random baseline\nmc_task,25\n")
        z.writestr("eval_bundle/eval_data/lm.jsonl", '{"context": "a", "continuation": "b"}\n')
    server.routes["/eval_bundle.zip"] = buf.getvalue()
    monkeypatch.setattr(evals, "CORE_URL", server.url + "/eval_bundle.zip")
    evals.main(["download", "-a", "SpellingBee"])  # the CLI's prefetch: bundle and tasks
    folder = tok.home() / "eval_bundle"
    assert (folder / "core.yaml").read_text() == CORE_YAML
    assert (folder / "eval_data" / "lm.jsonl").exists() and not (tok.home() / "eval_bundle.zip").exists()
    evals.ensure_bundle(server.url + "/eval_bundle.zip")
    assert server.hits == [("/eval_bundle.zip", None)]  # the second call finds it on disk


def test_download_resumes_a_cut_connection(server, tmp_path):
    body = bytes(range(256)) * 4200  # ~1 MB, cut after ~600 KB: whole 256 KB blocks were written before the cut
    server.routes["/f.bin"], server.cuts["/f.bin"] = body, 600_000

    def verify(p):
        assert p.read_bytes() == body

    evals.download_file(server.url + "/f.bin", tmp_path / "f.bin", verify, backoff=0)
    assert (tmp_path / "f.bin").read_bytes() == body and not (tmp_path / "f.bin.tmp").exists()
    assert [h[0] for h in server.hits] == ["/f.bin", "/f.bin"] and server.hits[0][1] is None
    assert 0 < int(re.match(r"bytes=(\d+)-$", server.hits[1][1]).group(1)) <= 600_000  # resumed, not restarted


def test_bundle_download_rejects_a_bad_body(server):
    server.routes["/bad.zip"] = b"<html>not a zip</html>"
    with pytest.raises(evals.EvalError, match=r"download failed after 5 attempts: .*/bad\.zip"):
        evals.ensure_bundle(server.url + "/bad.zip", backoff=0)
    assert server.hits == [("/bad.zip", None)] * 5 and not (tok.home() / "eval_bundle").exists()
    assert not list(tok.home().glob("*.tmp"))


# ----------------------------------------------------------------------------- chat tasks

class ListTask(evals.Task):
    """Five categorical items with answers A, B, B, C, B (a model that always says B scores 0.6)."""
    name, eval_type = "List", "categorical"

    def __init__(self, tokenizer=None, **kw):
        super().__init__(**kw)

    def num_examples(self):
        return 5

    def get_example(self, i):
        return evals._categorical_item(f"Question {i}?", ["red", "green", "blue", "pink"], "ABCD".index("ABBCB"[i]))

    def evaluate(self, item, completion):
        return evals._grade_letter(item, completion)


class LetterModel(torch.nn.Module):
    """Logits: a huge one for a non-letter token everywhere, and B above the other letters."""

    def __init__(self, t):
        super().__init__()
        self.w, self.t = torch.nn.Parameter(torch.zeros(1)), t
        self.config = SimpleNamespace(sequence_len=1024)
        self.max_positions = 1024

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        out = torch.zeros(*idx.shape, self.t.vocab_size)
        out[..., self.t.encode("x")[0]] = 100.0
        out[..., self.t.encode("B")[0]] = 5.0
        out[..., self.t.encode("A")[0]] = 4.0
        return out


def test_categorical_grading_uses_only_the_answer_letters():
    t = make_tokenizer()
    task = ListTask()
    item = task[0]
    assert item["messages"][1] == {"role": "assistant", "content": "A"} and item["task"] == "List"
    assert "A. red\nB. green\nC. blue\nD. pink" in item["messages"][0]["content"]
    assert evals.evaluate_chat_task(LetterModel(t), t, task, "cpu") == pytest.approx(0.6)
    assert evals.evaluate_chat_task(LetterModel(t), t, task, "cpu", max_problems=2) == pytest.approx(0.5)
    assert task.evaluate(item, " A") == 1.0 and task.evaluate(item, "B. green") == 0.0


def test_slices_and_mixtures():
    bee = evals.SpellingBee(size=20, split="train")
    view = bee[5:15:2]
    assert len(view) == 5 and view[1] == bee[7] and view[1:][0] == bee[7] and len(bee[::3]) == 7
    assert bee[3] == evals.SpellingBee(size=20, split="train")[3]  # deterministic
    test = evals.SpellingBee(size=50, split="test")
    assert not {test[i]["word"] for i in range(50)} & set(evals.SpellingBee(size=500)[i]["word"] for i in range(500))
    mix = evals.TaskMixture([bee, ListTask()], seed=1)
    assert len(mix) == 25 and sorted(mix[i]["task"] for i in range(25)).count("List") == 5
    for i in range(25):
        it = mix[i]
        right = f"#### {it['answer']}" if it["task"] == "SpellingBee" else it["answer"]
        assert mix.evaluate(it, right) == 1.0
    assert len(evals.TaskMixture([bee, bee])) == 40 and len(mix[:10]) == 10


def test_spelling_bee_items_are_right_and_render():
    t = make_tokenizer()
    bee = evals.SpellingBee(size=30, split="test")
    for it in bee:
        parts = it["messages"][1]["content"]
        assert parts[2]["text"] == str(it["word"].count(it["letter"]))
        assert bee.evaluate(it, "".join(p["text"] for p in parts)) == 1.0
        assert bee.evaluate(it, f"#### {int(it['answer']) + 1}") == 0.0
        ids, mask = t.render_conversation(it["messages"])
        assert sum(mask) > 0


# (completion, gold, grade) as the reference grades GSM8K: the first "#### " then [-0-9.,]+, commas
# removed, compared as strings
GSM8K_GRADES = [
    ("#### 18", "18", 1), ("So 6 * 3 = 18 apples.\n#### 18", "18", 1), ("#### 18 dollars", "18", 1),
    ("#### 18\n#### 17", "18", 1), ("#### 17\n#### 18", "18", 0),          # the first marker counts
    ("#### 18.00", "18", 0), ("#### 18.", "18", 0),                          # strings, not numbers
    ("####18", "18", 0), ("#### $18", "18", 0), ("#### eighteen", "18", 0),   # not read at all
    ("the answer is 18", "18", 0), ("", "18", 0),
    ("#### -7", "-7", 1), ("#### $-7", "-7", 0), ("#### - 7", "-7", 0),
    ("#### 1,000", "1000", 1), ("#### 1000", "1000", 1), ("#### 1 000", "1000", 0),
    ("#### 3.5", "3.5", 1), ("#### 3.50", "3.5", 0),
]


@pytest.mark.parametrize("completion, gold, grade", GSM8K_GRADES)
def test_gsm8k_grades_as_the_reference(completion, gold, grade):
    assert evals.gsm8k_grade(completion, gold) == grade
    item = {"messages": [], "answer": gold}
    assert evals.GSM8K.evaluate(None, item, completion) == grade


def test_gsm8k_gold_answers_and_misses():
    assert evals.gsm8k_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,234") == "1234"
    assert evals.gsm8k_answer("no marker here") is None
    assert evals.gsm8k_grade("no marker", None) == 0.0  # nothing read never matches, not even nothing


def test_toy_tasks_read_numbers_leniently():
    assert evals.last_number("so #### $18.00") == "18.00" and evals.same_number("18.00", "18")
    assert evals.last_number("first #### 4, then #### 7 (final)") == "7"
    assert evals.last_number("it is 3 then 12") == "12" and evals.last_number("none") is None


def test_gsm8k_calculator_calls_become_python_parts():
    parts = evals.gsm8k_parts("Half is 48/2 = <<48/2=24>>24 clips.\nSum <<48+24=72>>72.\n#### 72")
    assert parts == [{"type": "text", "text": "Half is 48/2 = "}, {"type": "python", "text": "48/2"},
                     {"type": "python_output", "text": "24"}, {"type": "text", "text": "24 clips.\nSum "},
                     {"type": "python", "text": "48+24"}, {"type": "python_output", "text": "72"},
                     {"type": "text", "text": "72.\n#### 72"}]


HE = {"prompt": "import math\n\ndef hyp(a, b):\n    \"\"\"Hypotenuse.\"\"\"\n", "entry_point": "hyp",
      "test": "def check(f):\n    assert f(3, 4) == 5\n    assert f(5, 12) == 13\n"}


def test_humaneval_right_and_wrong_completions():
    grade = lambda c: evals.HumanEval.evaluate(None, HE, c)
    assert grade("Here it is:\n```python\nimport math\ndef hyp(a, b):\n    return math.sqrt(a*a + b*b)\n```\nDone.") == 1.0
    assert grade("    return math.hypot(a, b)\n") == 1.0          # a body, completing the prompt (which imports math)
    assert grade("```python\ndef hyp(a, b):\n    return math.hypot(a, b)\n```") == 1.0  # the prompt's imports are kept
    helper = {**HE, "prompt": "def sq(x):\n    return x * x\n\n" + HE["prompt"]}  # prompts may define helpers
    assert evals.HumanEval.evaluate(None, helper, "```python\ndef hyp(a, b):\n    return (sq(a) + sq(b)) ** 0.5\n```") == 1.0
    assert grade("```python\ndef hyp(a, b):\n    return a + b\n```") == 0.0
    assert grade("not code at all") == 0.0


# Real-shaped HumanEval problems (our own) whose solutions need the standard library: (prompt,
# canonical solution, test, entry point). A program is prompt + completion + test + check(entry_point).
HE_STDLIB = [
    ("import random\n\n\ndef shuffled_sum(xs, seed):\n    \"\"\"Sum of xs after a seeded shuffle.\"\"\"\n",
     "    ys = list(xs)\n    random.Random(seed).shuffle(ys)\n    return sum(ys)\n",
     "import random\n\n\ndef check(candidate):\n    rng = random.Random(42)\n    for _ in range(50):\n"
     "        xs = [rng.randint(-50, 50) for _ in range(rng.randint(0, 9))]\n        assert candidate(xs, rng.random()) == sum(xs)\n",
     "shuffled_sum"),
    ("import statistics\n\n\ndef spread(xs):\n    \"\"\"(median, population standard deviation) of xs.\n"
     "    >>> spread([1, 2, 3])\n    (2, 0.816496580927726)\n    \"\"\"\n",
     "    return statistics.median(xs), statistics.pstdev(xs)\n",
     "def check(candidate):\n    m, s = candidate([1, 2, 3])\n    assert m == 2 and abs(s - 0.816496580927726) < 1e-9\n"
     "    assert candidate([5, 5]) == (5, 0)\n",
     "spread"),
    ("import threading\nfrom concurrent.futures import ThreadPoolExecutor\n\n\ndef squares(xs):\n"
     "    \"\"\"Squares of xs, computed by worker threads, in order.\"\"\"\n",
     "    out, lock = {}, threading.Lock()\n    def work(i):\n        with lock:\n            out[i] = xs[i] ** 2\n"
     "    with ThreadPoolExecutor(4) as ex:\n        list(ex.map(work, range(len(xs))))\n"
     "    t = threading.Thread(target=lambda: None)\n    t.start()\n    t.join()\n    return [out[i] for i in range(len(xs))]\n",
     "import queue, logging\n\n\ndef check(candidate):\n    logging.getLogger('he').info('checking')\n"
     "    q = queue.Queue()\n    q.put([1, 2, 3])\n    assert candidate(q.get()) == [1, 4, 9]\n    assert candidate([]) == []\n",
     "squares"),
    ("import os\nimport tempfile\n\n\ndef roundtrip(text):\n    \"\"\"Write text to a temporary file, read it back.\"\"\"\n",
     "    with tempfile.TemporaryDirectory() as d:\n        path = os.path.join(d, 'note.txt')\n"
     "        with open(path, 'w') as f:\n            f.write(text)\n        with open(path) as f:\n            back = f.read()\n"
     "    with tempfile.NamedTemporaryFile('w+') as f:\n        f.write(text)\n        f.seek(0)\n        assert f.read() == back\n"
     "    return back\n",
     "import secrets\n\n\ndef check(candidate):\n    for text in ('', 'hello', secrets.token_hex(8)):\n        assert candidate(text) == text\n",
     "roundtrip"),
]
EARLY_EXITS = ["    import sys\n    sys.exit(0)\n", "    raise SystemExit\n", "    import os\n    os._exit(0)\n",
               "```python\nimport unittest\nunittest.main()\n```", "```python\nimport sys\nsys.exit(0)\n```",
               "    return 0\nimport os\nos._exit(0)\n", "    raise KeyboardInterrupt\n"]


@pytest.mark.parametrize("prompt, solution, test, entry", HE_STDLIB, ids=[p[3] for p in HE_STDLIB])
def test_humaneval_solutions_that_need_the_standard_library_pass(prompt, solution, test, entry):
    item = {"prompt": prompt, "test": test, "entry_point": entry}
    assert evals.HumanEval.evaluate(None, item, solution) == 1.0
    assert evals.HumanEval.evaluate(None, item, f"```python\n{prompt}{solution}```") == 1.0  # the whole function
    assert evals.humaneval_program(item, solution) == f"{prompt}{solution}\n\n{test}\n\ncheck({entry})\n"
    for wrong in EARLY_EXITS:  # exits before check has run (or inside it): never a pass
        assert evals.HumanEval.evaluate(None, item, wrong) == 0.0, wrong


def test_generative_eval_and_chatcore():
    t = make_tokenizer()
    bee = evals.SpellingBee(size=10, split="test")
    answers = {tuple(t.render_for_completion(it["messages"])): it["answer"] for it in bee}
    calls = []

    def generate(prompts):  # one call with every prompt; right on every other one
        calls.append(prompts)
        return [f"#### {answers[tuple(p)]}" if i % 2 else f"#### {int(answers[tuple(p)]) + 1}" for i, p in enumerate(prompts)]

    assert evals.evaluate_chat_task(None, t, bee, "cpu", generate=generate) == 0.5 and [len(c) for c in calls] == [10]
    res = evals.evaluate_chat(LetterModel(t), t, "cpu", [bee, ListTask()], max_problems=4,
                              generate=lambda ps: [f"#### {answers[tuple(p)]}" for p in ps])
    assert res["SpellingBee"] == 1.0 and res["List"] == 0.5
    assert res["ChatCORE"] == pytest.approx((1.0 + (0.5 - 0.25) / 0.75) / 2)
    assert evals.chatcore({"a": 0.25, "b": 0.0}, {"a": "categorical", "b": "generative"}) == 0.0


# ----------------------------------------------------------------------------- downloads through the HF API

def _parquet_bytes(rows):
    import pyarrow as pa, pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def test_tasks_download_through_the_hf_parquet_api(server, monkeypatch):
    monkeypatch.setattr(tok, "HF_ENDPOINT", server.url)
    arc = [{"id": "q1", "question": "Which is a gas?", "choices": {"text": ["rock", "air", "ice"], "label": ["1", "2", "3"]}, "answerKey": "2"},
           {"id": "q2", "question": "Sun is a?", "choices": {"text": ["star", "moon", "rock", "sea"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"}]
    server.routes["/api/datasets/allenai/ai2_arc/parquet/ARC-Easy/test"] = json.dumps(
        [server.url + "/f/arc0.parquet", server.url + "/f/arc1.parquet"]).encode()
    server.routes["/f/arc0.parquet"], server.routes["/f/arc1.parquet"] = _parquet_bytes(arc[:1]), _parquet_bytes(arc[1:])
    task = evals.ARC("ARC-Easy", "test")
    assert len(task) == 2 and task.name == "ARC-Easy" and task.eval_type == "categorical"
    assert task[0]["answer"] == "B" and task[0]["letters"] == ["A", "B", "C"] and task[1]["answer"] == "A"
    assert "A. rock\nB. air\nC. ice" in task[0]["messages"][0]["content"]
    n = len(server.hits)
    assert len(evals.ARC("ARC-Easy", "test")) == 2 and len(server.hits) == n  # cached under $SPEEDCHAT_HOME/tasks
    assert (tok.home() / "tasks" / "allenai__ai2_arc" / "ARC-Easy" / "test" / "files.json").exists()
    # MMLU auxiliary_train wraps each row in a 'train' field; GSM8K calculator calls become tool calls
    server.routes["/api/datasets/cais/mmlu/parquet/auxiliary_train/train"] = json.dumps([server.url + "/f/aux.parquet"]).encode()
    server.routes["/f/aux.parquet"] = _parquet_bytes([{"train": {"question": "2+2?", "choices": ["3", "4"], "answer": 1, "subject": ""}}])
    assert evals.MMLU("auxiliary_train", "train")[0]["answer"] == "B"
    server.routes["/api/datasets/openai/gsm8k/parquet/main/test"] = json.dumps([server.url + "/f/g.parquet"]).encode()
    server.routes["/f/g.parquet"] = _parquet_bytes([{"question": "2*3?", "answer": "It is <<2*3=6>>6.\n#### 6"}])
    g = evals.GSM8K("main", "test")
    assert g[0]["answer"] == "6" and g[0]["messages"][1]["content"][1] == {"type": "python", "text": "2*3"}
    assert g.evaluate(g[0], "<|python_start|>2*3<|python_end|> so #### 6") == 1.0


def test_hf_download_errors_name_the_dataset(server, monkeypatch):
    monkeypatch.setattr(tok, "HF_ENDPOINT", server.url)
    with pytest.raises(evals.EvalError, match=r"allenai/ai2_arc: no subset 'ARC-Hard'"):
        evals.hf_parquet("allenai/ai2_arc", "ARC-Hard", "test")
    server.routes["/api/datasets/x/y/parquet/s/t"] = b'{"not": "a list"}'
    with pytest.raises(evals.EvalError, match="expected a non-empty JSON list"):
        evals.hf_parquet("x/y", "s", "t", backoff=0)
    server.routes["/api/datasets/x/y/parquet/s/t"] = json.dumps([server.url + "/f/broken.parquet"]).encode()
    server.routes["/f/broken.parquet"] = b"PAR1 truncated"
    with pytest.raises(evals.EvalError, match=r"download failed .*broken\.parquet"):
        evals.hf_parquet("x/y", "s", "t", backoff=0)
    assert not list((tok.home() / "tasks").rglob("*.parquet*"))  # nothing half-written left behind
    with pytest.raises(evals.EvalError, match="ARC subset 'ARC-Hard'"):
        evals.ARC("ARC-Hard")


# ----------------------------------------------------------------------------- the report card

def test_report_with_missing_sections(tmp_path):
    out = evals.assemble_report()  # nothing at all: dashes, no crash
    text = out.read_text()
    assert "## Base model\n\n-" in text and "| CORE | - | - | - | - |" in text and "## Loss curves\n\n-" in text
    tok.write_section("tokenizer", {"vocab_size": 600, "train_time_s": 1800})
    tok.write_section("base", merge=False, data={"val_bpb": 0.91, "CORE_subsample": 0.31, "CORE_subsample_items": 2000, "mfu": 40.5,
                              "train_time_s": 5400, "world_size": 8})
    tok.write_section("sft", {"ARC-Easy": 0.4, "ChatCORE": 0.1})
    tok.write_section("sft", {"GSM8K": 0.05, "ToyFacts": 0.7})  # merged, not replaced
    (tok.home() / "report" / "rl.json").write_text("{torn")  # a broken section shows as missing
    log = tok.home() / "checkpoints" / "base" / "d4" / "log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("".join(json.dumps({"step": s, "loss": 5 - s / 10}) + "\n" for s in range(30)) + '{"step": 30, "lo')
    text = evals.assemble_report(gpu_hour_cost=2.0).read_text()
    assert "| CORE | - | - | - | - |" in text  # a subsample is never the summary's CORE
    assert "| CORE, every item | not measured: run `evals.py core --source base` (a subsample gave 0.3100: not a leaderboard figure) |" in text
    assert "| beats GPT-2 1.5B (CORE > 0.256525) | - |" in text and "| training time (optimizer steps only) | 1h30m (5,400 s) |" in text
    assert "Estimated cost" not in text  # no section says it ran on a GPU: no cost
    tok.write_section("base", {"CORE": 0.2612, "CORE_tasks": 22, "CORE_items": 91037, "gpu": "NVIDIA H100 80GB HBM3",
                                 "gpu_count": 8, "git_commit": "abc123", "git_dirty": True, "command": "train.py --depth 24",
                                 "launcher": "torchrun, 1 node(s) x 8", "torch": "2.11.0", "cuda": "13.0"})
    text = evals.assemble_report(gpu_hour_cost=2.0).read_text()
    assert "| CORE | 0.2612 | - | - | - |" in text and "| CORE, every item | 0.2612 (22 tasks, 91,037 items) |" in text
    assert "| beats GPT-2 1.5B (CORE > 0.256525) | yes |" in text and "| GPUs | 8 x NVIDIA H100 80GB HBM3 |" in text
    assert "| code | git abc123 with uncommitted changes |" in text and "| final val bpb | 0.9100 |" in text
    assert "| command | `train.py --depth 24` (torchrun, 1 node(s) x 8) |" in text and "| torch / CUDA | 2.11.0 / 13.0 |" in text
    assert "| ARC-Easy | - | - | 0.4000 | - |" in text and "| GSM8K | - | - | 0.0500 | - |" in text
    assert "| ToyFacts | - | - | 0.7000 | - |" in text and "| ChatCORE | - | - | 0.1000 | - |" in text
    assert "| val_bpb | 0.9100 |" in text and "## RL\n\n-" in text and "## Midtraining\n\n-" in text
    assert "Training time, all stages (optimizer steps): 2h00m (7200s)" in text and "Estimated cost: $32.00 (8 GPU x $2.00/GPU-hour)" in text
    assert re.search(r"- base: `[▁▂▃▄▅▆▇█]+` 5\.000 -> 2\.100 \(30 steps\)", text)
    for k in ("CPU:", "torch:", "git commit:", "date:", "lines:", "dependencies:"):
        assert k in text


@pytest.mark.heavy(7)
def test_speedrun_full_core_path_on_a_tiny_model(tmp_path, speedchat_home):
    """The speedrun preset's last base-model stage (run.sh: `evals.py core --source base --tag $TAG`) on a
    tiny model trained here, with a tiny bundle in place, then the report's time-to-GPT-2 section."""
    import shlex, subprocess, sys
    import train
    from _helpers_train import make_corpus, make_tokenizer as make_train_tokenizer
    root = Path(__file__).resolve().parents[1]
    stage = re.search(r"^.*evals\.py core --source base --tag \$TAG$", (root / "run.sh").read_text(), re.M)
    assert stage and "--max-per-task" not in stage.group(0)  # the preset scores every item
    write_bundle(speedchat_home / "eval_bundle")  # where ensure_bundle looks first: no download
    make_train_tokenizer()
    corpus = make_corpus(tmp_path / "corpus.jsonl", 600, max_words=20)
    train.main(["--depth", "1", "--n-embd", "64", "--n-head", "2", "--max-seq-len", "32", "--device-batch-size", "4",
                "--total-batch-size", "256", "--num-iterations", "3", "--eval-every", "-1", "--eval-tokens", "256",
                "--sample-every", "-1", "--core-metric-every", "-1", "--core-metric-max-per-task", "3",
                "--data", str(corpus), "--tag", "t"])
    base = json.loads((speedchat_home / "report" / "base.json").read_text())
    assert base["CORE_subsample_items"] == 9 and "CORE" not in base  # training's CORE: 3 items a task, labeled
    env = {**os.environ, "SPEEDCHAT_HOME": str(speedchat_home)}
    cmd = shlex.split(stage.group(0).split("||")[-1].replace("$TAG", "t"))
    cmd = [sys.executable, *cmd[cmd.index("evals.py"):]]  # as the preset runs it, on one CPU process
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "over 3 tasks, 21 of 21 items (every item)" in run.stdout
    base = json.loads((speedchat_home / "report" / "base.json").read_text())
    assert base["CORE_tasks"] == 3 and base["CORE_items"] == 21 and -3 <= base["CORE"] <= 1
    assert base["CORE_subsample_items"] == 9  # kept beside it, never mixed up
    out = subprocess.run([sys.executable, "evals.py", "report"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    text = (speedchat_home / "report" / "report.md").read_text()
    assert f"| CORE, every item | {base['CORE']:.4f} (3 tasks, 21 items) |" in text
    assert f"| beats GPT-2 1.5B (CORE > 0.256525) | {'yes' if base['CORE'] > 0.256525 else 'no'} |" in text
    assert f"| final val bpb | {base['val_bpb']:.4f} |" in text
    assert re.search(r"\| training time \(optimizer steps only\) \| \d+m\d\ds \([\d,]+ s\) \|", text)
    assert f"| code | git {base['git_commit']}" in text and "| GPUs | 0 x none |" in text and "`train.py --depth 1" in text


def test_sparkline():
    assert evals.sparkline([3, 2, 1]) == "█▄▁" and evals.sparkline([]) == "" and evals.sparkline([1, 1]) == "▁▁"
    assert len(evals.sparkline(list(range(1000)), width=50)) <= 50


# ----------------------------------------------------------------------------- command line

def test_cli_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        evals.main(["chat", "-a", "ARC-Easy,Nope"])
    assert e.value.code == 2 and "error: -a Nope: unknown task" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evals.main(["core", "--source", "base", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --source base: no base checkpoints") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        evals.main(["core", "--max-per-task", "0"])
    evals.main(["report"])
    assert (tok.home() / "report" / "report.md").exists()


def test_cli_end_to_end_on_a_tiny_checkpoint(core_setup, capsys):
    """core and chat through train.load_model and engine.py's generation, on a random 1-layer GPT."""
    import shutil
    import train
    root, t, _, _ = core_setup
    t.save(tok.home() / "tokenizer")
    shutil.copytree(root, tok.home() / "eval_bundle")  # present: nothing to download
    cfg = train.GPTConfig(sequence_len=128, vocab_size=t.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    model = train.GPT(cfg)
    train.save_checkpoint(train.checkpoint_root("base") / "d1", 5, model.state_dict(), None,
                          {"model_config": vars(cfg), "tokenizer_hash": t.hash, "step": 5})
    evals.main(["core", "--source", "base", "--device", "cpu", "--max-per-task", "4"])
    evals.main(["chat", "--source", "base", "--device", "cpu", "-a", "SpellingBee", "--max-problems", "2", "--max-new-tokens", "4"])
    sec = json.loads((tok.home() / "report" / "base.json").read_text())
    assert -3 <= sec["CORE_subsample"] <= 1 and sec["CORE_subsample_items"] == 12 and "CORE" not in sec  # 4 a task: labeled
    assert sec["SpellingBee"] in (0.0, 0.5, 1.0) and sec["ChatCORE"] == sec["SpellingBee"]
    detail = json.loads((tok.home() / "report" / "core_base.json").read_text())
    assert set(detail) == {f"{k}/{n}" for k in ("acc", "centered") for n in ("mc_task", "schema_task", "lm_task")}
    assert "CORE" in capsys.readouterr().out


def test_report_plots_loss_when_matplotlib_is_there(monkeypatch):
    """A stand-in matplotlib (the real one is optional and not installed in CI) records the calls."""
    import sys, types
    calls = []
    ax = types.SimpleNamespace(**{n: (lambda *a, n=n, **k: calls.append(n)) for n in ("plot", "set_xlabel", "set_ylabel", "grid", "legend")})
    fig = types.SimpleNamespace(savefig=lambda path, **k: Path(path).write_bytes(b"png"))
    plt = types.ModuleType("matplotlib.pyplot")
    plt.subplots, plt.close = (lambda **k: (fig, ax)), (lambda f: None)
    mpl = types.ModuleType("matplotlib")
    mpl.use, mpl.pyplot = (lambda backend: None), plt
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", plt)
    log = tok.home() / "checkpoints" / "sft" / "t" / "log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("".join(json.dumps({"step": s, "loss": 1 / (s + 1)}) + "\n" for s in range(5)))
    text = evals.assemble_report().read_text()
    assert "![sft loss](loss_sft.png)" in text and (tok.home() / "report" / "loss_sft.png").exists() and calls.count("plot") == 1
