"""
hf.py: speedchat and the Hugging Face ecosystem (a helper of train.py and engine.py, not a stage).

  python engine.py export --source sft --out DIR [--dtype bf16|fp32]   # a folder transformers loads
  python engine.py chat --source hf:DIR                                # and back: hf:DIR wherever --source is taken

Reads top to bottom: safetensors files (our checkpoints' weights too), the tokenizer in the HF
`tokenizers` format and the chat template, the export, the import (hf:DIR back to train.GPT and
tok.Tokenizer). Nothing optional is imported here: the export and the import run on speedchat's own
dependencies; transformers, which reads the export, is needed only by whoever loads it there
(modeling_speedchat.py, shipped inside the folder, is the model on that side).
"""
import json, os, shutil, struct
from pathlib import Path

import torch

import tok  # train.py imports this file where it writes or reads weights: train is imported where used here

# ----------------------------------------------------------------------------- safetensors
# The format (github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON
# header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}} padded with
# spaces to a multiple of 8, then the tensors' bytes back to back. Small enough to write ourselves, so
# checkpoints need no extra package and the export is what the safetensors library reads.

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # the library's own limit: a larger "length" is a damaged or foreign file


def save_safetensors(tensors: dict, path, metadata: dict | None = None):
    """tensors {name: tensor} to a safetensors file at path (written whole: a .tmp, then a rename)."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name")
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for data in blobs:
            f.write(data)
    os.replace(tmp, path)
    return path


def load_safetensors(path) -> dict:
    """{name: tensor} of a safetensors file; ValueError saying what is wrong with a damaged one."""
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    if len(raw) < 8:
        raise ValueError(f"{len(raw)} bytes: too short for a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > min(MAX_HEADER, len(raw) - 8):
        raise ValueError(f"header of {n} bytes in a file of {len(raw)}: not a safetensors file, or cut short")
    try:
        header = json.loads(raw[8:8 + n])
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        raise ValueError("the header is not a JSON object: not a safetensors file") from None
    header.pop("__metadata__", None)
    body, out = memoryview(raw)[8 + n:], {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = DTYPES[info["dtype"]], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r}: a malformed header entry {str(info)[:80]}") from None
        count = 1
        for s in shape:
            count *= s
        if not 0 <= begin <= end <= len(body) or end - begin != count * torch.empty(0, dtype=dtype).element_size():
            raise ValueError(f"tensor {name!r}: bytes {begin}..{end} do not hold {info['dtype']} {shape} "
                             f"in a body of {len(body)} (cut short?)")
        out[name] = torch.frombuffer(body[begin:end], dtype=torch.uint8).view(dtype).reshape(shape) if count else torch.empty(shape, dtype=dtype)
    return out


# ----------------------------------------------------------------------------- the tokenizer, HF format
# Our byte-level BPE as a `tokenizers` tokenizer.json: the same split regex (a Split pre-tokenizer), then
# GPT-2's byte-to-character map (each byte a printable character, so merges are text), our merges in
# order (merge i makes token 256 + i, which is its rank, as tiktoken ranks it) and ignore_merges (a whole
# chunk that is a token is that token, as tiktoken does). Special tokens are added tokens with their ids.

def byte_chars() -> list:
    """GPT-2's map from a byte to a printable character: printable Latin-1 bytes stand for themselves,
    the other 68 (control characters, space, ...) for the characters from U+0100 on, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _token_text(data: bytes, chars) -> str:
    return "".join(chars[b] for b in data)


