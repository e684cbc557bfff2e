"""
chat_sft.py: midtraining and supervised finetuning. A base model becomes a chat model.

  python chat_sft.py --stage mid                                  # base -> mid (default mixture, downloads)
  python chat_sft.py --stage sft                                  # mid -> sft
  python chat_sft.py --stage mid --mixture toy                    # offline: the toy world (small batches)
  python chat_sft.py --stage sft --mixture toy                    # then sft on it
  torchrun --standalone --nproc_per_node=8 chat_sft.py --stage sft   # the same math on 8 GPUs
  python chat_sft.py --measure base,mid,sft --model-tag toy      # toy-world figures: facts, turn ends, tool calls
  python chat_sft.py --stage sft --data my_chats.jsonl            # your own conversations (JSONL, parquet, a folder)
  python chat_sft.py --stage sft --mixture default+my_chats.jsonl:3   # ... mixed in, 3 epochs of them

Two stages, one file. mid starts from a base checkpoint and trains on every token of conversations
packed best-fit into full rows, as in pretraining: it teaches the special tokens, tool use and
multiple choice. sft starts from mid (or base: --init-from base) with one conversation per row,
padded, and a loss only where render_conversation's mask is 1 (what the assistant says).
--total-batch-size counts tokens for mid (as train.py) and conversations (rows) for sft.

--data reads a user's conversations in the OpenAI chat format; every one is checked before training
starts, and a held-out share of them is measured at the start and the end (loss, exact turns, token F1).

Reads top to bottom: constants, the identity and SmolTalk tasks, the mixtures, your own conversations,
the two loaders, the optimizer step, the loop, the measurements (--data's held-out share, the toy world),
the command line.
"""
import argparse, collections, contextlib, functools, gzip, hashlib, json, math, random, time, zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import tok
import train
import engine
import evals

# ----------------------------------------------------------------------------- constants

# Per-stage defaults (nanochat's): a flag left at -1 / None takes these.
STAGES = {
    "mid": dict(init_from="base", device_batch_size=32, total_batch_size=524288, init_lr_frac=1.0, warmdown_ratio=0.2),
    "sft": dict(init_from="mid", device_batch_size=4, total_batch_size=32, init_lr_frac=0.02, warmdown_ratio=1.0),
}
# The toy world is ~6K short conversations (~250K tokens): nanochat's half-million-token mid step would
# make one pass a single step. 0 = one micro-batch per rank (16 rows of the model's context).
TOY_BATCH = {"mid": dict(device_batch_size=16, total_batch_size=0), "sft": dict(device_batch_size=16, total_batch_size=32)}
EVAL_TASKS = {"default": "ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval,SpellingBee", "toy": "ToyFacts,ToyMath,ToySpell"}
ESTIMATE_SAMPLE = 2000     # mid's "one pass" is estimated from this many conversations' lengths
MEASURE_MAX_TOKENS = 64    # toy answers are ~15-45 tokens; a model that never stops is cut here
IDENTITY_SIZE = 500

# ----------------------------------------------------------------------------- identity conversations
# Who the model is, from our own templates: several hundred varied conversations (one to three
# topics, greetings, casing and punctuation noise), seeded, so every run sees the same ones.

IDENTITY_TOPICS = {  # topic -> (user questions, assistant answers); any answer fits any question of its topic
    "name": (["What is your name?", "Who are you?", "What should I call you?", "Do you have a name?", "What are you called?",
              "Introduce yourself."],
             ["I'm speedchat, a small chat model.", "My name is speedchat.",
              "You can call me speedchat. I'm a small language model trained to chat.",
              "I'm speedchat: a compact ChatGPT-like assistant, trained from scratch."]),
    "maker": (["Who made you?", "Who created you?", "Who built you?", "Who trained you?", "Where do you come from?",
               "Are you made by OpenAI?", "Which company made you?"],
              ["I was built by the speedchat project, an open-source effort that trains a ChatGPT-like model from scratch, "
               "in the spirit of Andrej Karpathy's nanochat.",
               "The speedchat project made me. It is open source: anyone can read the code that trained me, stage by stage.",
               "I'm not made by a big company. The open-source speedchat project trained me from raw text, "
               "with a small and readable codebase inspired by nanochat and the modded-nanogpt speedrun."]),
    "what": (["What are you?", "Are you a human?", "Are you ChatGPT?", "Are you an AI?", "Tell me about yourself.",
              "Are you a person?"],
             ["I'm an AI language model called speedchat, not a person. I predict text one token at a time.",
              "I'm speedchat, a small AI assistant. I'm not ChatGPT, though I was trained to chat in a similar way.",
              "I'm a language model, a neural network called speedchat. I'm much smaller than ChatGPT, so I make more mistakes."]),
    "can": (["What can you do?", "How can you help me?", "What are you good at?", "What can I ask you?"],
            ["I can chat, answer simple questions, spell words, count letters, and do arithmetic with a small python tool.",
             "I can hold a conversation, answer questions, and work out arithmetic by calling a python calculator.",
             "Ask me questions, ask me to spell a word, or give me a math problem: I'll use python for the arithmetic."]),
    "limits": (["Can you browse the internet?", "Are you always right?", "What are your limitations?",
                "Do you know today's news?", "Can I trust your answers?"],
               ["I can't browse the internet, and I'm a small model, so I often make mistakes. Please check important answers.",
                "No, I'm not always right. I'm small, I have no internet access, and my knowledge stops at my training data.",
                "I only know what was in my training data, I can't look anything up, and I can be confidently wrong."]),
    "training": (["How were you trained?", "What data were you trained on?", "How big are you?", "How do you work?"],
                 ["I was trained in stages: a tokenizer, pretraining on web text, then midtraining and finetuning on "
                  "conversations, and finally a bit of reinforcement learning.",
                  "First I read a lot of text to learn language, then I was finetuned on conversations to become an assistant.",
                  "I'm a transformer, a neural network; how big depends on the speedchat run that trained me, from a few million "
                  "to about a billion parameters."]),
    "tools": (["Can you use tools?", "How do you do arithmetic?", "Can you run code?", "Can you do math?"],
              ["For arithmetic I write a short python expression, a sandbox runs it, and I read the result.",
               "I can call a python tool. For sums I write the expression and use the exact result it returns.",
               "I can do math by calling python for the calculation, which is more reliable than doing it in my head."]),
}
GREETINGS = (["Hi!", "Hello", "hey", "Good morning!", "Hi there.", "hello!", "Hey, how are you?"],
             ["Hello! I'm speedchat. How can I help you today?", "Hi! What can I do for you?",
              "Hello! I'm doing well, thanks. What would you like to talk about?"])
