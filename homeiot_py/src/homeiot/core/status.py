"""Health signals stored beside the readings, where Grafana's alert rules can query them.

One measurement, ``homeiot_status``, tag ``component`` (``gateway``, ``archive``), float fields
only (a field never changes type). ``files/grafana/alerting/homeiot-alerts.yml`` reads them:

* ``component=archive``: ``ok=1`` and ``days``/``rows`` after each successful archive run;
* ``component=gateway``: ``dead_letters`` (letters held) and ``broker_cert_days_left`` (the
  certificate the broker presented on the current connection), every minute.
"""

from __future__ import annotations

from datetime import datetime

from homeiot.core.lineprotocol import encode_line
from homeiot.core.reading import epoch_ms

MEASUREMENT = "homeiot_status"
COMPONENT_TAG = "component"


def status_line(component: str, at: datetime, **fields: float) -> str:
    """The line-protocol point of one status sample (millisecond timestamp), fields as floats."""
    return encode_line(MEASUREMENT, {COMPONENT_TAG: component},
                       {key: float(value) for key, value in fields.items()}, epoch_ms(at))
