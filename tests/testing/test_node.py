"""The local node against real processes: each test drives one kubelet behaviour
through the API emulator over HTTP and checks what the processes and the pod
objects show (``apipool.testing.node``; kubelet-facts.md in the notes)."""

from __future__ import annotations

import base64
import copy
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from apipool.testing.node import BackoffPolicy, NodeThread, unavailable
from apipool.testing.polling import wait_for

from ..operator.emulator import PODS, EmulatorThread

_WHY = unavailable()
pytestmark = [
    pytest.mark.skipif(_WHY is not None, reason=f"local node unavailable: {_WHY}"),
    pytest.mark.timeout(60),
]

NODE = "test-node"
FAST_BACKOFF = BackoffPolicy(initial=0.5, cap=2.0, reset_after=600.0)
WAIT = 20.0
"""Seconds any one condition may take on a loaded machine."""

# -- the container program ------------------------------------------------------------

_BODY = """
import http.server, json, os, signal, sys, threading, time
START = time.monotonic()
TERM = CFG.get("term", "default")
if TERM == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
elif TERM == "exit":
    def on_term(signum, frame):
        print(json.dumps({"sigterm": time.time()}), flush=True)
        code = CFG.get("term_code", 0)
        threading.Timer(CFG.get("term_delay", 0), os._exit, (code,)).start()
    signal.signal(signal.SIGTERM, on_term)
print(json.dumps({"start": time.time(), "pid": os.getpid(), "argv": sys.argv[1:],
                  "env": dict(os.environ)}), flush=True)
if "exit" in CFG:
    time.sleep(CFG.get("run_for", 0))
    print(json.dumps({"exit": time.time()}), flush=True)
    sys.exit(CFG["exit"])

def failing(name):
    path = CFG.get(name + "_file")
    return bool(path) and os.path.exists(path)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200
        if self.path == "/healthz":
            if time.monotonic() - START < CFG.get("unhealthy_for", 0) or failing("sick"):
                code = 500
        elif self.path == "/ready" and failing("unready"):
            code = 503
        body = json.dumps({"pid": os.getpid()}).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.HTTPServer(("0.0.0.0", CFG.get("port", 8080)), Handler).serve_forever()
"""


def program(**cfg: Any) -> list[str]:
    """A container ``command``: a small Python program configured by ``cfg``.

    ``term`` chooses its SIGTERM handling (``default``: die; ``ignore``;
    ``exit``: go on serving, exit ``term_code`` after ``term_delay`` s); then it prints a JSON
    line with its start time, PID, argv and environment (a test that signals it
    waits for that line: a SIGTERM before it meets Python's default); with ``exit`` it
    sleeps ``run_for`` s and exits with that code; else it serves HTTP on
    ``port`` (8080): ``/healthz`` answers 500 for its first ``unhealthy_for`` s
    or while ``sick_file`` exists, ``/ready`` 503 while ``unready_file`` exists.
    The source holds no ``$``: the node expands ``$(VAR)`` in the command too.
    """
    source = f"CFG = {cfg!r}\n{_BODY}"
    assert "$" not in source
    return [sys.executable, "-c", source]


