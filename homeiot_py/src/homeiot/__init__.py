"""HomeIot: smart-meter readings from a Raspberry Pi to InfluxDB, Grafana and a daily archive."""

__version__ = "0.1.0"
