"""Triton Inference Server deployment: ``trtlm triton-repo`` writes a model repository for an engine.

* :mod:`trtlm.triton.repo` — options, engine kind, placing engine and tokenizer, the atomic write;
* :mod:`trtlm.triton.torch_repo` — torch engines: a Python-backend model running trtlm's engine
  (:mod:`trtlm.triton.python_model` is its ``model.py``);
* :mod:`trtlm.triton.trtllm_repo` — tensorrt-llm engines: tensorrtllm_backend's ``inflight_batcher_llm``
  layout from its templates (``templates/``), every parameter filled;
* :mod:`trtlm.triton.server` — find and start ``tritonserver`` (``--launch`` and the tests).

Nothing here imports torch or Triton at module level.
"""
