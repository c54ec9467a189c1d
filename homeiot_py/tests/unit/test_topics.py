from __future__ import annotations

import pytest

from homeiot.core.errors import TopicError
from homeiot.core.topics import source_from_topic, subscription_filter, topic_for


def test_topic_round_trip() -> None:
    assert topic_for("home/power", "meter1") == "home/power/meter1"
    assert source_from_topic("home/power", "home/power/meter1") == "meter1"


@pytest.mark.parametrize("topic", ["home/power", "home/power/", "home/power/a/b", "x/power/m",
                                   "home/powerx/m", "home/power/+"])
def test_foreign_topics_are_refused(topic: str) -> None:
    with pytest.raises(TopicError):
        source_from_topic("home/power", topic)


@pytest.mark.parametrize("base", ["", "/home", "home/", "home//power", "home/+", "a/#", "$SYS"])
def test_bad_base_topics(base: str) -> None:
    with pytest.raises(TopicError, match="base topic"):
        topic_for(base, "m")


def test_subscription_filters() -> None:
    assert subscription_filter("home/power") == "home/power/+"
    assert subscription_filter("home/power", "gw") == "$share/gw/home/power/+"
    with pytest.raises(TopicError, match="share group"):
        subscription_filter("home/power", "a/b")
