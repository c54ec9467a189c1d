from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from homeiot.config import load_gateway, load_influx, load_mqtt, load_source_default, load_topic
from homeiot.core.errors import ConfigError

CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.fixture
def ca(tmp_path: Path) -> str:
    path = tmp_path / "ca.crt"
    path.write_text(CA_PEM)
    return str(path)


def test_seed_example(ca: str) -> None:
    settings = load_mqtt({
        "MQTT_BROKER_URL": "mqtts://homeiot:change-me@mqtt.example.com:8883",
        "MQTT_TLS_CA_CERT": ca, "MQTT_TOPIC": "home/power",
    })
    assert (settings.host, settings.port, settings.username, settings.password) == (
        "mqtt.example.com", 8883, "homeiot", "change-me")
    assert settings.topic == "home/power"
    assert settings.session_expiry_s == 7 * 24 * 3600
    assert "change-me" not in repr(settings)


def test_percent_encoded_credentials_and_defaults(ca: str) -> None:
    settings = load_mqtt({"MQTT_BROKER_URL": "mqtts://us%40er:p%3Aa%2Fss%40@[::1]",
                          "MQTT_TLS_CA_CERT": ca})
    assert (settings.username, settings.password) == ("us@er", "p:a/ss@")
    assert (settings.host, settings.port, settings.topic) == ("::1", 8883, "home/power")


def test_host_variables_without_url(ca: str) -> None:
    settings = load_mqtt({"MQTT_HOST": "192.0.2.7", "MQTT_USER": "u", "MQTT_PASSWORD": "p",
                          "MQTT_TLS_CA_CERT": ca, "MQTT_PORT": "18883"})
    assert (settings.host, settings.port) == ("192.0.2.7", 18883)


def test_url_without_credentials_uses_user_variables(ca: str) -> None:
    settings = load_mqtt({"MQTT_BROKER_URL": "mqtts://h", "MQTT_USER": "u",
                          "MQTT_PASSWORD": "p", "MQTT_TLS_CA_CERT": ca})
    assert (settings.username, settings.password) == ("u", "p")


MQTT_CASES: list[tuple[dict[str, str], str, str]] = [
    ({}, "MQTT_BROKER_URL", "is not set"),
    ({"MQTT_BROKER_URL": "mqtt://u:p@h:1883"}, "MQTT_BROKER_URL", "scheme must be 'mqtts'"),
    ({"MQTT_BROKER_URL": "https://u:p@h"}, "MQTT_BROKER_URL", "scheme"),
    ({"MQTT_BROKER_URL": "mqtts://u:p@h:99999"}, "MQTT_BROKER_URL", "port"),
    ({"MQTT_BROKER_URL": "mqtts://u:p@h:0"}, "MQTT_BROKER_URL", "port"),
    ({"MQTT_BROKER_URL": "mqtts://u:p@h:abc"}, "MQTT_BROKER_URL", "port"),
    ({"MQTT_BROKER_URL": "mqtts://u:p@:8883"}, "MQTT_BROKER_URL", "no host"),
    ({"MQTT_BROKER_URL": "mqtts://u:p@h:8883/x"}, "MQTT_BROKER_URL", "no path"),
    ({"MQTT_BROKER_URL": "mqtts://h:8883"}, "MQTT_USER", "anonymous"),
    ({"MQTT_BROKER_URL": "mqtts://u@h:8883"}, "MQTT_PASSWORD", "no MQTT password"),
    ({"MQTT_HOST": "h:8883", "MQTT_USER": "u", "MQTT_PASSWORD": "p"}, "MQTT_HOST", "bare host"),
    ({"MQTT_HOST": "h", "MQTT_PORT": "x", "MQTT_USER": "u", "MQTT_PASSWORD": "p"}, "MQTT_PORT",
     "integer"),
    ({"MQTT_HOST": "h", "MQTT_PORT": "70000", "MQTT_USER": "u", "MQTT_PASSWORD": "p"},
     "MQTT_PORT", "between 1 and 65535"),
    ({"MQTT_BROKER_URL": "mqtts://u:p@h", "MQTT_TLS_CA_CERT": "/nonexistent/ca.crt"},
     "MQTT_TLS_CA_CERT", "does not exist"),
    ({"MQTT_BROKER_URL": "mqtts://u:p@h", "MQTT_TOPIC": "home/#"}, "MQTT_TOPIC", "base topic"),
    ({"MQTT_BROKER_URL": "mqtts://u:p@h", "MQTT_KEEPALIVE_S": "1"}, "MQTT_KEEPALIVE_S",
     "between"),
    ({"MQTT_BROKER_URL": "mqtts://u:p@h", "MQTT_SESSION_EXPIRY_S": "-5"},
     "MQTT_SESSION_EXPIRY_S", "between"),
]


