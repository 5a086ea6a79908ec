"""The store room: PostgreSQL.

- db.py          pools and dedicated connections, DSN redaction, JSON text
- queries.py     the engine's and operators' SQL statements
- migrations.py  sql/migrations applied in order under an advisory lock
- clock.py       the database's clock as seen from this process
- errors.py      which database errors are worth retrying unchanged

It knows no pools, schedules, HTTP or CLI."""