def chat_template() -> str:
    """A Jinja chat template that renders what tok.Tokenizer.render_conversation renders: <|bos|>; a
    system message merged into the first user turn ("system\\n\\nuser"); user turns in
    <|user_start|>..<|user_end|>; assistant turns in <|assistant_start|>..<|assistant_end|>, their content
    a string or parts (text; python in <|python_start|>..<|python_end|>; python_output in
    <|output_start|>..<|output_end|>); add_generation_prompt appends <|assistant_start|>. Each special
    token splits the text, so every piece is encoded alone, as tok.py encodes it (two text parts side
    by side are the one exception: joined here, encoded apart there)."""
    return "".join([
        "{{- bos_token -}}",
        "{%- set ns = namespace(system='') -%}",
        "{%- for message in messages -%}",
        "{%- if message['role'] == 'system' -%}",
        "{%- if not loop.first -%}{{- raise_exception('a system message must come first') -}}{%- endif -%}",
        "{%- set ns.system = message['content'] + '\n\n' -%}",
        "{%- elif message['role'] == 'user' -%}",
        "<|user_start|>{{- ns.system -}}{{- message['content'] -}}<|user_end|>{%- set ns.system = '' -%}",
        "{%- elif message['role'] == 'assistant' -%}",
        "<|assistant_start|>",
        "{%- if message['content'] is string -%}{{- message['content'] -}}",
        "{%- else -%}{%- for part in message['content'] -%}",
        "{%- if part['type'] == 'text' -%}{{- part['text'] -}}",
        "{%- elif part['type'] == 'python' -%}<|python_start|>{{- part['text'] -}}<|python_end|>",
        "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{- part['text'] -}}<|output_end|>",
        "{%- else -%}{{- raise_exception('unknown part type ' + part['type']) -}}{%- endif -%}",
        "{%- endfor -%}{%- endif -%}",
        "<|assistant_end|>",
        "{%- else -%}{{- raise_exception('unknown role ' + message['role']) -}}{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}",
    ])


def tokenizer_files(tokenizer: tok.Tokenizer, max_positions: int) -> dict:
    """{file name: JSON object} of the tokenizer in the Hugging Face format: tokenizer.json,
    tokenizer_config.json (with the chat template), special_tokens_map.json."""
    chars = byte_chars()
    vocab = {_token_text(t, chars): i for i, t in enumerate(tokenizer.vocab)}
    merges = [f"{_token_text(tokenizer.vocab[a], chars)} {_token_text(tokenizer.vocab[b], chars)}" for a, b in tokenizer.merges]
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
             for s, i in tokenizer.specials.items()]
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,  # encode() adds nothing, as tok.Tokenizer.encode
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }
    specials = {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|bos|>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": False, "add_eos_token": False,
              "model_max_length": max_positions, "clean_up_tokenization_spaces": False, "chat_template": chat_template(),
              "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids, which generate() refuses
              "additional_special_tokens": [s for s in tok.SPECIAL_TOKENS if s not in specials.values()]}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config,
            "special_tokens_map.json": {**specials, "additional_special_tokens": config["additional_special_tokens"]}}


def tokenizer_from_hf(path: Path) -> tok.Tokenizer:
    """tok.Tokenizer back from an exported tokenizer.json: the split regex and the merges as id pairs.
    ValueError naming what does not fit (another family's tokenizer: bytes in another order, other specials)."""
    try:
        state = json.loads(path.read_text())
        model, pre = state["model"], state["pre_tokenizer"]
        splits = [p for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"]
        pattern = splits[0]["pattern"]["Regex"]
        vocab, merges = model["vocab"], model["merges"]
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"not a byte-level BPE tokenizer.json as speedchat writes it ({type(e).__name__}: {e})") from None
    chars = byte_chars()
    for b in range(256):
        if vocab.get(chars[b]) != b:
            raise ValueError(f"token {b} is not the byte {b} (another tokenizer's byte order): not speedchat's")
    pairs = []
    for i, m in enumerate(merges):
        a, b = m.split(" ") if isinstance(m, str) else m
        if a not in vocab or b not in vocab or vocab.get(a + b) != 256 + i:
            raise ValueError(f"merge {i} ({a!r} + {b!r}) does not make token {256 + i}: not speedchat's merge order")
        pairs.append((vocab[a], vocab[b]))
    t = tok.Tokenizer(pairs, pattern)
    got = {a["content"]: a["id"] for a in state.get("added_tokens", []) if a.get("special")}
    if got != t.specials:
        raise ValueError(f"special tokens {got} differ from speedchat's {t.specials}")
    return t


# ----------------------------------------------------------------------------- the export

MODELING_FILE = "modeling_speedchat.py"
EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json")  # what an import cannot do without
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(tok.DataError):
    """A bad --out, or a folder that is not a speedchat export: one line naming it."""


