"""The in-tree families run the same conformance suite a third-party plugin inherits."""
from trtlm.testing import FamilyConformance


class TestMistralConformance(FamilyConformance):
    family = "mistral"
    # a window shorter than the prompt + decode, so the suite exercises it
    config_overrides = {"sliding_window": 8}
    parallel_layouts = ((2, 1), (4, 1), (1, 2), (2, 2))


class TestMixtralConformance(FamilyConformance):
    family = "mixtral"


class TestMptConformance(FamilyConformance):
    family = "mpt"