@pytest.mark.parametrize(("env", "variable", "message"), MQTT_CASES)
def test_mqtt_errors_name_the_variable(ca: str, env: dict[str, str], variable: str,
                                       message: str) -> None:
    env = {"MQTT_TLS_CA_CERT": ca, **env}
    with pytest.raises(ConfigError) as info:
        load_mqtt(env)
    assert info.value.variable == variable
    assert str(info.value).startswith(f"{variable}: ")
    assert message in str(info.value)


def test_errors_never_show_the_password(ca: str) -> None:
    for url in ("mqtt://u:TOPSECRET@h", "mqtts://u:TOPSECRET@h:99999",
                "mqtts://u:TOPSECRET@h/path"):
        with pytest.raises(ConfigError) as info:
            load_mqtt({"MQTT_BROKER_URL": url, "MQTT_TLS_CA_CERT": ca})
        assert "TOPSECRET" not in str(info.value)


def test_ca_file_without_a_certificate(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.crt"
    bogus.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"MQTT_TLS_CA_CERT: .* holds no PEM certificate"):
        load_mqtt({"MQTT_BROKER_URL": "mqtts://u:p@h", "MQTT_TLS_CA_CERT": str(bogus)})


def test_topic_and_source_defaults() -> None:
    assert load_topic({}) == "home/power"
    assert load_topic({"MQTT_TOPIC": ""}) == "home/power"
    assert load_source_default({}) == "meter1"
    with pytest.raises(ConfigError, match="SOURCE_DEFAULT"):
        load_source_default({"SOURCE_DEFAULT": "a/b"})


def test_influx_defaults_and_auth_inference() -> None:
    settings = load_influx({})
    assert (settings.url, settings.database, settings.auth) == ("http://influxdb:8086", "homeiot",
                                                                "none")
    assert load_influx({"INFLUXDB_TOKEN": "t"}).auth == "token"
    settings = load_influx({"INFLUXDB_USER": "u", "INFLUXDB_PASSWORD": "secret-pw"})
    assert settings.auth == "password"
    assert "secret-pw" not in repr(settings)
    assert load_influx({"INFLUXDB_URL": "https://influx.lan:8443/prefix/"}).url == \
        "https://influx.lan:8443/prefix"


INFLUX_CASES: list[tuple[dict[str, str], str, str]] = [
    ({"INFLUXDB_URL": "influxdb:8086"}, "INFLUXDB_URL", "http(s)://"),
    ({"INFLUXDB_URL": "ftp://h"}, "INFLUXDB_URL", "http(s)://"),
    ({"INFLUXDB_URL": "http://u:p@h:8086"}, "INFLUXDB_URL", "credentials"),
    ({"INFLUXDB_URL": "http://h:8086?db=x"}, "INFLUXDB_URL", "query"),
    ({"INFLUXDB_URL": "http://h:123456"}, "INFLUXDB_URL", "port"),
    ({"INFLUXDB_AUTH": "basic"}, "INFLUXDB_AUTH", "none, password or token"),
    ({"INFLUXDB_AUTH": "token"}, "INFLUXDB_TOKEN", "required"),
    ({"INFLUXDB_AUTH": "password"}, "INFLUXDB_USER", "required"),
    ({"INFLUXDB_USER": "u"}, "INFLUXDB_PASSWORD", "required"),
    ({"INFLUXDB_DB": 'a"b'}, "INFLUXDB_DB", "without"),
    ({"INFLUXDB_MEASUREMENT": "#x"}, "INFLUXDB_MEASUREMENT", "comment"),
    ({"INFLUXDB_TIMEOUT_S": "nan"}, "INFLUXDB_TIMEOUT_S", "between"),
    ({"INFLUXDB_TIMEOUT_S": "soon"}, "INFLUXDB_TIMEOUT_S", "must be a number"),
]


