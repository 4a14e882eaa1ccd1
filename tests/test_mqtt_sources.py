"""What MQTT messages mean (CONTRACT §11): every preset with the topics and payloads its devices really publish,
the generic source, the zigbee2mqtt bridge rule, the Sparkplug bdSeq rule, device ids, and topic matching."""

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from webhookd.config import MqttConfig, parse_config
from webhookd.config.mqtt import filter_problem
from webhookd.mqtt import sparkplug
from webhookd.mqtt.sources import Ignored, Reading, Sources, matches


def sources(*srcs: dict[str, Any], **mqtt: Any) -> Sources:
    cfg = parse_config({"mqtt": {"sources": list(srcs), **mqtt}}, Path("/srv"), env={}).mqtt
    assert isinstance(cfg, MqttConfig)
    return Sources(cfg)


def on(device: str) -> Reading:
    return Reading(device, "online", "connected")


def off(device: str) -> Reading:
    return Reading(device, "offline", "disconnected")


def readings(s: Sources, topic: str, payload: bytes | str) -> list[Reading]:
    got = s.route(topic, payload.encode() if isinstance(payload, str) else payload)
    assert got is not None, topic
    assert isinstance(got[1], list), got
    return got[1]


def ignored(s: Sources, topic: str, payload: bytes | str) -> str:
    got = s.route(topic, payload.encode() if isinstance(payload, str) else payload)
    assert got is not None, topic
    assert isinstance(got[1], Ignored), got
    return got[1].why


# ---------------------------------------------------------------------------------------------------------
# the simple presets
# ---------------------------------------------------------------------------------------------------------


def test_tasmota_lwt() -> None:
    s = sources({"preset": "tasmota"})
    assert s.filters() == ["tele/+/LWT"]
    # Tasmota publishes its LWT retained: "Online" after connecting, the will "Offline".
    assert s.route("tele/tasmota_8A1B2C/LWT", b"Online") == ("tasmota", [on("tasmota_8A1B2C")])
    assert readings(s, "tele/tasmota_8A1B2C/LWT", b"Offline") == [off("tasmota_8A1B2C")]
    assert readings(s, "tele/tasmota_8A1B2C/LWT", b" Online\n") == [on("tasmota_8A1B2C")]  # trimmed
    assert ignored(s, "tele/tasmota_8A1B2C/LWT", b"online") == "payload matches no state"  # case-sensitive
    assert ignored(s, "tele/tasmota_8A1B2C/LWT", b"") == "empty payload (deleted retained topic)"
    assert s.route("tele/tasmota_8A1B2C/STATE", b'{"POWER":"ON"}') is None
    assert s.route("stat/tasmota_8A1B2C/LWT", b"Online") is None


def test_tasmota_base() -> None:
    s = sources({"preset": "tasmota", "base": "home/tele"})
    assert s.filters() == ["home/tele/+/LWT"]
    assert readings(s, "home/tele/plug/LWT", "Online") == [on("plug")]


def test_esphome_status() -> None:
    s = sources({"preset": "esphome"}, status_topic=None)
    assert s.filters() == ["+/status"]
    assert readings(s, "livingroom-sensor/status", "online") == [on("livingroom-sensor")]
    assert readings(s, "livingroom-sensor/status", "offline") == [off("livingroom-sensor")]
    assert ignored(s, "livingroom-sensor/status", "Online") == "payload matches no state"
    assert sources({"preset": "esphome", "base": "esphome"}).filters() == ["esphome/+/status"]


def test_shelly_gen1() -> None:
    s = sources({"preset": "shelly"})
    assert s.filters() == ["shellies/+/online"]
    assert readings(s, "shellies/shelly1-98CDAC1F03A2/online", "true") == [on("shelly1-98CDAC1F03A2")]
    assert readings(s, "shellies/shelly1-98CDAC1F03A2/online", "false") == [off("shelly1-98CDAC1F03A2")]
    assert s.route("shellies/shelly1-98CDAC1F03A2/relay/0", b"on") is None


