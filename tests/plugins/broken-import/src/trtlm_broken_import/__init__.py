"""Entry points that fail while being imported (test-only); see the submodules."""