THANKS = (["Thanks!", "thank you", "Great, thanks.", "ok, cool"],
          ["You're welcome!", "Happy to help. Anything else?", "Glad I could help."])


def _noisy(rng, text):
    """Users type carelessly: sometimes lowercase, no final punctuation, a lead-in."""
    if rng.random() < 0.2:
        text = rng.choice(["Quick question: ", "Hey, ", "So, ", "I wonder, "]) + text[0].lower() + text[1:]
    if rng.random() < 0.25:
        text = text.lower()
    if rng.random() < 0.2:
        text = text.rstrip("?.!")
    return text


class Identity(evals.Task):
    """Conversations about speedchat itself, generated from the templates above."""
    name = "Identity"

    def __init__(self, size=IDENTITY_SIZE, seed=0, **kw):
        super().__init__(**kw)
        self.size, self.seed = size, seed

    def num_examples(self):
        return self.size

    def get_example(self, i):
        rng = random.Random(f"identity:{self.seed}:{i}")
        turns = []
        if rng.random() < 0.3:
            turns.append(GREETINGS)
        turns += [IDENTITY_TOPICS[t] for t in rng.sample(sorted(IDENTITY_TOPICS), rng.choice([1, 1, 2, 2, 3]))]
        if rng.random() < 0.15:
            turns.append(THANKS)
        messages = []
        for questions, answers in turns:
            messages += [{"role": "user", "content": _noisy(rng, rng.choice(questions))},
                         {"role": "assistant", "content": rng.choice(answers)}]
        return {"messages": messages}

    def evaluate(self, item, completion):
        return float("speedchat" in completion.lower())


class SmolTalk(evals.Task):
    """General conversations (HuggingFaceTB/smol-smoltalk, split train or test), in its 'messages' field."""
    name = "SmolTalk"

    def __init__(self, split="train", **kw):
        super().__init__(**kw)
        self.source = f"HuggingFaceTB/smol-smoltalk {split}"
        self.rows = evals.hf_rows("HuggingFaceTB/smol-smoltalk", "default", split)

    def get_example(self, i):
        row = self.row(i, ("messages",))
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}

    def evaluate(self, item, completion):
        raise NotImplementedError("SmolTalk is for training only: it has no grader")


# ----------------------------------------------------------------------------- the mixtures
# The one place that says what each stage trains on: name -> [(label, factory, epochs in mid,
# epochs in sft)]. A fraction of an epoch takes the task's first part; 0 leaves the task out of that
# stage (its factory is never called, so nothing is downloaded for it).

# The toy mixtures' rare arithmetic families (tok._MATH_RARE), relative to a common one: about 19 of
# 2000 problems, so SFT solves them only sometimes and RL has room (0.05 left it little, 0: none to start from).
TOY_RARE_WEIGHT = 0.02
MIXTURES = {
    "default": [
        ("SmolTalk", lambda: SmolTalk("train"), 1, 0.022),                             # 460K chats; sft: ~10K
        ("MMLU", lambda: evals.MMLU("auxiliary_train", "train"), 1, 0),               # 100K multiple choice
        ("ARC-Easy", lambda: evals.ARC("ARC-Easy", "train"), 0, 1),                   # 2.3K multiple choice
        ("ARC-Challenge", lambda: evals.ARC("ARC-Challenge", "train"), 0, 1),         # 1.1K
        ("GSM8K", lambda: evals.GSM8K("main", "train"), 1, 1),                        # 7.5K, calculator calls -> python
        ("Identity", lambda: Identity(), 2, 1),                                       # who speedchat is
        ("SpellingBee", lambda: evals.SpellingBee(size=200_000, split="train"), 1, 0.003),  # 200K; sft: 600
        ("ToyFacts", lambda: evals.ToyFacts("train"), 1, 1),                          # the offline toy world
        ("ToyMath", lambda: evals.ToyMath("train", rare_weight=TOY_RARE_WEIGHT), 1, 0.25),
        ("ToySpell", lambda: evals.ToySpell("train"), 1, 0.25),
    ],
    "toy": [  # offline: the toy world alone (facts are few, so they are repeated)
        ("ToyFacts", lambda: evals.ToyFacts("train"), 4, 2),
        ("ToyMath", lambda: evals.ToyMath("train", rare_weight=TOY_RARE_WEIGHT), 1, 0.5),
        ("ToySpell", lambda: evals.ToySpell("train"), 1, 0.25),
        ("Identity", lambda: Identity(), 1, 0.5),
    ],
}


def build_mixture(name: str | None, stage: str, seed: int = 42, chats=()) -> evals.TaskMixture:
    """The stage's conversations of mixture `name` and of the user's (label, Chats, epochs) `chats`
    (load_chats; name None: those alone), shuffled together with a fixed seed; .rows says how many each
    task gave (the report's record of what the stage trained on)."""
    if name is not None and name not in MIXTURES:
        raise SystemExit(f"--mixture {name}: unknown mixture; known: {', '.join(MIXTURES)}")
    tasks, rows = [], {}
    mine = [(label, lambda t=task: t, epochs, epochs) for label, task, epochs in chats]
    for label, factory, *per_stage in (MIXTURES[name] if name else []) + mine:
        epochs = per_stage[0 if stage == "mid" else 1]
        if epochs <= 0:
            continue
        task = factory()
        whole, frac = int(epochs), epochs - int(epochs)
        tasks += [task] * whole
        if round(frac * len(task)) > 0:
            tasks.append(task[:round(frac * len(task))])
        rows[label] = round(epochs * len(task))
    train.print0(f"mixture {name or '--data'} ({stage}): " + " + ".join(f"{k} {v:,}" for k, v in rows.items()))
    mixture = evals.TaskMixture(tasks, seed=seed)
    mixture.rows = rows
    return mixture


