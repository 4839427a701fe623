"""SciTags pure logic: flow-label bit layout, registry, pipe lines, fireflies, config, CLI."""
import json
import os
import subprocess
import sys
import time

import pytest
from hypothesis import given, strategies as st

from gridbpf.scitags import config, firefly, label
from gridbpf.scitags.flows import InputError, make_tuple, parse_api_request, parse_pipe_line
from gridbpf.scitags.registry import Registry, RegistryError

REG = Registry.bundled()


def bit(value: int, n: int) -> int:
    return value >> n & 1


# --- the flow label --------------------------------------------------------------------------

def test_every_registry_entry_round_trips_through_label_and_scitag():
    entries = list(REG.entries())
    assert len(entries) > 100          # the whole shipped registry, not a sample
    for exp_id, act_id, exp_name, act_name in entries:
        for entropy in (0, label.ENTROPY_MASK, label.random_entropy()):
            value = label.encode(exp_id, act_id, entropy)
            assert value <= 0xFFFFF
            assert label.decode(value) == (exp_id, act_id)
            assert value & label.ENTROPY_MASK == entropy & label.ENTROPY_MASK
        assert label.split_scitag(label.scitag(exp_id, act_id)) == (exp_id, act_id)
        assert REG.names(*label.decode(label.encode(exp_id, act_id))) == (exp_name, act_name)
        assert REG.resolve(exp_name, act_name)[:2] == (exp_id, act_id)
        assert REG.resolve(str(exp_id), str(act_id))[:2] == (exp_id, act_id)


@given(st.integers(0, 511), st.integers(0, 63), st.integers(0, 31))
def test_bit_layout_matches_the_specification(exp, act, ent5):
    value = label.encode(exp, act, label.spread_entropy(ent5))
    for i in range(9):      # experiment bit i (LSB first) sits at bit 17 - i: bit-reversed
        assert bit(value, 17 - i) == bit(exp, i)
    for i in range(6):      # activity bit i at bit 2 + i
        assert bit(value, 2 + i) == bit(act, i)
    entropy_bits = [bit(value, 19), bit(value, 18), bit(value, 8), bit(value, 1), bit(value, 0)]
    assert entropy_bits == [bit(ent5, 4), bit(ent5, 3), bit(ent5, 2), bit(ent5, 1), bit(ent5, 0)]
    assert label.scitag(exp, act) == exp << 6 | act


def test_known_values():
    # atlas (2) "Production Input" (15): experiment 0b000000010 reversed is 0b010000000
    assert label.encode(2, 15) == 0b00_010000000_0_001111_00 == 0x1003C
    assert label.scitag(2, 15) == 143
    assert label.decode(0x1003C | label.ENTROPY_MASK) == (2, 15)
    assert label.encode(1, 0) == 1 << 17          # experiment LSB lands at bit 17


def test_out_of_range_ids_are_refused():
    with pytest.raises(ValueError, match="experiment id 512"):
        label.encode(512, 1)
    with pytest.raises(ValueError, match="activity id 64"):
        label.encode(1, 64)
    with pytest.raises(ValueError, match="20 bits"):
        label.decode(1 << 20)


def test_random_entropy_uses_only_entropy_bits_and_varies():
    seen = {label.random_entropy() for _ in range(400)}
    assert all(e & ~label.ENTROPY_MASK == 0 for e in seen)
    assert len(seen) == 32


# --- registry --------------------------------------------------------------------------------

def test_registry_names_and_numbers():
    assert REG.resolve("atlas", "Production Input")[:2] == (2, 15)
    assert REG.resolve("ATLAS", "production input")[:2] == (2, 15)
    assert REG.resolve(3, 1)[2:] == ("cms", "default")
    assert {e.name: e.id for e in REG.experiments.values()}.items() >= {
        "atlas": 2, "cms": 3, "lhcb": 4, "alice": 5}.items()
    with pytest.raises(RegistryError, match="experiment 'nosuch' is not in the registry"):
        REG.resolve("nosuch", 1)
    with pytest.raises(RegistryError, match="activity id 63 is not registered for experiment atlas"):
        REG.resolve("atlas", 63)


