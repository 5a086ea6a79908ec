"""The cron room: firing schedules exactly once per tick.

- cronspec.py   cron expressions and zones: next ticks, DST rules
- schedules.py  schedules from the configuration and stoker.schedules, the tick fence, status
- leader.py     the advisory-lock leader election on its own connection
- timer.py      the leader's timer wheel: which ticks are due, catch-up, reloads
- firing.py     firing a batch of ticks in one transaction: fence, pause, overlap, ledger, jobs
- reading.py    the leader's reads of stoker.schedules: all in pages, or what changed since
- queries.py    every statement of the room: the tick fence, cursors, counters, status

It enqueues through SQL like any producer: it imports nothing of the engine."""
