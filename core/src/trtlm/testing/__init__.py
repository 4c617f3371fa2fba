"""Test helpers for plugin authors (pytest plugin ``trtlm.testing.plugin``)."""
