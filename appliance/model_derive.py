"""Files a model's setup makes from its verified package files: a GGUF with some tensors requantized.

Why: on an x86 CPU with AVX2, llama.cpp repacks IQ4_NL (and Q4_0) weights into 8-row interleaved
blocks whose kernels decode several sequences in one pass. The default LLM's packaged file stores
most matrices as q5_0, Q4_K and Q6_K, which on this CPU are computed row by row for every sequence.
The same file with its feed-forward up and gate projections (59% of its matrix weights) requantized
to IQ4_NL decodes one token 10-20% faster and 2-4 sequences together 25-33% faster, with the same or
better ``scripts/bench_brain`` accuracy (docs/capacity.md). Requantizing every tensor (attention too)
lost a fifth of the right tool calls, and ``ffn_down`` too broke the seed's order-status scenario, so
the recipe names its tensors.

How: llama.cpp's own ``llama_model_quantize`` requantizes a scratch copy of the whole file, and the
chosen tensors are spliced from it into a copy of the packaged file (:func:`splice`); everything
else, metadata included, is copied byte for byte. Nothing is downloaded.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .model_manifest import DerivedFile, ModelError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml type id -> (elements per block, bytes per block), for the types a GGUF LLM file holds.
GGML_TYPES: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    20: (32, 18),  # IQ4_NL
    30: (1, 2),  # BF16
}
# llama_ftype for ``llama_model_quantize``, by the type name a recipe uses.
QUANTIZE_FTYPES = {"Q4_0": 2, "Q8_0": 7, "IQ4_NL": 25}

# GGUF metadata value types: fixed sizes, 8 = string, 9 = array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4

Progress = Callable[[str], None]


class GgufError(ModelError):
    """A file is not a GGUF this module can read, or two files do not hold the same tensors."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section

    @property
    def nbytes(self) -> int:
        block = GGML_TYPES.get(self.ggml_type)
        if block is None:
            raise GgufError(f"tensor {self.name}: ggml type {self.ggml_type} is not supported here")
        elements, size = block
        if self.dims[0] % elements:
            raise GgufError(f"tensor {self.name}: row of {self.dims[0]} is not whole blocks of {elements}")
        return math.prod(self.dims) // elements * size


@dataclass(frozen=True)
class GgufLayout:
    """Where things are in a GGUF file: the metadata ends at ``infos_at``, the data starts at
    ``data_at``."""

    version: int
    tensors: tuple[TensorInfo, ...]
    alignment: int
    infos_at: int
    data_at: int


def _read(fh: BinaryIO, fmt: str) -> tuple[int, ...]:
    size = struct.calcsize(fmt)
    raw = fh.read(size)
    if len(raw) != size:
        raise GgufError("file ends inside its header")
    return struct.unpack(fmt, raw)


def _read_string(fh: BinaryIO) -> bytes:
    (length,) = _read(fh, "<Q")
    if length > 1 << 24:
        raise GgufError(f"implausible string length {length}")
    raw = fh.read(length)
    if len(raw) != length:
        raise GgufError("file ends inside a string")
    return raw


def _skip_value(fh: BinaryIO, value_type: int) -> None:
    if value_type == _STRING:
        _read_string(fh)
    elif value_type == _ARRAY:
        item_type, count = _read(fh, "<IQ")
        if item_type in _SCALAR_SIZES:
            fh.seek(_SCALAR_SIZES[item_type] * count, 1)
        else:
            for _ in range(count):
                _skip_value(fh, item_type)
    elif value_type in _SCALAR_SIZES:
        fh.seek(_SCALAR_SIZES[value_type], 1)
    else:
        raise GgufError(f"unknown metadata value type {value_type}")


