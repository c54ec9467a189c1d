"""Topic contract: readings of ``source`` are published to ``{MQTT_TOPIC}/{source}``."""

from __future__ import annotations

import re

from homeiot.core.errors import TopicError
from homeiot.core.reading import validate_source

# A base topic: one or more levels of printable characters without MQTT wildcards, no empty level.
_BASE_TOPIC = re.compile(r"[^/+#\x00-\x1f\x7f]+(?:/[^/+#\x00-\x1f\x7f]+)*")
_SHARE_GROUP = re.compile(r"[A-Za-z0-9_-]{1,64}")


def validate_base_topic(base: str) -> str:
    """Return ``base`` if it is a valid base topic (e.g. ``home/power``), else raise."""
    if _BASE_TOPIC.fullmatch(base) is None or base.startswith("$"):
        raise TopicError(
            f"base topic {base!r} must be non-empty levels separated by '/', without '+', '#', "
            "a leading '$', empty levels or control characters"
        )
    return base


def topic_for(base: str, source: str) -> str:
    """The topic a source publishes to."""
    return f"{validate_base_topic(base)}/{validate_source(source)}"


def source_from_topic(base: str, topic: str) -> str:
    """The source a message was published for, taken from its topic; raises :class:`TopicError`."""
    prefix = base + "/"
    if not topic.startswith(prefix):
        raise TopicError(f"topic {topic!r} is not under {base!r}")
    return validate_source(topic[len(prefix):])


def subscription_filter(base: str, share_group: str | None = None) -> str:
    """The gateway's subscription: ``{base}/+``, or ``$share/{group}/{base}/+`` for scale-out."""
    topic_filter = f"{validate_base_topic(base)}/+"
    if share_group is None:
        return topic_filter
    if _SHARE_GROUP.fullmatch(share_group) is None:
        raise TopicError(f"share group {share_group!r} must be 1-64 characters of A-Z a-z 0-9 _ -")
    return f"$share/{share_group}/{topic_filter}"
