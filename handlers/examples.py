"""An example of a handler of your own, for the seed apps' wishlist sale check.

Every run finds wishlisted products that are on sale and enqueues one `email.send` job per
(user, product, day), in the same transaction that records the notice, so that a crash between
the two can neither lose the email nor send it twice. Copy this shape for your own handlers:
validate the payload with a model, take a connection from `ctx.db` for as long as the work
needs it, do the work in one transaction, enqueue follow-up jobs on the same connection with
`daemon.enqueue_many`. Loaded only when configured: handler_modules = ["handlers.examples"]."""

from __future__ import annotations

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


class SaleCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queue: str = "email-default"


@handler("wishlist.sale_check", payload=SaleCheck, timeout=120)
async def wishlist_sale_check(ctx: JobContext, check: SaleCheck) -> dict[str, Any]:
    async with ctx.db.acquire() as conn, conn.transaction():
        notices = await conn.fetch(NEW_NOTICES)
        people = await conn.fetch(
            RECIPIENTS, [n["user_id"] for n in notices], [n["product_id"] for n in notices]
        )
        jobs = [
            Job(
                check.queue,
                "email.send",
                {
                    "to": p["email"],
                    "template": "wishlist_sale",
                    "context": {"name": p["name"], "product": p["title"], "price": p["price"]},
                },
            )
            for p in people
        ]
        await enqueue_many(conn, jobs)
    ctx.log.info("wishlist sale check: %d new notices", len(jobs))
    return {"emails": len(jobs)}
