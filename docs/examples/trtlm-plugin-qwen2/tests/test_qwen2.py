"""The trtlm conformance suite against the Qwen2 plugin, logits checked with transformers' Qwen2ForCausalLM."""
from trtlm.testing import FamilyConformance


class TestQwen2(FamilyConformance):
    family = "qwen2"
