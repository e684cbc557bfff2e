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
