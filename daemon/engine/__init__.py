"""The engine room: running jobs.

- registry.py     handlers by kind (what `@handler` fills) and lifecycle hooks
- pool.py         one pool per queue: claim in batches sized to free slots, start, drain
- waiting.py      the idle sweep: one look and one renewal for all of a daemon's idle pools
- jobrun.py       one claimed job: its handler under its timeout, and how it ended (an Outcome)
- retry.py        the backoff between attempts
- outcomes.py     the completer: outcomes buffered and written once each (split, park, retry)
- payloads.py     size caps on payloads, results and error texts
- listener.py     the LISTEN connection that wakes pools
- maintenance.py  heartbeats, lease rescue, the history purge, parked jobs, VACUUM
- loopwatch.py    a thread that names whatever blocks the event loop

It knows no HTTP and no CLI (import-linter holds this: see pyproject.toml)."""
