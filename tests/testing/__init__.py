"""Tests of the test tools themselves (:mod:`apipool.testing`)."""