def records(text: str) -> list[dict[str, Any]]:
    """The JSON lines a container program printed (all its runs, in order)."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def starts(text: str) -> list[float]:
    return [r["start"] for r in records(text) if "start" in r]


def http_probe(path: str = "/healthz", **fields: Any) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": 1, **fields}


def pod_manifest(
    name: str, *, grace: int = 5, restart: str = "Always", **container: Any
) -> dict[str, Any]:
    spec_container = {
        "name": "main",
        "image": "example/test:1",
        "ports": [{"name": "http", "containerPort": 8080}],
        **container,
    }
    spec_container.setdefault("command", program())
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "node-test"}},
        "spec": {
            "terminationGracePeriodSeconds": grace,
            "restartPolicy": restart,
            "containers": [spec_container],
        },
    }


# -- the API over HTTP ----------------------------------------------------------------


class Api:
    """Plain HTTP to the emulator, as a client of the cluster would send it."""

    def __init__(self, url: str) -> None:
        self.url = url

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.request(method, path, body)
        assert status < 300, (method, path, status, answer)
        return answer

    def create_pod(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return dict(self.ok("POST", "/api/v1/namespaces/default/pods", manifest))

    def pod(self, name: str) -> dict[str, Any] | None:
        status, answer = self.request("GET", f"/api/v1/namespaces/default/pods/{name}")
        if status == 404:
            return None
        assert status == 200, answer
        return dict(answer)

    def delete_pod(self, name: str, query: str = "", **options: Any) -> tuple[int, Any]:
        """DELETE with ``options`` as the DeleteOptions body (``query``: as a
        client library sends them, e.g. ``gracePeriodSeconds=0``)."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", **options}
        path = f"/api/v1/namespaces/default/pods/{name}" + (f"?{query}" if query else "")
        return self.request("DELETE", path, body)

    def create_secret(self, name: str, data: dict[str, str]) -> None:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": encoded}
        self.ok("POST", "/api/v1/namespaces/default/secrets", body)


def container_status(pod: dict[str, Any] | None) -> dict[str, Any]:
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or [{}]
    return dict(statuses[0])


def condition(pod: dict[str, Any] | None, kind: str) -> str | None:
    for item in ((pod or {}).get("status") or {}).get("conditions") or []:
        if item.get("type") == kind:
            return str(item.get("status"))
    return None


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def http_get(ip: str, port: int = 8080) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{ip}:{port}/", timeout=5) as response:
        return dict(json.loads(response.read()))


class Cluster:
    """An emulator, a node and helpers of one test."""

    def __init__(self, emu: EmulatorThread, node: NodeThread) -> None:
        self.emu = emu
        self.node = node
        self.api = Api(emu.url)

    def wait_pod(
        self, name: str, check: Callable[[dict[str, Any]], Any], what: str, timeout: float = WAIT
    ) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            pod = self.api.pod(name)
            return pod if pod is not None and check(pod) else None

        return wait_for(ready, timeout, interval=0.05, what=f"pod {name}: {what}")

    def wait_ready(self, name: str, timeout: float = WAIT) -> dict[str, Any]:
        return self.wait_pod(name, lambda p: condition(p, "Ready") == "True", "Ready", timeout)

    def wait_running(self, name: str) -> int:
        """The PID of the pod's container once the node runs it."""
        return wait_for(lambda: self.node.pid(name), WAIT, interval=0.05, what=f"{name} runs")

    def wait_started(self, name: str) -> int:
        """The PID of the pod's current run once its program has printed its start
        line (its signal handlers are in place)."""

        def started() -> int | None:
            pid = self.node.pid(name)
            runs = records(self.node.log_text(name))
            return pid if pid is not None and any(r.get("pid") == pid for r in runs) else None

        return wait_for(started, WAIT, interval=0.05, what=f"{name}'s program started")

    def wait_gone(self, name: str, timeout: float = WAIT) -> None:
        wait_for(lambda: self.api.pod(name) is None, timeout, interval=0.05, what=f"{name} gone")


