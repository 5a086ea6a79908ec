"""[alerts]: where alert messages go (destinations) and what deserves one (rules)."""

from __future__ import annotations

from pydantic import Field

from daemon.config.models import Seconds, Strict


class AlertsConfig(Strict):
    """Alert rules evaluated by the leader; messages delivered as jobs on an internal queue."""

    digest_interval: Seconds = Field(
        300.0,
        gt=0,
        description="repeats of an open incident are folded into one message this often",
    )
