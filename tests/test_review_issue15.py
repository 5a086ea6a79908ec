"""Review of issue 15 (the dashboard): bad input that answers 500 instead of a clear 4xx page, a
viewer session that outlives a rotated viewer token, and a bulk cancel of a whole filter that
asks nobody when JavaScript is off. Plain HTTP against real daemons (no browser needed).

Each test shows one bug and is marked xfail (strict) until it is fixed."""

from __future__ import annotations

import re
from html import unescape
from html.parser import HTMLParser

import aiohttp
import asyncpg

import daemon
from daemon.web.dashboard.session import Sessions
from tests.browser import ADMIN_TOKEN, DASHBOARD_CONFIG, http_port
from tests.conftest import DaemonFactory

SCHEDULE = """
[schedules.nightly]
cron = "0 3 * * *"
kind = "noop"
"""
LONELY = "nobody-serves-this"  # a queue no daemon claims from: its jobs stay queued


async def start(daemons: DaemonFactory, extra: str = "") -> str:
    running = await daemons.start(DASHBOARD_CONFIG + extra)
    return f"http://127.0.0.1:{http_port(running.log())}"


async def admin_session(http: aiohttp.ClientSession, base: str) -> tuple[dict[str, str], str]:
    """The Cookie header of an admin session, and its CSRF token (read from a page)."""
    async with http.post(
        f"{base}/dashboard/login", data={"token": ADMIN_TOKEN}, allow_redirects=False
    ) as response:
        assert response.status == 303
        headers = {"Cookie": f"stoker_session={response.cookies['stoker_session'].value}"}
    async with http.get(f"{base}/dashboard/jobs", headers=headers) as response:
        found = re.search(r'name="csrf" value="([^"]+)"', await response.text())
    assert found is not None
    return headers, found[1]


async def statuses(
    http: aiohttp.ClientSession, base: str, paths: list[str], headers: dict[str, str]
) -> dict[str, int]:
    found = {}
    for path in paths:
        async with http.get(f"{base}{path}", headers=headers, allow_redirects=False) as response:
            found[path] = response.status
    return found


async def test_a_nul_byte_in_a_jobs_filter_is_a_400_not_a_500(daemons: DaemonFactory) -> None:
    base = await start(daemons)
    async with aiohttp.ClientSession() as http:
        headers, csrf = await admin_session(http, base)
        paths = [
            "/dashboard/jobs?queue=a%00b",
            "/dashboard/jobs?kind=a%00b",
            "/dashboard/jobs?error=a%00b",
            "/dashboard/jobs?meta_key=a%00b",
            "/dashboard/jobs?meta_key=org&meta_value=a%00b",
        ]
        found = await statuses(http, base, paths, headers)
        async with http.post(
            f"{base}/dashboard/jobs/cancel-filter",
            headers=headers,
            data={"csrf": csrf, "queue": "a\x00b"},
            allow_redirects=False,
        ) as response:
            found["POST cancel-filter"] = response.status
    assert found == dict.fromkeys(found, 400)


async def test_a_job_id_holding_a_newline_is_a_404_not_a_500(daemons: DaemonFactory) -> None:
    base = await start(daemons)
    async with aiohttp.ClientSession() as http:
        headers, csrf = await admin_session(http, base)
        found = await statuses(http, base, ["/dashboard/jobs/a%0Ab"], headers)
        for path, data in (
            ("/dashboard/jobs/a%0Ab/retry", {"csrf": csrf}),
            ("/dashboard/jobs/selected", {"csrf": csrf, "do": "retry", "id": "a\nb"}),
        ):
            async with http.post(
                f"{base}{path}", headers=headers, data=data, allow_redirects=False
            ) as response:
                found[f"POST {path}"] = response.status
    assert found == dict.fromkeys(found, 404)


async def test_out_of_range_before_parameters_are_a_400_not_a_500(
    daemons: DaemonFactory,
) -> None:
    base = await start(daemons, SCHEDULE)
    async with aiohttp.ClientSession() as http:
        headers, _ = await admin_session(http, base)
        found = await statuses(
            http,
            base,
            [
                "/dashboard/audit?before=99999999999999999999",
                "/dashboard/audit?before=-99999999999999999999",
                "/dashboard/schedules/nightly?before=0001-01-01T00:00:00%2B01:00",
                "/dashboard/schedules/nightly?before=9999-12-31T23:59:59-01:00",
            ],
            headers,
        )
    assert found == dict.fromkeys(found, 400)


async def test_a_non_ascii_cookie_or_csrf_token_is_refused_not_a_500(
    daemons: DaemonFactory,
) -> None:
    base = await start(daemons)
    async with aiohttp.ClientSession() as http:
        headers, _ = await admin_session(http, base)
        found = {}
        async with http.get(
            f"{base}/dashboard/",
            headers={"Cookie": "stoker_session=x.\u00e9"},
            allow_redirects=False,
        ) as response:
            found["cookie"] = response.status  # not signed in: to the login page
        async with http.post(
            f"{base}/dashboard/queues/default/pause",
            headers=headers,
            data={"csrf": "\u00e9"},
            allow_redirects=False,
        ) as response:
            found["csrf"] = response.status
    assert found == {"cookie": 303, "csrf": 403}


def test_a_changed_viewer_token_ends_the_sessions_of_the_old_one() -> None:
    before = Sessions("admin-token-0123456789", "viewer-token-leaked-01")
    after = Sessions("admin-token-0123456789", "viewer-token-rotated-2")
    assert before.sign_in("viewer-token-leaked-01") == "viewer"
    _, cookie = before.issue("viewer")
    assert before.read(cookie) is not None
    assert after.sign_in("viewer-token-leaked-01") is None  # the old token no longer signs in
    assert after.read(cookie) is None  # ... and what it signed in should end too


class Forms(HTMLParser):
    """The hidden fields of every form of a page, by the form's action."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: dict[str, dict[str, str]] = {}
        self._current: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: unescape(v or "") for k, v in attrs}
        if tag == "form":
            self._current = self.forms.setdefault(found.get("action", ""), {})
        elif tag == "input" and self._current is not None and found.get("type") == "hidden":
            self._current[found["name"]] = found.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


async def test_cancelling_a_whole_filter_without_javascript_asks_first(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    base = await start(daemons)
    ids = [
        await daemon.enqueue(db, queue=LONELY, kind="test.noop", payload={"i": i}) for i in range(3)
    ]
    async with aiohttp.ClientSession() as http:
        headers, _ = await admin_session(http, base)
        async with http.get(
            f"{base}/dashboard/jobs?queue={LONELY}&state=queued", headers=headers
        ) as response:
            forms = Forms()
            forms.feed(await response.text())
        fields = forms.forms["/dashboard/jobs/cancel-filter"]
        assert fields["queue"] == LONELY
        # What a browser without JavaScript sends when the button is pressed: the form as it
        # is (no X-Requested-With, no answer to a question nobody asked).
        async with http.post(
            f"{base}/dashboard/jobs/cancel-filter",
            headers=headers,
            data=fields,
            allow_redirects=False,
        ) as response:
            status = response.status
    states = await db.fetch("SELECT state::text FROM stoker.all_jobs WHERE id = ANY($1)", ids)
    assert [r["state"] for r in states] == ["queued"] * 3, status