@pytest.fixture
def cluster_factory(
    caplog: pytest.LogCaptureFixture,
) -> Iterator[Callable[..., Cluster]]:
    """Start an emulator in node mode and a node on it; both are stopped at teardown.
    The node must have logged no warning (a status patch the emulator's schema
    refused is one) and nothing may have logged an error (a request the emulator
    failed to serve, a task that died)."""
    started: list[tuple[EmulatorThread, NodeThread]] = []
    caplog.set_level(logging.INFO, logger="apipool.testing.node")

    def start(relist: float = 0.25, backoff: BackoffPolicy = FAST_BACKOFF) -> Cluster:
        emu = EmulatorThread(node_runs_pods=True, auto_ready=None).start()
        node = NodeThread(emu.url, name=NODE, relist=relist, backoff=backoff)
        try:
            node.start()
        except BaseException:
            emu.stop()
            raise
        started.append((emu, node))
        return Cluster(emu, node)

    yield start
    for emu, node in started:
        try:
            node.stop()
        finally:
            emu.stop()
    complaints = [
        f"{r.name}: {r.getMessage()}"
        for r in [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
        if r.levelno >= logging.ERROR
        or (r.name.startswith("apipool.testing.node") and r.levelno >= logging.WARNING)
    ]
    assert complaints == [], complaints


@pytest.fixture
def cluster(cluster_factory: Callable[..., Cluster]) -> Cluster:
    return cluster_factory()


# -- 1, 2: the environment ------------------------------------------------------------


def test_env_is_resolved_as_the_kubelet_does(cluster: Cluster) -> None:
    cluster.api.create_secret("creds", {"token": "s3cr3t value"})
    env = [
        {"name": "GREETING", "value": "hello"},
        {"name": "PHRASE", "value": "$(GREETING)-world $$(GREETING) $(UNKNOWN)"},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    args = ["$(PHRASE)", "$$(TOKEN)", "$(NOPE)", "$(POD_NAME)"]
    created = cluster.api.create_pod(pod_manifest("env", env=env, args=args))
    cluster.wait_running("env")
    seen = wait_for(lambda: records(cluster.node.log_text("env")), WAIT, what="the env printed")
    first = seen[0]
    got = first["env"]
    assert got["GREETING"] == "hello"
    assert got["PHRASE"] == "hello-world $(GREETING) $(UNKNOWN)"
    assert got["TOKEN"] == "s3cr3t value"
    assert got["POD_UID"] == created["metadata"]["uid"]
    assert (got["POD_NAME"], got["POD_NS"], got["APP"]) == ("env", "default", "node-test")
    assert got["POD_IP"] == cluster.node.pod_ip("env")
    assert got["HOSTNAME"] == "env"
    assert "PYTEST_CURRENT_TEST" not in got  # the test's own environment does not leak in
    assert first["argv"] == ["hello-world $(GREETING) $(UNKNOWN)", "$(TOKEN)", "$(NOPE)", "env"]


def test_a_missing_secret_keeps_the_container_waiting_until_it_exists(cluster: Cluster) -> None:
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "k"}}}]
    cluster.api.create_pod(pod_manifest("cfg", env=env))
    pod = cluster.wait_pod(
        "cfg",
        lambda p: (
            container_status(p).get("state", {}).get("waiting", {}).get("reason")
            == "CreateContainerConfigError"
        ),
        "CreateContainerConfigError",
    )
    waiting = container_status(pod)["state"]["waiting"]
    assert waiting["reason"] == "CreateContainerConfigError"
    assert "later" in waiting["message"]
    assert pod["status"]["phase"] == "Pending"
    assert cluster.node.pid("cfg") is None
    cluster.api.create_secret("later", {"k": "now"})
    pod = cluster.wait_pod(
        "cfg", lambda p: "running" in container_status(p).get("state", {}), "running"
    )
    assert container_status(pod)["restartCount"] == 0
    got = wait_for(lambda: records(cluster.node.log_text("cfg")), WAIT, what="the env printed")
    assert got[0]["env"]["TOKEN"] == "now"


# -- 3: a network namespace per pod ---------------------------------------------------


def test_each_pod_has_its_own_ip_and_binds_the_same_port(cluster: Cluster) -> None:
    ready = http_probe("/ready")
    for name in ("net-a", "net-b"):
        cluster.api.create_pod(pod_manifest(name, readinessProbe=ready))
    pods = [cluster.wait_ready(name) for name in ("net-a", "net-b")]
    ips = [p["status"]["podIP"] for p in pods]
    assert ips[0] != ips[1]
    assert all(p["status"]["hostIP"] != ip for p, ip in zip(pods, ips, strict=True))
    for name, ip in zip(("net-a", "net-b"), ips, strict=True):
        assert cluster.node.pod_ip(name) == ip
        assert http_get(ip)["pid"] == cluster.node.pid(name)  # each answers on its own :8080


