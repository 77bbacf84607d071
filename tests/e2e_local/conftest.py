"""The Kubernetes path on one machine needs root for the pods' network namespaces."""

from __future__ import annotations

import pytest

from apipool.testing.node import unavailable


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    why = unavailable()
    if why is None:
        return
    for item in items:
        if "e2e_local" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"local node: {why}"))
