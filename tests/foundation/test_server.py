import shutil
import time
from pathlib import Path

from fastapi.testclient import TestClient

from appliance.config import load_settings
from appliance.server import create_app


def _wait_ready(client: TestClient, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        r = client.get("/ready")
        body = r.json()
        if r.status_code == 200 or (not body["loading"] and body["error"]):
            return body
        time.sleep(0.2)
    return body


def test_health_at_once_and_not_ready_when_a_model_is_missing(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(load_settings(env={}).models_dir / "manifest.toml", models / "manifest.toml")
    settings = load_settings(env={}, data_dir=tmp_path / "data", models_dir=models)
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").json() == {"status": "ok"}
        body = _wait_ready(client, 30)
        r = client.get("/ready")
        assert r.status_code == 503 and body["ready"] is False
        assert "not installed" in body["error"] and "models install" in body["error"]


def test_not_ready_when_a_model_file_is_corrupt(tmp_path: Path) -> None:
    src = load_settings(env={}).models_dir
    models = tmp_path / "models"
    (models / "vad").mkdir(parents=True)
    shutil.copy(src / "manifest.toml", models / "manifest.toml")
    shutil.copytree(src / "vad" / "silero-vad", models / "vad" / "silero-vad")
    onnx = models / "vad" / "silero-vad" / "silero_vad.onnx"
    data = bytearray(onnx.read_bytes())
    data[500] ^= 0x55
    onnx.write_bytes(bytes(data))
    settings = load_settings(env={}, data_dir=tmp_path / "data", models_dir=models)
    with TestClient(create_app(settings)) as client:
        body = _wait_ready(client, 30)
        assert client.get("/ready").status_code == 503
        assert "silero_vad.onnx" in body["error"] and "sha256" in body["error"]


def test_ready_once_every_default_engine_is_warm(tmp_path: Path) -> None:
    settings = load_settings(env={}, data_dir=tmp_path / "data")
    with TestClient(create_app(settings)) as client:
        body = _wait_ready(client, 300)
        assert client.get("/ready").status_code == 200, body
        loaded = set(body["load_seconds"])
        m = settings.models
        assert {f"vad:{m.vad}", f"asr:{m.asr}", f"llm:{m.llm}", f"tts:{m.tts}", f"embed:{m.embed}"} <= loaded
