"""Configuration: TOML plus environment, validated with errors that name file and key."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from daemon.config import BackoffConfig, load_settings
from daemon.engine.retry import backoff_delay, retry_delay
from daemon.errors import MAX_RETRY_DELAY, ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stoker.toml"
    path.write_text(text)
    return path


def test_environment_overrides_file_with_nested_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        'database_url = "postgresql://file/db"\n'
        "[queues.default]\nconcurrency = 3\nbatch_size = 7\n",
    )
    monkeypatch.setenv("DATABASE_URL", "postgresql://env/db")
    monkeypatch.setenv("STOKER_QUEUES__DEFAULT__CONCURRENCY", "12")
    monkeypatch.setenv("STOKER_LEASE_SECONDS", "9")
    settings = load_settings(path)
    assert settings.database_url == "postgresql://env/db"
    assert settings.queues["default"].concurrency == 12
    assert settings.queues["default"].batch_size == 7  # from the file, kept
    assert settings.lease_seconds == 9


def test_missing_database_url_says_how_to_set_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("STOKER_DATABASE_URL", raising=False)
    with pytest.raises(ConfigError, match="database_url is not set: set DATABASE_URL"):
        load_settings(write(tmp_path, "[queues.default]\n"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[queues."bad name"]\n', "queue name 'bad name' is not valid"),
        ("lease_seconds = 0\n", "lease_seconds: Input should be greater than or equal to 1"),
        ("[queues.default]\nbackoff = { jitter = 2 }\n", "queues.default.backoff.jitter"),
        ('log_format = "xml"\n', "log_format: Input should be 'auto', 'json' or 'text'"),
        ('handler_modules = ["my app"]\n', "'my app' is not a Python module path"),
        ("queues = {}\n", "at least one queue is needed"),
        ("poll = 3\n", "poll: unknown key"),
    ],
)
def test_bad_values_name_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://x/y")
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, text))
    assert expected in str(raised.value)
    assert str(tmp_path / "stoker.toml") in str(raised.value)


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://x/y")
    settings = load_settings(Path(__file__).resolve().parent.parent / "deploy" / "stoker.toml")
    assert "email-high" in settings.queues


def test_backoff_grows_exponentially_within_jitter_and_cap() -> None:
    policy = BackoffConfig(base=1.0, cap=30.0, jitter=0.0)
    assert [backoff_delay(policy, n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    jittered = BackoffConfig(base=10.0, cap=1000.0, jitter=0.2)
    rng = random.Random(1)
    delays = [backoff_delay(jittered, 1, rng) for _ in range(200)]
    assert min(delays) >= 8.0
    assert max(delays) <= 12.0
    assert max(delays) - min(delays) > 1.0  # jitter spreads them
    assert backoff_delay(policy, 10_000) == 30.0


def test_retry_delay_is_the_requested_one_else_the_backoff_and_never_over_a_year() -> None:
    policy = BackoffConfig(base=1, cap=30, jitter=0)
    assert retry_delay(policy, 3, None) == 4
    assert retry_delay(policy, 3, 0.5) == 0.5
    assert retry_delay(policy, 3, 10.0**9) == MAX_RETRY_DELAY
