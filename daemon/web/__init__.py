"""The web room: the daemon's aiohttp server.

- server.py        /health, /ready, /metrics, the throttle, the admin API's mount point
- admin.py         the admin API (bearer token)
- admin_models.py  its request models and input checks"""
