"""Configuration files layered key by key, `${VAR}` references resolved from the environment,
durations written with units, and the new handler sections validated with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import default_config_paths, load_settings
from daemon.errors import ConfigError
from tests.conftest import stoker_cli

BASE = """
database_url = "postgresql://x/y"
lease_seconds = 30

[queues.default]
concurrency = 3
batch_size = 7

[queues.email]
concurrency = 2

[schedules.report]
cron = "0 18 * * *"
timezone = "America/New_York"
kind = "log"
payload = { message = "base", level = "info" }
"""

DEMO = """
lease_seconds = 10

[queues.default]
concurrency = 9

[schedules.report]
cron = "* * * * *"
payload = { message = "demo" }

[schedules.extra]
cron = "*/5 * * * *"
kind = "log"
"""


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("DATABASE_URL", "STOKER_CONFIG", "RETENTION", "ADMINS", "UNSET_ONE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def files(tmp_path: Path, *texts: str) -> list[Path]:
    paths = []
    for index, text in enumerate(texts):
        path = tmp_path / f"layer{index}.toml"
        path.write_text(text)
        paths.append(path)
    return paths


def test_a_later_file_overrides_an_earlier_one_key_by_key(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    settings = load_settings(files(tmp_path, BASE, DEMO))
    assert settings.lease_seconds == 10
    assert settings.queues["default"].concurrency == 9
    assert settings.queues["default"].batch_size == 7  # kept from the base
    assert settings.queues["email"].concurrency == 2  # a table only the base has
    report = settings.schedules["report"]
    assert (report.cron, report.timezone) == ("* * * * *", "America/New_York")
    # A payload is one value, the handler's argument: replaced whole, never merged.
    assert report.payload == {"message": "demo"}
    assert set(settings.schedules) == {"report", "extra"}


def test_the_environment_still_wins_over_every_file(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("STOKER_QUEUES__DEFAULT__CONCURRENCY", "21")
    settings = load_settings(files(tmp_path, BASE, DEMO))
    assert settings.queues["default"].concurrency == 21


def test_a_bad_value_names_the_file_that_set_it(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    base, demo = files(tmp_path, BASE, "[queues.email]\nconcurrency = 0\n")
    with pytest.raises(ConfigError) as raised:
        load_settings([base, demo])
    assert f"{demo}: queues.email.concurrency: Input should be greater than" in str(raised.value)


def test_references_are_resolved_from_the_environment_with_defaults(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("RETENTION", "730")
    clean_env.setenv("ADMINS", "a@example.com, b@example.com")
    paths = files(
        tmp_path,
        BASE
        + """
[sql_tasks.voucher_audit_archival]
statement = "DELETE FROM v WHERE created_at < now() - make_interval(days => :days)"
params = { days = "${RETENTION}", grace = "${UNSET_ONE:-7}", note = "costs $${PRICE}" }

[reports.sales]
query = "SELECT 1"
to = "${ADMINS}"
""",
        '[schedules.report]\nenabled = "${UNSET_ONE:-false}"\n',
    )
    settings = load_settings(paths)
    params = settings.sql_tasks["voucher_audit_archival"].params
    assert params == {"days": "730", "grace": "7", "note": "costs ${PRICE}"}
    assert settings.reports["sales"].to == ["a@example.com", "b@example.com"]
    assert settings.schedules["report"].enabled is False


def test_an_unset_variable_without_default_is_named_with_its_key(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    base, demo = files(
        tmp_path,
        BASE,
        '[commands.finalize]\nargv = ["npm", "run", "job"]\nenv = { TOKEN = "${UNSET_ONE}" }\n',
    )
    with pytest.raises(ConfigError) as raised:
        load_settings([base, demo])
    message = str(raised.value)
    assert f"{demo}: commands.finalize.env.TOKEN: environment variable UNSET_ONE is not set" in (
        message
    )
    assert "${UNSET_ONE:-default}" in message


def test_a_malformed_reference_is_named(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    (path,) = files(tmp_path, BASE + '[email]\nsender = "${not a name}"\n')
    with pytest.raises(ConfigError, match=r"email.sender: \$\{not a name\} is not a variable"):
        load_settings(path)


@pytest.mark.parametrize(
    ("written", "seconds"),
    [(90, 90.0), ("90", 90.0), ("90s", 90.0), ("5m", 300.0), ("2h", 7200.0), ("1.5d", 129600.0)],
)
def test_durations_take_units(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, written: object, seconds: float
) -> None:
    value = f'"{written}"' if isinstance(written, str) else str(written)
    (path,) = files(tmp_path, BASE + f'[commands.x]\nargv = ["true"]\ntimeout = {value}\n')
    assert load_settings(path).commands["x"].timeout == seconds


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ('[commands.x]\nargv = ["true"]\ntimeout = "5 minutes"\n', "commands.x.timeout"),
        ("[commands.x]\nargv = []\n", "commands.x.argv"),
        ('[commands.x]\nargv = ["true"]\npermanent_exit_codes = [0]\n', "exit code 0"),
        ('[commands.X]\nargv = ["true"]\n', "commands name 'X' is not valid"),
        ('[file_tasks.t]\ndirectory = "/tmp"\n', "a directory sweep needs older_than"),
        ('[file_tasks.t]\nquery = "SELECT 1"\n', "needs delete_statement and root"),
        ('[reports.r]\nquery = "SELECT 1"\n', "reports.r.to"),
    ],
)
def test_new_sections_name_the_bad_key(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, section: str, expected: str
) -> None:
    (path,) = files(tmp_path, BASE + section)
    with pytest.raises(ConfigError, match="invalid configuration") as raised:
        load_settings(path)
    assert expected in str(raised.value)


def test_the_cli_layers_repeated_config_flags(dsn: str, tmp_path: Path) -> None:
    base, demo = files(tmp_path, BASE.replace('database_url = "postgresql://x/y"\n', ""), DEMO)
    out = stoker_cli(dsn, "--config", str(base), "--config", str(demo), "schedules")
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    assert "* * * * *" in lines["report"] and "America/New_York" in lines["report"]
    assert "extra" in lines
    out = stoker_cli(dsn, "--config", str(base), "schedules")
    assert "0 18 * * *" in out.stdout and "extra" not in out.stdout


def test_stoker_config_names_several_files_in_order(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    base, demo = files(tmp_path, BASE, DEMO)
    clean_env.setenv("STOKER_CONFIG", f"{base}:{demo}")
    assert default_config_paths() == [base, demo]
    assert load_settings(default_config_paths()).lease_seconds == 10
