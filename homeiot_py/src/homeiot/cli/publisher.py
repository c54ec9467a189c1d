"""``homeiot-publisher`` / ``python -m homeiot.cli.publisher``: read the meter, publish over MQTT.

Configuration comes from the environment (on the Pi, systemd's ``EnvironmentFile=`` loads
``/etc/homeiot/publisher.env``) or from ``--env-file``. Logs go to stdout for journald.
Exit codes: 0 clean stop (SIGTERM/SIGINT), 2 configuration error, 3 the meter refused the B-route
credentials (not retried: the unit sets RestartPreventExitStatus=3), 4 the B-route link did not
come back after every recovery step (systemd starts a fresh process).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from homeiot.adapters.broute import BrouteBackend
from homeiot.adapters.meters import Meter, SimulatedBackend
from homeiot.adapters.outbox import Outbox
from homeiot.config import load_publisher, read_env_file
from homeiot.core.errors import ConfigError
from homeiot.logs import setup_logging
from homeiot.services.publisher import Publisher

logger = logging.getLogger("homeiot.publisher")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="homeiot-publisher", description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", type=Path, help="read KEY=VALUE settings from this file "
                                                      "(the environment wins)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        env = dict(os.environ)
        if args.env_file is not None:
            env = {**read_env_file(args.env_file), **env}
        settings = load_publisher(env)
        outbox = Outbox(settings.outbox, max_rows=settings.outbox_max_rows,
                        max_age_days=settings.outbox_max_age_days)
    except ConfigError as exc:
        logger.error("configuration error: %s", exc)
        return 2
    meter: Meter
    if settings.meter == "broute":
        meter = BrouteBackend(settings.source, settings.broute_id, settings.broute_password,
                              settings.broute_device, timing=settings.broute_timing,
                              policy=settings.broute_policy,
                              history_days=settings.broute_history_days,
                              resume_kwh=outbox.last_energy(settings.source),
                              joined_marker=settings.outbox.with_name("broute-joined"))
    else:
        meter = SimulatedBackend(settings.source, settings.seed, settings.timezone)
    publisher = Publisher(settings, meter, outbox)

    def on_signal(signum: int, frame: object) -> None:
        logger.info("signal %s: stopping", signal.Signals(signum).name)
        publisher.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        publisher.run()
    finally:
        outbox.close()
    return publisher.exit_code


if __name__ == "__main__":
    sys.exit(main())
