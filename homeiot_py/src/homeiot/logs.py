"""Logging for the services: one line per event to stdout (journald and Docker collect it)."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str | None = None) -> None:
    """Log to stdout, one line per event: ``time level logger message`` (``HOMEIOT_LOG_LEVEL``)."""
    name = (level or os.environ.get("HOMEIOT_LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, name, logging.INFO))
    logging.getLogger("paho").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