# ----------------------------------------------------------------------------- your own conversations
# --data PATH[:EPOCHS] (or a --mixture entry NAME+PATH:EPOCHS): a .jsonl / .jsonl.gz file of lines
# {"messages": [{"role": "system"|"user"|"assistant", "content": str or assistant parts}, ...]}, a
# .parquet file with a 'messages' column, or a folder of them. Every conversation is checked before the
# model trains (tok.py's rules, as render_conversation applies them, and what training needs on top);
# a held-out share of each source is measured instead of trained on.

CHAT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
VAL_SHARE = 0.05      # of each --data source held out (at least one conversation, from a source of two or more)
HELDOUT_TURNS = 200   # held-out assistant turns generated (temperature 0) at the start and the end of the run
HELDOUT_SLACK = 16    # generation budget past the reference's length: enough to see whether the turn ends


class Chats(evals.Task):
    """A user's conversations (read_chats: already checked), for training."""

    def __init__(self, name, convs, **kw):
        super().__init__(**kw)
        self.name, self.convs = name, convs

    def num_examples(self):
        return len(self.convs)

    def get_example(self, i):
        return {"messages": self.convs[i]}

    def evaluate(self, item, completion):
        raise NotImplementedError("--data conversations are graded by heldout_check")


def parse_sources(spec: str | None, data: list) -> tuple:
    """(named mixture or None, [(path, epochs)]) of --mixture NAME+PATH[:EPOCHS]+... and --data PATH[:EPOCHS] ..."""
    name, sources = None if spec or data else "default", []
    for flag, part in [("--mixture", p) for p in (spec.split("+") if spec else [])] + [("--data", p) for p in data]:
        if flag == "--mixture" and part in MIXTURES:
            if name is not None:
                raise SystemExit(f"--mixture {spec}: at most one named mixture ({name}, {part})")
            name = part
            continue
        path, _, epochs = part.rpartition(":")
        try:
            path, epochs = (path, float(epochs)) if path else (part, 1.0)
        except ValueError:
            path, epochs = part, 1.0
        if not Path(path).exists():
            raise SystemExit(f"--mixture {part}: unknown mixture; known: {', '.join(MIXTURES)}; or a path to chats "
                             f"(no such file or folder)" if flag == "--mixture" else f"--data {path}: no such file or folder")
        if not (epochs > 0 and math.isfinite(epochs)):
            raise SystemExit(f"{flag} {part}: EPOCHS must be a positive number")
        sources.append((path, epochs))
    return name, sources


def _chat_rows(f: Path):
    """(where, row) of every row of a file: a jsonl line (row tok._MISSING: not JSON), or a parquet row."""
    if f.name.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(f)
            column = pf.read(columns=["messages"]).column("messages").to_pylist() if "messages" in pf.schema_arrow.names else None
        except Exception as e:
            raise tok.DataError(f"{f}: not a readable parquet file ({e})") from None
        if column is None:
            raise tok.DataError(f"{f}: no 'messages' column")
        yield from ((f"{f}: row index {i}", {"messages": m}) for i, m in enumerate(column))
        return
    try:
        raw = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw[:e.start].count(b"\n") + 1
        raise tok.DataError(f"{f}:{lineno}: not UTF-8 text (is it a binary file?)") from None
    except (EOFError, OSError, zlib.error) as e:
        raise tok.DataError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                row = tok._MISSING
            yield f"{f}:{lineno}", row


def conversation_problem(row, tokenizer, T: int) -> str | None:
    """What makes one row unfit to train on (None: nothing): not an object with a 'messages' list, then
    tok.py's rules (render_conversation: roles, their order, parts), then an empty message, no assistant
    turn, or more tokens than a row of T + 1 holds (the loaders would crop it)."""
    if row is tok._MISSING:
        return "not JSON: expected an object with a 'messages' list"
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object with a 'messages' list"
    messages = row.get("messages", tok._MISSING)
    if not isinstance(messages, list):
        return f"'messages' is {tok._described(messages)}, expected a list of messages"
    try:
        ids, _ = tokenizer.render_conversation(messages, max_tokens=1 << 62)
    except ValueError as e:
        return str(e)
    for i, m in enumerate(messages):
        if not "".join([m["content"]] if isinstance(m["content"], str) else [p["text"] for p in m["content"]]).strip():
            return f"message {i}: empty content"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message: nothing to learn"
    if len(ids) > T + 1:
        return f"the conversation is {len(ids)} tokens, longer than the context ({T + 1} tokens a row; --max-seq-len {T})"
    return None


def read_chats(path, tokenizer, T: int, skip_bad: bool = False) -> list:
    """The message lists of a file or folder of chats, every one checked (conversation_problem): a bad row
    is a DataError naming the file and the line (parquet: the row index), or with skip_bad one more
    skipped, counted per file as tok.py's text reader counts them."""
    path = Path(path)
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    files = [f for f in files if f.name.endswith(CHAT_SUFFIXES)]
    if not files:
        kinds = "/".join(CHAT_SUFFIXES)
        raise tok.DataError(f"--data {path}: " + (f"no {kinds} files in it" if path.is_dir() else f"not a {kinds} file"))
    convs = []
    for f in files:
        skipped = [0]
        for where, row in _chat_rows(f):
            what = conversation_problem(row, tokenizer, T)
            if what is None:
                convs.append(row["messages"])
            else:
                tok._bad_row(where, what, skip_bad, skipped)
        if skipped[0]:
            train.print0(f"{f}: skipped {skipped[0]} bad rows (--skip-bad-rows)")
    if not convs:
        raise tok.DataError(f"--data {path}: no conversations")
    return convs