def model_config(model, meta: dict, dtype: str) -> dict:
    """config.json: SpeedchatConfig's fields (train.GPTConfig and train.py's constants), auto_map to the
    modeling file, the token ids generate() needs, and where the weights came from."""
    import train
    c, sp = model.config, meta["special_ids"]
    return {"architectures": ["SpeedchatForCausalLM"], "model_type": "speedchat",
            "auto_map": {"AutoConfig": "modeling_speedchat.SpeedchatConfig",
                         "AutoModelForCausalLM": "modeling_speedchat.SpeedchatForCausalLM"},
            "vocab_size": c.vocab_size, "padded_vocab_size": c.padded_vocab_size, "sequence_len": c.sequence_len,
            "n_layer": c.n_layer, "n_head": c.n_head, "n_kv_head": c.n_kv_head, "n_embd": c.n_embd,
            "window_pattern": c.window_pattern, "logit_softcap": train.LOGIT_SOFTCAP, "rope_base": train.ROPE_BASE,
            "rope_context_mult": train.ROPE_CONTEXT_MULT, "ve_gate_channels": train.VE_GATE_CHANNELS,
            "bos_token_id": sp["<|bos|>"], "eos_token_id": [sp["<|assistant_end|>"], sp["<|bos|>"]], "pad_token_id": sp["<|bos|>"],
            "tie_word_embeddings": False, "use_cache": True, "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
            "speedchat": {k: meta.get(k) for k in ("source", "tag", "step", "tokenizer_hash")}}


CARD_DIR = 'DIR = "."  # this folder, or its Hub id'


def model_card(config: dict, num_params: int) -> str:
    """README.md of the export: what it is, how to load it, and the report card's figures where a run wrote one."""
    s = config["speedchat"]
    lines = ["---", "library_name: transformers", "tags: [speedchat, text-generation]", "---", "",
             f"# speedchat {s['source']} model (step {s['step']})", "",
             f"A {num_params / 1e6:.1f}M-parameter GPT trained with speedchat: depth {config['n_layer']}, width {config['n_embd']}, "
             f"{config['n_head']} query / {config['n_kv_head']} key-value heads, trained context {config['sequence_len']} tokens "
             f"(window pattern {config['window_pattern']}), vocabulary {config['vocab_size']}; weights in {config['dtype']}.", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", CARD_DIR,
             "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)  # modeling_speedchat.py",
             "tokenizer = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)  # for the config; the tokenizer is plain",
             "chat = [{'role': 'user', 'content': 'What is 2+3?'}]",
             "ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors='pt', return_dict=True)",
             "out = model.generate(**ids, max_new_tokens=64, do_sample=False)",
             "print(tokenizer.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))",
             "```", "", "In speedchat: `python engine.py chat --source hf:DIR`, `python serve.py --source hf:DIR`, "
             "`python evals.py chat --source hf:DIR`, `python chat_sft.py --stage sft --init-from hf:DIR`.", ""]
    report = tok.home() / "report"
    md = (report / "report.md").read_text() if (report / "report.md").exists() else ""
    keep = [part for part in md.split("\n## ") if part.startswith(("Summary", "Time to GPT-2"))]
    if keep:
        lines += ["## Report card (speedchat's report.md)", ""] + [f"### {part.strip()}" + "\n" for part in keep]
    elif (report / f"{s['source']}.json").exists():
        figures = json.loads((report / f"{s['source']}.json").read_text())
        lines += [f"## Report card ({s['source']})", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in figures.items()
                  if isinstance(v, (int, float, str)) and not isinstance(v, bool)] + [""]
    else:
        lines += ["No report card: this run wrote none (`python evals.py report`).", ""]
    return "\n".join(lines)


