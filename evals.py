"""
evals.py: measure every stage and write the report card.

  python evals.py core --source base [--tag T] [--step S] [--max-per-task N]    # CORE (DCLM, 22 tasks)
  python evals.py chat --source sft [-a ARC-Easy,GSM8K] [--max-problems N]     # chat tasks, ChatCORE
  python evals.py report [--gpu-hour-cost 3.0]                                  # $SPEEDCHAT_HOME/report/report.md
  python evals.py download [-a ARC-Easy,MMLU] [--no-core]                       # fetch the data ahead of a run
  torchrun --standalone --nproc_per_node=8 evals.py core --source base          # same numbers, items split over 8 GPUs

Reads top to bottom: constants, downloads, CORE (bundle, core.yaml, prompts, scoring), chat tasks
(the Task objects that chat_sft.py and chat_rl.py also train on), chat evaluation, the report card
(assembled from the sections each stage writes with tok.write_section), the command line.
"""
import argparse, contextlib, copy, csv, fcntl, functools, json, math, os, platform, random, re, shutil, subprocess, sys, time
import zipfile, zlib
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.distributed as dist

import tok
import train
import engine
from train import print0

# ----------------------------------------------------------------------------- constants

CORE_URL = os.environ.get("SPEEDCHAT_CORE_URL", "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip")
GPT2_XL_CORE = 0.256525       # CORE of GPT-2 1.5B, the reference point
SHUFFLE_SEED = 1337           # CORE items in the order random.Random(1337).shuffle gives (the reference's)
FEWSHOT_SEED = 1234           # few-shot examples of the item at position i: random.Random(FEWSHOT_SEED + i)
CORE_BATCH_TOKENS = 8192      # tokens per scoring forward (rows x longest row); logits cost 4*V bytes each
CORE_TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
LETTERS = "ABCDEFGHIJ"
CHAT_BASELINE = {"categorical": 0.25, "generative": 0.0}  # ChatCORE centers by these
HUMANEVAL_TIMEOUT = 10.0      # seconds per HumanEval program in the sandbox
SECTIONS = {"tokenizer": "Tokenizer", "base": "Base model", "mid": "Midtraining", "sft": "SFT", "rl": "RL"}  # in order
SUMMARY_ROWS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]
SPARK = "▁▂▃▄▅▆▇█"


class EvalError(tok.DataError):
    """Bad input named plainly: the CLI prints it as one line (tok.fetch does not retry it)."""


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(values: list, device) -> list:
    """Sum a list of numbers over ranks (no-op on one process). gloo wants CPU tensors, NCCL CUDA ones."""
    if _rank_world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- downloads

def download_file(url: str, path: Path, verify, attempts: int = 5, backoff: float = 1.0, timeout: float = 60.0) -> Path:
    """tok.fetch (streamed to .tmp, resumed, verified, renamed, retried) with our error type."""
    try:
        return tok.fetch(url, path, attempts, backoff, timeout, verify=verify)
    except tok.DataError as e:
        raise EvalError(str(e)) from None


@contextlib.contextmanager
def _file_lock(path: Path):
    """One process downloads, the others (ranks started together) wait and then find it done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _verify_zip(path):
    with zipfile.ZipFile(path) as z:
        if not any(n.endswith("core.yaml") for n in z.namelist()):
            raise EvalError("not the CORE bundle: no core.yaml in the zip")
        bad = z.testzip()
        if bad is not None:  # damaged bytes: fetched again
            raise zipfile.BadZipFile(f"corrupt member {bad}")


def _verify_url_list(path):
    """The parquet API's answer: a JSON list of file URLs (a body cut short is not JSON, and is fetched again)."""
    urls = json.loads(Path(path).read_text())
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise EvalError(f"expected a non-empty JSON list of parquet URLs, got {str(urls)[:100]}")


def _verify_parquet(path):
    import pyarrow.parquet as pq
    pq.ParquetFile(path).metadata  # raises on a truncated or non-parquet body


# ----------------------------------------------------------------------------- CORE: the bundle

def ensure_bundle(url: str | None = None, backoff: float = 1.0) -> Path:
    """$SPEEDCHAT_HOME/eval_bundle with core.yaml, eval_meta_data.csv, eval_data/; downloaded once."""
    url = url or CORE_URL
    folder = tok.home() / "eval_bundle"
    if (folder / "core.yaml").exists():
        return folder
    with _file_lock(tok.home() / ".eval_bundle.lock"):
        if (folder / "core.yaml").exists():  # another rank finished it while we waited
            return folder
        zpath = tok.home() / "eval_bundle.zip"
        print(f"downloading the CORE eval bundle: {url}")
        download_file(url, zpath, _verify_zip, backoff=backoff)
        tmp = tok.home() / ".eval_bundle.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp)
        root = min((p.parent for p in tmp.rglob("core.yaml")), key=lambda p: len(p.parts))  # the zip may nest a folder
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(root, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        zpath.unlink()
    return folder


def parse_core_yaml(text: str, where: str = "core.yaml") -> list:
    """The icl_tasks list of core.yaml, each task's fields checked and given their defaults."""
    try:  # PyYAML (a dependency): core.yaml is YAML as llm-foundry writes it; imported here so that the
        import yaml  # rest of evals.py works on a machine without it (a GPU image with torch alone)
    except ImportError:
        raise EvalError(f"{where}: reading it needs PyYAML (pip install pyyaml)") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "context_mark", None) or getattr(e, "problem_mark", None)
        raise EvalError(f"{where}:{mark.line + 1 if mark else '?'}: {getattr(e, 'problem', None) or e}") from None
    tasks = (doc.get("icl_tasks") if isinstance(doc, dict) else None) or []
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise EvalError(f"{where}: icl_tasks is not a list of tasks")
    out = []
    for i, t in enumerate(tasks):
        for field in ("label", "dataset_uri", "icl_task_type"):
            if field not in t:
                raise EvalError(f"{where}: task {i + 1} has no '{field}' field")
        if t["icl_task_type"] not in CORE_TASK_TYPES:
            raise EvalError(f"{where}: task {t['label']}: icl_task_type {t['icl_task_type']!r} is not one of {', '.join(CORE_TASK_TYPES)}")
        shots = t.get("num_fewshot", 0)
        shots = shots[0] if isinstance(shots, list) and shots else (shots or 0)
        out.append({"label": str(t["label"]), "dataset_uri": str(t["dataset_uri"]), "icl_task_type": t["icl_task_type"],
                    "num_fewshot": int(shots), "continuation_delimiter": str(t.get("continuation_delimiter", " "))})
    if not out:
        raise EvalError(f"{where}: no icl_tasks")
    return out


