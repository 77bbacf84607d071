"""A local node: a kubelet for the Kubernetes API emulator that runs pods as
real local processes, each pod in a network namespace of its own.

- :mod:`.node`: :class:`LocalNode` (watch, bind, run, write back) and
  :class:`NodeThread`;
- :mod:`.pod_worker`: one pod's containers, probes, restarts and status;
- :mod:`.container`: one run of a container (a process, its kill sequence);
- :mod:`.probing`, :mod:`.backoff`, :mod:`.environment`, :mod:`.status`: the
  kubelet's rules as pure code;
- :mod:`.network`: per-pod network namespaces on a bridge (needs root);
- :mod:`.api`: the HTTP calls a kubelet makes.

What it does not do (images, volumes, users, cgroups, scheduling) and why the
results still count: ``tests/operator/README.md``.
"""

from .backoff import BackoffPolicy
from .network import NetworkUnavailable, PodNetwork, unavailable
from .node import LocalNode, NodeThread

__all__ = [
    "BackoffPolicy",
    "LocalNode",
    "NetworkUnavailable",
    "NodeThread",
    "PodNetwork",
    "unavailable",
]
