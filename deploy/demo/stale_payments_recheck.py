"""A stand-in for the jewellery shop's payment recheck script, run by command.run in the demo:
payments PENDING for longer than STOKER_PARAM_PENDING_FOR_MINUTES are "asked about" at the
payment provider (here: even ids were paid, odd ones failed) and confirmed or failed."""

from __future__ import annotations

import asyncio
import os

import asyncpg

STALE = """
SELECT id, order_ref, amount FROM payments
 WHERE status = 'PENDING' AND created_at < now() - make_interval(mins => $1)
 ORDER BY id FOR UPDATE SKIP LOCKED
"""


async def main() -> int:
    minutes = int(os.environ.get("STOKER_PARAM_PENDING_FOR_MINUTES", "10"))
    job = os.environ.get("STOKER_JOB_ID", "?")
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        async with conn.transaction():
            stale = await conn.fetch(STALE, minutes)
            for payment in stale:
                status = "CONFIRMED" if payment["id"] % 2 == 0 else "FAILED"
                await conn.execute(
                    "UPDATE payments SET status = $2, checked_at = now() WHERE id = $1",
                    payment["id"],
                    status,
                )
                print(f"payment {payment['order_ref']} ({payment['amount']}): {status}", flush=True)
    finally:
        await conn.close()
    print(f"job {job}: {len(stale)} stale payments rechecked", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
