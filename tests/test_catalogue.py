"""The seed catalogue (deploy/stoker.toml) and its demo layer (deploy/demo.toml, demo.sql):
every seed job is there with its team's cadence and zone, and every one of them does its
work on the demo tables when it runs, in a real daemon started as `make run` starts it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from daemon.config import Settings, load_settings
from tests.conftest import REPO, DaemonFactory, eventually

CATALOGUE = REPO / "deploy" / "stoker.toml"
DEMO = REPO / "deploy" / "demo.toml"

# SEEDS.md, job by job: schedule name -> (cron, zone, handler). Zones the teams did not state
# are UTC (team D runs everything in UTC).
SEED_JOBS = {
    # A. NestJS shop
    "voucher_expiry": ("0 2 * * *", "UTC", "sql.batch"),
    "voucher_audit_archival": ("15 4 * * *", "UTC", "sql.batch"),
    # B. Multi-tenant SaaS: hourly storage cleanup (expired uploads, temporary files)
    "storage_cleanup": ("0 * * * *", "UTC", "files.cleanup"),
    "storage_temporary_files_cleanup": ("0 * * * *", "UTC", "files.cleanup"),
    # C. Sim-racing shop
    "wishlist_sale_check": ("0 * * * *", "America/New_York", "wishlist.sale_check"),
    "wishlist_stock_check": ("*/30 * * * *", "America/New_York", "wishlist.stock_check"),
    # D. Community marketplace: the seven retention jobs
    "invitations_cleanup": ("0 2 * * *", "UTC", "sql.batch"),
    "push_tokens_cleanup": ("30 2 * * *", "UTC", "sql.batch"),
    "audit_logs_anonymisation": ("0 3 * * *", "UTC", "sql.batch"),
    "audit_logs_deletion": ("30 3 * * 0", "UTC", "sql.batch"),
    "orphaned_files_cleanup": ("0 4 * * *", "UTC", "files.cleanup"),
    "deletions_finalization": ("30 4 * * *", "UTC", "command.run"),
    "karma_recalculation": ("0 5 * * 0", "UTC", "sql.batch"),
    # E. Jewellery shop
    "expired_inventory_locks": ("*/5 * * * *", "UTC", "sql.batch"),
    "low_stock_alert": ("0 * * * *", "UTC", "sql.report"),
    "stale_payments_recheck": ("*/10 * * * *", "UTC", "http.request"),
    "password_reset_tokens_cleanup": ("0 * * * *", "UTC", "sql.batch"),
    "read_notifications_cleanup": ("0 2 * * *", "UTC", "sql.batch"),
    "daily_sales_report": ("0 18 * * *", "UTC", "sql.report"),
    "unverified_users_cleanup": ("0 3 1 * *", "UTC", "sql.batch"),
}

# Where each handler finds the entry a payload names.
SECTIONS: dict[str, tuple[str, str | None]] = {
    "sql.batch": ("task", "sql_tasks"),
    "files.cleanup": ("task", "file_tasks"),
    "sql.report": ("report", "reports"),
    "command.run": ("command", "commands"),
}


def clean_environment(monkeypatch: pytest.MonkeyPatch, demo_dir: Path) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://catalogue@localhost/check")
    monkeypatch.setenv("DEMO_DIR", str(demo_dir))
    for name in list(os.environ):
        if name.startswith(("STOKER_", "WISHLIST_", "VOUCHER_")):
            monkeypatch.delenv(name)


def catalogue(demo: bool, monkeypatch: pytest.MonkeyPatch, demo_dir: Path) -> Settings:
    clean_environment(monkeypatch, demo_dir)
    return load_settings([CATALOGUE, DEMO] if demo else [CATALOGUE])


def test_every_seed_job_is_in_the_catalogue_with_its_cadence_and_zone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = catalogue(False, monkeypatch, tmp_path)
    found = {
        name: (s.cron, s.timezone, s.kind) for name, s in settings.schedules.items() if s.enabled
    }
    assert found == SEED_JOBS
    for name, schedule in settings.schedules.items():
        assert schedule.description[:3] in {"[A]", "[B]", "[C]", "[D]", "[E]"}, name
        key, section = SECTIONS.get(schedule.kind, ("", None))
        if section is not None:
            entry = schedule.payload[key]
            assert entry in getattr(settings, section), f"{name}: no [{section}.{entry}]"
        elif schedule.kind == "http.request":
            assert schedule.payload["target"] in settings.webhooks.targets, name
    assert settings.webhooks.targets["payments_recheck"].url.startswith("http://127.0.0.1:3000")
    assert settings.sql_tasks["voucher_audit_archival"].params == {"retention_days": "730"}


def test_the_teams_switches_and_retention_come_from_their_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("WISHLIST_SALE_CHECK_ENABLED", "false")
    monkeypatch.setenv("VOUCHER_AUDIT_RETENTION_DAYS", "90")
    settings = load_settings([CATALOGUE])
    assert settings.schedules["wishlist_sale_check"].enabled is False
    assert settings.schedules["wishlist_stock_check"].enabled is True
    assert settings.sql_tasks["voucher_audit_archival"].params == {"retention_days": "90"}


def test_the_demo_layer_keeps_production_cadences_and_adds_minutely_demo_schedules(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = catalogue(True, monkeypatch, tmp_path)
    for name, (cron, zone, _) in SEED_JOBS.items():
        schedule = settings.schedules[name]
        assert (schedule.cron, schedule.timezone) == (cron, zone), name
    demo = {n: s for n, s in settings.schedules.items() if n.startswith("demo_")}
    assert {s.kind for s in demo.values()} >= {"command.run", "sql.report", "sql.batch"}
    assert {s.kind for s in demo.values()} >= {"files.cleanup"}
    assert all(s.cron == "* * * * *" for s in demo.values())
    # No shop application runs in the demo: its payment recheck runs the stand-in script.
    assert settings.schedules["stale_payments_recheck"].payload == {
        "command": "stale_payments_recheck"
    }


@pytest.fixture
async def demo_db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.execute((REPO / "deploy" / "demo.sql").read_text())
    try:
        yield conn
    finally:
        await conn.close()


def demo_environment(tmp: Path) -> dict[str, str]:
    return {"DEMO_DIR": str(tmp / "demo"), "STOKER_EMAIL__OUTBOX": str(tmp / "outbox")}


def make_demo_files(daemons: DaemonFactory) -> None:
    subprocess.run(
        [sys.executable, "deploy/demo/make_files.py", str(daemons.tmp / "demo")],
        cwd=REPO,
        env=daemons.env(**demo_environment(daemons.tmp)),
        check=True,
        timeout=60,
    )


async def all_done(db: asyncpg.Connection, ids: list[int], timeout: float = 60) -> dict[int, Any]:
    async def done() -> dict[int, Any] | None:
        rows = await db.fetch(
            "SELECT id, state, result, last_error FROM stoker.all_jobs WHERE id = ANY($1)"
            " AND state IN ('succeeded', 'failed')",
            ids,
        )
        return {r["id"]: r for r in rows} if len(rows) == len(ids) else None

    return await eventually(done, timeout)


async def test_every_catalogue_job_does_its_work_on_the_demo_tables(
    demo_db: asyncpg.Connection,
    daemons: DaemonFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    db = demo_db
    make_demo_files(daemons)
    settings = catalogue(True, monkeypatch, tmp_path / "demo")
    layer = tmp_path / "test-layer.toml"
    layer.write_text("run_scheduler = false\n")  # the test runs each job itself, once
    daemon = await daemons.start_files(
        [CATALOGUE, DEMO, layer], wait_ready=False, **demo_environment(tmp_path)
    )
    ids: dict[str, int] = {}
    for name in SEED_JOBS:
        schedule = settings.schedules[name]
        ids[name] = await db.fetchval(
            "SELECT stoker.enqueue($1, $2, $3)", schedule.queue, schedule.kind, schedule.payload
        )
    rows = await all_done(db, list(ids.values()), timeout=90)
    failed = {n: rows[i]["last_error"] for n, i in ids.items() if rows[i]["state"] != "succeeded"}
    assert not failed, f"{failed}\n{daemon.log()[-3000:]}"

    def result(name: str) -> dict[str, Any]:
        value: dict[str, Any] = rows[ids[name]]["result"]
        return value

    count = db.fetchval
    # A: one EXPIRED row per expired voucher; 3,000 old audit rows gone in batches of 1,000.
    assert await count("SELECT count(*) FROM voucher_audit_logs WHERE action = 'EXPIRED'") == 10
    archival = result("voucher_audit_archival")
    assert (archival["rows"], archival["batches"]) == (3000, 4)
    # B: expired uploads deleted with their files, live ones kept; old temporary files gone.
    assert await count("SELECT count(*) FROM uploads") == 4
    saas = tmp_path / "demo" / "saas-uploads"
    assert len([p for p in saas.rglob("*.bin")]) == 4
    tmp_left = sorted(p.name for p in (tmp_path / "demo" / "saas-tmp").rglob("*.part"))
    assert tmp_left == ["chunk-7.part", "chunk-8.part", "chunk-9.part"]
    # C: wishlist emails enqueued for products on sale and products restocked.
    assert result("wishlist_sale_check")["notified"] > 0
    assert result("wishlist_stock_check")["notified"] > 0
    # D: retention.
    assert await count("SELECT count(*) FROM invitations") == 5
    # 200 stale tokens gone; of the 20 in use, user 19's went with their deletion request.
    assert await count("SELECT count(*) FROM push_tokens") == 19
    assert await count("SELECT count(*) FROM audit_logs") == 550  # 100 older than 3 years gone
    personal = await count(
        """SELECT count(*) FROM audit_logs WHERE created_at < now() - interval '1 year'
            AND (user_id IS NOT NULL OR ip_address IS NOT NULL OR user_agent IS NOT NULL
                 OR metadata ?| ARRAY['email', 'name', 'phone', 'address'])"""
    )
    assert personal == 0
    assert await count("SELECT count(*) FROM audit_logs WHERE metadata ? 'changed'") == 550
    assert await count("SELECT count(*) FROM uploaded_files") == 15  # 25 orphans gone
    market = tmp_path / "demo" / "marketplace-uploads"
    assert sorted(int(p.stem.split("-")[1]) for p in market.glob("*.png")) == list(range(1, 16))
    names = dict(await db.fetch("SELECT id, name FROM users WHERE id IN (17, 18, 19, 20)"))
    assert names == {17: "[Deleted User]", 18: "[Deleted User]", 20: "User 20"}
    assert await count("SELECT count(*) FROM deletion_requests WHERE finalized_at IS NULL") == 1
    stale_karma = await count(
        """SELECT count(*) FROM users u WHERE karma <> (
             SELECT coalesce(sum(points), 0) FROM karma_events e WHERE e.user_id = u.id)"""
    )
    assert stale_karma == 0
    assert await count("SELECT count(*) FROM karma_changes") > 0
    # E: the jewellery shop.
    assert await count("SELECT count(*) FROM inventory_locks") == 100
    assert await count("SELECT count(*) FROM password_reset_tokens") == 10
    assert await count("SELECT count(*) FROM notifications") == 20
    assert await count("SELECT count(*) FROM payments WHERE status = 'PENDING'") == 2
    assert await count("SELECT count(*) FROM users WHERE email_verified_at IS NULL") == 0
    for report in ("low_stock_alert", "daily_sales_report"):
        email_job = result(report)["email_job_id"]
        assert email_job is not None, result(report)
    stdout = daemon.log()
    assert "stale payments rechecked" in stdout  # the command's output, in the daemon's log


def test_the_catalogues_commented_alerts_are_valid_when_uncommented(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    text = CATALOGUE.read_text()
    block = text[text.index("# [alerts]\n") :]
    uncommented = "\n".join(
        line[2:] if line.startswith("# ") else "" for line in block.splitlines()
    )
    layer = tmp_path / "alerts.toml"
    layer.write_text(uncommented)
    clean_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("SLACK_ALERTS_WEBHOOK_URL", "https://hooks.slack.com/services/T/B/x")
    settings = load_settings([CATALOGUE, layer])
    assert set(settings.alerts.rules) == {
        "failed_for_good",
        "retention_failing",
        "late_or_missed",
        "too_slow",
        "email_backlog",
    }
    assert set(settings.alerts.rules["retention_failing"].schedules or []) <= set(
        settings.schedules
    )
