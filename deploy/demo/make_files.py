"""Files for the demo's cleanups, under .stoker/demo (run by `make run` after deploy/demo.sql):
one file per row of `uploads` and `uploaded_files`, and temporary files, some two days old.

    DATABASE_URL=postgresql://... python deploy/demo/make_files.py [.stoker/demo]
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import asyncpg

TWO_DAYS = 2 * 86_400


def touch(path: Path, age: float = 0) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"demo file\n")
    if age:
        then = time.time() - age
        os.utime(path, (then, then))


async def main(base: Path) -> None:
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        for row in await conn.fetch("SELECT storage_path FROM uploads"):
            touch(base / "saas-uploads" / row["storage_path"])
        for row in await conn.fetch("SELECT path FROM uploaded_files"):
            touch(base / "marketplace-uploads" / row["path"], TWO_DAYS)
    finally:
        await conn.close()
    tmp = base / "saas-tmp"
    for i in range(1, 7):
        touch(tmp / f"chunk-{i}.part", TWO_DAYS)
    for i in range(1, 3):
        touch(tmp / "session-1" / f"upload-{i}.part", TWO_DAYS)
    for i in range(7, 10):
        touch(tmp / f"chunk-{i}.part")  # in use: newer than 24 hours, kept


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".stoker/demo")))
