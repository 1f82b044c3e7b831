"""Cut a GGUF model down to its header, or grow a header back into a same-shaped model.

A GPU box lent for measurements can neither download the appliance's models nor receive more than a
few tens of MiB. The speed of a llama.cpp forward pass depends on the tensors' shapes and quantization
types, not on their values, so the box gets only the header (metadata, tokenizer, tensor table: ~6 MB
for Qwen2.5-0.5B) and fills the data region, of the original length, with zeros: random bytes would
make some fp16 scales NaN or denormal, which slows CPU kernels (measured: 24 against 32 tokens/s), while
zeros run at the real model's speed:

    python3 scripts/gpu/skeleton_gguf.py cut models/llm/qwen2.5-coder-0.5b/model.gguf .gpu/qwen.header
    python3 scripts/gpu/skeleton_gguf.py grow .gpu/qwen.header /tmp/qwen-zero.gguf

The grown model produces nonsense; use it for timing only. Needs only the standard library.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"GGUF"
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_ALIGNMENT_KEY = "general.alignment"


def _read(stream: BinaryIO, fmt: str) -> int:
    size = struct.calcsize(fmt)
    data = stream.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return int(struct.unpack(fmt, data)[0])


def _read_string(stream: BinaryIO) -> bytes:
    return stream.read(_read(stream, "<Q"))


def _skip_value(stream: BinaryIO, value_type: int) -> int | None:
    """Skip one metadata value; return it when it is a uint32 (for the alignment key)."""
    if value_type == _STRING:
        _read_string(stream)
        return None
    if value_type == _ARRAY:
        item_type = _read(stream, "<I")
        count = _read(stream, "<Q")
        if item_type in _FIXED_SIZES:
            stream.seek(_FIXED_SIZES[item_type] * count, 1)
        else:
            for _ in range(count):
                _skip_value(stream, item_type)
        return None
    if value_type == 4:
        return _read(stream, "<I")
    stream.seek(_FIXED_SIZES[value_type], 1)
    return None


def data_offset(path: Path) -> int:
    """Byte offset of the tensor data region: the header's end, rounded up to the alignment."""
    with path.open("rb") as stream:
        if stream.read(4) != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        version = _read(stream, "<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        tensor_count = _read(stream, "<Q")
        kv_count = _read(stream, "<Q")
        alignment = 32
        for _ in range(kv_count):
            key = _read_string(stream).decode()
            value = _skip_value(stream, _read(stream, "<I"))
            if key == _ALIGNMENT_KEY and value:
                alignment = value
        for _ in range(tensor_count):
            _read_string(stream)
            dims = _read(stream, "<I")
            stream.seek(8 * dims + 4 + 8, 1)
        end = stream.tell()
    return (end + alignment - 1) // alignment * alignment


def cut(model: Path, header: Path) -> None:
    offset = data_offset(model)
    total = model.stat().st_size
    with model.open("rb") as source:
        header.write_bytes(source.read(offset))
    header.with_suffix(".json").write_text(json.dumps({"header_bytes": offset, "total_bytes": total}))
    print(f"{header}: {offset} header bytes of {total}")


def grow(header: Path, model: Path) -> None:
    sizes = json.loads(header.with_suffix(".json").read_text())
    remaining = sizes["total_bytes"] - sizes["header_bytes"]
    zeros = bytes(64 << 20)
    with model.open("wb") as target:
        target.write(header.read_bytes())
        while remaining:  # written out, not sparse: the load then reads real pages, as with a model
            chunk = min(remaining, len(zeros))
            target.write(zeros[:chunk])
            remaining -= chunk
    print(f"{model}: {sizes['total_bytes']} bytes, tensor data all zeros")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cut_parser = sub.add_parser("cut", help="write a model's header (and its sizes beside it)")
    cut_parser.add_argument("model", type=Path)
    cut_parser.add_argument("header", type=Path)
    grow_parser = sub.add_parser("grow", help="write a same-shaped model with all-zero tensor data")
    grow_parser.add_argument("header", type=Path)
    grow_parser.add_argument("model", type=Path)
    args = parser.parse_args(argv)
    if args.command == "cut":
        cut(args.model, args.header)
    else:
        grow(args.header, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
