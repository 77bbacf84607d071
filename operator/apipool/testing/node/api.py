"""The node's side of the Kubernetes API: what a kubelet reads and writes.

Plain HTTP (aiohttp) against an API server: list and watch the pods of a
namespace, read Secrets and ConfigMaps, bind a pod to the node, patch a pod's
status, delete a pod with a grace period and a UID precondition. JSON in,
JSON out; an answer of 400 or more raises :class:`ApiError`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

__all__ = ["ApiError", "NodeApi", "Partitioned"]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class Partitioned(ApiError):
    """The node is cut off from the API server (a test's network partition)."""

    def __init__(self) -> None:
        super().__init__(503, "the node is cut off from the API server")


class NodeApi:
    """The API calls of a node, for one namespace.

    :meth:`cut` stages a network partition between the node and the API server:
    every call fails with :class:`Partitioned` and the open watch ends, until
    :meth:`heal`. The node's pods run on, unseen and unseeing.
    """

    def __init__(self, url: str, namespace: str, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.namespace = namespace
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)
        )
        self.partitioned = False
        self._watches: set[aiohttp.ClientResponse] = set()

    def cut(self) -> None:
        """Cut the node off from the API server (watches end, calls fail)."""
        self.partitioned = True
        for response in list(self._watches):
            response.close()

    def heal(self) -> None:
        self.partitioned = False

    async def close(self) -> None:
        await self._session.close()

    def _path(self, resource: str, name: str | None = None, sub: str | None = None) -> str:
        path = f"{self.url}/api/v1/namespaces/{self.namespace}/{resource}"
        if name:
            path += f"/{name}"
        if sub:
            path += f"/{sub}"
        return path

    async def _json(
        self, method: str, url: str, *, body: Any = None, content_type: str | None = None
    ) -> Any:
        if self.partitioned:
            raise Partitioned()
        headers = {"Content-Type": content_type} if content_type else {}
        data = json.dumps(body) if body is not None else None
        timeout = aiohttp.ClientTimeout(total=30)
        async with self._session.request(
            method, url, data=data, headers=headers, timeout=timeout
        ) as response:
            text = await response.text()
            if response.status >= 400:
                try:
                    message = json.loads(text).get("message", text)
                except (ValueError, AttributeError):
                    message = text
                raise ApiError(response.status, str(message))
            return json.loads(text) if text else None

    async def list_pods(self) -> tuple[list[dict[str, Any]], str]:
        """The namespace's pods and the list's resourceVersion."""
        answer = await self._json("GET", self._path("pods"))
        return list(answer.get("items") or []), str(answer["metadata"]["resourceVersion"])

    async def watch_pods(self, since: str) -> AsyncIterator[dict[str, Any]]:
        """Watch events of the namespace's pods after ``since``, until the
        server ends the stream (the caller lists and watches again)."""
        if self.partitioned:
            raise Partitioned()
        params = {"watch": "true", "resourceVersion": since, "allowWatchBookmarks": "false"}
        async with self._session.get(self._path("pods"), params=params) as response:
            if response.status >= 400:
                raise ApiError(response.status, await response.text())
            self._watches.add(response)
            try:
                async for line in response.content:
                    if self.partitioned:
                        raise Partitioned()
                    if line.strip():
                        yield json.loads(line)
            finally:
                self._watches.discard(response)

    async def get(self, resource: str, name: str) -> dict[str, Any] | None:
        """A Secret or ConfigMap (``resource`` plural) of the namespace, or None."""
        try:
            found = await self._json("GET", self._path(resource, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return dict(found)

    async def bind(self, pod: str, node: str) -> None:
        """Bind the pod to the node (what the scheduler does)."""
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": pod, "namespace": self.namespace},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        await self._json("POST", self._path("pods", pod, "binding"), body=body)

    async def patch_status(self, pod: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``status`` into the pod's status (lists are replaced)."""
        return dict(
            await self._json(
                "PATCH",
                self._path("pods", pod, "status"),
                body={"status": status},
                content_type="application/merge-patch+json",
            )
        )

    async def delete_pod(self, pod: str, *, uid: str, grace: int = 0) -> None:
        """Delete the pod (``grace`` 0: remove the object now), only if it still
        has ``uid``; a pod already gone is not an error."""
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": grace,
            "preconditions": {"uid": uid},
        }
        try:
            await self._json("DELETE", self._path("pods", pod), body=body)
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise
