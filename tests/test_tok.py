import gzip, json, random, threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import regex

import tok
from bpe_reference import train_reference

SPECIAL_LOOKALIKES = "".join(tok.SPECIAL_TOKENS)


def random_text(rng, n_words=2000):
    words = ["the", "then", "hello", "world", "aaaa", "ab", "abab", "ba", "zzzz", "123456", "7", "é", "日本語",
             "😀😀", "🤖", "   ", "\n\n", "\t", "it's", "WE'LL", "x'ſ", "(ok)", "...", "  \n  ", "über", "naïve", "42.5%"]
    return " ".join(rng.choice(words) for _ in range(n_words))


# ----------------------------------------------------------------------------- splitting

def test_split_matches_regex_on_random_strings():
    pool = list("aAbsSdDmMtTlLvVeErR'\" \t\n\r\x0b\x85\xa0\u3000.,!?()-_/123٣é中😀ſ\x1c\u2028#") + ["'ll", "'ve", "'re", "  ", "\n\n"]
    rng = random.Random(0)
    pat = regex.compile(tok.SPLIT_PATTERN)
    for _ in range(3000):
        s = "".join(rng.choice(pool) for _ in range(rng.randint(0, 30)))
        assert tok.split(s) == pat.findall(s), repr(s)


def test_split_matches_regex_on_text():
    rng = random.Random(1)
    text = random_text(rng, 5000)
    assert tok.split(text) == regex.findall(tok.SPLIT_PATTERN, text)


@pytest.mark.parametrize("window, fold", [(10 ** 9, 32), (700, 3)])  # one window; many windows, folded in threes
def test_count_chunks_matches_counter(monkeypatch, window, fold):
    monkeypatch.setattr(tok, "WINDOW_CHARS", window)
    monkeypatch.setattr(tok, "FOLD_PARTS", fold)
    rng = random.Random(2)
    docs = [random_text(rng, rng.randint(1, 300)) for _ in range(50)] + ["", "a", "  trailing  "]
    data, lens, counts = tok.count_chunks(docs, workers=2)
    offs = np.cumsum(lens) - lens
    raw = data.tobytes()
    got = {raw[o:o + n].decode(): c for o, n, c in zip(offs.tolist(), lens.tolist(), counts.tolist())}
    assert len(got) == len(lens)  # each chunk once
    assert got == Counter(c for d in docs for c in regex.findall(tok.SPLIT_PATTERN, d))


# ----------------------------------------------------------------------------- exact merges

CORPORA = {
    "ascii": lambda rng: [" ".join(rng.choice(["the", "cat", "sat", "on", "mat", "then", "hat", "at"]) for _ in range(200)) for _ in range(20)],
    "unicode": lambda rng: ["".join(rng.choice("éèêüößçñ日本語中文한국어привет ") for _ in range(400)) for _ in range(10)],
    "emoji": lambda rng: [" ".join(rng.choice(["😀", "😀😀", "🤖x", "👍🏽", "🇫🇷", "ok😀"]) for _ in range(200)) for _ in range(10)],
    "digits": lambda rng: [" ".join(str(rng.randint(0, 10 ** rng.randint(1, 9))) for _ in range(300)) for _ in range(10)],
    "whitespace": lambda rng: ["".join(rng.choice([" ", "  ", "\t", "\n", "\n\n", "    ", "x", "y "]) for _ in range(500)) for _ in range(10)],
    "one_char": lambda rng: ["a" * rng.randint(1, 60) for _ in range(100)] + ["aaab" * 7, "baaa aaaa"],
    "mixed": lambda rng: [random_text(rng, 400) for _ in range(10)],
}


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_merges_equal_reference(name):
    rng = random.Random(3)
    docs = CORPORA[name](rng)
    data, lens, counts = tok.count_chunks(docs, workers=1)
    fast = tok.bpe_merges(data, lens, counts, 150)
    ref = train_reference(Counter(c for d in docs for c in regex.findall(tok.SPLIT_PATTERN, d)), 150)
    assert len(fast) > 10
    assert fast == ref


