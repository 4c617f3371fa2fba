"""An entry-point module whose dependency is not installed."""
import trtlm_test_dependency_that_is_not_installed  # noqa: F401

from trtlm import PLUGIN_API_VERSION

TRTLM_PLUGIN_API = PLUGIN_API_VERSION
