"""trtlm family plugin: mpt (being written)."""
from trtlm import PLUGIN_API_VERSION

TRTLM_PLUGIN_API = PLUGIN_API_VERSION
