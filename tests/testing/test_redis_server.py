"""The throwaway redis-server: start, restart with and without AOF, pause, failures."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from apipool.errors import ApipoolError
from apipool.testing import redis_server
from apipool.testing.redis_server import (
    RedisServer,
    RedisServerError,
    RedisServerFailed,
    RedisServerMissing,
    free_port,
)

pytestmark = pytest.mark.redis


def client(server: RedisServer, timeout: float = 2.0) -> redis.Redis:
    return redis.Redis.from_url(
        server.url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


@pytest.mark.timeout(30)
def test_start_ping_set_and_close_removes_its_directory() -> None:
    with RedisServer() as server:
        assert server.running
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        workdir = server.workdir
        assert workdir is not None
        assert (workdir / "redis.log").exists()
        r = client(server)
        assert r.ping()
        r.set("k", "v")
        assert r.get("k") == b"v"
        assert r.config_get("bind")["bind"] == "127.0.0.1"
        assert r.config_get("save")["save"] == ""
        r.close()
    assert server.pid is None
    assert not workdir.exists()


@pytest.mark.timeout(30)
def test_restart_with_appendonly_keeps_data_on_the_same_port() -> None:
    with RedisServer(appendonly=True) as server:
        port = server.port
        r = client(server)
        r.set("survivor", "yes")
        r.close()
        server.restart()
        assert server.port == port
        r = client(server)
        assert r.get("survivor") == b"yes"
        r.close()
        server.kill()  # a crash: appendfsync always loses nothing acknowledged
        assert not server.running
        server.start()
        r = client(server)
        assert r.get("survivor") == b"yes"
        r.close()


@pytest.mark.timeout(30)
def test_restart_without_appendonly_loses_data() -> None:
    with RedisServer() as server:
        r = client(server)
        r.set("ephemeral", "yes")
        r.close()
        server.restart()
        r = client(server)
        assert r.get("ephemeral") is None
        r.close()


@pytest.mark.timeout(30)
def test_pause_hangs_and_resume_answers() -> None:
    with RedisServer() as server:
        r = client(server, timeout=0.5)
        assert r.ping()
        server.pause()
        assert server.running
        with pytest.raises(redis.TimeoutError):
            r.ping()
        server.resume()
        r2 = client(server, timeout=2.0)
        assert r2.ping()
        r2.close()
        r.close()


@pytest.mark.timeout(30)
def test_stop_while_paused_does_not_hang() -> None:
    server = RedisServer()
    try:
        server.start()
        server.pause()
        server.stop()
        assert not server.running
    finally:
        server.close()


@pytest.mark.timeout(30)
def test_given_workdir_is_kept(tmp_path: Path) -> None:
    with RedisServer(workdir=str(tmp_path / "data"), appendonly=True) as server:
        r = client(server)
        r.set("k", "v")
        r.close()
    assert (tmp_path / "data" / "redis.log").exists()


@pytest.mark.timeout(30)
def test_missing_binary_names_the_package() -> None:
    server = RedisServer(binary="/nonexistent/redis-server")
    with pytest.raises(RedisServerMissing) as info:
        server.start()
    assert isinstance(info.value, RedisServerError)
    assert not isinstance(info.value, ApipoolError)  # a test tool's error, not the runtime's
    message = str(info.value)
    assert "redis-server" in message
    assert "apt-get install redis-server" in message
    assert "brew install redis" in message
    assert not server.running
    server.close()


@pytest.mark.timeout(30)
def test_port_in_use_fails_with_the_log_tail() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        server = RedisServer(port=blocker.getsockname()[1])
        try:
            with pytest.raises(RedisServerFailed) as info:
                server.start()
            assert "tail of redis.log" in str(info.value)
            assert not server.running
        finally:
            server.close()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.timeout(30)
def test_a_server_that_never_answers_fails_with_the_last_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mute = tmp_path / "mute-redis-server"
    mute.write_text("#!/bin/sh\nexec sleep 30\n")  # runs, never listens
    mute.chmod(0o755)
    monkeypatch.setattr(redis_server, "START_DEADLINE", 0.5)
    server = RedisServer(binary=str(mute))
    try:
        with pytest.raises(RedisServerFailed) as info:
            server.start()
        message = str(info.value)
        assert "did not answer PING within 0.5 s (last error: " in message
        assert f"port {server.port}" in message
        assert not server.running  # killed, not left behind
    finally:
        server.close()
