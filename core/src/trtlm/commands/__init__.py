"""One module per ``trtlm`` command; each imports only click at module level."""