def load_chats(sources, tokenizer, T: int, skip_bad: bool = False, val_share: float = VAL_SHARE) -> tuple:
    """([(label, Chats, epochs)] to train on, held-out conversations) of parse_sources' sources. A source
    of n >= 2 conversations gives max(1, round(val_share * n)) of them, spread evenly through it, to the
    held-out share (none with val_share 0)."""
    chats, heldout = [], []
    for path, epochs in sources:
        convs = read_chats(path, tokenizer, T, skip_bad)
        k = max(1, round(val_share * len(convs))) if val_share > 0 and len(convs) > 1 else 0
        picks = {round(i * len(convs) / k) for i in range(k)}
        heldout += [c for i, c in enumerate(convs) if i in picks]
        chats.append((str(path), Chats(str(path), [c for i, c in enumerate(convs) if i not in picks]), epochs))
    return chats, heldout


def chats_hash(chats) -> dict:
    """label -> sha256 (16 hex digits) of the conversations a source trains on: --resume refuses other data."""
    return {label: hashlib.sha256(json.dumps(task.convs, sort_keys=True).encode()).hexdigest()[:16] for label, task, _ in chats}


# ----------------------------------------------------------------------------- the loaders
# Rank r of ws reads positions r, r + ws, r + 2ws, ... of the endless stream mixture[0], mixture[1],
# ..., mixture[N-1], mixture[0], ...: ranks never share a conversation within a pass, and a loader's
# whole position is a few integers, so a resume is exact.

class _Stream:
    def __init__(self, mixture, tokenizer, T, rank=0, world_size=1):
        if len(mixture) < world_size:
            raise SystemExit(f"--mixture: {len(mixture)} conversations cannot feed {world_size} ranks")
        self.mixture, self.tokenizer, self.T, self.rank, self.ws = mixture, tokenizer, T, rank, world_size
        self.pos, self.skipped = 0, 0  # this rank's next position; conversations that failed to render

    def render(self, g):
        """(ids, mask) of stream position g, cropped to a row of T+1 tokens; None if it is malformed."""
        try:
            return self.tokenizer.render_conversation(self.mixture[g % len(self.mixture)]["messages"], max_tokens=self.T + 1)
        except ValueError as e:  # a malformed conversation in a dataset: skip it, do not die mid-run
            self.skipped += 1
            if self.skipped <= 3:
                print(f"rank {self.rank}: skipping conversation {g % len(self.mixture)}: {e}")
            return None

    def next(self):
        """(g, ids, mask) of this rank's next well-formed conversation."""
        while True:
            g = self.pos * self.ws + self.rank
            self.pos += 1
            r = self.render(g)
            if r is not None:
                return g, r[0], r[1]

    @property
    def epoch(self) -> float:
        return self.pos * self.ws / len(self.mixture)


def _to_device(x, y, device):
    if device.type == "cuda":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


class PackedLoader(_Stream):
    """mid: rows of T+1 tokens packed best-fit from whole conversations (each starts with <|bos|>): the
    longest buffered conversation that fits the room left goes next. A conversation longer than a row
    was cropped to one row; when nothing fits, the rest of the row is padding (input <|bos|>, target
    -1). Every token of a conversation is a target: mid learns the whole format."""

    def __init__(self, mixture, tokenizer, batch_size, T, rank=0, world_size=1, device="cpu", buffer=1000):
        super().__init__(mixture, tokenizer, T, rank, world_size)
        self.B, self.device, self.buffer_size = batch_size, torch.device(device), buffer
        self.buffer = train.BestFit()  # (stream position, ids) of conversations waiting to be packed

    def _row(self):
        row, valid, n = np.full(self.T + 1, self.tokenizer.bos_id, np.int64), np.zeros(self.T + 1, bool), 0
        while True:
            while len(self.buffer) < max(1, self.buffer_size):
                g, ids, _ = self.next()
                self.buffer.add(len(ids), (g, ids))
            best = self.buffer.take(self.T + 1 - n)
            if best is None:
                return row, valid
            ids = best[1]
            row[n:n + len(ids)], valid[n:n + len(ids)] = ids, True
            n += len(ids)

    def next_batch(self):
        """(inputs, targets), both (B, T) int64; targets -1 on padding."""
        rows, valid = zip(*(self._row() for _ in range(self.B)))
        rows, valid = torch.from_numpy(np.stack(rows)), torch.from_numpy(np.stack(valid))
        y = torch.where(valid[:, 1:], rows[:, 1:], -1)
        return _to_device(rows[:, :-1].contiguous(), y, self.device)

    def state_dict(self):
        return {"pos": self.pos, "buffer": [g for g, _ in self.buffer.items], "rank": self.rank, "world_size": self.ws}

    def load_state_dict(self, state):
        items = [(g, self.render(g)[0]) for g in state["buffer"]]  # rendering is deterministic: the same tokens
        self.pos, self.buffer = state["pos"], train.BestFit([len(ids) for _, ids in items], items)  # saved in order


def collate_sft(examples, pad_id):
    """One conversation per row, padded to the longest: inputs ids[:-1]; targets ids[1:] where the mask
    is 1, else -1 (user turns, tool outputs, <|bos|>, <|assistant_start|>, padding)."""
    L = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), max(L, 1)), pad_id, dtype=torch.long)
    y = torch.full((len(examples), max(L, 1)), -1, dtype=torch.long)
    for r, (ids, mask) in enumerate(examples):
        ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)
        n = len(ids) - 1
        x[r, :n] = ids_t[:-1]
        y[r, :n] = torch.where(mask_t[1:], ids_t[1:], -1)
    return x, y


class RowLoader(_Stream):
    """sft: micro-batches of B conversations, one a row (collate_sft)."""

    def __init__(self, mixture, tokenizer, batch_size, T, rank=0, world_size=1, device="cpu"):
        super().__init__(mixture, tokenizer, T, rank, world_size)
        self.B, self.device = batch_size, torch.device(device)

    def next_batch(self):
        examples = [self.next()[1:] for _ in range(self.B)]
        return _to_device(*collate_sft(examples, self.tokenizer.bos_id), self.device)

    def state_dict(self):
        return {"pos": self.pos, "rank": self.rank, "world_size": self.ws}

    def load_state_dict(self, state):
        self.pos = state["pos"]


