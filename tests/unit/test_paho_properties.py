"""paho's v5 Properties with the lookup tables shared (flowerpower_daemon.mqtt.client): still
packs, unpacks, validates and clears as paho's own does."""

from __future__ import annotations

import pytest
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flowerpower_daemon.mqtt import client as mqtt


def test_the_tables_are_shared_on_this_paho() -> None:
    assert mqtt._share_property_tables()
    assert "names" not in vars(Properties(PacketTypes.PUBLISH))


def test_properties_round_trip_through_pack_and_unpack() -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "replies/7"
    props.CorrelationData = b"\x00\x01corr"
    props.UserProperty = [("a", "1")]
    props.UserProperty = ("b", "2")  # several allowed: appended
    packed = props.pack()
    back = Properties(PacketTypes.PUBLISH)
    back.unpack(packed)
    assert back.ResponseTopic == "replies/7"
    assert back.CorrelationData == b"\x00\x01corr"
    assert back.UserProperty == [("a", "1"), ("b", "2")]
    assert back.json()["ResponseTopic"] == "replies/7"
    assert "replies/7" in str(back)


def test_validation_still_refuses_bad_properties() -> None:
    props = Properties(PacketTypes.PUBLISH)
    with pytest.raises(MQTTException, match="Property name must be one of"):
        props.NoSuchProperty = 1
    with pytest.raises(MQTTException, match="does not apply to packet type"):
        props.ReceiveMaximum = 10  # a CONNECT/CONNACK property
    connect = Properties(PacketTypes.CONNECT)
    with pytest.raises(MQTTException, match="range 1-65535"):
        connect.ReceiveMaximum = 0


def test_instances_do_not_share_values_and_clear_empties_one() -> None:
    one, two = Properties(PacketTypes.PUBLISH), Properties(PacketTypes.PUBLISH)
    one.ResponseTopic = "x"
    assert not hasattr(two, "ResponseTopic") and two.isEmpty()
    one.clear()
    assert one.isEmpty() and one.pack() == b"\x00"
