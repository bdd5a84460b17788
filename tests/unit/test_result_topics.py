"""Result topic templates: fields filled in, made safe for one topic level, unknown names kept."""

from __future__ import annotations

import pytest

from flowerpower_daemon.mqtt.sinks import render_topic

FIELDS = {"pipeline": "stats", "device": "a/b+#", "run_id": "r1", "n": None}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("flowerpower/results/{pipeline}", "flowerpower/results/stats"),
        ("out/{device}/{pipeline}", "out/a_b__/stats"),  # no extra levels, no wildcards
        ("out/{unknown}/{run_id}", "out/{unknown}/r1"),  # unknown names stay
        ("{{literal}}/{pipeline}", "{literal}/stats"),
        ("out/{n}", "out/None"),
        ("out/{device!r}", "out/'a_b__'"),  # str.format itself handles conversions
        ("fixed/topic", "fixed/topic"),
    ],
)
def test_render_topic(template: str, expected: str) -> None:
    assert render_topic(template, FIELDS) == expected
