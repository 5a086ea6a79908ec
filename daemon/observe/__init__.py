"""The observe room: what the daemon tells the outside.

- metrics.py  Prometheus metric families, read at scrape time
- logs.py     logging setup: JSON lines or text, job fields
- systemd.py  sd_notify: READY, WATCHDOG, STOPPING, STATUS"""