def read_layout(path: Path) -> GgufLayout:
    with path.open("rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise GgufError(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = _read(fh, "<IQQ")
        if version < 2:
            raise GgufError(f"{path}: GGUF version {version} is too old")
        alignment = DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = _read_string(fh)
            (value_type,) = _read(fh, "<I")
            if key == b"general.alignment" and value_type == _UINT32:
                (alignment,) = _read(fh, "<I")
            else:
                _skip_value(fh, value_type)
        infos_at = fh.tell()
        tensors = []
        for _ in range(n_tensors):
            name = _read_string(fh).decode("utf-8")
            (n_dims,) = _read(fh, "<I")
            dims = _read(fh, f"<{n_dims}Q")
            ggml_type, offset = _read(fh, "<IQ")
            tensors.append(TensorInfo(name, tuple(dims), ggml_type, offset))
        data_at = _aligned(fh.tell(), alignment)
    return GgufLayout(version, tuple(tensors), alignment, infos_at, data_at)


def _aligned(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _copy_range(src: BinaryIO, dst: BinaryIO, start: int, length: int) -> None:
    src.seek(start)
    left = length
    while left:
        block = src.read(min(left, 8 << 20))
        if not block:
            raise GgufError("file ends inside a tensor")
        dst.write(block)
        left -= len(block)


def splice(base: Path, donor: Path, out: Path, pattern: str) -> list[str]:
    """Write ``out``: ``base`` with every tensor whose name matches ``pattern`` taken from ``donor``
    (same name and shape, any type). Metadata is copied as it is. Returns the names replaced."""
    chosen = re.compile(pattern)
    layout, donor_layout = read_layout(base), read_layout(donor)
    donors = {t.name: t for t in donor_layout.tensors}
    plan: list[tuple[TensorInfo, Path, int]] = []  # the tensor as written, its file, where its bytes are
    replaced = []
    for tensor in layout.tensors:
        if chosen.search(tensor.name):
            other = donors.get(tensor.name)
            if other is None or other.dims != tensor.dims:
                raise GgufError(f"{donor} has no tensor {tensor.name} of shape {tensor.dims}")
            plan.append((other, donor, donor_layout.data_at + other.offset))
            replaced.append(tensor.name)
        else:
            plan.append((tensor, base, layout.data_at + tensor.offset))
    if not replaced:
        raise GgufError(f"no tensor of {base} matches {pattern!r}")
    with base.open("rb") as src, donor.open("rb") as other_src, out.open("wb") as dst:
        _copy_range(src, dst, 0, layout.infos_at)  # header and metadata, byte for byte
        offset = 0
        for tensor, _, _ in plan:
            dst.write(struct.pack("<Q", len(tensor.name.encode())) + tensor.name.encode())
            dst.write(struct.pack(f"<I{len(tensor.dims)}Q", len(tensor.dims), *tensor.dims))
            dst.write(struct.pack("<IQ", tensor.ggml_type, offset))
            offset = _aligned(offset + tensor.nbytes, layout.alignment)
        _pad(dst, dst.tell(), layout.alignment)
        data_at = dst.tell()
        for tensor, path, at in plan:
            _copy_range(src if path == base else other_src, dst, at, tensor.nbytes)
            _pad(dst, dst.tell() - data_at, layout.alignment)
    return replaced


def _pad(dst: BinaryIO, position: int, alignment: int) -> None:
    dst.write(b"\0" * (_aligned(position, alignment) - position))


def requantize(source: Path, out: Path, type_name: str, *, threads: int = 0) -> None:
    """The whole of ``source`` requantized to ``type_name`` by llama.cpp (where a tensor's shape does
    not allow it, llama.cpp picks a fallback type itself)."""
    ftype = QUANTIZE_FTYPES.get(type_name)
    if ftype is None:
        raise ModelError(f"cannot requantize to {type_name!r}; known: {', '.join(QUANTIZE_FTYPES)}")
    import llama_cpp  # heavy, and only setup needs it here

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = threads
    # llama.cpp logs a line (or two) per tensor through llama-cpp-python's logger: silenced.
    native_log = logging.getLogger("llama-cpp-python")
    level = native_log.level
    native_log.setLevel(logging.CRITICAL + 1)
    try:
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    finally:
        native_log.setLevel(level)
    if code != 0:
        raise ModelError(f"llama.cpp could not requantize {source} to {type_name} (code {code})")


def derive(derived: DerivedFile, directory: Path, out: Path, progress: Progress) -> None:
    """Make ``derived`` from its source file in ``directory``, written to ``out``."""
    source = directory / derived.source
    with tempfile.TemporaryDirectory(prefix=".derive-", dir=out.parent) as tmp:
        whole = Path(tmp) / "requantized.gguf"
        progress(f"    requantizing {derived.source} to {derived.quantize} (a minute or two) ...")
        requantize(source, whole, derived.quantize)
        replaced = splice(source, whole, out, derived.tensors)
        progress(f"    {derived.name}: {len(replaced)} tensors as {derived.quantize}, the rest as packaged")
