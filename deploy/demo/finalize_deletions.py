"""A stand-in for the marketplace's `npm run job:finalize-deletions`, run by command.run in the
demo: deletion requests older than STOKER_PARAM_GRACE_DAYS are finalised as each one says —
the user anonymised (contributions kept as "[Deleted User]") or the user and their data
deleted. Each request is finalised in its own transaction, so a rerun skips finished ones."""

from __future__ import annotations

import asyncio
import os

import asyncpg

DUE = """
SELECT id, user_id, mode FROM deletion_requests
 WHERE finalized_at IS NULL AND requested_at < now() - make_interval(days => $1)
 ORDER BY id
"""


async def finalise(conn: asyncpg.Connection, request: asyncpg.Record) -> None:
    user = request["user_id"]
    async with conn.transaction():
        if request["mode"] == "anonymise":
            await conn.execute(
                "UPDATE users SET name = '[Deleted User]', email = 'deleted-' || id || "
                "'@invalid', avatar_file_id = NULL WHERE id = $1",
                user,
            )
        else:
            for table in ("wishlist_items", "push_tokens", "karma_events"):
                await conn.execute(f"DELETE FROM {table} WHERE user_id = $1", user)
            await conn.execute("DELETE FROM users WHERE id = $1", user)
        await conn.execute(
            "UPDATE deletion_requests SET finalized_at = now() WHERE id = $1", request["id"]
        )


async def main() -> int:
    grace = int(os.environ.get("STOKER_PARAM_GRACE_DAYS", "30"))
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        due = await conn.fetch(DUE, grace)
        for request in due:
            await finalise(conn, request)
            print(f"user {request['user_id']}: {request['mode']} done", flush=True)
    finally:
        await conn.close()
    print(f"{len(due)} deletion requests finalised", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