# ----------------------------------------------------------------------------- the optimizer step

def train_step(model, optimizer, batches, world_size=1, autocast_ctx=contextlib.nullcontext):
    """One optimizer step over this rank's micro-batches. The loss is the sum of token losses over the
    number of target tokens in the whole step, on all ranks: every assistant token weighs the same
    however rows are padded or split, and a micro-batch with no targets adds nothing (not NaN).
    Returns that loss (a 0-d tensor, the same on every rank)."""
    n = sum((y >= 0).sum() for _, y in batches).float()
    if world_size > 1:
        dist.all_reduce(n)
    n = n.clamp(min=1)
    total = 0.0
    for x, y in batches:
        with autocast_ctx():
            loss = model(x, y, loss_reduction="sum")
        (loss * (world_size / n)).backward()  # the optimizer averages gradients over ranks: x ws undoes it
        total = total + loss.detach()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    if world_size > 1:
        dist.all_reduce(total)
    return total / n


# ----------------------------------------------------------------------------- the loop

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Midtraining and SFT (chat_sft.py)")
    a = p.add_argument
    a("--stage", choices=list(STAGES), help="mid (packed, every token) or sft (a row each, assistant tokens)")
    a("--mixture", default=None, help=f"one of: {', '.join(MIXTURES)} (toy: offline), optionally +PATH[:EPOCHS] of your own "
      "chats, e.g. default+my_chats.jsonl:2 (default: default, or --data alone)")
    a("--data", action="append", default=[], metavar="PATH[:EPOCHS]", help="your own conversations, OpenAI chat format: "
      f"a {'/'.join(CHAT_SUFFIXES)} file ('messages' per line / column) or a folder of them; repeatable")
    a("--skip-bad-rows", action="store_true", help="skip (and count) --data rows that fail the checks instead of stopping")
    a("--val-share", type=float, default=VAL_SHARE, help="of each --data source held out, measured at the start and end "
      "(validation loss, exact turns, token F1), at least one conversation; 0 = none")
    a("--init-from", default=None, type=train.source_type,
      help="base | mid | hf:DIR: the checkpoint to start from (default: base for mid, mid for sft)")
    a("--model-tag", default=None, help="tag of that checkpoint (default: its newest)")
    a("--model-step", type=int, default=None, help="step of that checkpoint (default: its last)")
    a("--tag", default=None, help="output folder checkpoints/<stage>/<tag> (default: the source's tag)")
    # horizon and batch
    a("--num-iterations", type=int, default=-1, help="optimizer steps; -1 = one pass over the mixture (estimated for mid)")
    a("--device-batch-size", type=int, default=-1, help="rows per micro-batch per rank (-1: mid 32, sft 4; toy 16)")
    a("--total-batch-size", type=int, default=-1, help="per optimizer step, all ranks: mid in tokens "
      "(-1: 524288; toy: one micro-batch), sft in conversations (-1: 32)")
    a("--max-seq-len", type=int, default=-1, help="row length in tokens (-1 = the model's context)")
    a("--buffer-convs", type=int, default=1000, help="mid: conversations the packer chooses from")
    # optimization (train.py's rates, times --init-lr-frac)
    train.add_lr_flags(a)
    a("--init-lr-frac", type=float, default=-1, help="scales every rate (-1: 1.0 from base, 0.02 for sft from mid)")
    a("--warmup-ratio", type=float, default=0.0)
    a("--warmdown-ratio", type=float, default=-1, help="-1: mid 0.2, sft 1.0 (linear decay to --final-lr-frac)")
    a("--final-lr-frac", type=float, default=0.0)
    # checkpoints
    train.add_checkpoint_flags(a)
    # evaluation
    a("-a", "--eval-tasks", default=None,
      help=f"chat tasks at the end, comma-separated, or 'none' (default: {EVAL_TASKS['default']}; toy: {EVAL_TASKS['toy']}; "
      "--data alone: none)")
    a("--max-problems", type=int, default=-1, help="first N items of each eval task (-1 = all)")
    a("--max-new-tokens", type=int, default=512, help="generation budget of generative eval tasks")
    a("--measure", default=None, metavar="SOURCES",
      help="no training: toy-world figures of these checkpoints, e.g. base,mid,sft or base:toy,sft:toy2 "
      "(default tag --model-tag, else the newest; --max-problems)")
    # compute
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile: auto = on CUDA only")
    a("--seed", type=int, default=42)
    args = p.parse_args(argv)
    if args.measure is None and args.stage is None:
        p.error("--stage mid|sft is required (or --measure SOURCES)")
    return args


def check_args(args):
    """Every bad flag fails here with one line naming it, before any model, data or folder is touched."""
    args.mixture_name, args.chat_sources = parse_sources(args.mixture, args.data)
    args.mixture = "+".join([args.mixture_name] * bool(args.mixture_name) + [f"{p}:{e:g}" for p, e in args.chat_sources])
    if not 0 <= args.val_share <= 0.5:
        raise SystemExit(f"--val-share {args.val_share}: must be in [0, 0.5]")
    for flag in ("device_batch_size", "total_batch_size", "buffer_convs"):
        if getattr(args, flag) < 1 and getattr(args, flag) != -1:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    d = {**STAGES[args.stage], **(TOY_BATCH[args.stage] if args.mixture_name == "toy" else {})}
    for k in ("init_from", "device_batch_size", "total_batch_size", "init_lr_frac", "warmdown_ratio"):
        if getattr(args, k) in (None, -1):
            # sft straight from base meets the special tokens for the first time: it needs mid's full rates
            # (toy world: at 0.02 it never learns to end a turn; at 1.0 it does)
            setattr(args, k, 1.0 if k == "init_lr_frac" and args.init_from == "base" else d[k])
    if (args.init_from not in ("base", "mid") and not args.init_from.startswith("hf:")) or (args.stage == "mid" and args.init_from == "mid"):
        raise SystemExit(f"--init-from {args.init_from}: use base{' or mid' if args.stage == 'sft' else ''} (or hf:DIR) for --stage {args.stage}")
    if args.num_iterations == 0 or args.num_iterations < -1:
        raise SystemExit(f"--num-iterations {args.num_iterations}: must be >= 1 (or -1 for one pass)")
    if args.max_problems == 0:
        raise SystemExit("--max-problems 0: use -1 for all, or a positive count")
    if not (0 <= args.warmup_ratio <= 1 and 0 <= args.warmdown_ratio <= 1 and args.warmup_ratio + args.warmdown_ratio <= 1):
        raise SystemExit(f"--warmup-ratio {args.warmup_ratio} / --warmdown-ratio {args.warmdown_ratio}: each in [0, 1], sum <= 1")
    args.eval_names = eval_task_names(args.eval_tasks if args.mixture_name or args.eval_tasks else "none", args.mixture_name)


