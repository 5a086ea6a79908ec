"""An example of handlers of your own, for the seed apps' wishlist sale and stock checks.

Every sale check finds wishlisted products that are on sale and enqueues one `email.send` job
per (user, product, day); every stock check finds wishlisted products restocked since and
enqueues one per (user, product, restock). The email jobs are enqueued in the transaction that
records the notices, so that a crash between the two can neither lose an email nor send it
twice. Copy this shape for your own handlers: validate the payload with a model, take a
connection from `ctx.db` for as long as the work needs it, do the work in one transaction,
enqueue follow-up jobs on the same connection with `daemon.enqueue_many`. Loaded only when
configured: handler_modules = ["handlers.examples"]."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from daemon import Job, JobContext, enqueue_many, handler

NEW_NOTICES = """
INSERT INTO wishlist_sale_notices (user_id, product_id, day)
SELECT w.user_id, w.product_id, current_date
  FROM wishlist_items w JOIN products p ON p.id = w.product_id
 WHERE p.on_sale
ON CONFLICT DO NOTHING
RETURNING user_id, product_id
"""

RECIPIENTS = """
SELECT u.email, u.name, p.title, p.price::text AS price
  FROM unnest($1::int[], $2::int[]) AS n(user_id, product_id)
  JOIN users u ON u.id = n.user_id JOIN products p ON p.id = n.product_id
"""


NEW_RESTOCK_NOTICES = """
INSERT INTO wishlist_stock_notices (user_id, product_id, restocked_at)
SELECT w.user_id, w.product_id, p.restocked_at
  FROM wishlist_items w JOIN products p ON p.id = w.product_id
 WHERE p.stock > 0 AND p.restocked_at IS NOT NULL
ON CONFLICT DO NOTHING
RETURNING user_id, product_id
"""


class WishlistCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queue: str = "email-default"


@handler("wishlist.sale_check", payload=WishlistCheck, timeout=120)
async def wishlist_sale_check(ctx: JobContext, check: WishlistCheck) -> dict[str, Any]:
    return await _notify(ctx, check, NEW_NOTICES, "wishlist_sale", "sale")


@handler("wishlist.stock_check", payload=WishlistCheck, timeout=120)
async def wishlist_stock_check(ctx: JobContext, check: WishlistCheck) -> dict[str, Any]:
    return await _notify(ctx, check, NEW_RESTOCK_NOTICES, "wishlist_restock", "stock")


async def _notify(
    ctx: JobContext, check: WishlistCheck, new_notices: str, template: str, what: str
) -> dict[str, Any]:
    started = time.monotonic()
    async with ctx.db.acquire() as conn, conn.transaction():
        notices = await conn.fetch(new_notices)
        people = await conn.fetch(
            RECIPIENTS, [n["user_id"] for n in notices], [n["product_id"] for n in notices]
        )
        jobs = [
            Job(
                check.queue,
                "email.send",
                {
                    "to": p["email"],
                    "template": template,
                    "context": {"name": p["name"], "product": p["title"], "price": p["price"]},
                },
            )
            for p in people
        ]
        await enqueue_many(conn, jobs)
    seconds = round(time.monotonic() - started, 3)
    ctx.log.info("wishlist %s check: %d notified in %.3fs", what, len(jobs), seconds)
    return {"notified": len(jobs), "seconds": seconds}