# -- 4-8: probes and kills ------------------------------------------------------------


def test_a_startup_probe_holds_off_a_strict_liveness_probe(cluster: Cluster) -> None:
    """Both pods answer /healthz 500 for their first 3 s; liveness fails at the first
    failure. With a startup probe the container is not killed; without, it is."""
    slow = program(unhealthy_for=3)
    liveness = http_probe(failureThreshold=1, terminationGracePeriodSeconds=1)
    startup = http_probe(failureThreshold=15)
    cluster.api.create_pod(
        pod_manifest("gated", command=slow, startupProbe=startup, livenessProbe=liveness)
    )
    cluster.api.create_pod(pod_manifest("ungated", command=slow, livenessProbe=liveness))
    pod = cluster.wait_pod("gated", lambda p: container_status(p).get("started"), "started")
    assert container_status(pod)["restartCount"] == 0
    killed = cluster.wait_pod(
        "ungated", lambda p: container_status(p).get("restartCount", 0) >= 1, "restarted"
    )
    assert container_status(killed)["lastState"]["terminated"]["exitCode"] != 0
    # Past the unhealthy 3 s liveness passes: the gated one is still its first run.
    pod = cluster.wait_ready("gated")
    assert container_status(pod)["restartCount"] == 0
    assert len(starts(cluster.node.log_text("gated"))) == 1


def test_a_failing_startup_probe_kills_and_restarts(cluster: Cluster) -> None:
    startup = http_probe(failureThreshold=2, terminationGracePeriodSeconds=1)
    cluster.api.create_pod(
        pod_manifest("nostart", command=program(unhealthy_for=3600), startupProbe=startup)
    )
    pod = cluster.wait_pod(
        "nostart", lambda p: container_status(p).get("restartCount", 0) >= 1, "restarted"
    )
    status = container_status(pod)
    assert status["started"] is False
    assert status["lastState"]["terminated"]["exitCode"] == 128 + signal.SIGTERM
    assert condition(pod, "Ready") == "False"


