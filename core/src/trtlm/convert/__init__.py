"""HF checkpoint -> TensorRT-LLM checkpoint conversion (see :func:`trtlm.convert.pipeline.convert`)."""
