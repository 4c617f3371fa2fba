"""Testing tools for family-plugin authors.

``trtlm.testing`` is also a pytest plugin (registered through the ``pytest11``
entry point, see :mod:`trtlm.testing.plugin`), so its fixtures are available
in any project that has trtlm installed.  A family plugin gets a whole
conformance suite by subclassing :class:`FamilyConformance`::

    from trtlm.testing import FamilyConformance

    class TestAcme(FamilyConformance):
        family = "acme"

Importing this module does not import torch; the suite imports it lazily.
"""
from __future__ import annotations

from trtlm.testing.conformance import FamilyConformance
from trtlm.testing.models import make_tiny_model

__all__ = ["FamilyConformance", "make_tiny_model"]
