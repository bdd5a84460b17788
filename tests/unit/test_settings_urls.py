"""mqtt.url is checked whole at load time, port included, so `check` and `run` agree."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flowerpower_daemon.settings import MqttSettings


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("mqtt://127.0.0.1:99999", "Port out of range"),
        ("mqtt://broker:notaport", "could not be cast to integer"),
        ("http://broker:1883", "use mqtt://host:port"),
    ],
)
def test_bad_mqtt_url_is_a_config_error(url: str, reason: str) -> None:
    """A port out of range or not a number is refused with the url (no later traceback)."""
    with pytest.raises(ValidationError, match=reason):
        MqttSettings(url=url)


def test_good_mqtt_urls_pass() -> None:
    """The documented forms load."""
    for url in ("mqtt://h:1883", "mqtts://u:p@h:8883", "embedded", "tcp://h"):
        assert MqttSettings(url=url).url == url