def load_baselines(path: Path) -> dict:
    """eval_meta_data.csv: task label -> random baseline as a fraction (the file has percent)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        task_col = next((c for c in cols if "task" in c.lower()), None)
        base_col = next((c for c in cols if "baseline" in c.lower()), None)
        if not task_col or not base_col:
            raise EvalError(f"{path}: expected columns 'Eval Task' and 'Random baseline', got {cols}")
        out = {}
        for lineno, row in enumerate(reader, 2):
            try:
                out[row[task_col].strip()] = float(row[base_col]) / 100.0
            except (TypeError, ValueError):
                raise EvalError(f"{path}:{lineno}: 'Random baseline' {row.get(base_col)!r} is not a number") from None
    return out


def load_jsonl(path: Path, task_type: str) -> list:
    need = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
            "language_modeling": ("context", "continuation")}[task_type]
    if not path.exists():
        raise EvalError(f"{path}: no such file (is the eval bundle complete?)")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise EvalError(f"{path}:{lineno}: not a JSON object") from None
            missing = [k for k in need if k not in item]
            if missing:
                raise EvalError(f"{path}:{lineno}: {task_type} item has no '{missing[0]}' field")
            items.append(item)
    return items


def centered(acc: float, baseline: float) -> float:
    """Accuracy rescaled so that random guessing is 0 and perfect is 1; baseline in [0, 1]."""
    return (acc - baseline) / (1.0 - baseline)


# ----------------------------------------------------------------------------- CORE: prompts

def render_mc(item, fewshot, delim) -> list:
    """One prompt per choice: few-shot examples (query, delimiter, gold choice) then query, delimiter, choice."""
    prefix = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{prefix}{item['query']}{delim}{c}" for c in item["choices"]]


def render_schema(item, fewshot, delim) -> list:
    """One prompt per context option, each followed by the shared continuation."""
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{prefix}{c}{delim}{item['continuation']}" for c in item["context_options"]]


def render_lm(item, fewshot, delim) -> tuple:
    """(prompt without the continuation, prompt with it)."""
    prefix = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{prefix}{item['context'].strip()}{delim}"
    return without, without + item["continuation"]


def _common_prefix(seqs) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def core_sequences(task_type, item, fewshot, delim, tokenizer) -> list:
    """(tokens, start, end) per option: tokens[start:end] is the span whose loss decides. Spans come
    from the tokenized full strings (common prefix / suffix), since BPE merges across the delimiter."""
    bos = tokenizer.bos_id
    if task_type == "multiple_choice":
        seqs = tokenizer.encode(render_mc(item, fewshot, delim), prepend=bos)
        if len(seqs) == 1:  # one choice: its span is what the bare prompt does not cover
            base = tokenizer.encode((render_mc({**item, "choices": [""]}, fewshot, delim)[0]).rstrip(), prepend=bos)
            p = _common_prefix([seqs[0], base])
        else:
            p = _common_prefix(seqs)
        return [(s, max(1, min(p, len(s) - 1)), len(s)) for s in seqs]
    if task_type == "schema":
        seqs = tokenizer.encode(render_schema(item, fewshot, delim), prepend=bos)
        suffix = _common_prefix([s[::-1] for s in seqs]) if len(seqs) > 1 else len(tokenizer.encode(item["continuation"]))
        return [(s, max(1, len(s) - max(1, suffix)), len(s)) for s in seqs]
    without, with_ = render_lm(item, fewshot, delim)
    a, b = tokenizer.encode([without.rstrip(), with_], prepend=bos)  # the delimiter's space joins the continuation
    return [(b, min(_common_prefix([a, b]), len(b) - 1), len(b))]


def check_fits(model, n_tokens: int, what: str):
    """Prompts are forwarded whole, never cropped: one the model cannot represent stops the evaluation."""
    if n_tokens > model.max_positions:
        raise EvalError(f"{what} is {n_tokens} tokens; this model represents at most {model.max_positions} "
                        f"(its rotary table) and prompts are never cropped")


@torch.no_grad()
def score_sequences(model, seqs, device, batch_tokens=CORE_BATCH_TOKENS) -> list:
    """(mean loss over tokens[start:end], greedy reproduces them all) for each (tokens, start, end).
    Rows are sorted by length and packed up to batch_tokens per forward (so a few long prompts run
    alone and don't pad the rest); padding goes on the right, where causal attention hides it."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out, i = [None] * len(seqs), 0
    while i < len(order):
        T = len(seqs[order[i]][0])
        chunk = order[i:i + max(1, batch_tokens // T)]
        i += len(chunk)
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, j in enumerate(chunk):
            x[r, :len(seqs[j][0])] = torch.tensor(seqs[j][0])
        x = x.to(device)
        with train.autocast(device):
            logits = model(x)
        # gather only the span positions (logits at p predict token p+1): one small (N, V) slice per batch
        rows = [r for r, j in enumerate(chunk) for _ in range(seqs[j][2] - seqs[j][1])]
        pos = [p for j in chunk for p in range(seqs[j][1] - 1, seqs[j][2] - 1)]
        rows, pos = torch.tensor(rows, device=device), torch.tensor(pos, device=device)
        lg, tgt = logits[rows, pos].float(), x[rows, pos + 1]
        nll = torch.zeros(len(chunk), device=device).index_add_(0, rows, F.cross_entropy(lg, tgt, reduction="none"))
        miss = torch.zeros(len(chunk), device=device).index_add_(0, rows, (lg.argmax(-1) != tgt).float())
        for j, loss, m in zip(chunk, nll.tolist(), miss.tolist()):
            out[j] = (loss / (seqs[j][2] - seqs[j][1]), m == 0)
    return out


# The reference's item order and few-shot draw (nanochat base_eval / core_eval, which measured GPT-2's
# 0.256525): the task's items are shuffled once with random.Random(1337); max_per_task > 0 keeps the
# first N of that order; the item at position i of the kept list takes its examples from
# random.Random(1234 + i).sample(every other position of the kept list, num_fewshot).

def core_order(n: int, max_per_task: int = -1) -> list:
    """File indices of the items a task scores, in the reference's order."""
    order = list(range(n))
    random.Random(SHUFFLE_SEED).shuffle(order)  # the same permutation as shuffling the items themselves
    return order[:max_per_task] if max_per_task > 0 else order


def fewshot_for(items, i, k) -> list:
    """k examples for items[i] from the other kept items (all of them when there are fewer than k).
    sample() picks positions from the population's length and the seed alone, so sampling
    range(n - 1) and skipping i equals sampling the list of other positions, in O(k) not O(n)."""
    k = min(k, len(items) - 1)
    if k <= 0:
        return []
    picks = random.Random(FEWSHOT_SEED + i).sample(range(len(items) - 1), k)
    return [items[j + (j >= i)] for j in picks]


def evaluate_task(model, tokenizer, task, data, device, max_per_task=-1, batch_tokens=CORE_BATCH_TOKENS) -> float:
    """Accuracy of one CORE task. Ranks take positions r, r+W, ...; the counts are summed over ranks."""
    ttype, delim, shots = task["icl_task_type"], task["continuation_delimiter"], task["num_fewshot"]
    order = core_order(len(data), max_per_task)
    items = [data[j] for j in order]
    rank, world = _rank_world()
    mine = range(rank, len(items), world)
    seqs, owner = [], []
    for n, i in enumerate(mine):
        for s in core_sequences(ttype, items[i], fewshot_for(items, i, shots), delim, tokenizer):
            check_fits(model, len(s[0]), f"{task['label']}: item {order[i]} of {task['dataset_uri']}")
            seqs.append(s)
            owner.append(n)
    scores = score_sequences(model, seqs, device, batch_tokens)
    per_item = [[] for _ in mine]
    for n, sc in zip(owner, scores):
        per_item[n].append(sc)
    correct = 0
    for i, sc in zip(mine, per_item):
        if ttype == "language_modeling":
            correct += sc[0][1]
        else:
            losses = [loss for loss, _ in sc]
            correct += int(losses.index(min(losses)) == int(items[i]["gold"]))
    correct, total = _all_reduce_sum([correct, len(mine)], device)
    return correct / max(total, 1)


def evaluate_core(model, tokenizer, device, max_per_task=-1, bundle=None, batch_tokens=CORE_BATCH_TOKENS) -> dict:
    """CORE: each task's accuracy, centered by its random baseline, averaged. Call on every rank.
    Returns {"CORE", "results", "centered", "items" scored, "all_items" in the task files}."""
    bundle = Path(bundle) if bundle else ensure_bundle()
    tasks = parse_core_yaml((bundle / "core.yaml").read_text(encoding="utf-8"), str(bundle / "core.yaml"))
    baselines = load_baselines(bundle / "eval_meta_data.csv")
    was_training = model.training
    model.eval()
    results, cent, items, all_items = {}, {}, 0, 0
    for task in tasks:
        label = task["label"]
        if label not in baselines:
            raise EvalError(f"{bundle / 'eval_meta_data.csv'}: no random baseline for task {label!r}")
        t0 = time.time()
        data = load_jsonl(bundle / "eval_data" / task["dataset_uri"], task["icl_task_type"])
        acc = evaluate_task(model, tokenizer, task, data, device, max_per_task, batch_tokens)
        results[label], cent[label] = acc, centered(acc, baselines[label])
        items, all_items = items + len(core_order(len(data), max_per_task)), all_items + len(data)
        print0(f"{label:<40} acc {acc:.4f}  centered {cent[label]:+.4f}  ({time.time() - t0:.1f}s)")
    model.train(was_training)
    core = sum(cent.values()) / len(cent)
    what = "every item" if items == all_items else f"a subsample, at most {max_per_task} per task"
    print0(f"CORE {core:.4f} over {len(tasks)} tasks, {items:,} of {all_items:,} items ({what}) | GPT-2 1.5B: {GPT2_XL_CORE}")
    return {"CORE": core, "results": results, "centered": cent, "items": items, "all_items": all_items}


def core_report(res: dict) -> dict:
    """CORE as the report records it: "CORE" only when every item of every task was scored (the
    leaderboard's figure), else "CORE_subsample" with its size, so that the two are never confused."""
    if res["items"] == res["all_items"]:
        return {"CORE": res["CORE"], "CORE_tasks": len(res["results"]), "CORE_items": res["items"]}
    return {"CORE_subsample": res["CORE"], "CORE_subsample_items": res["items"]}


# ----------------------------------------------------------------------------- chat tasks: data

def hf_parquet(repo: str, subset: str, split: str, backoff: float = 1.0) -> list:
    """Local parquet files of a Hugging Face dataset split, under $SPEEDCHAT_HOME/tasks; downloaded once
    through the parquet API (a JSON list of file URLs)."""
    folder = tok.home() / "tasks" / repo.replace("/", "__") / subset / split
    manifest = folder / "files.json"

    def have():
        if manifest.exists():
            files = [folder / n for n in json.loads(manifest.read_text())]
            if all(f.exists() for f in files):
                return files
        return None

    if have():
        return have()
    with _file_lock(folder.parent / f".{split}.lock"):
        if have():
            return have()
        api = f"{tok.HF_ENDPOINT}/api/datasets/{repo}/parquet/{subset}/{split}"
        try:
            download_file(api, folder / "urls.json", _verify_url_list, backoff=backoff)
        except EvalError as e:
            if "HTTP 404" in str(e):
                raise EvalError(f"{repo}: no subset {subset!r} / split {split!r} ({api} says 404)") from None
            raise
        urls = json.loads((folder / "urls.json").read_text())
        names = [f"{i:04d}.parquet" for i in range(len(urls))]
        for url, name in zip(urls, names):
            download_file(url, folder / name, _verify_parquet, backoff=backoff)
        tok.atomic_write(manifest, json.dumps(names))
    return have()


def hf_rows(repo: str, subset: str, split: str) -> list:
    import pyarrow.parquet as pq
    rows = []
    for f in hf_parquet(repo, subset, split):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def need(row, fields, where):
    for k in fields:
        if k not in row:
            raise EvalError(f"{where}: row has no '{k}' field (has {', '.join(row)})")


# ----------------------------------------------------------------------------- chat tasks: the objects

class Task:
    """A list of conversations with a grader. task[i] -> {"messages": [...], "task": name, ...grading
    fields}; task[a:b:c] is a view; len(task); task.evaluate(item, completion_text) -> 0.0 or 1.0.
    eval_type: "categorical" (graded from the logits of the answer letters) or "generative"."""
    name = "task"
    eval_type = "generative"

    def __init__(self, start=0, stop=None, step=1):
        self._view = slice(start, stop, step)
        self._range = None

    # subclasses define these three; a task read from a dataset keeps its rows in self.rows, which
    # sizes it, and reads row i with self.row(i, fields)
    rows: list = None
    source = ""  # the dataset and split, as a malformed row's error names them

    def num_examples(self) -> int:
        return len(self.rows)

    def row(self, i: int, fields) -> dict:
        need(self.rows[i], fields, f"{self.source} row {i}")
        return self.rows[i]

    def get_example(self, i: int) -> dict:
        raise NotImplementedError

    def evaluate(self, item: dict, completion: str) -> float:
        raise NotImplementedError

    @property
    def indices(self) -> range:
        if self._range is None:
            self._range = range(self.num_examples())[self._view]
        return self._range

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):  # a view sharing the data: task[:100], task[rank::world]
            view = copy.copy(self)
            view._range = self.indices[i]
            return view
        item = self.get_example(self.indices[i])
        item.setdefault("task", self.name)
        return item

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def reward(self, item, completion) -> float:  # RL's name for it
        return self.evaluate(item, completion)


class TaskMixture(Task):
    """Several tasks as one, shuffled together with a fixed seed (a task listed twice is seen twice).
    evaluate() grades an item with the task it came from."""
    name = "mixture"
    eval_type = "mixed"

    def __init__(self, tasks, seed=42, **kw):
        super().__init__(**kw)
        self.tasks = list(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)
        self.by_name = {task.name: task for task in self.tasks}

    def num_examples(self):
        return len(self.index)

    def get_example(self, i):
        t, j = self.index[i]
        return self.tasks[t][j]

    def evaluate(self, item, completion):
        return self.by_name[item["task"]].evaluate(item, completion)


def render_choices(question: str, choices: list) -> str:
    """A multiple-choice question as the user sees it; the answer is the bare letter."""
    lines = [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return f"{question.strip()}\n\n" + "\n".join(lines) + "\n\nAnswer with the letter of the correct choice."


def _categorical_item(question, choices, answer_idx, **extra):
    letters = list(LETTERS[:len(choices)])
    return {"messages": [{"role": "user", "content": render_choices(question, choices)},
                         {"role": "assistant", "content": letters[answer_idx]}],
            "letters": letters, "answer": letters[answer_idx], **extra}


def _grade_letter(item, completion) -> float:
    return float(completion.strip()[:1].upper() == item["answer"])


class ARC(Task):
    """AI2 reasoning challenge (allenai/ai2_arc), subset ARC-Easy or ARC-Challenge; 3-5 choices."""
    eval_type = "categorical"

    def __init__(self, subset="ARC-Easy", split="test", **kw):
        super().__init__(**kw)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise EvalError(f"ARC subset {subset!r}: expected ARC-Easy or ARC-Challenge")
        self.name, self.source = subset, f"allenai/ai2_arc {subset}/{split}"
        self.rows = hf_rows("allenai/ai2_arc", subset, split)

    def get_example(self, i):
        row = self.row(i, ("question", "choices", "answerKey"))
        labels, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
        if row["answerKey"] not in labels:
            raise EvalError(f"{self.source} row {i}: answerKey {row['answerKey']!r} not in {labels}")
        return _categorical_item(row["question"], texts, labels.index(row["answerKey"]))

    def evaluate(self, item, completion):
        return _grade_letter(item, completion)


class MMLU(Task):
    """Massive multitask language understanding (cais/mmlu): subset all (test/validation/dev) or
    auxiliary_train (split train), the SFT teaching set."""
    eval_type = "categorical"

    def __init__(self, subset="all", split="test", **kw):
        super().__init__(**kw)
        self.name, self.split = "MMLU", split
        self.rows = hf_rows("cais/mmlu", subset, split)

    def get_example(self, i):
        row = self.rows[i]
        if "train" in row and isinstance(row["train"], dict):  # auxiliary_train rows are wrapped in a 'train' field
            row = row["train"]
        need(row, ("question", "choices", "answer"), f"cais/mmlu {self.split} row {i}")
        return _categorical_item(row["question"], list(row["choices"]), int(row["answer"]), subject=row.get("subject", ""))

    def evaluate(self, item, completion):
        return _grade_letter(item, completion)


# GSM8K is graded as the reference grades it (openai/grade-school-math's rule, which nanochat's chat_eval
# uses): the first "#### " followed by [-0-9.,]+, commas removed, compared as a string with the gold's.
# So "#### 18", "#### -7" and "#### 1,000" (= "1000") are read; "####18" (no space), "#### $18",
# "#### $-7" and "#### eighteen" are not; "#### 18.00" and "#### 18." do not equal a gold "18"; and a
# later "#### 18" cannot repair an earlier wrong one.
GSM8K_ANSWER = re.compile(r"#### (-?[0-9.,]+)")


def gsm8k_answer(text: str):
    """The reference's reading of a '#### ' answer, as a string; None if there is none."""
    m = GSM8K_ANSWER.search(text)
    return m.group(1).replace(",", "") if m else None


def gsm8k_grade(completion: str, gold) -> float:
    pred = gsm8k_answer(completion)
    return float(pred is not None and pred == gold)


def gsm8k_parts(answer: str) -> list:
    """A GSM8K reference answer as assistant parts: each calculator call <<48/2=24>> becomes a python
    call '48/2' and its output '24'; the surrounding text stays text."""
    parts, pos = [], 0
    for m in re.finditer(r"<<([^<>=]*)=([^<>]*)>>", answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        parts.append({"type": "python", "text": m.group(1)})
        parts.append({"type": "python_output", "text": m.group(2)})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


class GSM8K(Task):
    """Grade-school math (openai/gsm8k, subset main or socratic), graded on the number after '####'."""
    name = "GSM8K"

    def __init__(self, subset="main", split="test", **kw):
        super().__init__(**kw)
        self.source, self.rows = f"openai/gsm8k {split}", hf_rows("openai/gsm8k", subset, split)

    def get_example(self, i):
        row = self.row(i, ("question", "answer"))
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": gsm8k_parts(row["answer"])}],
                "answer": gsm8k_answer(row["answer"])}

    def evaluate(self, item, completion):
        return gsm8k_grade(completion, item["answer"])


def extract_code(completion: str) -> str:
    """The first ```python (or bare ```) block of a completion, else the completion itself."""
    m = re.search(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", completion, re.S)
    return m.group(1) if m else completion


def _sandbox(code: str, timeout: float) -> bool:
    """True when code runs without error in engine.py's sandbox (a separate, limited process)."""
    return engine.execute_code(code, timeout=timeout).success


def humaneval_program(item: dict, completion: str) -> str:
    """The program a completion is judged by, then the tests and the check. A completion that defines
    the entry point comes after the whole prompt (a prompt ends with a docstring, so it is valid code
    that brings the imports and helper functions, and the completion redefines the function); any
    other completion is a function body that continues the prompt."""
    code = extract_code(completion)
    if re.search(rf"^\s*def\s+{re.escape(item['entry_point'])}\s*\(", code, re.M):
        program = item["prompt"] + "\n" + code
    else:
        program = item["prompt"] + code
    return f"{program}\n\n{item['test']}\n\ncheck({item['entry_point']})\n"


class HumanEval(Task):
    """OpenAI HumanEval (openai/openai_humaneval): write the function; pass@1 on the task's tests."""
    name = "HumanEval"

    def __init__(self, split="test", **kw):
        super().__init__(**kw)
        self.source, self.rows = "openai/openai_humaneval", hf_rows("openai/openai_humaneval", "openai_humaneval", split)

    def get_example(self, i):
        row = self.row(i, ("prompt", "canonical_solution", "test", "entry_point"))
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": f"```python\n{row['prompt']}{row['canonical_solution']}```"}],
                "prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"],
                "task_id": row.get("task_id", str(i))}

    def evaluate(self, item, completion):
        return float(_sandbox(humaneval_program(item, completion), HUMANEVAL_TIMEOUT))


SPELLING_WORDS = """strawberry banana apple orange grape cherry lemon mango papaya raspberry blueberry pineapple
coconut watermelon avocado tomato potato carrot broccoli cucumber pepper onion garlic spinach lettuce
mississippi bookkeeper committee balloon coffee letter address success necessary accommodate
occasion embarrass millennium parallel tomorrow beginning possession assassination bubble puzzle
giraffe elephant hippopotamus kangaroo alligator crocodile penguin octopus squirrel rabbit turtle
mountain valley river ocean desert forest island volcano glacier canyon meadow prairie
computer keyboard monitor program function variable algorithm database network internet software
chocolate vanilla caramel cinnamon marshmallow lollipop pretzel spaghetti lasagna broccoli
happiness sadness kindness darkness wilderness business loneliness forgiveness awareness
""".split()
SPELLING_QUESTIONS = ["How many times does the letter '{l}' appear in the word '{w}'?",
                      "How many {l}'s are in {w}?", "Count the letter {l} in \"{w}\".",
                      "how many {l} in {w}", "In the word {w}, how many times does {l} occur?"]


def _pseudo_words(n, seed):
    """Made-up words from syllables: more words to count letters in than any list we would write."""
    rng, sy = random.Random(seed), ["ka", "lo", "mi", "ru", "te", "sa", "bo", "ne", "pi", "da", "str", "ee",
                                    "rr", "ll", "ss", "oo", "qu", "ix", "ap", "el"]
    return ["".join(rng.choice(sy) for _ in range(rng.randint(2, 5))) for _ in range(n)]


@functools.lru_cache(maxsize=2)
def _spelling_words(split):
    words = sorted(set(SPELLING_WORDS + _pseudo_words(2000, 7)))
    return [w for w in words if (zlib.crc32(w.encode()) % 5 == 0) == (split == "test")]  # a fifth of words are test-only


class SpellingBee(Task):
    """'How many r in strawberry': count a letter in a word, spelling it out and checking with Python.
    Generated offline and deterministic; test words are disjoint from train words."""
    name = "SpellingBee"

    def __init__(self, size=1000, split="train", seed=0, **kw):
        super().__init__(**kw)
        if split not in ("train", "test"):
            raise EvalError(f"SpellingBee split {split!r}: expected train or test")
        self.words = _spelling_words(split)
        self.size, self.seed = size, seed + (10**6 if split == "test" else 0)

    def num_examples(self):
        return self.size

    def get_example(self, i):
        rng = random.Random(self.seed + i)
        w = rng.choice(self.words)
        l = rng.choice(w) if rng.random() < 0.7 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        n = w.count(l)
        q = rng.choice(SPELLING_QUESTIONS).format(l=l, w=w)
        parts = [{"type": "text", "text": f"Spelling out {w}: {'-'.join(w)}. Let me count '{l}' with Python.\n\n"},
                 {"type": "python", "text": f"'{w}'.count('{l}')"},
                 {"type": "python_output", "text": str(n)},
                 {"type": "text", "text": f"\n\nThe letter '{l}' appears {n} time{'s' if n != 1 else ''} in '{w}'.\n\n#### {n}"}]
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": parts}],
                "answer": str(n), "word": w, "letter": l}

    def evaluate(self, item, completion):  # nanochat grades SpellingBee by GSM8K's rule
        return gsm8k_grade(completion, item["answer"])


# ----------------------------------------------------------------------------- the toy world's tasks
# Questions about tok.ToyWorld, offline and deterministic: facts stated in the pretraining documents
# (ToyFacts; its test split is the held-out facts, never asked in SFT or RL data, so its accuracy is
# knowledge from pretraining surfaced by finetuning), arithmetic word problems solved with the python
# tool (ToyMath), and spelling and letter counting (ToySpell). All generative, baseline 0.

_NUMBER = r"-?\$?\s*(?:\d[\d,]*)?\.?\d+"


def last_number(text: str):
    """The toy tasks' lenient reading (ours, no benchmark's): the number after the last '####' (with
    $, commas and spaces dropped), else the last number in the text; None when there is none."""
    found = re.findall(r"####\s*(" + _NUMBER + ")", text) or re.findall(_NUMBER, text)
    return re.sub(r"[,$\s]", "", found[-1]) if found else None


def same_number(a, b) -> bool:
    """'18' == '18.00' == '18.'; anything unparsable only equals itself."""
    if a is None or b is None:
        return False
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return a == b


class ToyFacts(Task):
    """'Where does Mira Tolan live?' Right when the answer is the only value of that kind named."""
    name = "ToyFacts"

    def __init__(self, split="test", seed=0, **kw):
        super().__init__(**kw)
        self.world = tok.ToyWorld(seed)
        self.ids = {"test": self.world.heldout, "train": self.world.train_facts}[split]
        self.pools = {}
        for _, r, o in self.world.facts:
            self.pools.setdefault(r, set()).add(o)

    def num_examples(self):
        return len(self.ids)

    def get_example(self, i):
        return self.world.fact_item(self.ids[i])

    def evaluate(self, item, completion):
        text = completion.replace(item["subject"], " ").lower()  # a surname may spell a town
        said = {v for v in self.pools[item["relation"]] if re.search(rf"(?<![a-z]){re.escape(v.lower())}(?![a-z])", text)}
        return float(said == {item["answer"]})


class ToyMath(Task):
    """Arithmetic word problems whose worked answers call the python tool; graded on the final number.
    Every problem family equally often; rare_weight < 1 draws the rare ones (tok._MATH_RARE) less."""
    name = "ToyMath"

    def __init__(self, split="test", size=None, seed=0, rare_weight=1.0, **kw):
        super().__init__(**kw)
        self.items = tok.ToyWorld(seed).math_items(split, size or (200 if split == "test" else 2000), rare_weight)

    def num_examples(self):
        return len(self.items)

    def get_example(self, i):
        return copy.deepcopy(self.items[i])

    def evaluate(self, item, completion):
        return float(same_number(last_number(completion), item["answer"]))


class ToySpell(Task):
    """Spell a word letter by letter, or count a letter in it; test words never appear in train items."""
    name = "ToySpell"

    def __init__(self, split="test", size=None, seed=0, **kw):
        super().__init__(**kw)
        self.world = tok.ToyWorld(seed)
        self.words = self.world.spell_test if split == "test" else self.world.spell_train
        self.size = size or (200 if split == "test" else 2000)

    def num_examples(self):
        return self.size

    def get_example(self, i):
        return self.world.spell_item(self.words[i % len(self.words)], i)

    def evaluate(self, item, completion):
        if item["kind"] == "count":
            return float(same_number(last_number(completion), item["answer"]))
        runs = re.findall(r"(?<![A-Za-z])[A-Za-z](?:[-\s,]+[A-Za-z](?![A-Za-z]))+", completion)
        return float(any(re.sub(r"[-\s,]", "", r).lower() == item["answer"].replace("-", "") for r in runs))


# Evaluation tasks by name (what -a takes and the summary table shows).
CHAT_TASKS = {
    "ARC-Easy": lambda: ARC("ARC-Easy", "test"),
    "ARC-Challenge": lambda: ARC("ARC-Challenge", "test"),
    "MMLU": lambda: MMLU("all", "test"),
    "GSM8K": lambda: GSM8K("main", "test"),
    "HumanEval": lambda: HumanEval(),
    "SpellingBee": lambda: SpellingBee(size=256, split="test"),
    "ToyFacts": lambda: ToyFacts("test"),
    "ToyMath": lambda: ToyMath("test"),
    "ToySpell": lambda: ToySpell("test"),
}


def get_task(name: str) -> Task:
    if name not in CHAT_TASKS:
        raise EvalError(f"-a {name}: unknown task; known: {', '.join(CHAT_TASKS)}")
    return CHAT_TASKS[name]()


# ----------------------------------------------------------------------------- chat evaluation

@torch.no_grad()
def run_categorical(model, tokenizer, task, device, batch_size=8) -> tuple:
    """(correct, total) over the given task (view). The prediction is the answer letter with the largest
    logit at the answer position: other tokens cannot win, so a model that rambles still gets graded."""
    correct, items = 0, list(task)
    for b in range(0, len(items), batch_size):
        batch = items[b:b + batch_size]
        prompts = [tokenizer.render_for_completion(it["messages"]) for it in batch]
        for n, p in enumerate(prompts):
            check_fits(model, len(p), f"{task.name}: item {b + n}")
        T = max(len(p) for p in prompts)
        x = torch.zeros(len(batch), T, dtype=torch.long)
        for r, p in enumerate(prompts):
            x[r, :len(p)] = torch.tensor(p)
        with train.autocast(device):
            logits = model(x.to(device))
        for r, (it, p) in enumerate(zip(batch, prompts)):
            letter_ids = [tokenizer.encode(l)[0] for l in it["letters"]]
            row = logits[r, len(p) - 1, letter_ids]
            correct += int(it["letters"][int(row.argmax())] == it["answer"])
    return correct, len(items)


def engine_generate(model, tokenizer, max_new_tokens=512, temperature=0.0, top_k=50, seed=42):
    """[prompt ids] -> [completion text], every prompt in one batched pass through engine.py
    (continuous batching, KV cache, python tool calls)."""
    eng = engine.Engine(model, tokenizer)

    def generate(prompts):
        outs = engine.generate_all(eng, prompts, max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
        return [engine.completion_text(tokenizer, seqs[0][len(p):]) for p, (seqs, _) in zip(prompts, outs)]
    return generate


def run_generative(tokenizer, task, generate) -> tuple:
    """(correct, total): the items' completions from generate([prompt ids]) in one call, graded by the task."""
    items = list(task)
    try:
        texts = generate([tokenizer.render_for_completion(it["messages"]) for it in items])
    except ValueError as e:  # a prompt leaves no room in the context: never cropped, so stop
        raise EvalError(f"{task.name}: {e}") from None
    return sum(task.evaluate(it, text) for it, text in zip(items, texts)), len(items)


def evaluate_chat_task(model, tokenizer, task, device, max_problems=-1, generate=None, batch_size=8) -> float:
    """Accuracy on one task (its first max_problems items). Ranks take every world-th item; counts are summed."""
    rank, world = _rank_world()
    view = task[:max_problems] if max_problems and max_problems > 0 else task
    view = view[rank::world]
    if task.eval_type == "categorical":
        correct, total = run_categorical(model, tokenizer, view, device, batch_size)
    else:
        correct, total = run_generative(tokenizer, view, generate or engine_generate(model, tokenizer))
    correct, total = _all_reduce_sum([correct, total], device)
    return correct / max(total, 1)


def chatcore(results: dict, types: dict) -> float:
    """Mean of accuracies centered by chance: 0.25 for categorical (4-way) tasks, 0 for generative."""
    return sum(centered(acc, CHAT_BASELINE.get(types[name], 0.0)) for name, acc in results.items()) / max(len(results), 1)


def evaluate_chat(model, tokenizer, device, tasks=None, max_problems=-1, generate=None) -> dict:
    """{task name: accuracy, ..., "ChatCORE": x} for tasks (names or Task objects; default CHAT_TASKS)."""
    was_training = model.training
    model.eval()
    results, types = {}, {}
    for t in tasks or list(CHAT_TASKS):
        task = get_task(t) if isinstance(t, str) else t
        t0 = time.time()
        results[task.name] = evaluate_chat_task(model, tokenizer, task, device, max_problems, generate)
        types[task.name] = task.eval_type
        print0(f"{task.name:<16} {results[task.name]:.4f}  ({time.time() - t0:.1f}s)")
    model.train(was_training)
    out = dict(results)
    out["ChatCORE"] = chatcore(results, types)
    print0(f"ChatCORE {out['ChatCORE']:.4f}")
    return out


# ----------------------------------------------------------------------------- the report card

def read_sections() -> dict:
    out = {}
    for name in SECTIONS:
        path = tok.home() / "report" / f"{name}.json"
        if path.exists():
            try:
                out[name] = json.loads(path.read_text())
            except ValueError:
                print(f"warning: {path}: not valid JSON, shown as missing", file=sys.stderr)
    return out


def system_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "none"
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"CPU": f"{cpu} ({os.cpu_count()} cores)", "GPU": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "git commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def code_stats(root=None) -> dict:
    """Size of the code: the repository's *.py (not .venv), and the runtime dependencies."""
    root = Path(root or Path(__file__).parent)
    files = [p for p in root.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    text = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    deps = "unknown"
    pyproject = root / "pyproject.toml"
    if pyproject.exists():
        m = re.search(r"^dependencies\s*=\s*\[(.*?)\]", pyproject.read_text(), re.S | re.M)
        if m:
            deps = ", ".join(re.findall(r"\"([^\"]+)\"", m.group(1)))
    return {"files": len(files), "lines": sum(t.count("\n") for t in text), "characters": sum(len(t) for t in text),
            "dependencies": deps}


def loss_curves() -> dict:
    """stage -> [(step, loss)] from the newest log.jsonl under checkpoints/<stage>/<tag>/ (missing: absent)."""
    out = {}
    for stage in list(SECTIONS)[1:]:
        logs = sorted((tok.home() / "checkpoints" / stage).glob("*/log.jsonl"), key=lambda p: p.stat().st_mtime)
        if not logs:
            continue
        pts = []
        for line in logs[-1].read_text(errors="replace").splitlines():
            try:
                e = json.loads(line)
                v = e.get("smooth_loss", e.get("loss"))
                if v is not None and math.isfinite(float(v)):
                    pts.append((int(e.get("step", len(pts))), float(v)))
            except (ValueError, TypeError, AttributeError):
                continue  # a torn last line or a foreign entry
        if pts:
            out[stage] = pts
    return out


def sparkline(values, width=60) -> str:
    if not values:
        return ""
    step = max(1, math.ceil(len(values) / width))
    vals = [sum(values[i:i + step]) / len(values[i:i + step]) for i in range(0, len(values), step)]
    lo, hi = min(vals), max(vals)
    return "".join(SPARK[int((v - lo) / (hi - lo) * (len(SPARK) - 1)) if hi > lo else 0] for v in vals)


def _plot(stage, pts, path) -> bool:
    """One stage's loss curve as a PNG; False without matplotlib (an optional extra: the sparkline stands)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=stage)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()):  # a mixture's rows per task
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}" if abs(v) < 1000 else f"{v:,.0f}"


def _gpus(sec: dict) -> int:
    """The GPUs a stage's section says it ran on: 0 on CPU."""
    if "gpu_count" in sec:
        return int(sec["gpu_count"] or 0)
    return int(sec.get("world_size") or 1) if str(sec.get("device", "")).startswith("cuda") else 0


def leaderboard(base: dict) -> list:
    """The time-to-GPT-2 rule, as report lines: the base model's training time (its optimizer steps only),
    its final val bpb and its CORE over every item of every task, and whether that beats GPT-2 1.5B."""
    core, sub, t = base.get("CORE"), base.get("CORE_subsample"), base.get("train_time_s")
    core_text = f"{core:.4f} ({base.get('CORE_tasks')} tasks, {base.get('CORE_items', 0):,} items)" if core is not None else \
        "not measured: run `evals.py core --source base`" + (f" (a subsample gave {sub:.4f}: not a leaderboard figure)" if sub is not None else "")
    beats = "-" if core is None else "yes" if core > GPT2_XL_CORE else "no"
    rows = [("training time (optimizer steps only)", f"{train.fmt_time(t)} ({t:,.0f} s)" if t is not None else "-"),
            ("GPUs", f"{base.get('gpu_count', '-')} x {base.get('gpu', '-')}"),
            ("final val bpb", _fmt(base.get("val_bpb"))), ("CORE, every item", core_text),
            (f"beats GPT-2 1.5B (CORE > {GPT2_XL_CORE})", beats),
            ("code", f"git {base.get('git_commit', 'unknown')}" + (" with uncommitted changes" if base.get("git_dirty") else "")),
            ("command", f"`{base.get('command', '-')}` ({base.get('launcher', '-')})"),
            ("torch / CUDA", f"{base.get('torch', '-')} / {base.get('cuda', '-')}")]
    return ["## Time to GPT-2", "", "| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def assemble_report(gpu_hour_cost: float = 3.0) -> Path:
    """$SPEEDCHAT_HOME/report/report.md from the sections that exist; a skipped stage shows a dash."""
    folder = tok.home() / "report"
    folder.mkdir(parents=True, exist_ok=True)
    sections = read_sections()
    md = ["# speedchat report card", ""]
    md += ["## System", ""] + [f"- {k}: {v}" for k, v in system_info().items()] + [""]
    md += ["## Code", ""] + [f"- {k}: {_fmt(v)}" for k, v in code_stats().items()] + [""]
    for name, title in SECTIONS.items():
        md += [f"## {title}", ""]
        sec = sections.get(name)
        if not sec:
            md += ["-", ""]
            continue
        md += ["| metric | value |", "| --- | --- |"]
        md += [f"| {k} | {_fmt(v)} |" for k, v in sec.items() if not isinstance(v, (dict, list)) or "," in _fmt(v)] + [""]
    stages = ["base", "mid", "sft", "rl"]
    rows = list(SUMMARY_ROWS) + [k for k in CHAT_TASKS if k not in SUMMARY_ROWS]
    rows += sorted({k for s in stages for k in sections.get(s, {}) if k.lower().startswith("toy") and k not in rows})
    rows = [r for r in rows if r in SUMMARY_ROWS or any(sections.get(s, {}).get(r) is not None for s in stages)]
    md += ["## Summary", "", "| metric | BASE | MID | SFT | RL |", "| --- | --- | --- | --- | --- |"]
    md += [f"| {r} | " + " | ".join(_fmt(sections.get(s, {}).get(r)) for s in stages) + " |" for r in rows] + [""]
    total = sum(float(sec.get("train_time_s") or 0) for sec in sections.values())
    gpus = max([_gpus(sec) for sec in sections.values()] or [0])
    md += [f"Training time, all stages (optimizer steps): {train.fmt_time(total)} ({total:.0f}s)"]
    if gpus:  # a cost only where GPUs ran
        md += [f"Estimated cost: ${total / 3600 * gpus * gpu_hour_cost:.2f} ({gpus} GPU x ${gpu_hour_cost:.2f}/GPU-hour)"]
    md += [""]
    if sections.get("base"):
        md += leaderboard(sections["base"])
    curves = loss_curves()
    md += ["## Loss curves", ""] + ([] if curves else ["-", ""])
    for stage, pts in curves.items():
        png = f"loss_{stage}.png"
        plot = f" ![{stage} loss]({png})" if _plot(stage, pts, folder / png) else ""
        md += [f"- {stage}: `{sparkline([p[1] for p in pts])}` {pts[0][1]:.3f} -> {pts[-1][1]:.3f} ({len(pts)} steps){plot}"]
    out = folder / "report.md"
    tok.atomic_write(out, "\n".join(md) + "\n")
    return out


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="speedchat evaluations and the report card")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("core", "CORE of a checkpoint (DCLM eval bundle)"), ("chat", "chat tasks and ChatCORE of a checkpoint")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--source", default="base" if name == "core" else "sft", type=train.source_type,
                       help="base, mid, sft, rl, or hf:DIR (an exported folder; its section: hf-<folder>)")
        p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest)")
        p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    c = sub.choices["core"]
    c.add_argument("--max-per-task", type=int, default=-1, help="items per task (a seeded subset); -1 = all")
    c.add_argument("--batch-tokens", type=int, default=CORE_BATCH_TOKENS, help="tokens per scoring forward")
    h = sub.choices["chat"]
    h.add_argument("-a", "--tasks", default=None, help=f"comma-separated; default: {','.join(CHAT_TASKS)}")
    h.add_argument("--max-problems", type=int, default=-1, help="first N items of each task; -1 = all")
    h.add_argument("--max-new-tokens", type=int, default=512)
    h.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    d = sub.add_parser("download", help="fetch the CORE bundle and the chat tasks' data now (e.g. before a GPU run)")
    d.add_argument("-a", "--tasks", default=None, help=f"comma-separated; default: {','.join(CHAT_TASKS)}")
    d.add_argument("--no-core", action="store_true", help="skip the CORE bundle")
    r = sub.add_parser("report", help="assemble $SPEEDCHAT_HOME/report/report.md")
    r.add_argument("--gpu-hour-cost", type=float, default=3.0, help="dollars per GPU-hour for the cost estimate")
    args = ap.parse_args(argv)
    for flag in ("max_per_task", "max_problems"):
        if getattr(args, flag, -1) == 0:
            ap.error(f"--{flag.replace('_', '-')} 0: use -1 for all, or a positive count")
    if getattr(args, "batch_tokens", 1) < 1:
        ap.error("--batch-tokens must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.cmd == "report":
            print(f"wrote {assemble_report(args.gpu_hour_cost)}")
            return
        names = [n.strip() for n in (args.tasks or ",".join(CHAT_TASKS)).split(",")] if args.cmd in ("chat", "download") else []
        for n in names:  # a typo fails here, by name, before a model is loaded
            if n not in CHAT_TASKS:
                raise EvalError(f"-a {n}: unknown task; known: {', '.join(CHAT_TASKS)}")
        if args.cmd == "download":
            if not args.no_core:
                print(f"CORE bundle: {ensure_bundle()}")
            for n in names:
                print(f"{n}: {len(get_task(n))} items")
            return
        rank, _, world, device = train.compute_init(args.device)
        try:
            model, tokenizer, meta = train.load_model(args.source, args.tag, args.step, device)
        except (FileNotFoundError, ValueError) as e:
            raise EvalError(f"--source {args.source}: {e}") from None
        t0, section = time.time(), train.source_label(args.source)
        if args.cmd == "core":
            if rank == 0:
                ensure_bundle()  # one rank downloads; the others find it (the file lock covers races too)
            res = evaluate_core(model, tokenizer, device, args.max_per_task, batch_tokens=args.batch_tokens)
            if rank == 0:
                tok.write_section(section, {**core_report(res), "core_eval_s": round(time.time() - t0, 1)})
                tok.write_section(f"core_{section}", {**{f"acc/{k}": v for k, v in res["results"].items()},
                                                      **{f"centered/{k}": v for k, v in res["centered"].items()}})
        else:
            tasks = [get_task(n) for n in names]
            gen = engine_generate(model, tokenizer, args.max_new_tokens, args.temperature)
            res = evaluate_chat(model, tokenizer, device, tasks, args.max_problems, gen)
            if rank == 0:
                tok.write_section(section, {**res, "chat_eval_s": round(time.time() - t0, 1)})
        train.compute_cleanup()
    except (EvalError, tok.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    tok.run_main(main)