def eval_task_names(spec, mixture) -> list:
    spec = EVAL_TASKS.get(mixture, EVAL_TASKS["default"]) if spec is None else spec
    names = [] if spec.strip().lower() == "none" else [n.strip() for n in spec.split(",") if n.strip()]
    for n in names:
        if n not in evals.CHAT_TASKS:
            raise SystemExit(f"-a {n}: unknown task; known: {', '.join(evals.CHAT_TASKS)}")
    return names


def load_source(source, tag, step, device, flag="--init-from"):
    """(model, tokenizer, meta, tag) of checkpoints/<source>/<tag>; a one-line error naming the flag."""
    hf_dir = source.startswith("hf:")
    tag = tag or (Path(source[3:]).resolve().name if hf_dir else train.newest_tag(source))  # hf:DIR: the folder names the run
    if tag is None:
        hint = "; run --stage mid first, or pass --init-from base" if source == "mid" and flag == "--init-from" else ""
        raise SystemExit(f"{flag} {source}: no {source} checkpoints under {train.checkpoint_root(source)}{hint}")
    try:
        model, tokenizer, meta = train.load_model(source, None if hf_dir else tag, step, device)
    except (FileNotFoundError, ValueError, tok.DataError) as e:
        raise SystemExit(f"{flag} {source} --model-tag {tag}: {e}") from None
    return model, tokenizer, meta, tag


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.measure is not None:
            return measure_main(args)
        check_args(args)
        return finetune(args)
    except (tok.DataError, evals.EvalError) as e:  # a download or data file that failed: one line
        raise SystemExit(str(e)) from None
    finally:
        train.compute_cleanup()


