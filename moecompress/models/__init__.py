"""Per-architecture adapters. Importing this package registers every family below."""

from moecompress.models import (  # noqa: F401  (each import registers one family)
    deepseek_v2,
    deepseek_v3,
    ernie4_5_moe,
    glm4_moe,
    gpt_oss,
    granitemoe,
    hunyuan_v1_moe,
    mixtral,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_moe,
)
from moecompress.models.base import MoEArch, MoEBlockView
from moecompress.models.experts import ExpertView, FusedExperts, ListExperts
from moecompress.models.registry import ARCHS, find_arch, register_arch

__all__ = ["ARCHS", "ExpertView", "FusedExperts", "ListExperts", "MoEArch", "MoEBlockView", "find_arch",
           "register_arch"]
