"""The Kubernetes operator: ApiConcurrencyPool reconciled into exactly N slot pods.

Pure parts (``spec``, ``manifests``, ``planning``, ``status``) import no
Kubernetes client. ``kube`` makes the API calls, ``pool_state`` keeps what the
operator remembers per pool, ``reconcile`` runs observe -> plan -> apply ->
report, and ``controller`` wires it into an explicit kopf registry, which
``run`` (``apipool operator``) hands to kopf.
"""