def finetune(args):
    rank, _, ws, device = train.compute_init(args.device)
    master, sft = rank == 0, args.stage == "sft"
    model, tokenizer, src_meta, src_tag = load_source(args.init_from, args.model_tag, args.model_step, device)
    model.train()
    T = model.config.sequence_len if args.max_seq_len < 1 else args.max_seq_len
    if T > model.config.sequence_len:  # longer rows than pretraining: rotary and windows were never trained there
        raise SystemExit(f"--max-seq-len {T}: the model's context is {model.config.sequence_len}")
    per_micro = args.device_batch_size * ws * (1 if sft else T)
    args.total_batch_size = args.total_batch_size or per_micro  # 0: one micro-batch per rank (TOY_BATCH)
    unit = "conversations" if sft else "tokens"
    grad_accum = train.accumulation(args.total_batch_size, per_micro,
                                    f"--device-batch-size x {'' if sft else '--max-seq-len x '}world size ({unit})")
    chats, heldout = load_chats(args.chat_sources, tokenizer, T, args.skip_bad_rows, args.val_share)  # all checked now
    mixture = build_mixture(args.mixture_name, args.stage, args.seed, chats)
    loader, num_iterations = make_loader(args, mixture, tokenizer, T, rank, ws, device)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    use_bf16 = train.use_bf16(device)
    autocast_ctx = functools.partial(train.autocast, device)
    f = args.init_lr_frac
    optimizer = train.setup_optimizer(model, args.embedding_lr * f, args.unembedding_lr * f, args.matrix_lr * f,
                                      args.scalar_lr * f, args.weight_decay, rank, ws)
    config = model.config
    ckpt_dir = train.checkpoint_root(args.stage) / (args.tag or src_tag)
    log_path = ckpt_dir / "log.jsonl"
    train_meta = {"stage": args.stage, "mixture": args.mixture, "init_from": args.init_from, "source_tag": src_tag,
                  "source_step": src_meta.get("step"), "total_batch_size": args.total_batch_size,
                  "device_batch_size": args.device_batch_size, "max_seq_len": T, "num_iterations": num_iterations,
                  "seed": args.seed, **({"chats": chats_hash(chats), "val_share": args.val_share} if chats else {})}

    # resume: refuse anything that would not continue the same run (as train.py)
    start_step, smooth_loss, train_time, last_loss, heldout_start = 0, 0.0, 0.0, None, None
    if args.resume:
        meta = train.load_resume(ckpt_dir, config, tokenizer, "train", train_meta, device, rank, ws, model, optimizer, loader)
        start_step = meta["step"]
        smooth_loss, train_time, last_loss = meta["loop"]["smooth_loss"], meta["loop"]["train_time"], meta["loop"]["loss"]
        heldout_start = meta["loop"].get("heldout_start")
        train.print0(f"resumed {ckpt_dir} at step {start_step}")
    train.prepare_run_dir(ckpt_dir, log_path, args.resume, args.overwrite, start_step, master)
    train.keep_tokenizer(ckpt_dir, tokenizer, args.init_from, master)
    if heldout and start_step == 0:  # the held-out share before training, for the report's before/after
        heldout_start = say_heldout("start", heldout_check(model, tokenizer, heldout, device, T, args.device_batch_size))

    raw_model = model
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
        model = torch.compile(model, dynamic=sft)  # sft rows vary in length

    def log(entry):
        if master:
            train.append_jsonl(log_path, entry)

    def save(step):
        meta = {"step": step, "model_config": asdict(config), "tokenizer_hash": tokenizer.hash, "world_size": ws,
                "train": train_meta, "args": {k: v for k, v in vars(args).items()},
                "loop": {"smooth_loss": smooth_loss, "train_time": train_time, "loss": last_loss, "heldout_start": heldout_start}}
        rank_state = {"loader": loader.state_dict(), "rng": train.rng_state(device)}
        path = train.save_checkpoint(ckpt_dir, step, raw_model.state_dict(), optimizer.state_dict(), meta, rank, ws,
                                     rank_state, args.keep_last)
        train.print0(f"saved {path}")

    train.print0(f"{args.stage} from {args.init_from}/{src_tag} on mixture {args.mixture} ({len(mixture):,} conversations) | "
                 f"{num_iterations} steps x {args.total_batch_size:,} {unit} | rows of {T} | grad accum {grad_accum} | "
                 f"{ws} rank(s) on {device} | {'bf16' if use_bf16 else 'fp32'}")
    step, t_start = start_step, time.time()
    while True:
        stop = step == num_iterations or step == args.stop_at_step
        if stop or (args.save_every > 0 and step % args.save_every == 0 and step > start_step):
            save(step)
        if stop:
            break
        lrm = train.lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        loss, dt, n_tok = optimizer_step(model, optimizer, loader, grad_accum, autocast_ctx, lrm, train.muon_momentum(step), ws, device)
        if not math.isfinite(loss):
            raise SystemExit(f"step {step}: loss is {loss}; stopping (the last good checkpoint in {ckpt_dir} is kept)")
        if step > start_step:  # the first step of a run includes compilation and warmup
            train_time += dt
        last_loss, beta = loss, 0.9
        smooth_loss = beta * smooth_loss + (1 - beta) * loss
        shown = smooth_loss / (1 - beta ** (step + 1))
        eta = train_time / max(step - start_step, 1) * (num_iterations - step - 1)
        train.print0(f"step {step + 1:05d}/{num_iterations:05d} ({100 * (step + 1) / num_iterations:.1f}%) | loss {shown:.4f} | "
                     f"lrm {lrm:.3f} | {dt * 1000:.0f}ms | {n_tok / dt:,.0f} target tok/s | epoch {loader.epoch:.2f} | "
                     f"elapsed {train.fmt_time(time.time() - t_start)} | eta {train.fmt_time(eta)}")
        log({"step": step, "loss": loss, "smooth_loss": shown, "lrm": lrm, "dt": dt, "target_tokens": n_tok,
             "train_time": train_time})
        step += 1

    results = {}
    if step == num_iterations:
        if args.eval_names:
            results = evals.evaluate_chat(raw_model, tokenizer, device, [evals.get_task(n) for n in args.eval_names],
                                          args.max_problems, evals.engine_generate(raw_model, tokenizer, args.max_new_tokens))
        if heldout:
            end = say_heldout("end", heldout_check(raw_model, tokenizer, heldout, device, T, args.device_batch_size))
            figures = {"heldout_conversations": end["conversations"], "heldout_turns": end["turns"]}
            for k in ("val_loss", "exact_match", "token_f1"):
                figures[f"heldout_{k}_start"], figures[f"heldout_{k}"] = (heldout_start or {}).get(k), end[k]
            log({"step": step, **figures})
            results = {**results, **figures}
        if master:
            tok.write_section(args.stage, {
                "stage": args.stage, "tag": ckpt_dir.name, "mixture": args.mixture, "init_from": f"{args.init_from}/{src_tag}",
                "num_iterations": num_iterations, "total_batch_size": args.total_batch_size, "batch_unit": unit,
                "conversations": len(mixture), "mixture_rows": mixture.rows, "epochs": round(loader.epoch, 4),
                "train_time_s": train_time, "final_loss": last_loss, "smooth_loss": smooth_loss / (1 - 0.9 ** step) if step else None,
                "world_size": ws, "device": str(device), **results})
    return {"step": step, "loss": last_loss, "ckpt_dir": ckpt_dir, "results": results}


def say_heldout(when, r) -> dict:
    train.print0(f"held-out --data at the {when}: {r['conversations']} conversations | val loss {r['val_loss']:.4f} | "
                 f"{r['turns']} assistant turns at temperature 0: exact {r['exact_match']:.3f}, token F1 {r['token_f1']:.3f}")
    return r


def make_loader(args, mixture, tokenizer, T, rank, ws, device):
    """(loader, steps): sft one conversation a row, mid packed rows; -1 steps is one pass over the mixture."""
    if args.stage == "sft":
        loader = RowLoader(mixture, tokenizer, args.device_batch_size, T, rank, ws, device)
        one_pass = len(mixture) // args.total_batch_size
    else:
        loader = PackedLoader(mixture, tokenizer, args.device_batch_size, T, rank, ws, device, args.buffer_convs)
        one_pass = estimate_tokens(mixture, tokenizer, T) // args.total_batch_size if args.num_iterations < 1 else 0
    return loader, args.num_iterations if args.num_iterations > 0 else max(1, one_pass)


def optimizer_step(model, optimizer, loader, grad_accum, autocast_ctx, lrm, momentum, ws, device) -> tuple:
    """One step at the schedule's lr multiplier and Muon momentum: (loss, seconds, target tokens on all ranks, approximately)."""
    t0 = train.start_step(optimizer, lrm, momentum, device)
    batches = [loader.next_batch() for _ in range(grad_accum)]
    n_tok = sum(int((y >= 0).sum()) for _, y in batches) * ws
    loss = float(train_step(model, optimizer, batches, ws, autocast_ctx))
    return loss, time.time() - t0, n_tok


def estimate_tokens(mixture, tokenizer, T) -> int:
    """Tokens in one pass over the mixture (each conversation cropped to a row), from the lengths of up to
    ESTIMATE_SAMPLE conversations spread evenly through it: mid's default horizon."""
    n = len(mixture)
    picks = sorted({round(i * n / min(n, ESTIMATE_SAMPLE)) for i in range(min(n, ESTIMATE_SAMPLE))})
    lens = []
    for i in picks:
        try:
            lens.append(len(tokenizer.render_conversation(mixture[i]["messages"], max_tokens=T + 1)[0]))
        except ValueError:
            pass
    return int(n * sum(lens) / max(len(lens), 1))


