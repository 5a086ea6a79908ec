"""The operate room: what an operator does, written once for every front end.

The CLI (daemon/cli), the admin API (daemon/web/admin.py) and, later, the dashboard only turn
a request into a call here and the answer (or a NotFound / Conflict) into their own form.

- jobs.py       job states, listing, one job, retry, cancel
- queues.py     queue status (counts, pause, oldest due job) and pause / resume
- schedules.py  schedule status, the leader, a manual run"""