def test_a_liveness_failure_kills_after_the_probe_level_grace(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    liveness = http_probe(failureThreshold=2, timeoutSeconds=1, terminationGracePeriodSeconds=3)
    cluster.api.create_pod(pod_manifest("hang", grace=60, livenessProbe=liveness))
    pid = cluster.wait_started("hang")
    cluster.wait_pod("hang", lambda p: "running" in container_status(p).get("state", {}), "running")

    def kill_began() -> float | None:
        """When the node decided to kill (it sends SIGTERM right after)."""
        found = [r.created for r in caplog.records if "killing hang/main" in r.getMessage()]
        return found[0] if found else None

    cluster.node.signal("hang", signal.SIGSTOP)  # hung: it will never act on SIGTERM
    try:
        began = wait_for(kill_began, WAIT, what="the liveness kill")
        wait_for(lambda: not alive(pid), 40, interval=0.02, what="the hung process dies")
        took = time.time() - began
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
    # SIGKILL after the probe's 3 s, not the pod's 60 s (nor the 2 s minimum).
    assert 2.8 <= took < 30.0, took
    pod = cluster.wait_pod(
        "hang", lambda p: container_status(p).get("restartCount", 0) >= 1, "restarted"
    )
    status = container_status(pod)
    assert status["restartCount"] == 1
    terminated = status["lastState"]["terminated"]
    assert (terminated["exitCode"], terminated["signal"], terminated["reason"]) == (
        137,
        9,
        "Error",
    )
    assert cluster.wait_started("hang") != pid


def test_a_process_that_exits_on_sigterm_is_not_sigkilled(cluster: Cluster, tmp_path: Path) -> None:
    sick = tmp_path / "sick"
    command = program(term="exit", term_delay=0.3, term_code=0, sick_file=str(sick))
    liveness = http_probe(
        failureThreshold=2, initialDelaySeconds=1, terminationGracePeriodSeconds=30
    )
    cluster.api.create_pod(pod_manifest("polite", command=command, livenessProbe=liveness))
    pid = cluster.wait_started("polite")
    sick.touch()
    pod = cluster.wait_pod(
        "polite", lambda p: container_status(p).get("restartCount", 0) >= 1, "restarted"
    )
    sick.unlink()
    terminated = container_status(pod)["lastState"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    assert "signal" not in terminated
    assert not alive(pid)
    assert any("sigterm" in r for r in records(cluster.node.log_text("polite")))


@pytest.mark.parametrize("action", ["httpGet", "exec"])
def test_a_readiness_failure_flips_ready_without_a_kill(
    cluster: Cluster, tmp_path: Path, action: str
) -> None:
    unready = tmp_path / "unready"
    command = program(unready_file=str(unready))
    readiness = http_probe("/ready", failureThreshold=1, successThreshold=1)
    if action == "exec":  # run in the pod's network namespace, like the container
        del readiness["httpGet"]
        readiness["exec"] = {"command": ["test", "!", "-e", str(unready)]}
    cluster.api.create_pod(pod_manifest("flip", command=command, readinessProbe=readiness))
    pod = cluster.wait_ready("flip")
    pid = cluster.node.pid("flip")
    unready.touch()
    pod = cluster.wait_pod("flip", lambda p: condition(p, "Ready") == "False", "not Ready")
    assert condition(pod, "ContainersReady") == "False"
    assert container_status(pod)["ready"] is False
    assert pod["status"]["phase"] == "Running"
    unready.unlink()
    pod = cluster.wait_ready("flip")
    assert container_status(pod)["restartCount"] == 0
    assert cluster.node.pid("flip") == pid


# -- 9, 10: restarts ------------------------------------------------------------------


def test_a_crash_loop_backs_off_with_growing_gaps(cluster: Cluster) -> None:
    cluster.api.create_pod(pod_manifest("crash", command=program(exit=3)))
    reasons: set[str] = set()

    def five_starts() -> list[float] | None:
        waiting = container_status(cluster.api.pod("crash")).get("state", {}).get("waiting")
        if waiting:
            reasons.add(waiting.get("reason", ""))
        found = starts(cluster.node.log_text("crash"))
        return found if len(found) >= 5 else None

    found = wait_for(five_starts, 30, interval=0.05, what="five runs")
    gaps = [b - a for a, b in itertools.pairwise(found)]
    # Back-off 0 (the first restart is immediate), then 0.5, 1, 2 (the cap), 2.
    assert gaps[1] >= 0.45, gaps
    assert gaps[2] >= 0.95, gaps
    assert gaps[3] >= 1.95, gaps
    assert gaps[3] > gaps[0], gaps
    assert "CrashLoopBackOff" in reasons
    pod = cluster.api.pod("crash")
    assert pod is not None
    status = container_status(pod)
    assert status["restartCount"] >= 4
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert status["lastState"]["terminated"]["reason"] == "Error"
    assert pod["status"]["phase"] == "Running"
    cluster.api.delete_pod("crash")  # in its back-off or just restarted: gone within the grace
    cluster.wait_gone("crash")


def test_on_failure_restarts_a_failed_container_and_the_pod_stays_running(
    cluster: Cluster,
) -> None:
    cluster.api.create_pod(pod_manifest("retry", restart="OnFailure", command=program(exit=1)))
    phases: set[str] = set()

    def restarted() -> dict[str, Any] | None:
        pod = cluster.api.pod("retry")
        phases.add(((pod or {}).get("status") or {}).get("phase", ""))
        return pod if container_status(pod).get("restartCount", 0) >= 2 else None

    pod = wait_for(restarted, WAIT, interval=0.02, what="two restarts")
    assert pod["status"]["phase"] == "Running"
    assert "Failed" not in phases, phases
    assert container_status(pod)["lastState"]["terminated"]["exitCode"] == 1


@pytest.mark.parametrize(
    ("restart", "code", "phase"),
    [("Never", 1, "Failed"), ("Never", 0, "Succeeded"), ("OnFailure", 0, "Succeeded")],
)
def test_a_container_that_ends_for_good_ends_the_pod(
    cluster: Cluster, restart: str, code: int, phase: str
) -> None:
    cluster.api.create_pod(pod_manifest("once", restart=restart, command=program(exit=code)))
    pod = cluster.wait_pod("once", lambda p: p["status"].get("phase") == phase, phase)
    status = container_status(pod)
    assert status["restartCount"] == 0
    assert status["state"]["terminated"]["exitCode"] == code
    assert status["state"]["terminated"]["reason"] == ("Completed" if code == 0 else "Error")
    assert condition(pod, "Ready") == "False"
    assert len(starts(cluster.node.log_text("once"))) == 1
    status_code, answer = cluster.api.delete_pod("once")
    assert status_code == 200, answer
    assert cluster.api.pod("once") is None  # a pod that has ended is deleted at once


def test_an_exit_is_noticed_at_a_relist(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory(relist=1.0)
    cluster.api.create_pod(pod_manifest("relist", command=program(exit=1)))
    runs: dict[int, float] = {}
    """PID -> when the node started it (the node's monotonic clock, which is ours)."""

    def current_run(node: Any) -> tuple[int, float] | None:
        worker = node.worker("relist")
        process = worker.runners[0].process if worker is not None else None
        return (process.pid, process.started_mono) if process is not None else None

    def two_runs() -> bool:
        run = cluster.node.call(current_run)
        if run is not None:
            runs.setdefault(*run)
        return len(runs) >= 2

    wait_for(two_runs, WAIT, what="a restart")
    first, second = sorted(runs.values())[:2]
    # The program exits within a moment, but the node looks only at its relists,
    # the first 1 s after the start; the first restart has no back-off.
    assert second - first >= 0.95, runs


# -- 11-13: deletion ------------------------------------------------------------------


def test_a_graceful_delete_waits_for_the_sigterm_handler(cluster: Cluster) -> None:
    command = program(term="exit", term_delay=1.5, term_code=0)
    cluster.api.create_pod(pod_manifest("bye", grace=30, command=command))
    pid = cluster.wait_started("bye")
    cluster.wait_pod("bye", lambda p: "running" in container_status(p).get("state", {}), "running")
    status, answer = cluster.api.delete_pod("bye")
    assert status == 200, answer
    assert answer["metadata"]["deletionTimestamp"]
    assert answer["metadata"]["deletionGracePeriodSeconds"] == 30
    wait_for(
        lambda: any("sigterm" in r for r in records(cluster.node.log_text("bye"))),
        WAIT,
        what="the SIGTERM handler runs",
    )
    pod = cluster.api.pod("bye")
    assert pod is not None
    assert pod["metadata"]["deletionTimestamp"]
    assert alive(pid)  # still in its handler
    cluster.wait_gone("bye")
    assert not alive(pid)


def test_a_graceful_delete_sigkills_after_the_deletion_grace(cluster: Cluster) -> None:
    cluster.api.create_pod(pod_manifest("stubborn", grace=60, command=program(term="ignore")))
    pid = cluster.wait_started("stubborn")
    cluster.wait_pod(
        "stubborn", lambda p: "running" in container_status(p).get("state", {}), "running"
    )
    began = time.monotonic()
    status, answer = cluster.api.delete_pod("stubborn", gracePeriodSeconds=3)
    assert status == 200, answer
    assert answer["metadata"]["deletionGracePeriodSeconds"] == 3
    cluster.wait_gone("stubborn", timeout=30)
    took = time.monotonic() - began
    assert 2.5 <= took < 30, took
    assert not alive(pid)


def test_a_force_delete_removes_the_object_before_the_process(cluster: Cluster) -> None:
    command = program(term="exit", term_delay=1.0, term_code=0)
    cluster.api.create_pod(pod_manifest("forced", grace=30, command=command))
    pid = cluster.wait_started("forced")
    status, answer = cluster.api.delete_pod("forced", query="gracePeriodSeconds=0")
    assert status == 200, answer
    assert cluster.api.pod("forced") is None
    assert alive(pid)  # the node has not even been told yet, or is in the grace
    wait_for(lambda: not alive(pid), 15, what="the node kills the force-deleted pod's process")


def test_a_force_deleted_pod_is_killed_with_the_minimum_grace(cluster: Cluster) -> None:
    """The removed object carries ``deletionGracePeriodSeconds`` 0: the node sends
    SIGTERM and SIGKILLs after its 2 s minimum, not after the pod's 60 s."""
    cluster.api.create_pod(pod_manifest("gone", grace=60, command=program(term="ignore")))
    pid = cluster.wait_started("gone")
    began = time.monotonic()
    status, answer = cluster.api.delete_pod("gone", gracePeriodSeconds=0)
    assert status == 200, answer
    assert cluster.api.pod("gone") is None
    wait_for(lambda: not alive(pid), 30, what="the stubborn process is killed")
    took = time.monotonic() - began
    assert 1.5 <= took < 30, took


def test_a_pod_recreated_after_a_force_delete_runs_beside_the_old_one(cluster: Cluster) -> None:
    command = program(term="exit", term_delay=2.0, term_code=0)
    manifest = pod_manifest("twin", grace=30, command=command, readinessProbe=http_probe("/ready"))
    first = cluster.api.create_pod(manifest)
    old_ip = cluster.wait_ready("twin")["status"]["podIP"]
    old_pid = cluster.wait_started("twin")
    cluster.api.delete_pod("twin", gracePeriodSeconds=0)
    second = cluster.api.create_pod(manifest)
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    new_pod = cluster.wait_ready("twin")  # its readiness probe passed: it serves
    new_pid = cluster.wait_started("twin")
    assert new_pid != old_pid
    # The hazard: both copies run at once, each with its own address.
    assert alive(old_pid)
    assert alive(new_pid)
    assert new_pod["status"]["podIP"] != old_ip
    assert http_get(old_ip)["pid"] == old_pid
    assert http_get(new_pod["status"]["podIP"])["pid"] == new_pid
    wait_for(lambda: not alive(old_pid), 15, what="the old copy ends")
    pod = cluster.api.pod("twin")
    assert pod is not None
    assert pod["metadata"]["uid"] == second["metadata"]["uid"]
    assert condition(pod, "Ready") == "True"
    assert alive(new_pid)


# -- 14: binding and preconditions ----------------------------------------------------


def test_binding_and_preconditions(cluster: Cluster) -> None:
    other = pod_manifest("elsewhere")
    other["spec"]["nodeName"] = "another-node"
    cluster.api.create_pod(other)
    cluster.api.create_pod(pod_manifest("mine"))
    pod = cluster.wait_pod(
        "mine", lambda p: "running" in container_status(p).get("state", {}), "running"
    )
    assert pod["spec"]["nodeName"] == NODE
    assert condition(pod, "PodScheduled") == "True"
    # The node saw "elsewhere" before "mine" (one watch, in order) and left it alone.
    elsewhere = cluster.api.pod("elsewhere")
    assert elsewhere is not None
    assert elsewhere["spec"]["nodeName"] == "another-node"
    assert not (elsewhere.get("status") or {}).get("containerStatuses")
    assert cluster.node.pid("elsewhere") is None

    binding = {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": "mine"},
        "target": {"apiVersion": "v1", "kind": "Node", "name": "thief"},
    }
    status, answer = cluster.api.request(
        "POST", "/api/v1/namespaces/default/pods/mine/binding", binding
    )
    assert status == 409, answer
    status, answer = cluster.api.delete_pod("mine", preconditions={"uid": str(uuid.uuid4())})
    assert status == 409, answer
    assert "Precondition" in answer["message"]
    still = cluster.api.pod("mine")
    assert still is not None
    assert not still["metadata"].get("deletionTimestamp")
    assert still["spec"]["nodeName"] == NODE


# -- 15: status shapes ----------------------------------------------------------------


def test_the_status_written_has_the_kubelet_shape(cluster: Cluster) -> None:
    """Pending, Running, a restart, Terminating: every status the node wrote passed
    the emulator's OpenAPI validation (a refused patch is a logged warning, which
    the fixture fails on) and carries the kubelet's fields."""
    history: list[dict[str, Any]] = []

    def record(emulator: Any) -> None:  # every committed version of the pod
        pod = emulator.current(PODS, "default", "shape")
        if pod is not None and (pod.get("status") or {}).get("containerStatuses"):
            history.append(copy.deepcopy(pod["status"]))

    cluster.emu.observe(record)
    readiness = http_probe("/ready")
    cluster.api.create_pod(pod_manifest("shape", readinessProbe=readiness))
    pod = cluster.wait_ready("shape")
    status = pod["status"]
    assert status["phase"] == "Running"
    assert [c["type"] for c in status["conditions"]] == [
        "PodScheduled",
        "Initialized",
        "ContainersReady",
        "Ready",
    ]
    assert all(
        c["status"] in ("True", "False") and c["lastTransitionTime"] for c in status["conditions"]
    )
    for field in ("hostIP", "podIP", "startTime"):
        assert status[field]
    assert status["podIPs"] == [{"ip": status["podIP"]}]
    cs = container_status(pod)
    assert set(cs) >= {
        "name",
        "image",
        "imageID",
        "ready",
        "started",
        "restartCount",
        "state",
        "lastState",
        "containerID",
    }
    assert cs["name"] == "main"
    assert cs["ready"] is True
    assert cs["started"] is True
    assert set(cs["state"]) == {"running"}
    assert cs["state"]["running"]["startedAt"]
    cluster.node.signal("shape", signal.SIGKILL)
    pod = cluster.wait_pod(
        "shape", lambda p: container_status(p).get("restartCount", 0) >= 1, "restarted"
    )
    terminated = container_status(pod)["lastState"]["terminated"]
    assert set(terminated) >= {"exitCode", "reason", "startedAt", "finishedAt", "containerID"}
    assert (terminated["exitCode"], terminated["signal"]) == (137, 9)
    cluster.wait_ready("shape")
    cluster.api.delete_pod("shape", gracePeriodSeconds=2)
    cluster.wait_gone("shape")
    kinds = ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
    assert all([c["type"] for c in h["conditions"]] == kinds for h in history)
    phases = [phase for phase, _ in itertools.groupby(h["phase"] for h in history)]
    # Pending until the first start, Running through the restart, and a final
    # phase written before the node deletes the object (it died of SIGTERM).
    assert phases in (["Pending", "Running", "Failed"], ["Running", "Failed"]), phases


# -- 16: shutdown ---------------------------------------------------------------------


def test_node_shutdown_kills_everything_and_removes_its_namespaces(
    cluster: Cluster,
) -> None:
    for name in ("down-a", "down-b"):
        cluster.api.create_pod(pod_manifest(name, command=program(term="ignore")))
    pids = [cluster.wait_started(name) for name in ("down-a", "down-b")]
    assert cluster.node.node is not None
    token = cluster.node.node.network.token
    bridge = cluster.node.node.network.bridge

    def namespaces() -> list[str]:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
        return [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]

    assert sum(ns.startswith(f"apn-{token}-") for ns in namespaces()) == 2
    began = time.monotonic()
    cluster.node.stop()
    assert time.monotonic() - began < 20  # kills at once: no grace for stubborn processes
    assert not any(alive(pid) for pid in pids)
    assert not [ns for ns in namespaces() if ns.startswith(f"apn-{token}-")]
    link = subprocess.run(["ip", "link", "show", bridge], capture_output=True, text=True)
    assert link.returncode != 0