# ----------------------------------------------------------------------------- the measurements: --data's held-out share, the toy world

def token_f1(pred: list, ref: list) -> float:
    """Overlap of two token lists as bags (SQuAD's F1): 2 x common / (len(pred) + len(ref)); 1 if both are empty."""
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    return 2 * common / (len(pred) + len(ref)) if pred or ref else 1.0


@torch.no_grad()
def heldout_check(model, tokenizer, convs, device, T: int, batch_size: int = 8, max_turns: int = HELDOUT_TURNS) -> dict:
    """The held-out share of --data, as the report shows it. val_loss: the mean loss per assistant token (the
    tokens SFT learns, whichever stage trains). For its first max_turns assistant turns, each prompted with the
    conversation before it and generated at temperature 0 in one batched pass: exact_match, the share
    reproduced exactly (and ended), and token_f1, the mean token_f1 against the reference (both decoded
    from tokens as rendered, so python calls count). Ranks split the work and sum."""
    rank, world = evals._rank_world()
    was_training = model.training
    model.eval()
    rendered = [tokenizer.render_conversation(c, max_tokens=T + 1) for c in convs]
    loss = n = 0.0
    for b in range(rank * batch_size, len(rendered), world * batch_size):
        x, y = collate_sft(rendered[b:b + batch_size], tokenizer.bos_id)
        with train.autocast(device):
            loss += float(model(x.to(device), y.to(device), loss_reduction="sum"))
        n += int((y >= 0).sum())
    turns = [c[:k + 1] for c in convs for k, m in enumerate(c) if m["role"] == "assistant"][:max_turns]
    mine = turns[rank::world]
    prompts = [tokenizer.render_for_completion(m) for m in mine]
    refs = [tokenizer.render_conversation(m, max_tokens=1 << 62)[0][len(p):-1] for m, p in zip(mine, prompts)]  # end off
    outs = engine.generate_all(engine.Engine(model, tokenizer), prompts, temperature=0.0,
                               max_tokens=[len(r) + 1 + HELDOUT_SLACK for r in refs])
    exact = f1 = 0.0
    for p, r, (seqs, _) in zip(prompts, refs, outs):
        text, ref = engine.completion_text(tokenizer, seqs[0][len(p):]), tokenizer.decode(r)
        exact += text == ref
        f1 += token_f1(tokenizer.encode(text), tokenizer.encode(ref))
    loss, n, exact, f1 = evals._all_reduce_sum([loss, n, exact, f1], device)
    model.train(was_training)
    return {"val_loss": loss / max(n, 1), "exact_match": exact / max(len(turns), 1), "token_f1": f1 / max(len(turns), 1),
            "conversations": len(convs), "turns": len(turns)}


@torch.no_grad()
def measure_toy(model, tokenizer, max_problems=-1, max_tokens=MEASURE_MAX_TOKENS) -> dict:
    """What SFT should change, on the toy world, with the model prompted in the chat format (greedy):
      ToyFacts   accuracy on held-out facts (test split: never in SFT data, known only from pretraining)
      ToyMath    accuracy on test word problems
      ToyMath_rare  the same on the problem families SFT shows rarely (tok._MATH_RARE: RL's to fix)
      ends_turn  fraction of completions (both tasks) whose last token is <|assistant_end|>
      python_calls  fraction of ToyMath completions that open a <|python_start|> call"""
    eng = engine.Engine(model, tokenizer)
    end, py = tokenizer.special("<|assistant_end|>"), tokenizer.special("<|python_start|>")
    out, ends = {}, []
    for task in (evals.ToyFacts("test"), evals.ToyMath("test")):
        view = list(task[:max_problems] if max_problems > 0 else task)
        prompts = [tokenizer.render_for_completion(item["messages"]) for item in view]
        outs = engine.generate_all(eng, prompts, max_tokens=max_tokens, temperature=0.0)
        correct = calls = 0
        rare = []  # right or not, on ToyMath problems of the rare families
        for item, prompt, (seqs, _) in zip(view, prompts, outs):
            gen = seqs[0][len(prompt):]
            ends.append(bool(gen) and gen[-1] == end)
            calls += py in gen
            right = task.evaluate(item, engine.completion_text(tokenizer, gen))
            correct += right
            if item.get("rare"):
                rare.append(right)
        out[task.name] = correct / max(len(view), 1)
        if task.name == "ToyMath":
            out["python_calls"] = calls / max(len(view), 1)
            out["ToyMath_rare"] = sum(rare) / max(len(rare), 1)
    out["ends_turn"] = sum(ends) / max(len(ends), 1)
    return out


def measure_main(args):
    sources = [s.strip().partition(":") for s in args.measure.split(",") if s.strip()]  # source[:tag]
    for s, _, _ in sources:
        if s not in ("base", "mid", "sft", "rl"):
            raise SystemExit(f"--measure {s}: unknown source; use base, mid, sft or rl (optionally source:tag)")
    if args.max_problems == 0:
        raise SystemExit("--max-problems 0: use -1 for all, or a positive count")
    _, _, _, device = train.compute_init(args.device)
    table = {}
    for s, _, tag in sources:
        model, tokenizer, meta, tag = load_source(s, tag or args.model_tag, args.model_step if len(sources) == 1 else None,
                                                  device, "--measure")
        table[f"{s}/{tag}"] = measure_toy(model, tokenizer, args.max_problems)
    keys = ["ToyFacts", "ends_turn", "python_calls", "ToyMath", "ToyMath_rare"]
    print(f"{'checkpoint':<20}" + "".join(f"{k:>20}" for k in keys))
    for name, row in table.items():
        print(f"{name:<20}" + "".join(f"{row[k]:>20.3f}" for k in keys))
    tok.write_section("toy_chat", table)
    return table


if __name__ == "__main__":
    tok.run_main(main)
