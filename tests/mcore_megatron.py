"""Load a trtlm-written Megatron-Core rank file into megatron-core's own GPTModel; print its logits'
max abs difference from transformers' as JSON.  Run by tests/test_mcore.py in a subprocess (Megatron
keeps process-global parallel state), on CPU with a one-process gloo group.

    python tests/mcore_megatron.py RANK_FILE HF_DIR SEQ_LEN

megatron-core 0.16 assumes CUDA in three places that do not touch the model's arithmetic; on a
CPU-only torch this script (a) points ``torch.cuda.current_device()`` at the CPU (the device of the
RoPE frequencies and of router-statistics buffers), (b) makes the model-parallel RNG fork a no-op (it
only seeds dropout, which is off in eval mode, and needs CUDA RNG states), and (c) defines
``moe_utils.te_general_gemm = None`` when Transformer Engine is absent (its no-TE import path forgets
the name, which selects Megatron's own ``torch.mm`` router path).  The model is built from the
checkpoint's ``args`` with the local (no Transformer Engine) layer spec; the Transformer-Engine
norm names trtlm writes are mapped to the local spec's with Megatron's own
``sharded_state_dict_keys_map`` of that spec.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

import torch

torch.cuda.current_device = lambda: "cpu"  # (a)


def main(rank_file: str, hf_dir: str, seq_len: int) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    import megatron.core.transformer.moe.moe_utils as moe_utils
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # (c)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()  # (b)

    from pathlib import Path

    from trtlm.mcore.torchfile import load_rank_file

    data = load_rank_file(Path(rank_file))  # the same safe reader trtlm uses
    a = vars(data["args"])
    experts = a.get("num_experts")
    moe = {} if not experts else dict(
        num_moe_experts=experts, moe_router_topk=a["moe_router_topk"], moe_ffn_hidden_size=a["moe_ffn_hidden_size"],
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_grouped_gemm=False,
        moe_router_pre_softmax=a["moe_router_pre_softmax"], moe_token_dispatcher_type="allgather")
    config = TransformerConfig(
        num_layers=a["num_layers"], hidden_size=a["hidden_size"], ffn_hidden_size=a["ffn_hidden_size"],
        num_attention_heads=a["num_attention_heads"], num_query_groups=a["num_query_groups"],
        kv_channels=a["kv_channels"], normalization=a["normalization"], layernorm_epsilon=a["norm_epsilon"],
        gated_linear_unit=a["swiglu"], activation_func=torch.nn.functional.silu, add_bias_linear=a["add_bias_linear"],
        add_qkv_bias=a["add_qkv_bias"], hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=True, params_dtype=torch.float32, **moe)
    spec = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False, normalization=a["normalization"])
    model = GPTModel(config, spec, vocab_size=a["padded_vocab_size"], max_sequence_length=a["max_position_embeddings"],
                     position_embedding_type=a["position_embedding_type"], rotary_base=int(a["rotary_base"]),
                     rotary_percent=a["rotary_percent"],
                     share_embeddings_and_output_weights=not a["untie_embeddings_and_output_weights"]).eval()
    # Megatron's own TE <-> local name map for this spec (dist-checkpoint keys), applied in reverse.
    keys_map = spec.submodules.sharded_state_dict_keys_map or {}
    state = {}
    for name, tensor in data["model"].items():
        for local, te in keys_map.items():
            if "." + te in name:
                name = name.replace(te, local)
        state[name] = tensor
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(3, hf.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq_len).unsqueeze(0).expand(2, -1)
    mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), 1)[None, None].expand(2, 1, -1, -1)
    with torch.no_grad():
        logits = model(ids, pos, mask)
        ref = hf(ids).logits
    err = (logits[..., :ref.shape[-1]] - ref).abs().max().item()
    print(json.dumps({"missing": missing, "unexpected": unexpected, "max_abs_err": err,
                      "ref_max_abs": ref.abs().max().item(), "padded_vocab": int(logits.shape[-1])}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
