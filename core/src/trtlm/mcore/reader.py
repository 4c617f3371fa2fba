"""A Megatron-Core checkpoint read as Hugging Face tensors, one at a time.

``trtlm convert --model-dir MCORE_CKPT`` (and ``trtlm run --model-dir``)
resolve the family from the checkpoint's ``args`` (:func:`resolve_family`),
ask it for the Hugging Face config (hook ``trtlm_mcore_config``) and for the
name/layout table (hook ``trtlm_mcore_layout``: the core's Llama part, the
family's feed-forward), and hand the ordinary conversion an
:class:`MCoreSource`: a lazy :class:`~trtlm.sources.TensorSource` whose
``get("model.layers.3.self_attn.q_proj.weight")`` reads the ``linear_qkv``
shards of layer 3's pipeline stage from every TP rank (all rank files are
memory-mapped, nothing is read up front), merges them and cuts out ``q``.
Every rank file is checked against the table before anything is written: a
missing rank, a tensor missing or of the wrong shape, a tensor trtlm does not
map, or a file whose args disagree is one ``error:`` line naming it.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from trtlm.errors import UserError
from trtlm.mcore.files import RankFiles, check_rank_dirs, find_iteration, parallel_sizes, rank_dir_name
from trtlm.mcore.layout import MCoreLayout, MCoreTensor, local_name, local_shape, merge
from trtlm.mcore.torchfile import load_rank_file
from trtlm.weights import LoadedModel

_IGNORED_SUFFIXES = ("._extra_state",)
#: Where the local (no Transformer Engine) layer spec keeps the norms TE fuses into the next linear
#: layer (Megatron-LM schema_core.py CoreLocalSchema vs CoreTESchema): read under either name.
_LOCAL_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def _stored_name(name: str, have: dict[str, object]) -> str | None:
    """``name`` as the rank file stores it: the Transformer-Engine name, or the local spec's."""
    if name in have:
        return name
    for te, local in _LOCAL_NAMES.items():
        if name.endswith(te) and name[: -len(te)] + local in have:
            return name[: -len(te)] + local
    return None


class MCoreCheckpoint:
    """One iteration of a Megatron checkpoint: its rank files (opened lazily) and ``args``."""

    def __init__(self, root: Path) -> None:
        self.files: RankFiles = find_iteration(Path(root))
        self._loaded: dict[Path, dict[str, Any]] = {}
        self._lock = threading.Lock()
        first = self.files.iter_dir / self.files.dirs[0] / "model_optim_rng.pt"
        self.where = str(first)
        data = self.load(first)
        args = data.get("args")
        if args is None or not hasattr(args, "__dict__"):
            raise UserError(f"{first}: holds no Megatron args (Namespace); not a Megatron-LM checkpoint")
        self.args: dict[str, Any] = dict(vars(args))
        self.tp, self.pp, self.ep = parallel_sizes(self.args, self.where)
        self.paths = check_rank_dirs(self.files, self.tp, self.pp, self.ep, self.where)
        self.iteration = data.get("iteration")

    def load(self, path: Path) -> dict[str, Any]:
        with self._lock:
            if path not in self._loaded:
                self._loaded[path] = load_rank_file(path)
            return self._loaded[path]

    def state_dict(self, pp: int, ep: int, tp: int) -> dict[str, torch.Tensor]:
        path = self.paths[(pp, ep, tp)]
        data = self.load(path)
        for key in ("model0", "model1"):
            if key in data:
                raise UserError(f"{path}: virtual pipeline stages ({key}) are not supported; "
                                f"re-save without --num-layers-per-virtual-pipeline-stage")
        model = data.get("model")
        if not isinstance(model, dict):
            raise UserError(f"{path}: no 'model' state dict (an optimizer-only or distributed checkpoint file?)")
        fargs = data.get("args")
        if hasattr(fargs, "__dict__"):
            sizes = parallel_sizes(dict(vars(fargs)), str(path))
            if sizes != (self.tp, self.pp, self.ep):
                raise UserError(f"{path}: its args say tp/pp/ep = {sizes}, {self.where}'s say "
                                f"{(self.tp, self.pp, self.ep)}; the rank files come from different checkpoints")
        return model


