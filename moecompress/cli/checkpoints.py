"""Commands that describe what is there: the registered architectures, stages, formats and tasks (``list``), a
model's layout (``info``), a packed directory (``inspect``); and ``export`` to another checkpoint format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moecompress.cli.core import ForceOpt, ModelArg, handled
from moecompress.console import print_table, show_inspect, success
from moecompress.errors import MoecompressError


def list_cmd() -> None:
    """List registered architectures, stages, formats and the bundled calibration tasks."""
    with handled():
        from moecompress.calib import bundled_tasks, read_documents
        from moecompress.formats import FORMATS
        from moecompress.models import ARCHS
        from moecompress.stages import STAGES

        rows = []
        for name, arch in ARCHS.items():
            rows.append([name, _routing_text(arch), arch.shared_experts or "-", arch.expert_layout,
                         f"{arch.layers}.N.{arch.moe_block}"])
        print_table("Architectures", ["model_type", "routing", "shared experts", "expert storage", "MoE block"], rows)
        print_table("Stages", ["stage", "modifies model", "keys", "what it does"],
                    [[n, "yes" if s.modifies_model else "no",
                      ", ".join(k for k in s.config.model_fields if k != "stage"), s.summary] for n, s in STAGES.items()])
        print_table("Formats", ["format", "bits/weight", "description"],
                    [[n, f.bits, f.description] for n, f in FORMATS.items()])
        print_table("Bundled tasks (calib_data/)", ["task", "calib documents", "eval documents"],
                    [[t, len(read_documents(t, "calib")), len(read_documents(t, "eval"))] for t in bundled_tasks()])


def _routing_text(arch) -> str:
    """The family's routing rule as text, read off its tiny test config."""
    from moecompress.testing import tiny_config

    cfg = tiny_config(arch.name)
    rule = arch.routing(cfg, arch.moe_layer_indices(cfg)[0])
    text = rule.score + (f" + {rule.group_score} groups" if rule.group_score else "")
    text += " + correction bias" if arch.correction_bias else ""
    return text + (" + renorm" if rule.renormalize else "")


def info(model: ModelArg = None) -> None:
    """Describe a model: MoE layout, routing rule, parameters by role (reads the config only)."""
    with handled():
        from moecompress.io.describe import describe_model

        d = describe_model(model)
        print_table(f"{d['model']}", ["property", "value"], [[k, v] for k, v in d.items() if k != "model"])


def inspect(directory: Annotated[str, typer.Argument(help="A model directory (packed or not), or demo.")]) -> None:
    """Show per module the codec, bits per weight and bytes, and the overall compression ratio."""
    with handled():
        from moecompress.io.model import model_dir

        show_inspect(model_dir(directory))


def export(
    directory: Annotated[Path, typer.Argument(help="A packed symmetric W4A16 or W8A16 directory.")],
    to: Annotated[str, typer.Option("--to", help="Target format (compressed-tensors).")] = "compressed-tensors",
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write.")] = ...,
    force: ForceOpt = False,
) -> None:
    """Export to another format: compressed-tensors (vLLM, llm-compressor) for symmetric W4A16 and W8A16."""
    with handled():
        if to != "compressed-tensors":
            raise MoecompressError(f"unknown export format {to!r}", "use --to compressed-tensors")
        from moecompress.formats.export_ct import export_compressed_tensors

        r = export_compressed_tensors(directory, output, force)
        success(f"wrote {r['output']}: {r['modules']} linears in compressed-tensors {r['format']} "
                f"({r['bits']}-bit, group {r['group_size'] or 'per channel'})")
