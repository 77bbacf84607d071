"""Pod network identities: a network namespace and an address per pod.

A :class:`PodNetwork` puts a bridge with one host address (``host_ip``,
``10.x.y.1/24``) in the current network namespace and, for each pod, a network
namespace of its own joined to the bridge by a veth pair, with loopback up, an
address (``10.x.y.n``) and a default route through the host address. Each pod
thus binds the ports its manifest names without meeting another pod's, and
reaches what the test serves on ``host_ip`` (Redis, the stand-in API); the
node's probes reach each pod at its own address.

It needs root (``CAP_NET_ADMIN``) and the ``ip`` command; :func:`unavailable`
says why it cannot work here, or returns None. Every name carries a token of
this network, so that :func:`sweep_stale` can remove what a crashed run left
behind (its owner process is gone), and :meth:`PodNetwork.close` removes all
it made. Nothing is routed beyond the bridge: no NAT, no forwarding.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

__all__ = ["NetworkUnavailable", "PodAddress", "PodNetwork", "sweep_stale", "unavailable"]

STATE_DIR = Path("/run/apipool-node")
NETNS_PREFIX = "apn-"
MAX_PODS = 250


class NetworkUnavailable(RuntimeError):
    """Pods cannot get network namespaces on this machine."""


def unavailable() -> str | None:
    """Why pod network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and done.returncode != 0:
        raise NetworkUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _used_networks() -> list[ipaddress.IPv4Network]:
    done = _ip("-j", "-4", "addr", check=False)
    found: list[ipaddress.IPv4Network] = []
    for link in json.loads(done.stdout or "[]"):
        for addr in link.get("addr_info", []):
            found.append(ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", False))
    return found


def sweep_stale() -> int:
    """Remove bridges and namespaces of networks whose owner process is gone."""
    removed = 0
    if not STATE_DIR.is_dir():
        return 0
    for state in STATE_DIR.glob("*.json"):
        try:
            info = json.loads(state.read_text())
            os.kill(int(info["pid"]), 0)
            continue  # its owner still runs
        except ProcessLookupError:
            pass
        except (OSError, ValueError, KeyError):
            pass
        token = state.stem
        for ns in _ip("netns", "list", check=False).stdout.split():
            if ns.startswith(f"{NETNS_PREFIX}{token}-"):
                _ip("netns", "delete", ns, check=False)
        _ip("link", "delete", f"apb{token}", check=False)
        state.unlink(missing_ok=True)
        removed += 1
    return removed


class PodAddress:
    """One pod's network namespace and address."""

    def __init__(self, namespace: str, ip: str, host_veth: str) -> None:
        self.namespace = namespace
        self.ip = ip
        self.host_veth = host_veth

    @property
    def exec_prefix(self) -> list[str]:
        """Prefix of a command line that runs the command inside the namespace
        (``ip netns exec`` enters it and execs: the command keeps the PID)."""
        return ["ip", "netns", "exec", self.namespace]

    def __repr__(self) -> str:
        return f"PodAddress({self.namespace!r}, {self.ip!r})"


class PodNetwork:
    """A bridge and per-pod network namespaces; thread-safe."""

    def __init__(self, subnet: str | None = None) -> None:
        why = unavailable()
        if why:
            raise NetworkUnavailable(why)
        sweep_stale()
        self.token = secrets.token_hex(3)
        self.bridge = f"apb{self.token}"
        self.subnet = ipaddress.IPv4Network(subnet) if subnet else self._free_subnet()
        hosts = list(self.subnet.hosts())
        self.host_ip = str(hosts[0])
        self._free = [str(h) for h in hosts[1 : MAX_PODS + 1]]
        self._lock = threading.Lock()
        self._pods: dict[str, PodAddress] = {}
        self._serial = 0
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self._state = STATE_DIR / f"{self.token}.json"
        self._state.write_text(json.dumps({"pid": os.getpid(), "subnet": str(self.subnet)}))
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.host_ip}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except Exception:
            self.close()
            raise

    @staticmethod
    def _free_subnet() -> ipaddress.IPv4Network:
        used = _used_networks()
        for second in range(200, 250):
            for third in range(0, 256, 7):
                net = ipaddress.IPv4Network(f"10.{second}.{third}.0/24")
                if not any(net.overlaps(u) for u in used):
                    return net
        raise NetworkUnavailable("no free 10.200-249.x.0/24 subnet for the pods")

    def add(self, key: str) -> PodAddress:
        """A namespace and address for the pod ``key`` (its UID)."""
        with self._lock:
            if key in self._pods:
                return self._pods[key]
            if not self._free:
                raise NetworkUnavailable(f"more than {MAX_PODS} pods on one local node")
            ip = self._free.pop(0)
            self._serial += 1
            serial = self._serial
        ns = f"{NETNS_PREFIX}{self.token}-{serial}"
        host_veth, pod_veth = f"apv{self.token}{serial}", f"apq{self.token}{serial}"
        try:
            _ip("netns", "add", ns)
            _ip("link", "add", host_veth, "type", "veth", "peer", "name", pod_veth)
            _ip("link", "set", pod_veth, "netns", ns)
            _ip("link", "set", host_veth, "master", self.bridge)
            _ip("link", "set", host_veth, "up")
            inside: Sequence[Sequence[str]] = (
                ("link", "set", "lo", "up"),
                ("addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", pod_veth),
                ("link", "set", pod_veth, "name", "eth0"),
                ("link", "set", "eth0", "up"),
                ("route", "add", "default", "via", self.host_ip),
            )
            for args in inside:
                _ip("-n", ns, *args)
        except Exception:
            _ip("netns", "delete", ns, check=False)
            _ip("link", "delete", host_veth, check=False)
            with self._lock:
                self._free.append(ip)
            raise
        address = PodAddress(ns, ip, host_veth)
        with self._lock:
            self._pods[key] = address
        return address

    def remove(self, key: str) -> None:
        """Delete the pod's namespace (its veth pair goes with it) and free its address."""
        with self._lock:
            address = self._pods.pop(key, None)
        if address is None:
            return
        _ip("netns", "delete", address.namespace, check=False)
        _ip("link", "delete", address.host_veth, check=False)
        with self._lock:
            self._free.append(address.ip)

    def close(self) -> None:
        """Remove every pod namespace, the bridge and the state file."""
        for key in list(self._pods):
            self.remove(key)
        _ip("link", "delete", self.bridge, check=False)
        self._state.unlink(missing_ok=True)
