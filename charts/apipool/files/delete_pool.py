"""Pre-delete hook of the apipool chart: delete the in-chart pool, wait until it is gone.

Runs while the operator still runs, so that kopf can remove its finalizer (and
the slot pods go with the pool). Usage: python delete_pool.py NAMESPACE POOL TIMEOUT
"""

from __future__ import annotations

import sys
import time

import kubernetes
from kubernetes.client.exceptions import ApiException

GROUP, VERSION, PLURAL = "apipool.dev", "v1alpha1", "apiconcurrencypools"


def main(namespace: str, pool: str, timeout: float) -> int:
    kubernetes.config.load_incluster_config()
    api = kubernetes.client.CustomObjectsApi()
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, pool)
    except ApiException as exc:
        if exc.status == 404:
            print(f"pool {namespace}/{pool} is already gone")
            return 0
        raise
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, pool)
        except ApiException as exc:
            if exc.status == 404:
                print(f"pool {namespace}/{pool} deleted")
                return 0
            raise
        time.sleep(2)
    print(
        f"pool {namespace}/{pool} still exists after {timeout:g} s: is the operator running? "
        "Remove its finalizer (kubectl patch acp ... --type=merge "
        '-p \'{"metadata":{"finalizers":null}}\'), then helm uninstall --no-hooks',
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