def test_shelly_gen2() -> None:
    s = sources({"preset": "shelly-gen2"})
    assert s.filters() == ["+/online"]
    assert readings(s, "shellyplus1pm-441793a1b2c4/online", "true") == [on("shellyplus1pm-441793a1b2c4")]
    assert readings(s, "shellyplus1pm-441793a1b2c4/online", "false") == [off("shellyplus1pm-441793a1b2c4")]
    assert ignored(s, "shellyplus1pm-441793a1b2c4/online", "1") == "payload matches no state"


# ---------------------------------------------------------------------------------------------------------
# zigbee2mqtt
# ---------------------------------------------------------------------------------------------------------

Z_ON, Z_OFF = b'{"state":"online"}', b'{"state":"offline"}'


def test_zigbee2mqtt_devices_with_slashes_and_both_payload_forms() -> None:
    s = sources({"preset": "zigbee2mqtt"})
    assert s.filters() == ["zigbee2mqtt/#"]
    assert readings(s, "zigbee2mqtt/living room/lamp/availability", Z_ON) == [on("living room/lamp")]
    assert readings(s, "zigbee2mqtt/living room/lamp/availability", b"offline") == [off("living room/lamp")]
    assert readings(s, "zigbee2mqtt/0x00158d0001a2b3c4/availability", b"online") == [on("0x00158d0001a2b3c4")]
    assert readings(s, "zigbee2mqtt/bridge/state", b"online") == [on("zigbee2mqtt")]
    assert readings(s, "zigbee2mqtt/bridge/state", Z_ON) == [on("zigbee2mqtt")]
    assert ignored(s, "zigbee2mqtt/a/availability", b'{"state":"unknown"}') == "payload matches no state"
    assert ignored(s, "zigbee2mqtt/a/availability", b"{nope") == "payload is not JSON"
    assert ignored(s, "zigbee2mqtt/a/availability", b"") == "empty payload (deleted retained topic)"


def test_zigbee2mqtt_other_topics_are_not_availability() -> None:
    s = sources({"preset": "zigbee2mqtt"})
    for topic, payload in [
        ("zigbee2mqtt/living room/lamp", b'{"state":"ON","brightness":254,"linkquality":120}'),
        ("zigbee2mqtt/living room/lamp/set", b'{"state":"OFF"}'),
        ("zigbee2mqtt/bridge/info", b'{"version":"1.40.2"}'),
        ("zigbee2mqtt/bridge/devices", b"[]"),
        ("zigbee2mqtt/bridge/logging", b'{"level":"info"}'),
        ("zigbee2mqtt/availability", b"online"),  # no device name
    ]:
        assert s.route(topic, payload) is None, topic


def test_zigbee2mqtt_bridge_offline_takes_its_devices_offline_and_back() -> None:
    s = sources({"preset": "zigbee2mqtt", "base": "z2m/usb0"})
    assert s.filters() == ["z2m/usb0/#"]
    assert readings(s, "z2m/usb0/bridge/state", Z_ON) == [on("z2m/usb0")]
    assert readings(s, "z2m/usb0/kitchen/plug/availability", Z_ON) == [on("kitchen/plug")]
    assert readings(s, "z2m/usb0/door/availability", Z_ON) == [on("door")]
    assert readings(s, "z2m/usb0/dead/availability", Z_OFF) == [off("dead")]
    # The bridge stops: every device known online counts offline (the dead one already is).
    assert readings(s, "z2m/usb0/bridge/state", b"offline") == [off("z2m/usb0"), off("kitchen/plug"), off("door")]
    # While it is offline a device's availability is remembered but the device stays offline.
    assert readings(s, "z2m/usb0/dead/availability", Z_ON) == [off("dead")]
    assert readings(s, "z2m/usb0/door/availability", Z_OFF) == [off("door")]
    # Back: each device takes its own last availability.
    assert readings(s, "z2m/usb0/bridge/state", Z_ON) == [on("z2m/usb0"), on("kitchen/plug"), off("door"), on("dead")]
    # A repeated online (a retained replay) changes nothing for the devices.
    assert readings(s, "z2m/usb0/bridge/state", Z_ON) == [on("z2m/usb0")]
    assert readings(s, "z2m/usb0/door/availability", Z_ON) == [on("door")]


