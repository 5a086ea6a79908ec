"""The web room: the daemon's aiohttp server.

- server.py        /health, /ready, /metrics, the throttle, the admin API's mount point
- auth.py          who is calling: the one check of the admin token
- admin.py         the admin API (bearer token)
- admin_models.py  its request models and input checks"""
