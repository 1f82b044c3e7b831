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
import sys
from pathlib import Path


def cut(model: Path, header: Path) -> None:
    # Run here, beside the appliance (``grow``, on the box, needs nothing of it): the header walk is
    # setup's own (``appliance.model_derive``, standard library only).
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from appliance.model_derive import read_layout

    offset = read_layout(model).data_at
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