def test_zigbee2mqtt_devices_filter_and_prefix_with_the_bridge() -> None:
    s = sources({"preset": "zigbee2mqtt", "devices": ["zb-plug*"], "id_prefix": "zb-"})
    assert readings(s, "zigbee2mqtt/plug 1/availability", Z_ON) == [on("zb-plug 1")]
    assert ignored(s, "zigbee2mqtt/door/availability", Z_ON) == "device 'zb-door' not selected by devices:"
    # The bridge itself is not selected, but its state still rules its selected devices.
    assert readings(s, "zigbee2mqtt/bridge/state", Z_OFF) == [off("zb-plug 1")]
    assert readings(s, "zigbee2mqtt/bridge/state", b"online") == [on("zb-plug 1")]


# ---------------------------------------------------------------------------------------------------------
# Sparkplug B
# ---------------------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, value: bytes) -> bytes:
    return _varint(number << 3 | wire) + value


def _ld(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def wire_birth(bd_seq: int, timestamp: int = 1_733_230_000_000) -> bytes:
    """An NBIRTH/NDEATH payload written byte by byte from sparkplug_b.proto (not with our descriptor): the
    ``bdSeq`` metric as an Int64 (datatype 4, long_value), as Eclipse Tahu's edge nodes send it."""
    metric = _ld(1, b"bdSeq") + _field(3, 0, _varint(timestamp)) + _field(4, 0, _varint(4))
    metric += _field(11, 0, _varint(bd_seq))
    return _field(1, 0, _varint(timestamp)) + _ld(2, metric) + _field(3, 0, _varint(0))


def birth(bd_seq: int | None, *, as_int32: bool = False) -> bytes:
    """A full NBIRTH as an edge node sends one: bdSeq, Node Control/Rebirth, and metrics of other kinds."""
    p = sparkplug.Payload(timestamp=1_733_230_000_000, seq=0)
    if bd_seq is not None:
        m = p.metrics.add(name="bdSeq", datatype=3 if as_int32 else 4)
        if as_int32:
            m.int_value = bd_seq
        else:
            m.long_value = bd_seq
    p.metrics.add(name="Node Control/Rebirth", datatype=11, boolean_value=False)
    p.metrics.add(name="Properties/Hardware", datatype=12, string_value="Raspberry Pi 4")
    t = p.metrics.add(name="Temperature", alias=7, datatype=10, double_value=21.5)
    t.properties.keys.append("engUnit")
    t.properties.values.add(type=12, string_value="°C")
    ds = p.metrics.add(name="Table", datatype=16).dataset_value
    ds.num_of_columns = 1
    ds.columns.append("c")
    ds.types.append(3)
    ds.rows.add().elements.add(int_value=5)
    return bytes(p.SerializeToString())


def test_sparkplug_payload_decodes_the_wire_format() -> None:
    assert sparkplug.bd_seq(wire_birth(0)) == 0
    assert sparkplug.bd_seq(wire_birth(300)) == 300
    assert sparkplug.bd_seq(birth(7)) == 7
    assert sparkplug.bd_seq(birth(7, as_int32=True)) == 7
    assert sparkplug.bd_seq(birth(None)) is None
    decoded = sparkplug.decode(birth(1))
    assert [m.name for m in decoded.metrics][:3] == ["bdSeq", "Node Control/Rebirth", "Properties/Hardware"]
    assert decoded.metrics[3].properties.values[0].string_value == "°C"
    # Our descriptor writes what the hand-written bytes are.
    assert sparkplug.decode(wire_birth(5)).SerializeToString() == wire_birth(5)
    with pytest.raises(sparkplug.Undecodable):
        sparkplug.decode(b"\x12\xff\xff\xff")


def test_sparkplug_births_and_deaths() -> None:
    s = sources({"preset": "sparkplug"})
    assert s.filters() == ["spBv1.0/+/NBIRTH/+", "spBv1.0/+/NDEATH/+", "spBv1.0/+/DBIRTH/+/+", "spBv1.0/+/DDEATH/+/+"]
    assert readings(s, "spBv1.0/plant1/NBIRTH/edge-a", birth(4)) == [on("plant1/edge-a")]
    assert readings(s, "spBv1.0/plant1/DBIRTH/edge-a/pump-1", birth(None)) == [on("plant1/edge-a/pump-1")]
    assert readings(s, "spBv1.0/plant1/DBIRTH/edge-a/pump-2", b"\x08\x01") == [on("plant1/edge-a/pump-2")]
    assert readings(s, "spBv1.0/plant1/DDEATH/edge-a/pump-2", b"\x08\x02") == [off("plant1/edge-a/pump-2")]
    # An NDEATH from an earlier session (the broker publishes an old will late): not counted.
    assert ignored(s, "spBv1.0/plant1/NDEATH/edge-a", wire_birth(3)) == "stale bdSeq 3 (last NBIRTH 4)"
    # The will of this session: the node and the devices it still has go offline.
    assert readings(s, "spBv1.0/plant1/NDEATH/edge-a", wire_birth(4)) == [
        off("plant1/edge-a"),
        off("plant1/edge-a/pump-1"),
    ]
    # Not presence: not even subscribed.
    for kind in ("NDATA/edge-a", "DDATA/edge-a/pump-1", "NCMD/edge-a", "DCMD/edge-a/pump-1"):
        assert s.route(f"spBv1.0/plant1/{kind}", birth(4)) is None
    assert s.route("spBv1.0/STATE/scada-host", b'{"online":true,"timestamp":1}') is None


def test_sparkplug_a_new_session_without_the_old_death_takes_the_old_devices_offline() -> None:
    s = sources({"preset": "sparkplug"})
    readings(s, "spBv1.0/g/NBIRTH/e", birth(4))
    readings(s, "spBv1.0/g/DBIRTH/e/pump", birth(None))
    readings(s, "spBv1.0/g/DBIRTH/e/fan", birth(None))
    # bdSeq 5: the session of bdSeq 4 died without its NDEATH reaching us
    assert readings(s, "spBv1.0/g/NBIRTH/e", birth(5)) == [off("g/e/fan"), off("g/e/pump"), on("g/e")]
    assert readings(s, "spBv1.0/g/DBIRTH/e/pump", birth(None)) == [on("g/e/pump")]  # alive: back at once
    # a rebirth asked by the host keeps its bdSeq: nothing is taken offline
    assert readings(s, "spBv1.0/g/NBIRTH/e", birth(5)) == [on("g/e")]


def test_sparkplug_ndeath_of_an_unknown_node_counts() -> None:
    s = sources({"preset": "sparkplug"})
    assert readings(s, "spBv1.0/g/NDEATH/e", wire_birth(9)) == [off("g/e")]
    assert readings(s, "spBv1.0/g/NBIRTH/e", birth(None)) == [on("g/e")]  # no bdSeq: any NDEATH counts
    assert readings(s, "spBv1.0/g/NDEATH/e", wire_birth(2)) == [off("g/e")]


def test_sparkplug_bad_payloads_and_selection() -> None:
    s = sources({"preset": "sparkplug", "devices": ["sp:g/e/*"], "id_prefix": "sp:"})
    assert ignored(s, "spBv1.0/g/NBIRTH/e", b"\x12\xff\xff") == "undecodable Sparkplug B payload"
    assert ignored(s, "spBv1.0/g/NBIRTH/e", b"") == "empty payload (deleted retained topic)"
    assert ignored(s, "spBv1.0/g/NBIRTH/e", birth(1)) == "device 'sp:g/e' not selected by devices:"
    assert readings(s, "spBv1.0/g/DBIRTH/e/d", birth(None)) == [on("sp:g/e/d")]
    # The node is not selected, its device is: the NDEATH still takes the device offline.
    assert readings(s, "spBv1.0/g/NDEATH/e", wire_birth(1)) == [off("sp:g/e/d")]


# ---------------------------------------------------------------------------------------------------------
# generic sources
# ---------------------------------------------------------------------------------------------------------


def test_generic_text_payloads_and_device_level() -> None:
    s = sources(
        {"topic": "site/+/rack/+/presence", "device": 2, "utilizing": ["busy"], "unplugged": ["unplugged", "gone"]}
    )
    assert s.names == ("site/+/rack/+/presence",)
    assert readings(s, "site/a/rack/r7/presence", " online ") == [on("r7")]
    assert readings(s, "site/a/rack/r7/presence", "offline") == [off("r7")]
    assert readings(s, "site/a/rack/r7/presence", "busy") == [Reading("r7", "utilizing", "reported")]
    assert readings(s, "site/a/rack/r7/presence", "gone") == [Reading("r7", "unplugged", "reported")]
    assert ignored(s, "site/a/rack/r7/presence", "hello") == "payload matches no state"
    assert ignored(s, "site/a/rack/r7/presence", b"\xff") == "payload is not UTF-8 text"


def test_generic_json_field() -> None:
    s = sources({"topic": "lab/+/presence", "field": "status", "online": ["up", "true"], "offline": ["down"]})
    assert readings(s, "lab/x/presence", b'{"status": "up", "rssi": -60}') == [on("x")]
    assert readings(s, "lab/x/presence", b'{"status": true}') == [on("x")]  # a JSON true compares as "true"
    assert readings(s, "lab/x/presence", b'{"status": " down "}') == [off("x")]
    assert ignored(s, "lab/x/presence", b'{"rssi": -60}') == "no 'status' in the JSON payload"
    assert ignored(s, "lab/x/presence", b'["up"]') == "no 'status' in the JSON payload"
    assert ignored(s, "lab/x/presence", b"up") == "payload is not JSON"
    assert ignored(s, "lab/x/presence", b'{"status": "sideways"}') == "payload matches no state"


def test_generic_heartbeat() -> None:
    s = sources({"topic": "beat/+", "heartbeat": True, "field": "state"})
    hb = Reading("d1", None, "heartbeat")
    assert readings(s, "beat/d1", b'{"uptime": 12}') == [hb]
    assert readings(s, "beat/d1", b"ping") == [hb]
    assert readings(s, "beat/d1", b'{"state": "offline"}') == [off("d1")]
    assert ignored(s, "beat/d1", b"") == "empty payload (deleted retained topic)"  # a deletion is no sign of life


def test_generic_devices_and_prefix() -> None:
    s = sources({"topic": "lab/+/presence", "devices": ["lab-printer-*", "lab-cam"], "id_prefix": "lab-"})
    assert readings(s, "lab/printer-2/presence", "online") == [on("lab-printer-2")]
    assert readings(s, "lab/cam/presence", "online") == [on("lab-cam")]
    assert ignored(s, "lab/Cam/presence", "online") == "device 'lab-Cam' not selected by devices:"


# ---------------------------------------------------------------------------------------------------------
# device ids, names, routing
# ---------------------------------------------------------------------------------------------------------


def test_device_ids_are_checked() -> None:
    s = sources({"preset": "tasmota"}, {"preset": "zigbee2mqtt"})
    assert readings(s, "tele/" + "x" * 128 + "/LWT", "Online") == [on("x" * 128)]
    assert ignored(s, "tele/" + "x" * 129 + "/LWT", "Online") == "device id longer than 128 characters"
    assert ignored(s, "tele/a\x07b/LWT", "Online") == "device id contains control characters"
    assert ignored(s, "tele/a\x85b/LWT", "Online") == "device id contains control characters"  # C1 too
    assert ignored(s, "tele//LWT", "Online") == "empty device id"
    assert readings(s, "zigbee2mqtt/Küche Lampe 2/availability", "online") == [on("Küche Lampe 2")]
    long = "/".join(["y" * 60] * 3)
    assert ignored(s, f"zigbee2mqtt/{long}/availability", "online") == "device id longer than 128 characters"


def test_status_topic_is_never_a_device() -> None:
    # esphome's `+/status` matches webhookd's own `webhookd/status`: it must not become a device.
    s = sources({"preset": "esphome"}, {"topic": "+/+"})
    assert s.route("webhookd/status", b"online") is None
    assert s.route("webhookd/status", b"offline") is None
    s = sources({"preset": "esphome"}, status_topic="gw/me")
    assert s.route("gw/me", b"offline") is None
    assert readings(s, "webhookd/status", "online") == [on("webhookd")]


def test_names_filters_and_first_source_wins() -> None:
    s = sources(
        {"preset": "tasmota"},
        {"preset": "tasmota", "base": "tele"},
        {"topic": "tele/+/LWT", "online": ["Online"], "offline": ["Offline"]},
        {"preset": "tasmota", "base": "b2"},
        {"topic": "tele/+/LWT"},
    )
    assert s.names == ("tasmota", "tasmota#2", "tele/+/LWT", "tasmota#3", "tele/+/LWT#2")
    assert s.filters() == ["tele/+/LWT", "b2/+/LWT"]
    assert s.route("tele/p/LWT", b"Online") == ("tasmota", [on("p")])
    assert s.route("b2/p/LWT", b"Offline") == ("tasmota#3", [off("p")])
    assert s.route("nothing/here", b"online") is None


def test_a_source_that_does_not_claim_a_topic_lets_the_next_one_have_it() -> None:
    s = sources({"preset": "zigbee2mqtt"}, {"topic": "zigbee2mqtt/+", "field": "state", "online": ["ON"]})
    assert s.route("zigbee2mqtt/lamp", b'{"state":"ON"}') == ("zigbee2mqtt/+", [on("lamp")])
    assert s.route("zigbee2mqtt/lamp/availability", b"online") == ("zigbee2mqtt", [on("lamp")])


def test_keep_state_across_a_reload() -> None:
    z2m, sp = {"preset": "zigbee2mqtt"}, {"preset": "sparkplug"}
    old = sources(z2m, sp)
    readings(old, "zigbee2mqtt/lamp/availability", "online")
    readings(old, "zigbee2mqtt/bridge/state", "offline")
    readings(old, "spBv1.0/g/NBIRTH/e", birth(4))
    new = sources({"preset": "esphome"}, sp, z2m)
    new.keep_state(old)
    assert readings(new, "zigbee2mqtt/lamp/availability", "online") == [off("lamp")]  # the bridge is still off
    assert readings(new, "zigbee2mqtt/bridge/state", "online") == [on("zigbee2mqtt"), on("lamp")]
    assert ignored(new, "spBv1.0/g/NDEATH/e", wire_birth(3)) == "stale bdSeq 3 (last NBIRTH 4)"
    # A source configured differently starts afresh.
    other = sources({"preset": "sparkplug", "id_prefix": "x-"})
    other.keep_state(old)
    assert readings(other, "spBv1.0/g/NDEATH/e", wire_birth(3)) == [off("x-g/e")]


# ---------------------------------------------------------------------------------------------------------
# topic matching (MQTT 3.1.1 §4.7), against paho's matcher
# ---------------------------------------------------------------------------------------------------------

LEVELS = st.sampled_from(["a", "b", "", "$SYS", "x y", "é"])
FILTER_LEVELS = st.one_of(LEVELS, st.just("+"), st.just("#"))


@given(st.lists(FILTER_LEVELS, min_size=1, max_size=5), st.lists(LEVELS, min_size=1, max_size=5))
def test_matching_agrees_with_paho(filter_levels: list[str], topic_levels: list[str]) -> None:
    f, topic = "/".join(filter_levels), "/".join(topic_levels)
    if filter_problem(f) is not None or not topic:
        return
    assert matches(f, topic) == topic_matches_sub(f, topic), (f, topic)


@given(st.lists(LEVELS, min_size=1, max_size=5))
def test_a_topic_matches_itself_and_hash(topic_levels: list[str]) -> None:
    topic = "/".join(topic_levels)
    assert matches(topic, topic)
    assert matches("#", topic) != topic.startswith("$")


def test_routing_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from webhookd.mqtt import sources as module

    monkeypatch.setattr(module, "CACHE_TOPICS", 10)
    s = sources({"preset": "esphome"}, {"topic": "+/+", "online": ["up"]}, status_topic=None)
    for i in range(50):
        assert readings(s, f"d{i}/status", "online") == [on(f"d{i}")]
        assert readings(s, f"d{i}/other", "up") == [on(f"d{i}")]
        assert len(s._candidates) <= 10
    assert s.route("d1/status", b"up") == ("esphome", Ignored("payload matches no state"))
