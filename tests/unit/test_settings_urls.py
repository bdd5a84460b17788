"""Settings errors as a user reads them: mqtt.url checked whole (port included), keys as in the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from flowerpower_daemon.errors import ConfigError
from flowerpower_daemon.settings import MqttSettings, load_settings


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


def test_trigger_problems_are_keyed_as_the_file_spells_them(tmp_path: Path) -> None:
    """A bad cron is `triggers[0].cron`, not pydantic's `triggers[0].cron.cron` (the union tag)."""
    config = tmp_path / "c.yml"
    config.write_text('triggers:\n  - {type: cron, pipeline: p, cron: "61 * * * *"}\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(str(config))
    [problem] = caught.value.problems
    assert problem.key == "triggers[0].cron", problem


def test_status_topic_client_id_is_a_whole_level() -> None:
    """`fp/status-{client_id}` would make the fleet view subscribe to `fp/status-+`: refused."""
    with pytest.raises(ValidationError, match="whole topic level"):
        MqttSettings(status_topic="fp/status-{client_id}")
    assert MqttSettings(status_topic="fp/{client_id}/status").fleet_status_filter == "fp/+/status"
