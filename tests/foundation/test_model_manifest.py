import os
import shutil
from pathlib import Path

import pytest

from appliance.config import load_settings
from appliance.model_install import install_models
from appliance.model_manifest import (
    STAMP_NAME,
    Manifest,
    ModelCorrupt,
    ModelNotInstalled,
    UnknownModel,
    verify_files,
)

PROJECT_MODELS = load_settings(env={}).models_dir


@pytest.fixture
def tmp_models(tmp_path: Path) -> Path:
    shutil.copy(PROJECT_MODELS / "manifest.toml", tmp_path / "manifest.toml")
    return tmp_path


def test_manifest_lists_every_role_and_default_set() -> None:
    m = Manifest.load(PROJECT_MODELS)
    roles = {s.role for s in m if s.default}
    assert roles == {"vad", "asr", "llm", "tts", "embed"}
    for spec in m:
        assert spec.sources and all(src.version for src in spec.sources)
        assert all(len(f.sha256) == 64 and f.size > 0 for f in spec.files)


def test_unknown_model_id_is_a_clear_error() -> None:
    m = Manifest.load(PROJECT_MODELS)
    with pytest.raises(UnknownModel, match="openai/whisper-large"):
        m.path("openai/whisper-large", "asr")
    with pytest.raises(UnknownModel, match="unknown llm model"):
        m.get("whisper-tiny.en", "llm")  # right id, wrong role


def test_not_installed_names_the_install_command(tmp_models: Path) -> None:
    m = Manifest.load(tmp_models)
    with pytest.raises(ModelNotInstalled, match="models install silero-vad"):
        m.path("silero-vad", "vad")


def test_install_verifies_and_second_run_skips(tmp_models: Path) -> None:
    m = Manifest.load(tmp_models)
    lines: list[str] = []
    install_models(m, ["silero-vad"], progress=lines.append)
    path = m.path("silero-vad", "vad")
    assert (path / "silero_vad.onnx").stat().st_size == m.get("silero-vad").files[0].size
    assert (path / STAMP_NAME).exists()
    assert any("done" in line for line in lines)
    lines.clear()
    install_models(m, ["silero-vad"], progress=lines.append)
    assert lines == [lines[0]] and "already installed" in lines[0]


def test_corrupt_or_truncated_file_is_detected_and_named(tmp_models: Path) -> None:
    m = Manifest.load(tmp_models)
    install_models(m, ["silero-vad"], progress=lambda _: None)
    spec = m.get("silero-vad")
    target = spec.directory(tmp_models) / "silero_vad.onnx"
    # same size, one flipped byte: only the hash can tell
    data = bytearray(target.read_bytes())
    data[1000] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ModelCorrupt, match=r"silero_vad\.onnx.*sha256"):
        verify_files(spec, target.parent)
    target.write_bytes(bytes(data[:-10]))
    with pytest.raises(ModelCorrupt, match=r"silero_vad\.onnx.*bytes"):
        m.path("silero-vad")
    target.unlink()
    with pytest.raises(ModelNotInstalled):
        m.path("silero-vad")
    # a bad copy is replaced by the installer
    install_models(m, ["silero-vad"], progress=lambda _: None)
    assert m.path("silero-vad").exists()


def test_unchanged_file_is_not_rehashed(tmp_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = Manifest.load(tmp_models)
    install_models(m, ["silero-vad"], progress=lambda _: None)
    calls: list[Path] = []
    import appliance.model_manifest as mm

    real = mm.sha256_file
    monkeypatch.setattr(mm, "sha256_file", lambda p: calls.append(p) or real(p))
    m.path("silero-vad")
    assert calls == []
    target = m.get("silero-vad").directory(tmp_models) / "silero_vad.onnx"
    os.utime(target, ns=(1, 1))  # touched: must be re-verified once
    m.path("silero-vad")
    assert calls == [target]
