"""End-to-end tests on a real kind cluster (marker ``e2e``; ``make e2e``)."""