def export(source: str, tag, step, out, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """A checkpoint as a folder transformers loads offline (AutoModelForCausalLM with trust_remote_code,
    AutoTokenizer): model.safetensors, config.json, modeling_speedchat.py, the tokenizer files,
    generation_config.json, README.md. Written into a temp folder beside `out`, then renamed: an
    interrupted export leaves nothing at `out`."""
    import train
    out = Path(out)
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype}: use {' or '.join(EXPORT_DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")
    tag = tag or (None if source.startswith("hf:") else train.newest_tag(source))
    model, tokenizer, meta = train.load_model(source, tag, step, "cpu")
    meta = {**meta, "source": meta.get("stage") or source, "tag": tag, "special_ids": tokenizer.specials}
    config = model_config(model, meta, dtype)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = {k: v.to(EXPORT_DTYPES[dtype]) for k, v in model.state_dict().items()}
        save_safetensors(state, tmp / "model.safetensors", {"format": "pt"})
        shutil.copy(Path(__file__).with_name(MODELING_FILE), tmp / MODELING_FILE)
        sp = tokenizer.specials
        files = {"config.json": config, **tokenizer_files(tokenizer, model.max_positions),
                 "generation_config.json": {"bos_token_id": sp["<|bos|>"], "pad_token_id": sp["<|bos|>"],
                                            "eos_token_id": [sp["<|assistant_end|>"], sp["<|bos|>"]],
                                            "do_sample": True, "temperature": 0.6, "top_k": 50}}  # engine.py chat's defaults
        for name, obj in files.items():
            (tmp / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False))
        (tmp / "README.md").write_text(model_card(config, sum(p.numel() for p in model.parameters())))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- the import: hf:DIR

def load_model(folder, device="cpu", tokenizer=None):
    """(train.GPT in eval mode, tok.Tokenizer, meta) from an exported folder (ours, or one fetched from the
    Hub): config.json, model.safetensors and tokenizer.json. Needs nothing beyond speedchat's own
    dependencies. Anything missing or not fitting is a CheckpointError naming the file and what is wrong."""
    import train
    d = Path(folder)
    if not d.is_dir():
        raise train.CheckpointError(f"hf:{folder}: no such folder")
    for name in EXPORT_FILES:
        if not (d / name).is_file():
            raise train.CheckpointError(f"{d / name}: missing (hf:DIR takes a folder `engine.py export` wrote)")
    try:
        config = json.loads((d / "config.json").read_text())
        assert isinstance(config, dict), "not a JSON object"
    except (ValueError, AssertionError) as e:
        raise train.CheckpointError(f"{d / 'config.json'}: unreadable ({e})") from None
    if config.get("model_type") != "speedchat":
        raise train.CheckpointError(f"{d / 'config.json'}: model_type {config.get('model_type')!r}, not a speedchat model")
    fields = [f for f in train.GPTConfig.__dataclass_fields__]
    try:
        gpt_config = train.GPTConfig(**{f: config[f] for f in fields}).validate()
        consts = {"logit_softcap": train.LOGIT_SOFTCAP, "rope_base": train.ROPE_BASE,
                  "rope_context_mult": train.ROPE_CONTEXT_MULT, "ve_gate_channels": train.VE_GATE_CHANNELS}
        for k, v in consts.items():  # train.py's constants: a model made with others would compute something else
            if config.get(k, v) != v:
                raise ValueError(f"{k} {config[k]} (this train.py has {v})")
    except (KeyError, TypeError, ValueError) as e:
        raise train.CheckpointError(f"{d / 'config.json'}: cannot build the model ({type(e).__name__}: {e})") from None
    try:
        folder_tokenizer = tokenizer_from_hf(d / "tokenizer.json")
    except (ValueError, tok.DataError) as e:
        raise train.CheckpointError(f"{d / 'tokenizer.json'}: {e}") from None
    if tokenizer is not None and tokenizer.hash != folder_tokenizer.hash:
        raise ValueError(f"hf:{folder}: its tokenizer ({folder_tokenizer.hash}) is not the one given ({tokenizer.hash})")
    if folder_tokenizer.vocab_size != gpt_config.vocab_size:
        raise train.CheckpointError(f"{d / 'config.json'}: vocab_size {gpt_config.vocab_size}, but tokenizer.json has "
                                    f"{folder_tokenizer.vocab_size} tokens")
    path = d / "model.safetensors"
    try:
        state = load_safetensors(path)
    except (OSError, ValueError) as e:
        raise train.CheckpointError(f"{path}: unreadable ({e})") from None
    model = train.GPT(gpt_config)
    want = model.state_dict()
    for name, t in want.items():  # named one by one: load_state_dict's report is many lines
        if name not in state:
            raise train.CheckpointError(f"{path}: tensor {name!r} missing")
        if tuple(state[name].shape) != tuple(t.shape):
            raise train.CheckpointError(f"{path}: tensor {name!r} has shape {list(state[name].shape)}, the config needs {list(t.shape)}")
    if extra := sorted(set(state) - set(want)):
        raise train.CheckpointError(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} in all): not this architecture")
    model.load_state_dict({k: v.float() for k, v in state.items()})  # fp32 master weights, as every stage keeps them
    s = config.get("speedchat") or {}
    meta = {"step": s.get("step"), "model_config": train.asdict(gpt_config), "tokenizer_hash": folder_tokenizer.hash,
            "source": f"hf:{folder}", "stage": s.get("source"), "hf_dir": str(d.resolve())}
    return model.to(device).eval(), folder_tokenizer, meta
