"""The models manifest (``models/manifest.toml``): which models exist, where their files come from,
and whether the installed copies under ``models/<role>/<id>/`` are complete and intact.

Nothing here downloads. A model that is asked for but not installed raises :class:`ModelNotInstalled`
naming the install command; a file whose size or sha256 does not match raises :class:`ModelCorrupt`
naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Role = Literal["vad", "asr", "llm", "tts", "embed"]
ROLES: tuple[Role, ...] = ("vad", "asr", "llm", "tts", "embed")
STAMP_NAME = ".verified.json"

log = logging.getLogger(__name__)


class ModelError(Exception):
    """Base class for model problems; messages are meant for the operator."""


class UnknownModel(ModelError):
    pass


class ModelNotInstalled(ModelError):
    pass


class ModelCorrupt(ModelError):
    pass


@dataclass(frozen=True)
class PackageSource:
    package: str
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelFile:
    name: str
    parts: tuple[str, ...]  # paths inside the installed packages, concatenated in order
    sha256: str
    size: int


@dataclass(frozen=True)
class DerivedFile:
    """A file the model's setup makes from one of its package files (``model_derive``): ``source``
    with the tensors whose names match ``tensors`` requantized to ``quantize``. ``sha256`` and
    ``size`` are what that makes on x86-64; a copy that comes out different is not kept, and the
    package file is loaded instead."""

    name: str
    source: str
    quantize: str
    tensors: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelSpec:
    id: str
    role: Role
    description: str
    sources: tuple[PackageSource, ...]
    files: tuple[ModelFile, ...]
    params: dict[str, Any] = field(default_factory=dict)
    default: bool = False
    derived: tuple[DerivedFile, ...] = ()

    def directory(self, models_dir: Path) -> Path:
        return models_dir / self.role / self.id

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def sha256_file(path: Path, chunk: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Manifest:
    """All models the appliance knows, read from ``<models_dir>/manifest.toml``."""

    def __init__(self, models_dir: Path, specs: list[ModelSpec]):
        self.models_dir = models_dir
        self._specs = {s.id: s for s in specs}

    @classmethod
    def load(cls, models_dir: Path) -> Manifest:
        path = models_dir / "manifest.toml"
        if not path.exists():
            raise ModelError(f"models manifest not found: {path}")
        raw = tomllib.loads(path.read_text())
        specs = []
        for entry in raw.get("model", []):
            role = entry["role"]
            if role not in ROLES:
                raise ModelError(f"{path}: model {entry.get('id')!r} has unknown role {role!r}")
            specs.append(
                ModelSpec(
                    id=entry["id"],
                    role=role,
                    description=entry.get("description", ""),
                    sources=tuple(PackageSource(s["package"], s["version"]) for s in entry["sources"]),
                    files=tuple(
                        ModelFile(f["name"], tuple(f["parts"]), f["sha256"], int(f["size"]))
                        for f in entry["files"]
                    ),
                    params=dict(entry.get("params", {})),
                    default=bool(entry.get("default", False)),
                    derived=tuple(
                        DerivedFile(
                            d["name"], d["from"], d["quantize"], d["tensors"], d["sha256"], int(d["size"])
                        )
                        for d in entry.get("derived", [])
                    ),
                )
            )
        return cls(models_dir, specs)

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def get(self, model_id: str, role: Role | None = None) -> ModelSpec:
        spec = self._specs.get(model_id)
        if spec is None or (role is not None and spec.role != role):
            known = ", ".join(s.id for s in self._specs.values() if role is None or s.role == role)
            what = f"{role} model" if role else "model"
            raise UnknownModel(f"unknown {what} {model_id!r}; known: {known}")
        return spec

    def is_installed(self, spec: ModelSpec) -> bool:
        directory = spec.directory(self.models_dir)
        return all((directory / f.name).is_file() for f in spec.files)

    def installed(self, role: Role | None = None) -> list[ModelSpec]:
        return [s for s in self if (role is None or s.role == role) and self.is_installed(s)]

    def path(self, model_id: str, role: Role | None = None, *, verify: bool = True) -> Path:
        """Directory of an installed model, checked against the manifest (sizes and sha256)."""
        spec = self.get(model_id, role)
        directory = spec.directory(self.models_dir)
        if not self.is_installed(spec):
            raise ModelNotInstalled(
                f"model {spec.id!r} ({spec.role}) is not installed under {directory}; "
                f"run: python -m appliance models install {spec.id}"
            )
        if verify:
            verify_files(spec, directory)
        return directory

    def weights(
        self, model_id: str, role: Role | None = None, *, derived: bool = True, verify: bool = True
    ) -> Path:
        """The file to load of an installed model (see :func:`weights_file`)."""
        directory = self.path(model_id, role, verify=verify)
        return weights_file(self.get(model_id, role), directory, derived=derived)


def read_stamp(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / STAMP_NAME).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_stamp(spec: ModelSpec, directory: Path) -> None:
    """Record the verified files (package files, and derived files present) by size and mtime."""
    stamp = {}
    for name, sha256 in [(f.name, f.sha256) for f in spec.files] + [(d.name, d.sha256) for d in spec.derived]:
        path = directory / name
        if path.is_file():
            st = path.stat()
            stamp[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    (directory / STAMP_NAME).write_text(json.dumps(stamp, indent=1))


def check_file(spec: ModelSpec, path: Path, size: int, sha256: str, stamp: dict[str, Any]) -> bool:
    """Raise unless ``path`` has ``size`` bytes and ``sha256``; True when it had to be rehashed. The
    full hash is skipped when the file is unchanged since it was last verified (same size and
    mtime as the stamp), so start-up does not rehash 500 MB."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelNotInstalled(
            f"model file missing: {path}; run: python -m appliance models install {spec.id}"
        ) from None
    if st.st_size != size:
        raise ModelCorrupt(
            f"model file {path} has {st.st_size} bytes, manifest says {size}; "
            f"reinstall with: python -m appliance models install --force {spec.id}"
        )
    seen = stamp.get(path.name, {})
    if (seen.get("size"), seen.get("mtime_ns"), seen.get("sha256")) == (st.st_size, st.st_mtime_ns, sha256):
        return False
    actual = sha256_file(path)
    if actual != sha256:
        raise ModelCorrupt(
            f"model file {path} has sha256 {actual}, manifest says {sha256}; "
            f"reinstall with: python -m appliance models install --force {spec.id}"
        )
    return True


def verify_files(spec: ModelSpec, directory: Path) -> None:
    """Check every package file's size and sha256 (see ``_check_file``)."""
    stamp = read_stamp(directory)
    rehashed = False
    for f in spec.files:
        rehashed |= check_file(spec, directory / f.name, f.size, f.sha256, stamp)
    if rehashed:
        write_stamp(spec, directory)


def weights_file(spec: ModelSpec, directory: Path, *, derived: bool = True) -> Path:
    """The file to load from a verified model directory: with ``derived``, the first derived file
    that is installed and intact, else the first package file. A damaged derived file is passed
    over with a warning: the package file it was made from serves as well, only slower."""
    if derived:
        stamp = read_stamp(directory)
        for d in spec.derived:
            path = directory / d.name
            if not path.is_file():
                continue
            try:
                if check_file(spec, path, d.size, d.sha256, stamp):
                    write_stamp(spec, directory)
            except ModelCorrupt as exc:
                log.warning("%s; loading %s instead", exc, spec.files[0].name)
                continue
            return path
    return directory / spec.files[0].name
