"""The Kubernetes operator: ApiConcurrencyPool reconciled into exactly N slot pods.

Pure parts (spec, manifests, planning) import no Kubernetes client; the kopf
handlers live in ``handlers`` and are loaded only by ``apipool operator``.
"""
