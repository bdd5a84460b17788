"""``queue.broker`` beyond one Redis server: the accepted forms, their errors, TLS settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio.connection import SSLConnection

from flowerpower_daemon.errors import ConfigError
from flowerpower_daemon.queue.broker import create_broker
from flowerpower_daemon.queue.streams import (
    ReclaimingClusterStreamBroker,
    ReclaimingSentinelStreamBroker,
    ReclaimingStreamBroker,
)
from flowerpower_daemon.redact import redact_url
from flowerpower_daemon.settings import QueueSettings, RedisTarget, load_settings, parse_broker
from flowerpower_daemon.state.history import history_prefix
from flowerpower_daemon.state.stores import cluster_for, open_redis, sentinel_for


def _problems(tmp_path: Path, queue: dict[str, Any]) -> list[tuple[str, str]]:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"queue": queue}))
    with pytest.raises(ConfigError) as info:
        load_settings(str(path))
    return [(p.key, p.message) for p in info.value.problems]


def test_accepted_forms() -> None:
    assert parse_broker("redis://h:6380/2") == RedisTarget("server", "redis://h:6380/2")
    assert parse_broker("rediss://:pw@h/0").tls
    assert parse_broker("unix:///run/redis.sock?db=1").mode == "server"
    sentinel = parse_broker("redis+sentinel://:p%40ss@h1:26380,h2,[::1]:5/mymaster/3")
    assert sentinel == RedisTarget(
        "sentinel",
        "redis://:p%40ss@h1:26380/3",
        (("h1", 26380), ("h2", 26379), ("::1", 5)),
        "mymaster",
    )
    cluster = parse_broker("rediss+cluster://u:pw@n1:7000,n2:7001/?ssl_cert_reqs=none")
    assert cluster.mode == "cluster" and cluster.tls
    assert cluster.nodes == (("n1", 7000), ("n2", 7001))
    assert cluster.url == "rediss://u:pw@n1:7000/0?ssl_cert_reqs=none"
    assert cluster.display == "rediss+cluster://n1:7000,n2:7001"
    assert sentinel.display == "redis+sentinel://h1:26380,h2:26379,[::1]:5/mymaster/3"


def test_cluster_flag_and_sentinel_block_set_the_equivalent_url() -> None:
    q = QueueSettings(broker="redis://:pw@n1:7000", cluster=True)
    assert q.broker == "redis+cluster://:pw@n1:7000" and q.redis.mode == "cluster"
    s = QueueSettings(
        sentinel={
            "master": "mymaster",
            "sentinels": ["s1:26379", "s2"],
            "password": "pa/ss",
            "sentinel_password": "spw",
            "db": 1,
        }
    )
    assert s.is_redis
    assert s.broker == "redis+sentinel://:pa%2Fss@s1:26379,s2/mymaster/1"
    target = s.redis
    assert (target.mode, target.master, target.sentinel_password) == ("sentinel", "mymaster", "spw")
    assert target.nodes == (("s1", 26379), ("s2", 26379))
    # What status and logs show of it: no password (the sentinels' is not in the URL at all).
    assert "pa" not in redact_url(s.broker).split("@")[0].split("://")[1].replace(":***", "")
    assert "spw" not in s.broker
    # Validated again from a dump (the URL it was given equals the block's): the same.
    assert QueueSettings.model_validate(s.model_dump()) == s


def test_bad_forms_name_the_key_and_hide_the_password(tmp_path: Path) -> None:
    cases = {
        "mysql://u:s3cret@h/db": "use 'memory'",
        "redis+sentinel://:s3cret@h1:26379": "name the master",
        "redis+sentinel://:s3cret@h1:port/m": "bad port",
        "redis+cluster://:s3cret@h1:7000/1": "db 0 only",
        "redis+cluster://:s3cret@/": "no host",
        "redis://:s3cret@h/0?socket_timeout=soon": "socket_timeout",
        "redis+sentinel://:s3cret@h/m/x": "db must be a number",
    }
    for broker, message in cases.items():
        [(key, text)] = _problems(tmp_path, {"broker": broker})
        assert key == "queue.broker" and message in text, (broker, text)
        assert "s3cret" not in text


def test_sentinel_block_errors(tmp_path: Path) -> None:
    [(key, _)] = _problems(tmp_path, {"sentinel": {"master": "", "sentinels": ["h:1"]}})
    assert key == "queue.sentinel.master"
    [(key, text)] = _problems(tmp_path, {"sentinel": {"master": "m", "sentinels": ["h:x"]}})
    assert key == "queue.sentinel.sentinels" and "host:port" in text
    [(key, _)] = _problems(tmp_path, {"sentinel": {"master": "m", "sentinels": []}})
    assert key == "queue.sentinel.sentinels"
    typo = dict(_problems(tmp_path, {"sentinel": {"master": "m", "sentinel": ["h"]}}))
    assert "did you mean 'sentinels'" in typo["queue.sentinel.sentinel"]
    both = {"broker": "redis://:s3cret@h/0", "sentinel": {"master": "m", "sentinels": ["h"]}}
    [(key, text)] = _problems(tmp_path, both)
    assert key == "queue" and "queue.broker" in text and "s3cret" not in text
    mixed = {"cluster": True, "sentinel": {"master": "m", "sentinels": ["h"]}}
    assert "queue.cluster" in _problems(tmp_path, mixed)[0][1]
    assert "queue.cluster" in _problems(tmp_path, {"cluster": True})[0][1]
    [(_, text)] = _problems(tmp_path, {"cluster": True, "broker": "unix:///s3cret.sock"})
    assert "redis://" in text


def test_tls_url_reaches_redis_py_with_its_ssl_settings(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    url = f"rediss://:pw@h:6380/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
    pool = open_redis(url).client.connection_pool
    assert pool.connection_class is SSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == str(ca)
    assert pool.connection_kwargs["ssl_cert_reqs"] == "required"
    broker = create_broker(QueueSettings(broker=url))
    assert isinstance(broker, ReclaimingStreamBroker)
    assert broker.connection_pool.connection_class is SSLConnection
    assert broker.connection_pool.connection_kwargs["ssl_ca_certs"] == str(ca)
    # Sentinel over TLS: the master's connections and the sentinels' both.
    target = parse_broker(f"rediss+sentinel://:pw@s1:26379/m/0?ssl_ca_certs={ca}")
    sentinel = sentinel_for(target)
    assert sentinel.connection_kwargs["ssl"] is True
    assert sentinel.connection_kwargs["ssl_ca_certs"] == str(ca)
    assert sentinel.connection_kwargs["password"] == "pw"
    node = sentinel.sentinels[0].connection_pool
    assert node.connection_class is SSLConnection
    assert node.connection_kwargs["ssl_ca_certs"] == str(ca)
    s_broker = create_broker(QueueSettings(broker=target_url(target, ca)))
    assert isinstance(s_broker, ReclaimingSentinelStreamBroker)
    # Cluster over TLS: every node's connections.
    cluster = cluster_for(parse_broker(f"rediss+cluster://n1:7000,n2:7001?ssl_ca_certs={ca}"))
    assert {n.port for n in cluster.startup_nodes} == {7000, 7001}
    assert all(
        n.connection_class is SSLConnection and n.connection_kwargs["ssl_ca_certs"] == str(ca)
        for n in cluster.startup_nodes
    )
    c_broker = create_broker(QueueSettings(broker="redis+cluster://n1:7000"))
    assert isinstance(c_broker, ReclaimingClusterStreamBroker)


def target_url(target: RedisTarget, ca: Path) -> str:
    return f"rediss+sentinel://:pw@s1:26379/{target.master}/0?ssl_ca_certs={ca}"


def test_history_keys_share_a_hash_tag_on_a_cluster_only() -> None:
    assert history_prefix(QueueSettings(broker="redis://h/0", queue_name="q")) == "q:history"
    cluster = QueueSettings(broker="redis+cluster://h:7000", queue_name="q")
    assert history_prefix(cluster) == "{q}:history"