def test_registry_file_errors(tmp_path):
    bad = tmp_path / "api.json"
    bad.write_text('{"experiments": [{"expName": "x"}]}')
    with pytest.raises(RegistryError, match="missing key 'expId'"):
        Registry.from_file(bad)
    bad.write_text("{not json")
    with pytest.raises(RegistryError, match="not JSON"):
        Registry.from_file(bad)
    bad.write_text('{"experiments": [{"expName": "x", "expId": 600, "activities": []}]}')
    with pytest.raises(RegistryError, match="does not fit in 9 bits"):
        Registry.from_file(bad)


def test_registry_update_installs_a_new_file(tmp_path):
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"experiments": [{"expName": "newexp", "expId": 77, "activities": [
        {"activityName": "Bulk", "activityId": 9}]}]}))
    dest = tmp_path / "state" / "scitags-api.json"
    env_run = [sys.executable, "-m", "gridbpf.cli", "scitags", "registry"]
    env = dict(os.environ, GRIDBPF_SCITAGS_REGISTRY=str(dest))
    r = subprocess.run(env_run + ["--update", str(new), "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["experiments"] == 1 and dest.exists()
    r = subprocess.run([sys.executable, "-m", "gridbpf.cli", "scitags", "encode", "newexp", "Bulk", "--json"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["scitag"] == 77 << 6 | 9
    new.write_text('{"experiments": 3}')
    r = subprocess.run(env_run + ["--update", str(new)], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "'experiments' is not a list" in r.stderr
    assert Registry.from_file(dest).experiments[77].name == "newexp"   # the good one stays


# --- named-pipe lines ------------------------------------------------------------------------

def test_the_lines_storm_writes():
    # StoRM WebDAV: "start" + " tcp " + src + " " + sport + " " + dst + " " + dport + " " + exp + " " + act + "\n"
    ev = parse_pipe_line("start tcp 0:0:0:0:0:0:0:1 8443 fd00:0:0:0:0:0:0:2 51234 2 15\n")
    assert (ev.state, ev.flow.protocol, str(ev.flow.src), ev.flow.src_port) == ("start", "tcp", "::1", 8443)
    assert (str(ev.flow.dst), ev.flow.dst_port, ev.experiment, ev.activity) == ("fd00::2", 51234, "2", "15")
    ev = parse_pipe_line("end tcp 192.0.2.1 443 198.51.100.7 40000 3 1")
    assert ev.state == "end" and ev.flow.afi == "ipv4"
    # a dual-stack Java socket reports IPv4 peers v4-mapped; that flow is IPv4
    ev = parse_pipe_line("start tcp ::ffff:192.0.2.1 443 ::ffff:198.51.100.7 40000 3 1")
    assert ev.flow.afi == "ipv4" and str(ev.flow.src) == "192.0.2.1"
    ev = parse_pipe_line("start tcp [fe80::1%eth0] 443 fe80::2 40000 atlas 2")
    assert str(ev.flow.src) == "fe80::1" and ev.experiment == "atlas"


@pytest.mark.parametrize("line,message", [
    ("start tcp ::1 443 ::2 40000 2", "expected 8 fields"),
    ("begin tcp ::1 443 ::2 40000 2 15", "state 'begin' is not start or end"),
    ("start sctp ::1 443 ::2 40000 2 15", "protocol 'sctp' is not tcp or udp"),
    ("start tcp ::1 0 ::2 40000 2 15", "source port 0 is out of range"),
    ("start tcp ::1 443 ::2 port 2 15", "destination port 'port' is not a port number"),
    ("start tcp ::1x 443 ::2 1 2 15", "source address '::1x' is not an IP address"),
    ("start tcp ::1 443 10.0.0.1 1 2 15", "not of the same address family"),
])
def test_malformed_pipe_lines_say_what_is_wrong(line, message):
    with pytest.raises(InputError, match=message):
        parse_pipe_line(line)


def test_api_requests():
    ev = parse_api_request({"src": "fd00::1", "src_port": 1, "dst": "fd00::2", "dst_port": 2,
                            "experiment": "cms"})
    assert (ev.state, ev.flow.protocol, ev.activity) == ("start", "tcp", "default")
    with pytest.raises(InputError, match="missing field 'dst_port'"):
        parse_api_request({"src": "fd00::1", "src_port": 1, "dst": "fd00::2", "experiment": 2})
    with pytest.raises(InputError, match="unknown field 'colour'"):
        parse_api_request({"colour": 1})
    with pytest.raises(InputError, match="not a JSON object"):
        parse_api_request([1])


# --- fireflies -------------------------------------------------------------------------------

def test_firefly_messages_validate_against_the_shipped_schema():
    import jsonschema
    schema = firefly.schema()
    assert schema["$id"].endswith("/v1.0.0/firefly.schema.json")
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    t = time.time()
    for afi_tuple in (make_tuple("tcp", "fd00::1", 443, "fd00::2", 5000),
                      make_tuple("udp", "192.0.2.1", 443, "192.0.2.2", 5000)):
        for state in ("start", "ongoing", "end"):
            msg = firefly.message(state, afi_tuple, 2, 15, start=t - 3, end=t if state == "end" else None,
                                  now=t, application="gridbpf test",
                                  usage=None if state == "start" else {"sent": 10, "received": 2})
            checker.validate(msg)
            firefly.validate(msg)
            header, body = firefly.parse_packet(firefly.packet(msg, t, "host1"))
            assert body == msg
            assert header == {"priority": 134, "version": 1, "timestamp": firefly.utc_iso(t),
                              "hostname": "host1", "app_name": "flowd", "procid": "-",
                              "msgid": "firefly-json", "structured_data": "-"}


def test_schema_checks_bite():
    t = time.time()
    ft = make_tuple("tcp", "fd00::1", 443, "fd00::2", 5000)
    msg = firefly.message("end", ft, 2, 15, start=t, now=t, application="x")   # no end-time
    with pytest.raises(ValueError, match="'end-time' is a required property"):
        firefly.validate(msg)
    msg = firefly.message("start", ft, 2, 15, start=t, now=t, application="x")
    msg["flow-lifecycle"]["start-time"] = "yesterday"
    with pytest.raises(ValueError, match="is not a 'date-time'"):
        firefly.validate(msg)
    msg = firefly.message("start", ft, 2, 15, start=t, now=t, application="x")
    msg["flow-id"]["src-ip"] = "192.0.2.1"           # afi ipv6 with an IPv4 address
    with pytest.raises(ValueError, match="flow-id"):
        firefly.validate(msg)


# --- config ----------------------------------------------------------------------------------

def test_config_parses_and_names_bad_keys(tmp_path):
    cfg = config.parse({"marking": {"interfaces": ["eth0", {"name": "v1", "netns": "ns"}]},
                        "pipe": {"path": "/tmp/x"}, "api": {"listen": "[::1]:9000"},
                        "firefly": {"collectors": ["[fd00::9]:9999", "c.example"], "interval": 5},
                        "auto_tag": [{"prefix": "/atlas/", "experiment": "atlas"}]})
    assert [str(i) for i in cfg.interfaces] == ["eth0", "v1@ns"]
    assert cfg.api_listen == ("::1", 9000) and cfg.firefly_interval == 5.0
    assert [firefly.parse_target(c) for c in cfg.firefly_collectors] == [("fd00::9", 9999), ("c.example", 10514)]
    for data, msg in [({"marking": {"interfaces": "eth0"}}, "marking.interfaces: expected list"),
                      ({"marking": {"colour": 1}}, "marking.colour: unknown key"),
                      ({"nope": {}}, r"unknown section \[nope\]"),
                      ({"api": {"listen": "localhost"}}, "api.listen: 'localhost' is not HOST:PORT"),
                      ({"firefly": {"interval": -1}}, "firefly.interval: -1 is negative"),
                      ({"firefly": {"enabled": "yes"}}, "firefly.enabled: expected bool"),
                      ({"auto_tag": [{"prefix": "atlas"}]}, r"auto_tag\[0\].prefix")]:
        with pytest.raises(config.ConfigError, match=msg):
            config.parse(data)
    p = tmp_path / "c.toml"
    p.write_text("[marking\n")
    with pytest.raises(config.ConfigError, match="c.toml"):
        config.load(str(p))


# --- CLI -------------------------------------------------------------------------------------

def cli(*args):
    return subprocess.run([sys.executable, "-m", "gridbpf.cli", "scitags", *args], capture_output=True, text=True)


def test_decode_cli():
    value = label.encode(2, 15, label.spread_entropy(0b10110))
    r = cli("decode", hex(value), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [(o["as"], o["experiment"], o["activity"]) for o in out] == [("label", "atlas", "Production Input")]
    r = cli("decode", "143")
    assert r.returncode == 0 and "scitag 143: experiment 2 activity 15: atlas/Production Input" in r.stdout
    r = cli("decode", "zz")
    assert r.returncode == 2 and "'zz' is not an integer" in r.stderr
    r = cli("decode", str(1 << 20), "--as", "label")
    assert r.returncode == 2 and "does not fit in 20 bits" in r.stderr


# --- automatic tagging by path prefix (the interface offered to the tracer) ---------------------

def test_autotag_tags_by_longest_prefix_and_keeps_keepalive_flows():
    from gridbpf.scitags.autotag import AutoTagger, data_direction
    from gridbpf.scitags.daemon import Daemon
    from gridbpf.scitags.marker import Marker
    cfg = config.parse({"firefly": {"enabled": False}})
    d = Daemon(cfg, REG)
    d.marker = Marker([])                    # the real kernel table, attached nowhere
    try:
        rules = [config.AutoTagRule("/atlas/", "atlas", "default"),
                 config.AutoTagRule("/atlas/tape/", "atlas", "T0 Tape"),
                 config.AutoTagRule("/cms/", 3, 12)]
        tagger = AutoTagger(d, rules, REG)
        get = data_direction("GET", "tcp", "fd00::2", 443, "fd00::1", 50000)
        assert (str(get.src), get.src_port) == ("fd00::2", 443)          # server sends
        put = data_direction("put", "tcp", "fd00::2", 443, "fd00::1", 50001)
        assert (str(put.src), put.src_port) == ("fd00::1", 50001)        # client sends
        assert tagger.on_request(get, "/dteam/file") is None and not d.active
        f1 = tagger.on_request(get, "/atlas/data/f1?x=1")
        assert (f1.experiment, f1.activity, f1.source) == ("atlas", "default", "trace")
        assert d.marker.counters(get) is not None                        # in the kernel table
        assert tagger.on_request(get, "/atlas/data/f2") is f1            # keep-alive, same tag
        f3 = tagger.on_request(get, "/atlas/tape/f3")                    # longest prefix wins
        assert f3 is not f1 and f3.activity == "T0 Tape" and f1.end is not None
        f4 = tagger.on_request(put, "/cms/x")
        assert (f4.experiment_id, f4.activity_id) == (3, 12)
        assert tagger.on_close(get) is f3 and f3.end is not None         # ending: still marked
        assert d.marker.counters(get) is not None
        assert d.reap() == 1 and get not in d.active                     # no packet in flight
        assert d.marker.counters(get) is None                            # unregistered
        with pytest.raises(RegistryError, match="activity 'Nope'"):
            AutoTagger(d, [config.AutoTagRule("/x/", "atlas", "Nope")], REG)
    finally:
        d.marker.close()
