"""Runs inside llm-compressor's own virtual environment (see benchmarks/quantize_demo.py); never imports
moecompress. GPTQ W{bits}A16 with group size G via `oneshot` on the given calibration token windows, then
saves the dense fake-quantized weights (`save_compressed=False`) and the wall time.

Usage: python llmcompressor_worker.py MODEL_DIR CALIB.pt OUT_DIR BITS GROUP [LINEAR_BITS]

LINEAR_BITS: the attention projections (``self_attn.{q,k,v,o}_proj``: the only linears besides the routed experts,
the router and the head in the Mixtral- and Qwen3-MoE-style models measured) at that width, the rest at BITS (two
config groups), to compare with moecompress's ``--linear-bits``.
"""

import json
import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM


def main() -> None:
    model_dir, calib, out, bits, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    linear_bits = int(sys.argv[6]) if len(sys.argv) > 6 else None
    torch.set_num_threads(2)
    ids = torch.load(calib)  # [N, S] token ids, the same windows moecompress calibrates on
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def weights(b):
        return {"num_bits": b, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}

    if linear_bits is not None:
        attn = r"re:.*self_attn\.(q|k|v|o)_proj$"
        recipe = GPTQModifier(targets="Linear", ignore=["lm_head", "re:.*mlp.gate$"], config_groups={
            "group_0": {"targets": [attn], "weights": weights(linear_bits)},
            "group_1": {"targets": [r"re:.*experts\.\d+\.\w+$"], "weights": weights(bits)}})
    elif bits == 4 and group == 128:
        recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*mlp.gate$"])
    else:
        recipe = GPTQModifier(targets="Linear", ignore=["lm_head", "re:.*mlp.gate$"], config_groups={
            "group_0": {"targets": ["Linear"], "weights": weights(bits)}})
    t0 = time.time()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=len(ids))
    seconds = time.time() - t0
    # check the weights really are on a 2^bits grid per group, then save them dense
    w = None
    for name, p in model.named_parameters():
        if "experts" in name and p.dim() >= 2:
            w = p.detach().reshape(-1, group)[0]
            break
    levels = int(torch.unique(w).numel()) if w is not None else -1
    attn_levels = -1
    for name, p in model.named_parameters():
        if "self_attn.q_proj" in name and p.dim() >= 2:
            attn_levels = int(torch.unique(p.detach().reshape(-1, group)[0]).numel())
            break
    model.save_pretrained(out, save_compressed=False)
    json.dump({"seconds": seconds, "levels_in_one_expert_group": levels,
               "levels_in_one_attention_group": attn_levels, "bits": bits, "linear_bits": linear_bits, "group": group,
               "calibration_windows": len(ids), "seq_len": ids.shape[1]}, open(f"{out}/llmcompressor_run.json", "w"))


if __name__ == "__main__":
    main()
