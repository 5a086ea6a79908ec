"""The alerts room: the leader evaluates alert rules against the database and delivers each
message as a job on an internal queue (issue 14). It knows no engine, HTTP or CLI; its SQL is
its own (queries.py).

- evaluator.py  the loop that runs while this process leads; the internal queue's settings
- rules.py      what each event means, read from jobs, history and the run ledger
- incidents.py  incidents (one per rule and subject), digests, recovery, the message document
- queries.py    the SQL"""
