"""trtlm's portable PyTorch runtime (the ``torch`` backend of ``build_network``)."""
