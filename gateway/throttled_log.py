"""The gateway's name for the core's throttled warning (kept for imports)."""

from ipaas.throttled_log import ThrottledWarning

__all__ = ["ThrottledWarning"]
