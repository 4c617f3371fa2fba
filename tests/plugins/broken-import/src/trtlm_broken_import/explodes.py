"""An entry-point module that raises ImportError at import, like a plugin built against
names its trtlm does not have."""
raise ImportError("trtlm_broken_import.explodes is broken on purpose (test plugin)")
