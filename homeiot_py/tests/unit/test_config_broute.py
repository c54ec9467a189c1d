"""The B-route link settings (``BROUTE_*``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from homeiot.config import load_publisher
from homeiot.core.errors import ConfigError
from homeiot.core.link import LinkPolicy, LinkTiming


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return {"MQTT_BROKER_URL": "mqtts://meter1:secret@broker:8883", "MQTT_TLS_CA_CERT": str(ca),
            "PUBLISHER_METER": "broute", "BROUTE_ID": "0" * 31 + "1",
            "BROUTE_PASSWORD": "ABCDEFGHIJKL"}


def test_defaults_detect_a_dead_session_within_90_s(env: dict[str, str]) -> None:
    settings = load_publisher(env)
    assert settings.broute_timing == LinkTiming()
    assert settings.broute_policy == LinkPolicy()
    # The liveness rule: max_misses requests without an answer, each bounded, after one interval.
    worst = settings.interval_s + settings.broute_policy.max_misses \
        * settings.broute_timing.request_bound_s
    assert worst <= 90
    assert settings.broute_policy.dead_after_s <= 90


def test_every_bound_is_configurable(env: dict[str, str]) -> None:
    settings = load_publisher({
        **env, "BROUTE_REQUEST_TIMEOUT_S": "3", "BROUTE_ANSWER_TIMEOUT_S": "2",
        "BROUTE_REQUEST_RETRIES": "4", "BROUTE_SCAN_TIMEOUT_S": "30", "BROUTE_JOIN_TIMEOUT_S": "20",
        "BROUTE_MAX_MISSES": "3", "BROUTE_DEAD_AFTER_S": "60", "BROUTE_REJOIN_ATTEMPTS": "2",
        "BROUTE_RESET_ATTEMPTS": "5", "BROUTE_BACKOFF_MIN_S": "1", "BROUTE_BACKOFF_MAX_S": "4"})
    assert settings.broute_timing == LinkTiming(request_timeout_s=3, answer_timeout_s=2,
                                                request_retries=4, scan_timeout_s=30,
                                                join_timeout_s=20)
    assert settings.broute_policy == LinkPolicy(max_misses=3, dead_after_s=60, rejoin_attempts=2,
                                                reset_attempts=5, backoff_min_s=1,
                                                backoff_max_s=4)


@pytest.mark.parametrize(("name", "value"), [
    ("BROUTE_REQUEST_TIMEOUT_S", "0"), ("BROUTE_ANSWER_TIMEOUT_S", "x"),
    ("BROUTE_REQUEST_RETRIES", "0"), ("BROUTE_MAX_MISSES", "0"), ("BROUTE_RESET_ATTEMPTS", "0"),
    ("BROUTE_BACKOFF_MAX_S", "1"),  # below the 10 s minimum backoff
])
def test_bad_values_name_the_variable(env: dict[str, str], name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_publisher({**env, name: value})
    assert info.value.variable == name


def test_history_days_must_fit_in_the_outbox(env: dict[str, str]) -> None:
    assert load_publisher({**env, "BROUTE_HISTORY_DAYS": "7"}).broute_history_days == 7
    assert load_publisher({**env, "BROUTE_HISTORY_DAYS": "0"}).broute_history_days == 0
    with pytest.raises(ConfigError, match="PUBLISHER_OUTBOX_MAX_AGE_DAYS") as info:
        load_publisher({**env, "BROUTE_HISTORY_DAYS": "5", "PUBLISHER_OUTBOX_MAX_AGE_DAYS": "5"})
    assert info.value.variable == "BROUTE_HISTORY_DAYS"