class MCoreSource:
    """Hugging Face named tensors from a Megatron checkpoint (see the module docstring)."""

    def __init__(self, ckpt: MCoreCheckpoint, layout: MCoreLayout) -> None:
        self._ckpt = ckpt
        pp, ep = ckpt.pp, ckpt.ep
        layers = int(ckpt.args.get("num_layers") or 0)
        experts = int(ckpt.args.get("num_experts") or 0)
        self._lps = max(layers // pp, 1)
        self._epr = max(experts // ep, 1)
        self._index: dict[str, tuple[MCoreTensor, int]] = {}
        for t in layout.tensors:
            if t.read:
                for pos, name in enumerate(t.hf):
                    self._index.setdefault(name, (t, pos))
        self._stored: dict[tuple[tuple[int, int, int], str], str] = {}
        self._check(layout)
        self._cache: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ placement
    def _stage(self, t: MCoreTensor) -> int:
        if t.layer is not None:
            return t.layer // self._lps
        return 0 if t.stage == "first" else self._ckpt.pp - 1

    def _ep_ranks(self, t: MCoreTensor) -> list[int]:
        return [t.expert // self._epr] if t.expert is not None else list(range(self._ckpt.ep))

    def _check(self, layout: MCoreLayout) -> None:
        """Every rank file holds exactly the tensors of the table, with the local shapes."""
        ck = self._ckpt
        expected: dict[tuple[int, int, int], dict[str, tuple[int, ...]]] = {r: {} for r in ck.paths}
        for t in layout.tensors:
            name = local_name(t, self._lps, self._epr)
            for e in self._ep_ranks(t):
                for r in range(ck.tp):
                    expected[(self._stage(t), e, r)][name] = local_shape(t, ck.tp)
        for rank, want in expected.items():
            path = ck.paths[rank]
            have = ck.state_dict(*rank)
            used = set()
            for name, shape in want.items():
                key = _stored_name(name, have)
                if key is None:
                    raise UserError(f"{path}: tensor {name} is missing")
                self._stored[(rank, name)] = key
                used.add(key)
                tensor = have[key]
                if not isinstance(tensor, torch.Tensor):
                    raise UserError(f"{path}: {key} is a {type(tensor).__name__}, not a tensor")
                if tuple(tensor.shape) != shape:
                    raise UserError(f"{path}: tensor {key} has shape {list(tensor.shape)} but args "
                                    f"(tp={ck.tp}) imply {list(shape)}; the args and the weights do not match")
            for name in have:
                if name not in used and not name.endswith(_IGNORED_SUFFIXES):
                    raise UserError(f"{path}: tensor {name} is not part of the model trtlm maps from these args "
                                    f"(biases, qk-norms and other extras are not supported)")

    # ------------------------------------------------------------------ TensorSource
    def keys(self) -> list[str]:
        return sorted(self._index)

    def shape(self, name: str) -> tuple[int, ...]:
        t, pos = self._index[name]
        return tuple(t.hf_shapes[pos])

    def dtype(self, name: str) -> torch.dtype:
        t, _ = self._index[name]
        rank = (self._stage(t), self._ep_ranks(t)[0], 0)
        return self._ckpt.state_dict(*rank)[self._stored[(rank, local_name(t, self._lps, self._epr))]].dtype

    def _full(self, t: MCoreTensor) -> tuple[torch.Tensor, ...]:
        with self._lock:
            hit = self._cache.get(t.name)
            if hit is not None:
                self._cache.move_to_end(t.name)
                return hit
        stage, e = self._stage(t), self._ep_ranks(t)[0]
        name = local_name(t, self._lps, self._epr)
        parts = [self._ckpt.state_dict(stage, e, r)[self._stored[((stage, e, r), name)]] for r in range(self._ckpt.tp)]
        out = tuple(t.from_mcore(merge(t.split, parts)))
        with self._lock:
            self._cache[t.name] = out
            while len(self._cache) > 4:
                self._cache.popitem(last=False)
        return out

    def get(self, name: str) -> torch.Tensor:
        t, pos = self._index[name]
        return self._full(t)[pos]


def resolve_family(model_dir: Path, family: str | None):
    """The family entry for a Megatron checkpoint: ``--family``, the HF architecture trtlm recorded in
    args, or by whether the model has experts, among the families that read ``mcore``."""
    from trtlm.mcore.config import recorded_hf_config
    from trtlm.plugins import get_registry

    registry = get_registry()
    ckpt = MCoreCheckpoint(model_dir)
    readers = registry.families_reading("mcore")
    if family:
        entry = registry.family(family)
        if entry not in readers:
            raise UserError(f"family {family} does not read Megatron-Core checkpoints")
        return entry, ckpt
    recorded = recorded_hf_config(ckpt.args)
    if recorded is not None:
        entry = registry.resolve_hf(recorded, where=f"{ckpt.where} (args.trtlm_hf_config)")
        if entry in readers:
            return entry, ckpt
    moe = bool(ckpt.args.get("num_experts"))
    matches = [e for e in readers if ("ep" in e.family.capabilities.parallel) == moe]
    if len(matches) != 1:
        names = ", ".join(e.family.name for e in matches) or "none installed"
        kind = "mixture-of-experts" if moe else "dense"
        raise UserError(f"{model_dir}: a {kind} Megatron checkpoint; families reading it: {names} "
                        f"(pass --family{', or pip install trtlm-plugin-mixtral' if moe and not matches else ''})")
    return matches[0], ckpt


def load_mcore(model_dir: Path, hooks, ckpt: MCoreCheckpoint | None = None) -> LoadedModel:
    """Open a Megatron checkpoint for the resolved family (``hooks`` from ``registry.hooks(entry)``)."""
    ckpt = ckpt or MCoreCheckpoint(model_dir)
    hf = hooks.trtlm_mcore_config(args=ckpt.args)
    if hf is None:
        raise UserError(f"{ckpt.where}: family {hooks.family.name} cannot describe this Megatron model")
    if int(ckpt.args.get("expert_tensor_parallel_size") or ckpt.tp) != ckpt.tp:
        raise UserError(f"{ckpt.where}: args.expert_tensor_parallel_size = {ckpt.args['expert_tensor_parallel_size']} "
                        f"differs from tensor_model_parallel_size {ckpt.tp}; not supported")
    for key in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                "num_layers_per_virtual_pipeline_stage", "account_for_embedding_in_pipeline_split",
                "account_for_loss_in_pipeline_split"):
        if ckpt.args.get(key):
            raise UserError(f"{ckpt.where}: args.{key} = {ckpt.args[key]!r}: uneven or virtual pipeline stages "
                            f"are not supported; re-save with Megatron-LM's converter (even stages)")
    layout = hooks.trtlm_mcore_layout(hf_config=hf, tp_size=ckpt.tp, pp_size=ckpt.pp, ep_size=ckpt.ep)
    source = MCoreSource(ckpt, layout)
    origin = (f"{ckpt.files.iter_dir} (Megatron-Core, tp={ckpt.tp} pp={ckpt.pp} ep={ckpt.ep})")
    return LoadedModel(hf, source, origin=origin)


__all__ = ["MCoreCheckpoint", "MCoreSource", "load_mcore", "resolve_family", "rank_dir_name"]
