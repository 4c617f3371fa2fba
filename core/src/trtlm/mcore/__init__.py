"""Megatron-Core checkpoints in and out (``trtlm convert --to mcore``, ``--model-dir MCORE_CKPT``).

Modules, one job each:

* :mod:`trtlm.mcore.layout` -- the HF <-> Megatron-Core name and layout
  table (fused qkv per query group, ``[gate; up]`` per TP shard, padded
  vocabulary, Transformer-Engine names) and the TP split/merge rules;
* :mod:`trtlm.mcore.config` -- Megatron ``args`` <-> Hugging Face config;
* :mod:`trtlm.mcore.files` -- the directory layout (``iter_*/mp_rank_*``)
  and its checks against ``args`` (no torch);
* :mod:`trtlm.mcore.torchfile` -- ``model_optim_rng.pt``: streamed writing,
  ``weights_only`` reading;
* :mod:`trtlm.mcore.reader` / :mod:`trtlm.mcore.writer` -- the two directions.

Families take part through two hooks (``trtlm_mcore_layout``,
``trtlm_mcore_config``); the core's defaults cover Llama-style dense models,
the Mixtral plugin adds its experts.  See docs/megatron.md.
"""
