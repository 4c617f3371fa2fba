"""The conformance suite every family plugin can inherit.

Subclass it in a test module (the class name must start with ``Test``)::

    class TestAcme(FamilyConformance):
        family = "acme"

and pytest runs these checks against the installed plugin: the entry point
loads without importing torch; its hook implementations match the specs;
``map_layers`` uses every tensor of a tiny model of the family, with nothing
left over; sharding for tensor and pipeline parallelism and merging back
gives the single-rank checkpoint exactly; the checkpoint builds and runs in
the torch runtime; and, when transformers has the family's class, float32
logits match it.  Class attributes tune it (see below).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


class FamilyConformance:
    #: the family name under test (required)
    family: str = ""
    #: which preset of the family to build the tiny model from
    preset: str = "tiny"
    #: changes to the preset's config for the tiny model
    config_overrides: dict[str, Any] = {}
    #: (tp, pp) layouts checked by the shard/merge round trip
    parallel_layouts: tuple[tuple[int, int], ...] = ((2, 1), (1, 2), (2, 2))
    #: max abs difference allowed between float32 logits and transformers'
    logits_atol: float = 1e-4
    #: decode steps compared with transformers
    decode_tokens: int = 8

    # -- fixtures ---------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tmp_path_factory) -> Path:
        from trtlm.testing.models import make_tiny_model

        self = cls
        assert self.family, "set `family = \"<name>\"` on the conformance class"
        return make_tiny_model(self.family, tmp_path_factory.mktemp(f"{self.family}-tiny"),
                               dict(self.config_overrides) or None, preset=self.preset)

    def _entry(self):
        from trtlm.plugins import get_registry

        return get_registry().family(self.family)

    def _convert(self, model_dir: Path, out: Path, **options: Any) -> Path:
        from trtlm.convert.options import ConvertOptions
        from trtlm.convert.pipeline import convert

        convert(model_dir, out, ConvertOptions(**{"dtype": "float32", **options}))
        return out

    # -- the checks -------------------------------------------------------------------------
    def test_family_is_registered(self):
        from trtlm.plugins import get_registry

        entry = self._entry()
        records = {r.name: r for r in get_registry().records}
        assert records[entry.plugin].status == "ok", records[entry.plugin].error
        assert self.preset in entry.family.presets, f"family {self.family} has no {self.preset!r} preset"

    def test_entry_point_loads_without_torch(self):
        entry = self._entry()
        if entry.plugin == "builtin":
            pytest.skip("family registered by the core itself")
        code = (
            "import sys, importlib.metadata as md\n"
            f"eps = [e for e in md.entry_points(group='trtlm.families') if e.name == {entry.plugin!r}]\n"
            "assert eps, 'no entry point'\n"
            "eps[0].load()\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors.torch') if m in sys.modules)\n"
            "print(','.join(heavy))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        if "no entry point" in out.stderr:
            pytest.skip(f"plugin {entry.plugin!r} is not installed through an entry point (registered in-process)")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "", f"importing the entry point imported {out.stdout.strip()}"

    def test_hookimpls_match_specs(self):
        from trtlm import hookspecs
        from trtlm.plugins import get_registry

        registry = get_registry()
        entry = self._entry()
        plugin = registry.pm.get_plugin(entry.plugin)
        assert plugin is not None
        registry.pm.check_pending()  # raises on a hookimpl without a spec
        specs = {n for n in dir(hookspecs) if n.startswith("trtlm_")}
        for impl in registry.pm.get_hookcallers(plugin) or []:
            assert impl.name in specs

    def test_map_layers_covers_every_tensor(self, model_dir):
        from trtlm.convert.options import ConvertOptions
        from trtlm.plugins import get_registry

        registry = get_registry()
        hooks = registry.hooks(self._entry())
        loaded = hooks.trtlm_load_weights(model_dir=model_dir, options=ConvertOptions())
        plan = hooks.trtlm_map_layers(hf_config=loaded.hf_config, options=ConvertOptions())
        used = set(plan.source_shapes())
        have = set(loaded.source.keys())
        assert used - have == set(), f"plan reads tensors the checkpoint lacks: {sorted(used - have)[:5]}"
        assert have - used == set(), f"tensors the plan ignores: {sorted(have - used)[:5]}"
        names = [t.name for t in plan.tensors]
        assert len(names) == len(set(names)), "duplicate output tensor names"

    def test_shard_then_merge_round_trips(self, model_dir, tmp_path):
        import torch

        from trtlm.runtime.checkpoint import merge_ranks, read_rank

        single = read_rank(self._convert(model_dir, tmp_path / "tp1"), 0)
        for tp, pp in self.parallel_layouts:
            out = self._convert(model_dir, tmp_path / f"tp{tp}pp{pp}", tp_size=tp, pp_size=pp)
            config = json.loads((out / "config.json").read_text())
            merged = merge_ranks(config, [read_rank(out, r) for r in range(tp * pp)])
            assert set(merged) == set(single), f"tp{tp} pp{pp}: names differ"
            for name, tensor in single.items():
                assert torch.equal(merged[name], tensor), f"tp{tp} pp{pp}: {name} differs after merge"

    def test_builds_and_runs(self, model_dir, tmp_path):
        from trtlm.api import LLM
        from trtlm.build import BuildOptions, build

        ckpt = self._convert(model_dir, tmp_path / "ckpt")
        build(ckpt, tmp_path / "engine", BuildOptions())
        out = LLM(tmp_path / "engine").generate([[1, 2, 3, 4]], max_new_tokens=4)
        assert len(out[0]["output_ids"]) >= 1

    def test_logits_match_transformers(self, model_dir, tmp_path):
        import torch

        from trtlm.api import LLM
        from trtlm.build import BuildOptions, build
        from trtlm.testing.models import transformers_class

        config = json.loads((model_dir / "config.json").read_text())
        cls = transformers_class(config)
        if cls is None:
            pytest.skip(f"transformers has no class for {config.get('architectures')}")
        hf = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
        ckpt = self._convert(model_dir, tmp_path / "ckpt")
        build(ckpt, tmp_path / "engine", BuildOptions())
        llm = LLM(tmp_path / "engine")
        prompt = torch.randint(3, int(config["vocab_size"]), (12,), generator=torch.Generator().manual_seed(0))
        out = llm.generate([prompt.tolist()], max_new_tokens=self.decode_tokens, keep_logits=True)
        gen = llm.last_generation
        ids = prompt.tolist() + out[0]["output_ids"]
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        T = len(prompt)
        assert (gen.prompt_logits[0] - ref[:T]).abs().max().item() <= self.logits_atol
        for i, step in enumerate(gen.step_logits):
            assert (step[0] - ref[T + i]).abs().max().item() <= self.logits_atol, f"decode step {i}"
        expected = ref[T - 1:-1].argmax(-1).tolist()
        assert out[0]["output_ids"] == expected[:len(out[0]["output_ids"])]