def test_batched_merges_equal_one_at_a_time(monkeypatch):
    # a larger Zipfian corpus: batches of hundreds of merges, checked against batches of one
    rng = random.Random(7)
    syll = ["th", "e", "an", "in", "er", "on", "re", "at", "st", "en", "ing", "ou", "a", "o", "i", "s", "t", "ch", "qu", "x"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 5))) for _ in range(3000)]
    docs = [" ".join(rng.choices(words, [1 / (i + 1) for i in range(len(words))], k=2000)) for _ in range(20)]
    data, lens, counts = tok.count_chunks(docs, workers=1)
    batched = tok.bpe_merges(data, lens, counts, 2000)
    monkeypatch.setattr(tok, "MAX_BATCH", 1)
    assert tok.bpe_merges(data, lens, counts, 2000) == batched and len(batched) == 2000


def test_duplicate_bytes_never_become_two_tokens():
    # 'a'+'bc' and 'ab'+'c' could both make b"abc"; a tokenizer must keep tokens distinct
    docs = ["abc " * 50 + "ab " * 40 + "bc " * 40 + "xabc yabc"] * 3
    t = tok.train_tokenizer(docs, vocab_size=256 + 9 + 40)
    assert len(set(t.vocab)) == len(t.vocab)


# ----------------------------------------------------------------------------- the Tokenizer

@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(4)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(300)]
    docs = [random_text(rng, 300) + " ".join(rng.choice(words) for _ in range(300)) for _ in range(40)]
    return tok.train_tokenizer(docs, vocab_size=600)


def test_roundtrip_random_unicode(tokenizer):
    rng = random.Random(5)
    for _ in range(200):
        s = "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0x2FFF), rng.randint(0x1F300, 0x1FAFF), 10]))
                    for _ in range(rng.randint(0, 60)))
        assert tokenizer.decode(tokenizer.encode(s)) == s
    batch = [random_text(rng, 50) for _ in range(8)]
    assert [tokenizer.decode(ids) for ids in tokenizer.encode(batch)] == batch


def test_special_tokens_only_by_name(tokenizer):
    ids = tokenizer.encode("hi " + SPECIAL_LOOKALIKES)
    assert not set(ids) & set(tokenizer.specials.values())
    assert tokenizer.decode(ids) == "hi " + SPECIAL_LOOKALIKES
    assert tokenizer.encode("hi", prepend="<|bos|>")[0] == tokenizer.bos_id
    assert tokenizer.vocab_size == 600 and tokenizer.bos_id == 600 - 9
    assert tokenizer.token_bytes.shape == (600,) and tokenizer.token_bytes[-9:].sum() == 0
    assert tokenizer.token_bytes[ord("a")] == 1 and tokenizer.token_bytes.max() >= 2


def test_save_load_hash(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "t")
    t2 = tok.Tokenizer.load(tmp_path / "t")
    assert t2.hash == tokenizer.hash and t2.merges == tokenizer.merges
    assert np.array_equal(np.load(tmp_path / "t" / tok.TOKEN_BYTES_FILE), tokenizer.token_bytes)
    assert not list((tmp_path / "t").glob("*.tmp"))
    (tmp_path / "t" / tok.TOKENIZER_FILE).write_text('{"format": "speedchat-bpe", "version": 1, "merges": [[1, ')
    with pytest.raises(tok.DataError, match="damaged tokenizer"):
        tok.Tokenizer.load(tmp_path / "t")
    with pytest.raises(tok.DataError, match="no tokenizer"):
        tok.Tokenizer.load(tmp_path / "missing")