@pytest.mark.parametrize(("env", "variable", "message"), INFLUX_CASES)
def test_influx_errors_name_the_variable(env: dict[str, str], variable: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_influx(env)
    assert info.value.variable == variable
    assert message in str(info.value)


def _gateway_env(ca: str, **extra: str) -> dict[str, str]:
    return {"MQTT_BROKER_URL": "mqtts://gw:pw@mqtt:8883", "MQTT_TLS_CA_CERT": ca,
            "API_TOKENS": "a" * 16 + ", " + "b" * 20, **extra}


def test_gateway_defaults(ca: str) -> None:
    settings = load_gateway(_gateway_env(ca))
    assert settings.client_id == "homeiot-gateway"
    assert settings.share_group is None
    assert (settings.batch_size, settings.batch_age_s) == (5000, 0.5)
    assert settings.api_tokens == ("a" * 16, "b" * 20)
    assert settings.timezone.key == "Asia/Tokyo"
    assert str(settings.dead_letter_db) == "/data/gateway/dead_letters.sqlite"
    assert "a" * 16 not in repr(settings)


GATEWAY_CASES: list[tuple[dict[str, str], str, str]] = [
    ({"API_TOKENS": ""}, "API_TOKENS", "is not set"),
    ({"API_TOKENS": " , "}, "API_TOKENS", "holds no token"),
    ({"API_TOKENS": "short"}, "API_TOKENS", "at least 16"),
    ({"GATEWAY_SHARE_GROUP": "a/b"}, "GATEWAY_SHARE_GROUP", "share group"),
    ({"GATEWAY_BATCH_SIZE": "0"}, "GATEWAY_BATCH_SIZE", "between"),
    ({"GATEWAY_BATCH_AGE_S": "x"}, "GATEWAY_BATCH_AGE_S", "number"),
    ({"HOMEIOT_TIMEZONE": "Mars/Olympus"}, "HOMEIOT_TIMEZONE", "unknown time zone"),
    ({"API_PORT": "0"}, "API_PORT", "between"),
]


@pytest.mark.parametrize(("env", "variable", "message"), GATEWAY_CASES)
def test_gateway_errors_name_the_variable(ca: str, env: dict[str, str], variable: str,
                                          message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_gateway(_gateway_env(ca, **env))
    assert info.value.variable == variable
    assert message in str(info.value)


ODD = "p#ss?w/rd@h:st% 1"


@pytest.mark.parametrize("password", [ODD, "a b", "x@y", "q?u=1&p=2", "50%off", "a:b/c#d"])
def test_unencoded_passwords_parse_and_encoded_ones_too(ca: str, password: str) -> None:
    for written in (password, quote(password, safe="")):
        settings = load_mqtt({"MQTT_BROKER_URL": f"mqtts://meter1:{written}@broker.lan:8883",
                              "MQTT_TLS_CA_CERT": ca})
        assert (settings.username, settings.host, settings.port) == ("meter1", "broker.lan", 8883)
        if written != password or "%" not in password:
            assert settings.password == password


SECRET_CASES = [
    {"MQTT_BROKER_URL": f"mqtt://meter1:{ODD}@h:8883"},            # parses; wrong scheme
    {"MQTT_BROKER_URL": f"mqtts://meter1:{ODD}@h:88x3"},           # parses; bad port
    {"MQTT_BROKER_URL": f"mqtts://meter1:{ODD}@h:8883/path?q=1"},  # parses; path
    {"MQTT_BROKER_URL": f"mqtts://meter1:{ODD}@"},                 # no host
    {"MQTT_BROKER_URL": "mqtts://meter1:p#ss?w/rd h:st% 1"},       # no "@": does not parse
    {"MQTT_BROKER_URL": f"mqtts//meter1:{ODD}@h"},                 # no "://"
    {"MQTT_HOST": f"meter1:{ODD}@h", "MQTT_USER": "u", "MQTT_PASSWORD": "x"},
    {"MQTT_HOST": f"{ODD}", "MQTT_USER": "u", "MQTT_PASSWORD": "x"},
]


@pytest.mark.parametrize("env", SECRET_CASES)
def test_no_password_in_any_mqtt_error(ca: str, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_mqtt({"MQTT_TLS_CA_CERT": ca, **env})
    message = str(info.value)
    for fragment in ("p#ss", "w/rd", "h:st", "st% 1", quote(ODD, safe=""), "rd h"):
        assert fragment not in message, message


@pytest.mark.parametrize("url", [
    "http://influx:8086?u=admin&p=s3cr%23t p#w", "http://influx:8086/?p=s3cr%23t",
    "http://admin:s3cr#t p@influx:8086", "ftp://admin:s3cr#t@influx", "http://influx:8086#s3cr",
])
def test_no_password_in_any_influx_error(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_influx({"INFLUXDB_URL": url})
    assert "s3cr" not in str(info.value), str(info.value)
