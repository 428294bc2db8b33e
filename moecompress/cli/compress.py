"""Commands that compress a model, one stage each: ``profile`` (expert activation per task), ``prune`` (keep the
best experts), ``quantize`` and ``ternary`` (packed low-bit experts)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moecompress.cli.core import (DataOpt, DeviceOpt, DtypeOpt, ForceOpt, ModelArg, OffloadOpt, TasksOpt, _calibration,
                                  _rank0, _run, handled)
from moecompress.console import (RichProgress, console, print_table, show_inspect, show_prune, show_quantize,
                                 show_ternary, success)
from moecompress.errors import MoecompressError


def profile(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Profile directory to write.")] = ...,
    tasks: TasksOpt = None,
    data: DataOpt = None,
    samples: Annotated[int, typer.Option(help="Calibration windows per task.")] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed for choosing windows.")] = 0,
    tcess_k: Annotated[Optional[int], typer.Option("--tcess-k", help="TCESS top-k (default: the model's).")] = None,
    tcess_r: Annotated[float, typer.Option("--tcess-r", help="TCESS confidence threshold r.")] = 0.0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also write PNG heatmaps into this directory.")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload_hidden: OffloadOpt = False,
    force: ForceOpt = False,
) -> None:
    """Profile per-task expert activation: counts, gate sums, TCESS, REAP, EAN, super experts."""
    with handled():
        from moecompress.formats.profile import Profile
        from moecompress.pipeline import run as run_pipeline
        from moecompress.recipe import validate_command

        recipe = validate_command("profile", model, _calibration(tasks, data, samples, seq_len, seed),
                                  {"stage": "profile", "tcess_k": tcess_k, "tcess_r": tcess_r, "batch_size": batch_size},
                                  run=_run(device, dtype, offload_hidden))
        if plot is not None and plot.exists() and not plot.is_dir():
            raise MoecompressError(f"--plot {str(plot)!r} is a file", "give a directory")
        result = run_pipeline(recipe, output=output, force=force, progress=RichProgress())
        if not _rank0():
            return
        prof = Profile.load(result.output)
        summ = prof.summary
        rows = []
        for t, d in summ["tasks"].items():
            for layer, v in d["layers"].items():
                rows.append([t, layer, " ".join(f"{e}:{s:.0%}" for e, s in v["most_used"]),
                             " ".join(f"{e}:{s:.1%}" for e, s in v["least_used"]), f"{v['entropy']:.2f}"])
        print_table("Most and least used experts (expert:share of top-k picks)",
                    ["task", "layer", "most used", "least used", "entropy"], rows)
        if summ.get("js_divergence_mean_per_layer"):
            print_table("Routing difference between tasks", ["MoE layer", "mean JS divergence (bits)"],
                        [[layer, v] for layer, v in zip(prof.model["moe_layers"], summ["js_divergence_mean_per_layer"])])
        if summ["super_experts"]:
            console.print(f"super experts (layer, expert), protected when pruning: {summ['super_experts']}")
        console.print(f"{sum(prof.tokens.values()):,} tokens in {summ['seconds']:.1f} s "
                      f"({summ['tokens_per_second']:,.0f} tokens/s)")
        if plot is not None:
            from moecompress.eval.plots import plot_profile

            for p in plot_profile(prof, plot):
                console.print(f"wrote {p}")
        success(f"wrote {result.output} (profile.json, profile.safetensors)")


def prune(
    model: ModelArg = None,
    profile_dir: Annotated[Path, typer.Option("--profile", "-p", help="Profile directory of this model.")] = ...,
    output: Annotated[Path, typer.Option("--output", "-o", help="Pruned model directory to write.")] = ...,
    task: Annotated[Optional[list[str]], typer.Option("--task", help="Task(s) to keep experts for (repeatable, "
                                                       "or comma-separated); default: every task in the profile.")] = None,
    keep: Annotated[Optional[int], typer.Option("--keep", help="Experts to keep per layer.")] = None,
    keep_ratio: Annotated[Optional[float], typer.Option("--keep-ratio", help="Share of experts to keep.")] = None,
    cumulative: Annotated[Optional[float], typer.Option(
        "--cumulative", help="Keep experts until this share of the score is covered (per-layer counts).")] = None,
    score: Annotated[str, typer.Option("--score", help="auto | tcess | tcess_prob | frequency | reap | reap_freq | "
                                       "consensus | ean | gate | random. auto: try each --candidates score's experts "
                                       "on held-out calibration text, keep the lowest loss.")] = "auto",
    candidates: Annotated[str, typer.Option("--candidates", help="--score auto: the scores to compare "
                                            "(comma-separated).")] = "tcess,reap,frequency,ean,reap_freq,consensus",
    auto_samples: Annotated[int, typer.Option("--auto-samples", help="--score auto: held-out calibration windows "
                                              "per task (as long as the profile's).")] = 32,
    layerwise: Annotated[bool, typer.Option("--layerwise/--no-layerwise", help="--score auto: also compare a model "
                                            "whose every layer takes the candidate set that keeps its outputs "
                                            "closest to the unpruned model's.")] = True,
    seed: Annotated[int, typer.Option(help="Seed (score random, router recalibration).")] = 0,
    protect_super: Annotated[bool, typer.Option("--protect-super/--no-protect-super",
                                                help="Always keep super experts.")] = True,
    uneven: Annotated[str, typer.Option(help="With --cumulative: 'fill' pads layers with the next-best experts; "
                                             "'mask' with never-chosen ones (routers with a bias only).")] = "fill",
    regroup: Annotated[bool, typer.Option("--regroup", help="Group-limited routers: allow uneven groups by "
                                                            "rewriting the routing to one group.")] = False,
    recalibrate_router: Annotated[bool, typer.Option("--recalibrate-router", help="Refit each kept router, layer by "
                                                     "layer, so the pruned block reproduces the unpruned block's "
                                                     "output on the calibration text.")] = False,
    recalibrate_steps: Annotated[int, typer.Option("--recalibrate-steps")] = 100,
    samples: Annotated[int, typer.Option(help="Calibration windows per task for --recalibrate-router.")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 256,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload_hidden: OffloadOpt = False,
    force: ForceOpt = False,
) -> None:
    """Keep the best experts per layer for some tasks (PEP) and write a standard HF checkpoint."""
    with handled():
        from moecompress.pipeline import run as run_pipeline
        from moecompress.recipe import validate_command

        tasks = [t.strip() for item in task or [] for t in item.split(",") if t.strip()] or None
        stage = {"stage": "prune", "profile": str(profile_dir), "tasks": tasks, "keep": keep, "keep_ratio": keep_ratio,
                 "cumulative": cumulative, "score": score, "seed": seed, "protect_super": protect_super,
                 "candidates": [c.strip() for c in candidates.split(",") if c.strip()], "auto_samples": auto_samples,
                 "layerwise": layerwise, "uneven": uneven, "regroup": regroup, "recalibrate_router": recalibrate_router,
                 "recalibrate_steps": recalibrate_steps}
        recipe = validate_command("prune", model, _calibration(",".join(tasks) if tasks else None, None, samples,
                                                               seq_len, seed), stage,
                                  {"tasks": "--task", "profile": "--profile"}, _run(device, dtype, offload_hidden))
        result = run_pipeline(recipe, output=output, force=force, progress=RichProgress())
        if not _rank0():
            return
        show_prune(result.report["stages"][0]["result"])
        success(f"wrote {result.output} (loads with plain transformers; provenance in moecompress.json)")


def _layer_bits(text: str | None) -> dict[int, int] | None:
    """``--layer-bits 0:4,1:3`` as {0: 4, 1: 3}; a malformed value is a one-line error."""
    if text is None:
        return None
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        layer, _, bits = part.partition(":")
        if not (layer.strip().isdigit() and bits.strip().isdigit()):
            raise MoecompressError(f"--layer-bits {text!r}: {part!r} is not LAYER:BITS",
                                   "give comma-separated pairs such as 0:4,1:3")
        out[int(layer)] = int(bits)
    return out


def quantize(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Quantized model directory to write.")] = ...,
    scheme: Annotated[str, typer.Option(help="w8a8 | w8a16 | w4a16 | w3a16 | w2a16 | w4a8 | w4a4 | w3a4")] = "w4a16",
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="Weight group size; -1 = per "
                                                      "output channel (default: 128 weight-only, -1 otherwise).")] = None,
    method: Annotated[str, typer.Option(help="gptq | rtn")] = "gptq",
    symmetric: Annotated[bool, typer.Option("--symmetric/--asymmetric", help="Weight grid without/with zero points "
                                            "(symmetric W4A16/W8A16 exports to compressed-tensors).")] = False,
    fractional_zeros: Annotated[Optional[bool], typer.Option(
        "--fractional-zeros/--integer-zeros", help="Asymmetric grids: zero points in steps of 2^-(8-b), in the byte "
        "an integer zero takes (the levels need not include 0; packed as int<b>-fz, format version 3) (default: on "
        "for 2-bit weights, integer above).")] = None,
    smooth: Annotated[Optional[bool], typer.Option("--smooth/--no-smooth", help="EAQuant expert-aware smoothing "
                                                   "(default: on when activations are quantized).")] = None,
    smooth_alpha: Annotated[float, typer.Option("--smooth-alpha")] = 0.6,
    router_bits: Annotated[Optional[int], typer.Option("--router-bits", help="Quantize the router too "
                                                       "(default: keep it in full precision).")] = None,
    align_router: Annotated[bool, typer.Option("--align-router/--no-align-router",
                                               help="Per-row KL-aligned clipping for a quantized router.")] = True,
    align_objective: Annotated[str, typer.Option("--align-objective", help="topk_rest (top-k KL plus the pooled "
                                                 "rest: a divergence) | topk (EAQuant's loss).")] = "topk_rest",
    balance: Annotated[bool, typer.Option("--balance/--no-balance", help="Calibration balance for rare experts.")] = True,
    rotate_intermediate: Annotated[Optional[bool], typer.Option(
        "--rotate-intermediate/--no-rotate-intermediate",
        help="Online Hadamard before the experts' down projections (default: on for A4).")] = None,
    rotate: Annotated[bool, typer.Option("--rotate", help="Rotate the residual stream (QuaRot; RMSNorm models).")] = False,
    refit: Annotated[Optional[bool], typer.Option(
        "--refit/--no-refit", help="Refit each group's scale and zero after GPTQ to the Hessian-weighted error, "
        "codes fixed (default: on).")] = None,
    rare_experts: Annotated[Optional[str], typer.Option(
        "--rare-experts", help="Experts still short of calibration tokens: pooled (topped up with the layer's other "
        "tokens, then GPTQ) | rtn (round-to-nearest fallback) (default: pooled).")] = None,
    sequential: Annotated[Optional[bool], typer.Option(
        "--sequential/--no-sequential", help="Quantize each layer in order (norm readers, attention output, experts' "
        "gate/up, their down), each linear toward its full-precision outputs from its quantized inputs (GPTAQ's "
        "asymmetric calibration; up to three more calibration passes per layer) (default: on for weight-only "
        "schemes of 2-3-bit weights).")] = None,
    sequential_targets: Annotated[Optional[str], typer.Option(
        "--sequential-targets", help="With --sequential, the full-precision outputs aimed at: model (the original "
        "model's, a second stream of the calibration batches: earlier layers' errors are taken up too) | layer "
        "(this layer's in full precision) (default: model).")] = None,
    code_sweeps: Annotated[Optional[int], typer.Option(
        "--code-sweeps", help="Coordinate-descent sweeps over the codes after GPTQ, each followed by the refit "
        "(QuantEase; 0 = plain GPTQ codes); a number sets both the routed experts and the other linears (default: 2 "
        "on the attention, dense and shared linears, 0 on the routed experts).")] = None,
    gptq_rounds: Annotated[Optional[int], typer.Option(
        "--gptq-rounds", help="With the refit: GPTQ again on the refit scales and zeros, each output row keeping the "
        "lower Hessian-weighted error, up to N times; stops once a round gains under 0.5 % (0 = one GPTQ pass) "
        "(default: 2 for 2-bit weights, 0 above; 1 with --codec trellis, each sequence of 64 rows keeping its "
        "lower error).")] = None,
    act_order: Annotated[Optional[bool], typer.Option(
        "--act-order/--no-act-order", help="GPTQ columns by decreasing Hessian diagonal (default: on).")] = None,
    clip_search: Annotated[Optional[bool], typer.Option(
        "--clip-search/--no-clip-search", help="Search each group's clipping range for the least weight error (25 "
        "trials, most of round-to-nearest's time); off: min-max ranges (default: on).")] = None,
    clip_floor: Annotated[Optional[float], typer.Option(
        "--clip-floor", help="The smallest range factor the clip search tries, 0.2-1 (default: 0.8 for GPTQ at 2 "
        "bits, where tighter ranges suit rounding alone but not GPTQ; 0.2 otherwise).")] = None,
    linear_bits: Annotated[Optional[int], typer.Option(
        "--linear-bits", help="Weight width (2-8) of the attention, dense and shared linears; the routed experts keep "
        "the scheme's (a few percent of an MoE's weights, much of its 2-3-bit error) (default: the scheme's).")] = None,
    layer_bits: Annotated[Optional[str], typer.Option(
        "--layer-bits", help="Decoder layers at their own weight width, experts and linears alike, as LAYER:BITS "
        "pairs, e.g. 0:4 or 0:4,1:3 (the first layers carry much of the 2-bit error) (default: none).")] = None,
    vocab_prior: Annotated[Optional[float], typer.Option(
        "--vocab-prior", help="The first layer's query/key/value read a function of the token alone: add this share "
        "of the whole vocabulary's input Hessian to theirs (scaled to the calibration Hessian), for tokens the "
        "calibration text lacks; 0 turns it off (default: 0.1 where layer 0's linears take 3-bit scalar-coded "
        "weights, where it was measured to pay, else 0).")] = None,
    expert_prior: Annotated[Optional[float], typer.Option(
        "--expert-prior", help="The same for the first layer's routed experts: the vocabulary's tokens through "
        "layer 0, each expert's Hessian given this share of its gate-weighted Hessian over them; 0 turns it off "
        "(default: 0, off: a tie at 3 bits on four trained models).")] = None,
    expert_chunk: Annotated[Optional[int], typer.Option(
        "--expert-chunk", min=0, help="Quantize a layer's routed experts this many at a time: their Hessians and "
        "pairing statistics (three [E, H, H] float32 tensors with the sequential targets: 158 GB for DeepSeek-V3) "
        "are held for one chunk at a time; the same bytes whatever the chunk (default 0: as many as fit in 40 % "
        "of the device's memory).")] = None,
    fake_quant: Annotated[bool, typer.Option("--fake-quant", help="Write dequantized bf16 weights and the record "
                                                                  "instead of the packed format.")] = False,
    codec: Annotated[str, typer.Option(help="auto: the scheme's int<b> (int<b>-fz where the zero points are "
                                       "fractional); trellis: 2-4-bit weights in QTIP's bitshift trellis code "
                                       "(packed trellis<b>, same size, lower error, slower to quantize); ternary "
                                       "codecs need `moecompress ternary`.")] = "auto",
    tasks: TasksOpt = None,
    data: DataOpt = None,
    samples: Annotated[int, typer.Option(help="Calibration windows per task.")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 256,
    seed: Annotated[int, typer.Option()] = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload_hidden: OffloadOpt = False,
    force: ForceOpt = False,
) -> None:
    """Expert-aware quantization: GPTQ over experts, smoothing, router alignment, calibration balance."""
    with handled():
        from moecompress.pipeline import run as run_pipeline
        from moecompress.recipe import validate_command

        stage = {"stage": "quantize", "scheme": scheme, "group_size": group_size, "method": method,
                 "symmetric": symmetric, "smooth": smooth,
                 "smooth_alpha": smooth_alpha, "router_bits": router_bits, "align_router": align_router,
                 "align_objective": align_objective, "balance": balance, "rotate_intermediate": rotate_intermediate,
                 "rotate": rotate, "save_format": "fake-quant" if fake_quant else "packed", "codec": codec,
                 **{k: v for k, v in (("refit", refit), ("code_sweeps", code_sweeps), ("gptq_rounds", gptq_rounds),
                                     ("rare_experts", rare_experts),
                                     ("act_order", act_order), ("clip_search", clip_search), ("clip_floor", clip_floor),
                                     ("sequential", sequential), ("linear_bits", linear_bits),
                                     ("layer_bits", _layer_bits(layer_bits)),
                                     ("sequential_targets", sequential_targets),
                                     ("fractional_zeros", fractional_zeros), ("vocab_prior", vocab_prior),
                                     ("expert_prior", expert_prior), ("expert_chunk", expert_chunk))
                    if v is not None}}  # unset: the stage config's defaults
        recipe = validate_command("quantize", model, _calibration(tasks, data, samples, seq_len, seed), stage,
                                  {"save_format": "--fake-quant"}, _run(device, dtype, offload_hidden))
        result = run_pipeline(recipe, output=output, force=force, progress=RichProgress())
        if not _rank0():
            return
        show_quantize(result.report["stages"][0]["result"])
        form = "fake-quantized bf16 weights + quantization.safetensors" if fake_quant else "packed format"
        success(f"wrote {result.output} ({form}; `moecompress eval {result.output}` compares it with the original)")


def ternary(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Ternary model directory to write.")] = ...,
    method: Annotated[str, typer.Option(help="absmean | twn (round to nearest on their grids) | gptq "
                                        "(error-compensated, QMoE-style) | rtn")] = "gptq",
    grid: Annotated[Optional[str], typer.Option(help="gptq / rtn grid: twn (default) | absmean | qmoe (QMoE's "
                                                "sparse per-row {min, 0, max}, ~90 % zeros)")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Zero-threshold factor of the grid (absmean 0.5, twn "
                                                       "0.7 x mean|w|, qmoe 0.5 x max): more zeros, more error.")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="Columns per scale (default 128; "
                                                      "qmoe: -1, one per row).")] = None,
    damp: Annotated[Optional[float], typer.Option(help="GPTQ damping (default 0.01; qmoe 0.1).")] = None,
    others: Annotated[str, typer.Option(help="Attention / shared experts: bf16 | int8 | int4")] = "bf16",
    codec: Annotated[str, typer.Option(help="ternary-b3 (5 trits per byte, ~1.7 bits) | ternary2 (2-bit layout) | "
                                       "ternary-dict (QMoE's dictionary code, < 1 bit at ~90 % zeros) | auto "
                                       "(per module the smaller of b3 and dict)")] = "ternary-b3",
    fake_quant: Annotated[bool, typer.Option("--fake-quant", help="Write dequantized bf16 weights and the record "
                                                                  "instead of the packed format.")] = False,
    tasks: TasksOpt = None,
    data: DataOpt = None,
    samples: Annotated[int, typer.Option(help="Calibration windows per task.")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 256,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload_hidden: OffloadOpt = False,
    force: ForceOpt = False,
) -> None:
    """Turn routed experts into {-1, 0, +1} x group scale (absmean, TWN or GPTQ-ternary; QMoE's sparse grid), packed
    below 2 bits (below 1 with ternary-dict)."""
    with handled():
        from moecompress.pipeline import run as run_pipeline
        from moecompress.recipe import validate_command

        stage = {"stage": "ternary", "method": method, "grid": grid, "threshold": threshold, "group_size": group_size,
                 "damp": damp, "others": others, "codec": codec, "save_format": "fake-quant" if fake_quant else "packed"}
        recipe = validate_command("ternary", model, _calibration(tasks, data, samples, seq_len, 0), stage,
                                  {"save_format": "--fake-quant"}, _run(device, dtype, offload_hidden))
        result = run_pipeline(recipe, output=output, force=force, progress=RichProgress())
        if not _rank0():
            return
        r = result.report["stages"][0]["result"]
        show_ternary(r)
        if "packed" in result.report:
            show_inspect(result.output)
        success(f"wrote {result.output}")