def test_render_conversation_masks(tokenizer):
    t = tokenizer
    S = t.specials
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Let me"},
                                              {"type": "python", "text": "2+2"},
                                              {"type": "python_output", "text": "4"},
                                              {"type": "text", "text": "It is 4."}]},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "Welcome"}]
    ids, mask = t.render_conversation(msgs)
    E = t.encode
    expect = [(S["<|bos|>"], 0), (S["<|user_start|>"], 0)] + [(i, 0) for i in E("Be brief.\n\n2+2?")] + [
        (S["<|user_end|>"], 0), (S["<|assistant_start|>"], 0)] + [(i, 1) for i in E("Let me")] + [
        (S["<|python_start|>"], 1)] + [(i, 1) for i in E("2+2")] + [(S["<|python_end|>"], 1), (S["<|output_start|>"], 0)] + [
        (i, 0) for i in E("4")] + [(S["<|output_end|>"], 0)] + [(i, 1) for i in E("It is 4.")] + [
        (S["<|assistant_end|>"], 1), (S["<|user_start|>"], 0)] + [(i, 0) for i in E("Thanks")] + [
        (S["<|user_end|>"], 0), (S["<|assistant_start|>"], 0)] + [(i, 1) for i in E("Welcome")] + [(S["<|assistant_end|>"], 1)]
    assert list(zip(ids, mask)) == expect
    ids8, mask8 = t.render_conversation(msgs, max_tokens=8)
    assert ids8 == ids[:8] and mask8 == mask[:8]
    prompt = t.render_for_completion(msgs)
    last_start = len(ids) - 1 - ids[::-1].index(S["<|assistant_start|>"])
    assert prompt == ids[:last_start + 1]


