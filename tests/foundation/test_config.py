from pathlib import Path

import pytest

from appliance.config import ConfigError, load_settings


def test_defaults_from_project_config() -> None:
    s = load_settings(env={})
    assert s.host == "127.0.0.1" and s.port == 8000
    assert s.models.llm == "qwen2.5-coder-0.5b"
    assert s.data_dir.is_absolute() and s.models_dir.is_absolute()
    assert s.resolved_database_url.startswith("sqlite+aiosqlite:///")


def test_env_overrides_top_level_and_section_keys(tmp_path: Path) -> None:
    s = load_settings(
        env={
            "APPLIANCE_PORT": "9123",
            "APPLIANCE_HOST": "0.0.0.0",
            "APPLIANCE_MODELS_LLM": "smollm2-135m",
            "APPLIANCE_THREADS_ASR": "3",
            "APPLIANCE_DATA_DIR": str(tmp_path),
        }
    )
    assert (s.port, s.host) == (9123, "0.0.0.0")
    assert s.models.llm == "smollm2-135m" and s.threads.asr == 3
    assert s.data_dir == tmp_path


def test_bad_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="port"):
        load_settings(env={"APPLIANCE_PORT": "not-a-number"})
    cfg = tmp_path / "c.toml"
    cfg.write_text("[threads]\nasr = 2\nbogus = 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_settings(cfg, env={})
    cfg.write_text("port = [unclosed\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(cfg, env={})


def test_relative_paths_resolve_against_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('data_dir = "here"\n')
    s = load_settings(cfg, env={})
    assert s.data_dir == (tmp_path / "here").resolve()
