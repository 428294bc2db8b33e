#!/usr/bin/env python
"""What `--linear-bits` and `--layer-bits` cost in size on real MoE shapes: the mean code width over every quantized
weight (routed experts and the decoder layers' other linears; routers, embeddings and the head unquantized) of
Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3 (transformers' default configs are those models; built on the meta
device, nothing downloaded) and of the three small models the quality figures come from.

Usage::

    python benchmarks/mixed_width_cost.py [--models /work/bench/moe2,/work/bench/qwen3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, MixtralConfig, Qwen3MoeConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize_demo import code_bits  # noqa: E402

from moecompress.models import find_arch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated local checkpoint directories to add")
    args = ap.parse_args()
    configs = {"Mixtral-8x7B": MixtralConfig(), "Qwen3-30B-A3B": Qwen3MoeConfig(), "DeepSeek-V3": DeepseekV3Config()}
    configs["demo"] = None
    for d in filter(None, args.models.split(",")):
        configs[d] = d
    for name, cfg in configs.items():
        if cfg is None or isinstance(cfg, str):
            from moecompress.runtime.source import load_model

            loaded = load_model(cfg)
            model, arch = loaded.model, loaded.arch
        else:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cfg)
            arch = find_arch(cfg)
        first = arch.moe_layer_indices(model.config)[0]
        row = [name, code_bits(model, arch, 2, 4), code_bits(model, arch, 2, 3),
               code_bits(model, arch, 2, None, {first: 4}), code_bits(model, arch, 3, 4)]
        print(f"{name}: W2 + linears 4-bit {row[1]:.3f}, W2 + linears 3-bit {row[2]:.3f}, W2 + first MoE layer "
              f"({first}) 4-bit {row[3]:.3f}, W3 + linears 4-bit {row[4]:.3f} code bits per quantized weight",
              flush=True)


if __name__ == "__main__":
    main()