@pytest.mark.parametrize("msgs, match", [
    ([], "non-empty"),
    ([{"role": "assistant", "content": "hi"}], "expected role user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected role assistant"),
    ([{"role": "bot", "content": "a"}], "role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "part 0"),
    ([{"role": "user", "content": 3}], "content must be"),
    ([{"role": "system", "content": "a"}], "followed by a user"),
])
def test_malformed_conversations(tokenizer, msgs, match):
    with pytest.raises(ValueError, match=match):
        tokenizer.render_conversation(msgs)


# ----------------------------------------------------------------------------- local sources

def write_sources(root, n=250):
    docs = [f"document {i} " + "word " * (i % 7) for i in range(n)]
    (root / "pq").mkdir(parents=True)
    pq.write_table(pa.table({"text": docs}), root / "pq" / "a.parquet", row_group_size=100)
    with open(root / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    with gzip.open(root / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    (root / "txt").mkdir()
    for i, d in enumerate(docs):
        (root / "txt" / f"{i:04d}.txt").write_text(d)
    return docs


@pytest.mark.parametrize("src", ["pq", "a.jsonl", "a.jsonl.gz", "txt"])
def test_local_formats_and_split(tmp_path, src):
    docs = write_sources(tmp_path)
    path = str(tmp_path / src)
    train = [d for _, ds in tok.iter_batches(path, "train") for d in ds]
    val = [d for _, ds in tok.iter_batches(path, "val") for d in ds]
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert 0 < len(val) <= len(docs) // 50
    assert [d for _, ds in tok.iter_batches(path, "val") for d in ds] == val  # deterministic
    if src == "pq":  # ranks take disjoint units; start resumes
        r0 = [u for u, _ in tok.iter_batches(path, "train", rank=0, world_size=2)]
        r1 = [u for u, _ in tok.iter_batches(path, "train", rank=1, world_size=2)]
        assert r0 == [0, 2] and r1 == [1]
        assert [u for u, _ in tok.iter_batches(path, "train", start=1)] == [1, 2]


def test_iter_documents_caps(tmp_path):
    write_sources(tmp_path)
    docs = list(tok.iter_documents(str(tmp_path / "a.jsonl"), max_chars=100, doc_cap=12))
    assert all(len(d) <= 12 for d in docs) and sum(map(len, docs)) == 100


def test_eval_compares_with_peer_encodings_read_from_a_folder(tmp_path, tokenizer, monkeypatch, capsys):
    """`tok.py eval --encodings DIR`: GPT-2's and GPT-4's ranks from local .tiktoken files (tiktoken's own
    format, checked by sha256), made up here: bytes only for "gpt2", bytes plus "word" for "cl100k_base"."""
    import base64, hashlib
    write_sources(tmp_path)
    ranks = {"gpt2": [bytes([b]) for b in range(256)]}
    ranks["cl100k_base"] = ranks["gpt2"] + [b"wo", b"rd", b"word", b" word"]
    enc = tmp_path / "enc"
    enc.mkdir()
    for name, (file, _, _) in tok.PEERS.items():
        data = b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(ranks[name]))
        (enc / file).write_bytes(data)
        monkeypatch.setitem(tok.PEERS, name, (file, hashlib.sha256(data).hexdigest(), tok.PEERS[name][2]))
    src = str(tmp_path / "a.jsonl")
    val = list(tok.iter_documents(src, "val"))
    row = tok.evaluate(tokenizer, [src], encodings=str(enc))[src]
    assert row["gpt2"] == 1.0 and row["ours"] == tok.bytes_per_token(tokenizer.encode, val)
    words = sum(d.count(" word") for d in val)
    assert row["cl100k_base"] == pytest.approx(sum(map(len, val)) / (sum(map(len, val)) - 4 * words))
    assert f"ours {row['ours']:.3f}  gpt2 1.000  cl100k_base" in capsys.readouterr().out
    # a file missing, or not the published one: one line naming it, exit status 2
    tokenizer.save(tmp_path / "t")
    cli = ["eval", "--data", src, "--tokenizer", str(tmp_path / "t"), "--encodings", str(enc)]
    gpt2 = (enc / "r50k_base.tiktoken").read_bytes()
    (enc / "r50k_base.tiktoken").unlink()
    with pytest.raises(SystemExit) as exit:
        tok.main(cli)
    assert exit.value.code == 2 and "no r50k_base.tiktoken" in capsys.readouterr().err
    (enc / "r50k_base.tiktoken").write_bytes(gpt2)
    (enc / "cl100k_base.tiktoken").write_bytes(gpt2)
    with pytest.raises(SystemExit) as exit:
        tok.main(cli)
    assert exit.value.code == 2 and "cl100k_base.tiktoken: not the file OpenAI publishes" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, match", [
    (["train", "--data", "/no/such/path"], "no such file"),
    (["train", "--data", "EMPTY"], "empty corpus"),
    (["train", "--data", "JSONL", "--vocab-size", "200"], "at least 265"),
    (["train", "--data", "climbmix"], "no train shards"),
    (["train", "--data", "NOTEXT"], "no .parquet"),
    (["train", "--data", "BADJSON"], "bad.jsonl:2: not JSON"),
    (["download", "-n", "1", "--dataset", "bogus"], "invalid choice"),
])
def test_bad_input_clear_error_nothing_written(tmp_path, speedchat_home, capsys, args, match):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    (tmp_path / "notext").mkdir()
    (tmp_path / "notext" / "x.csv").write_text("a,b\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    sub = {"EMPTY": tmp_path / "empty.jsonl", "JSONL": tmp_path / "ok.jsonl", "NOTEXT": tmp_path / "notext", "BADJSON": tmp_path / "bad.jsonl"}
    with pytest.raises(SystemExit):
        tok.main([str(sub.get(a, a)) for a in args])
    out = capsys.readouterr()
    assert match in out.err + out.out
    assert not (speedchat_home / "tokenizer").exists()


# ----------------------------------------------------------------------------- downloads

def parquet_bytes(tmp_path, i):
    path = tmp_path / f"src_{i}.parquet"
    rng = random.Random(i)  # incompressible filler so a file spans several download blocks
    pq.write_table(pa.table({"text": [f"shard {i} doc {j} " + "".join(rng.choices("abcdefgh ", k=20000)) for j in range(50)]}), path)
    return path.read_bytes()


class ShardServer:
    """A local HTTP server for shard_XXXXX.parquet with scripted faults per file:
    '500' answers an error, 'cut' sends half the body then drops the connection. Honors Range."""

    def __init__(self, files: dict, faults: dict):
        self.files, self.faults, self.log = files, faults, []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                outer.log.append((name, self.headers.get("Range")))
                plan = outer.faults.get(name, [])
                fault = plan.pop(0) if plan else None
                if name not in outer.files or fault == "500":
                    self.send_error(404 if name not in outer.files else 500)
                    return
                body = outer.files[name]
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if fault == "cut":
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/data"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_download_with_faults(tmp_path, speedchat_home):
    val = tok.DATASETS["climbmix"][1] - 1
    ids = [0, 1, 2, val]
    files = {f"shard_{i:05d}.parquet": parquet_bytes(tmp_path, i) for i in ids}
    faults = {"shard_00000.parquet": ["500"], "shard_00001.parquet": ["cut"], f"shard_{val:05d}.parquet": ["500", "cut"]}
    srv = ShardServer(files, faults)
    try:
        folder = speedchat_home / "data" / "climbmix"
        folder.mkdir(parents=True)
        (folder / "shard_00002.parquet").write_bytes(b"PAR1 corrupt, truncated")  # damaged file on disk
        paths = tok.download(3, "climbmix", workers=2, base_url=srv.url, backoff=0.01)
        assert sorted(p.name for p in paths) == sorted(files)
        for p in paths:
            assert p.read_bytes() == files[p.name]
        assert not list(folder.glob("*.tmp"))
        ranges = [r for name, r in srv.log if name == "shard_00001.parquet" and r]
        assert ranges and 0 < int(ranges[0][6:-1]) <= len(files["shard_00001.parquet"]) // 2  # resumed, not restarted
        n_requests = len(srv.log)
        tok.download(3, "climbmix", base_url=srv.url, backoff=0.01)  # all present: nothing fetched
        assert len(srv.log) == n_requests
        train = [d for _, ds in tok.iter_batches("climbmix", "train") for d in ds]
        val_docs = [d for _, ds in tok.iter_batches("climbmix", "val") for d in ds]
        assert len(train) == 150 and all(d.startswith(f"shard {val} ") for d in val_docs)
    finally:
        srv.close()


def test_download_gives_up_cleanly(tmp_path, speedchat_home):
    val = tok.DATASETS["climbmix"][1] - 1
    names = [f"shard_{i:05d}.parquet" for i in (0, val)]
    srv = ShardServer({n: parquet_bytes(tmp_path, 0) for n in names}, {n: ["500"] * 6 for n in names})
    try:  # a server error is retried, then given up
        with pytest.raises(tok.DataError, match="download failed after 6 attempts"):
            tok.download(1, "climbmix", base_url=srv.url, backoff=0.001)
        assert not list((speedchat_home / "data" / "climbmix").glob("*.parquet*"))
        srv.files, srv.log = {}, []  # a 404 is final: each shard asked once at most
        with pytest.raises(tok.DataError, match=rf"shard_{val:05d}\.parquet: HTTP 404 Not Found"):
            tok.download(1, "climbmix", base_url=srv.url, backoff=0.001)
        assert len(srv.log) == len(set(srv.log)) <= 2 and not list((speedchat_home / "data" / "climbmix").glob("*.parquet*"))
    finally:
        srv.close()


def test_download_schema_error_is_final(tmp_path, speedchat_home, capsys):
    val = tok.DATASETS["climbmix"][1] - 1
    pq.write_table(pa.table({"body": ["no text here"]}), tmp_path / "x.parquet")
    srv = ShardServer({f"shard_{i:05d}.parquet": (tmp_path / "x.parquet").read_bytes() for i in (0, val)}, {})
    try:
        with pytest.raises(SystemExit) as e:
            tok.main(["download", "-n", "1", "--base-url", srv.url])
        assert e.value.code == 2
        assert f"error: {srv.url}/shard_{val:05d}.parquet: no 'text' column" in capsys.readouterr().err
        names = [name for name, _ in srv.log]
        assert f"shard_{val:05d}.parquet" in names and len(names) == len(set(names))  # each asked once, not retried
        assert not list((speedchat_home / "data" / "climbmix").glob("*.parquet*"))
    finally:
        srv.close()


def test_concurrent_downloads_one_fetch_each(tmp_path, speedchat_home):
    val = tok.DATASETS["climbmix"][1] - 1
    files = {f"shard_{i:05d}.parquet": parquet_bytes(tmp_path, i) for i in (0, val)}
    srv = ShardServer(files, {})
    try:
        threads = [threading.Thread(target=tok.download, args=(1, "climbmix"), kwargs={"base_url": srv.url}) for _ in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert sorted(name for name, _ in srv.log) == sorted(files)  # the lock made the others wait
    finally:
        srv.close()
