"""No import cycles anywhere in trtlm, lazy imports included (scripts/import_cycles.py).

The plugin registry once reached the quantizer and the quantizer the registry (plugins ->
builtin -> quant.plan -> plugins), and the runtime model and the quantized layers imported each
other; the family's hooks are now passed down, and shared pieces live below both sides.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("import_cycles", REPO / "scripts" / "import_cycles.py")
cycles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cycles)

#: Modules that must be on no import cycle (module-level or lazy imports).
ACYCLIC = ("trtlm.plugins", "trtlm.registry", "trtlm.discovery", "trtlm.builtin", "trtlm.hookspecs",
           "trtlm.family", "trtlm.quant.plan", "trtlm.mapping", "trtlm.config", "trtlm.dtypes", "trtlm.layout",
           "trtlm.sources", "trtlm.weights", "trtlm.testing.models")


def test_plugin_machinery_and_conversion_are_on_no_cycle():
    graph = cycles.graph(top_level=False)
    assert "trtlm.quant.plan" in graph and "trtlm.plugins" in graph
    for comp in cycles.components(graph):
        bad = sorted(m for m in comp if m in ACYCLIC or m.startswith("trtlm.convert."))
        assert not bad, f"{bad} on the import cycle {' -> '.join(cycles.shortest_cycle(graph, comp))}"


def test_no_module_is_on_a_cycle():
    graph = cycles.graph(top_level=False)
    found = [" -> ".join(cycles.shortest_cycle(graph, comp)) for comp in cycles.components(graph)]
    assert not found, f"import cycles: {found}"


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles.components(graph) == [["a", "b", "c"]]
    assert cycles.shortest_cycle(graph, ["a", "b", "c"]) in (["a", "b", "c", "a"], ["b", "c", "a", "b"],
                                                             ["c", "a", "b", "c"])
