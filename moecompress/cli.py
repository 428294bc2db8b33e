"""The ``moecompress`` command. Thin: each command parses options, calls one library function, prints.

Errors a user can fix end as one line on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
import typer.rich_utils

from moecompress.console import (SHOW, RichProgress, console, error, print_eval, print_table, setup_console,
                                 show_generic, show_inspect, show_prune, show_quantize, show_ternary, success, warn)
from moecompress.errors import MoecompressError, shorten
from moecompress.io.fsops import disk_full_error, signals_as_interrupts
from moecompress.version import __version__

app = typer.Typer(
    name="moecompress", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Post-training compression for Hugging Face Mixture-of-Experts LLMs (profile, prune, quantize, pack). "
         "Every command defaults to the bundled demo MoE when no model is given.",
)

ModelArg = Annotated[Optional[str], typer.Argument(
    help="Model: a local HF directory, tiny:<model_type> (a random test model), or omit for the bundled demo MoE.",
    show_default=False)]


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Turn every failure into one line on stderr + a non-zero exit status (2 for bad input or a full disk,
    128 + the signal when interrupted, 1 for a bug, with the traceback only under --verbose). SIGTERM and SIGHUP
    act as Ctrl-C does (the same cleanup runs)."""
    try:
        with signals_as_interrupts():
            yield
    except MoecompressError as e:
        error(str(e))
        raise typer.Exit(2) from None
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        error(f"interrupted ({signal.Signals(signum).name})")
        raise typer.Exit(128 + signum) from None
    except MemoryError:
        error("out of memory: use a machine with more memory, or lower --samples / --batch-size")
        raise typer.Exit(1) from None
    except (typer.Exit, typer.Abort, click.exceptions.ClickException):
        raise
    except Exception as e:
        full = disk_full_error(e)  # ENOSPC / EFBIG / EDQUOT, however a library wrapped it
        if full is not None:
            error(str(full))
            raise typer.Exit(2) from None
        if isinstance(e, OSError):
            error(_os_error(e))
            raise typer.Exit(2) from None
        logging.getLogger("moecompress").debug("traceback", exc_info=True)  # a bug: still one line
        error(f"unexpected {e.__class__.__name__}: {shorten(str(e))} (a bug in moecompress: run again with "
              "--verbose for the traceback and report it)")
        raise typer.Exit(1) from None


def _os_error(e: OSError) -> str:
    where = f" {str(e.filename)!r}" if e.filename else ""
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not allowed to write{where} ({e.strerror}): choose a directory you can write to"
    return f"cannot access{where} ({e.strerror or e.__class__.__name__}): check the path and the disk"


def _usage_error(e: click.ClickException) -> None:
    """Click/Typer's usage errors (a bad option type, an unknown option) as one line."""
    if e.__class__.__name__ == "NoArgsIsHelpError":  # the help was printed already
        return
    ctx = getattr(e, "ctx", None)
    where = f"`{ctx.command_path} --help`" if ctx is not None else "`moecompress --help`"
    error(f"{e.format_message()}: see {where}")


class _Warnings(logging.Handler):
    """The library's warnings (``logging.warning``) as one yellow line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        warn(record.getMessage())


typer.rich_utils.rich_format_error = _usage_error  # typer looks it up at call time


def _rank0() -> bool:
    """Under torchrun every rank runs the command; rank 0 alone prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def _version(value: bool) -> None:
    if value:
        console.print(f"moecompress {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what each stage does.")] = False,
) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_console(quiet=not _rank0())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    lib = logging.getLogger("moecompress")
    if not any(isinstance(h, _Warnings) for h in lib.handlers):
        handler = _Warnings(logging.WARNING)
        lib.addHandler(handler)
    lib.propagate = verbose  # warnings print once, as our own line (all records also go to the log with -v)
    lib.setLevel(logging.DEBUG if verbose else logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command("list")
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


@app.command()
def info(model: ModelArg = None) -> None:
    """Describe a model: MoE layout, routing rule, parameters by role (reads the config only)."""
    with handled():
        from moecompress.io.describe import describe_model

        d = describe_model(model)
        print_table(f"{d['model']}", ["property", "value"], [[k, v] for k, v in d.items() if k != "model"])


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).", show_default=False)],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Override the recipe's model.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Override the recipe's output directory.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated calibration tasks (override).")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", help="TASK=PATH (.jsonl or .txt), repeatable: "
                                                      "your own text for a task (override).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload_hidden: OffloadOpt = False,
) -> None:
    """Run a recipe: its stages in order on one loaded model, then save and report."""
    with handled():
        from moecompress.calib import parse_data_specs
        from moecompress.pipeline import run as run_pipeline
        from moecompress.recipe import load_recipe

        r = load_recipe(recipe)
        run_keys = {k: v for k, v in _run(device, dtype, offload_hidden).items() if v is not None}
        if run_keys:
            from moecompress.recipe import validate_command

            validate_command("run", None, {}, r.stages[0].model_dump(), run=run_keys)  # flags named in errors
            r = r.model_copy(update=run_keys)
        if tasks or data:
            files = {k: str(v) for k, v in parse_data_specs(data).items()}
            calib = r.calibration.model_copy(update={
                "tasks": tasks.split(",") if tasks else r.calibration.tasks,
                "data": {**r.calibration.data, **files}})
            r = r.model_copy(update={"calibration": calib})
        result = run_pipeline(r, model=model, output=output, force=force, progress=RichProgress())
        if not _rank0():
            return
        for s in result.report["stages"]:
            console.print(f"[bold]{s['stage']}[/] ({s['seconds']:.1f} s)")
            SHOW.get(s["stage"], show_generic)(s["result"])
        if result.output is not None:
            success(f"wrote {result.output} (report: {result.output / 'moecompress.json'})")


DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="Where to compute: auto (the first GPU when there is one), cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="Compute dtype: auto (float32 on the CPU, the stored dtype on a GPU), float32, bfloat16, float16.")]
OffloadOpt = Annotated[bool, typer.Option(
    "--offload-hidden", help="Keep the batches' hidden states in host memory between layers (when they do not fit "
                             "on the GPU).")]


def _run(device: str | None, dtype: str | None, offload: bool) -> dict:
    return {"device": device, "dtype": dtype, "offload_hidden": offload or None}


TasksOpt = Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated bundled tasks "
                                                 "(default: all, or only the --data tasks).")]
DataOpt = Annotated[Optional[list[str]], typer.Option(
    "--data", help="TASK=PATH (.jsonl with a 'text' field per line, or plain text), repeatable.")]


def _calibration(tasks: str | None, data: list[str] | None, samples: int, seq_len: int, seed: int) -> dict:
    from moecompress.calib import parse_data_specs

    return {"tasks": [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
            "data": {k: str(v) for k, v in parse_data_specs(data).items()},
            "samples": samples, "seq_len": seq_len, "seed": seed}


@app.command()
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
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
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


@app.command()
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
                                       "ean | gate | random. auto: try each --candidates score's experts on "
                                       "held-out calibration text, keep the lowest loss.")] = "auto",
    candidates: Annotated[str, typer.Option("--candidates", help="--score auto: the scores to compare "
                                            "(comma-separated).")] = "tcess,reap,frequency,ean,reap_freq",
    auto_samples: Annotated[int, typer.Option("--auto-samples", help="--score auto: held-out calibration windows "
                                              "per task (as long as the profile's).")] = 32,
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
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Keep the best experts per layer for some tasks (PEP) and write a standard HF checkpoint."""
    with handled():
        from moecompress.pipeline import run as run_pipeline
        from moecompress.recipe import validate_command

        tasks = [t.strip() for item in task or [] for t in item.split(",") if t.strip()] or None
        stage = {"stage": "prune", "profile": str(profile_dir), "tasks": tasks, "keep": keep, "keep_ratio": keep_ratio,
                 "cumulative": cumulative, "score": score, "seed": seed, "protect_super": protect_super,
                 "candidates": [c.strip() for c in candidates.split(",") if c.strip()], "auto_samples": auto_samples,
                 "uneven": uneven, "regroup": regroup, "recalibrate_router": recalibrate_router,
                 "recalibrate_steps": recalibrate_steps}
        recipe = validate_command("prune", model, _calibration(",".join(tasks) if tasks else None, None, samples,
                                                               seq_len, seed), stage,
                                  {"tasks": "--task", "profile": "--profile"}, _run(device, dtype, offload_hidden))
        result = run_pipeline(recipe, output=output, force=force, progress=RichProgress())
        if not _rank0():
            return
        show_prune(result.report["stages"][0]["result"])
        success(f"wrote {result.output} (loads with plain transformers; provenance in moecompress.json)")


@app.command()
def quantize(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Quantized model directory to write.")] = ...,
    scheme: Annotated[str, typer.Option(help="w8a8 | w8a16 | w4a16 | w3a16 | w2a16 | w4a8 | w4a4 | w3a4")] = "w4a16",
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="Weight group size; -1 = per "
                                                      "output channel (default: 128 weight-only, -1 otherwise).")] = None,
    method: Annotated[str, typer.Option(help="gptq | rtn")] = "gptq",
    symmetric: Annotated[bool, typer.Option("--symmetric/--asymmetric", help="Weight grid without/with zero points "
                                            "(symmetric W4A16/W8A16 exports to compressed-tensors).")] = False,
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
    code_sweeps: Annotated[Optional[int], typer.Option(
        "--code-sweeps", help="Coordinate-descent sweeps over the codes after GPTQ, each followed by the refit "
        "(QuantEase; 0 = plain GPTQ codes) (default: 0).")] = None,
    act_order: Annotated[Optional[bool], typer.Option(
        "--act-order/--no-act-order", help="GPTQ columns by decreasing Hessian diagonal (default: on).")] = None,
    fake_quant: Annotated[bool, typer.Option("--fake-quant", help="Write dequantized bf16 weights and the record "
                                                                  "instead of the packed format.")] = False,
    codec: Annotated[str, typer.Option(help="Packed codec: auto (the scheme's int<b>); ternary codecs need "
                                       "`moecompress ternary`.")] = "auto",
    tasks: TasksOpt = None,
    data: DataOpt = None,
    samples: Annotated[int, typer.Option(help="Calibration windows per task.")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 256,
    seed: Annotated[int, typer.Option()] = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload_hidden: OffloadOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
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
                 **{k: v for k, v in (("refit", refit), ("code_sweeps", code_sweeps),
                                                 ("rare_experts", rare_experts), ("act_order", act_order))
                    if v is not None}}  # unset: the stage config's defaults
        recipe = validate_command("quantize", model, _calibration(tasks, data, samples, seq_len, seed), stage,
                                  {"save_format": "--fake-quant"}, _run(device, dtype, offload_hidden))
        result = run_pipeline(recipe, output=output, force=force, progress=RichProgress())
        if not _rank0():
            return
        show_quantize(result.report["stages"][0]["result"])
        form = "fake-quantized bf16 weights + quantization.safetensors" if fake_quant else "packed format"
        success(f"wrote {result.output} ({form}; `moecompress eval {result.output}` compares it with the original)")


@app.command()
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
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
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


@app.command()
def inspect(directory: Annotated[Path, typer.Argument(help="A model directory (packed or not).")]) -> None:
    """Show per module the codec, bits per weight and bytes, and the overall compression ratio."""
    with handled():
        show_inspect(directory)


@app.command()
def export(
    directory: Annotated[Path, typer.Argument(help="A packed symmetric W4A16 or W8A16 directory.")],
    to: Annotated[str, typer.Option("--to", help="Target format (compressed-tensors).")] = "compressed-tensors",
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write.")] = ...,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Export to another format: compressed-tensors (vLLM, llm-compressor) for symmetric W4A16 and W8A16."""
    with handled():
        if to != "compressed-tensors":
            raise MoecompressError(f"unknown export format {to!r}", "use --to compressed-tensors")
        from moecompress.formats.export_ct import export_compressed_tensors

        r = export_compressed_tensors(directory, output, force)
        success(f"wrote {r['output']}: {r['modules']} linears in compressed-tensors {r['format']} "
                f"({r['bits']}-bit, group {r['group_size'] or 'per channel'})")


@app.command()
def patterns(
    model: ModelArg = None,
    profile_dir: Annotated[Path, typer.Option("--profile", "-p", help="Profile directory of this model.")] = ...,
    output: Annotated[Path, typer.Option("--output", "-o", help="Pattern store directory to write.")] = ...,
    score: Annotated[str, typer.Option(help="Score that ranks each task's experts.")] = "tcess",
    signature_layers: Annotated[int, typer.Option("--signature-layers", help="MoE layers in a routing signature.")] = 2,
    samples: Annotated[int, typer.Option(help="Calibration windows per task for the distance thresholds.")] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 256,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload_hidden: OffloadOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Store one routing pattern per profiled task for task-adaptive expert retrieval (TAER)."""
    with handled():
        from moecompress.pipeline import run as run_pipeline
        from moecompress.recipe import validate_command

        stage = {"stage": "patterns", "profile": str(profile_dir), "score": score, "signature_layers": signature_layers}
        recipe = validate_command("patterns", model, _calibration(None, None, samples, seq_len, 0), stage,
                                  {"profile": "--profile", "signature_layers": "--signature-layers"},
                                  _run(device, dtype, offload_hidden))
        result = run_pipeline(recipe, output=output, force=force, progress=RichProgress())
        r = result.report["stages"][0]["result"]
        print_table("Patterns", ["task", "fallback distance (q99 of its own windows)"],
                    [[t, f"{v:.4f}"] for t, v in r["threshold"].items()])
        console.print(f"signature: mean router logits of MoE layers {r['signature_layers']}; calibration windows "
                      f"matched to their own task: {r['accuracy']:.1%} of {r['windows']}")
        success(f"wrote {result.output}")


@app.command()
def retrieve(
    model: ModelArg = None,
    store: Annotated[Path, typer.Option("--store", "-s", help="Pattern store from `moecompress patterns`.")] = ...,
    output: Annotated[Path, typer.Option("--output", "-o", help="Pruned model directory to write.")] = ...,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="The query text.")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="Read the query from a file.")] = None,
    keep: Annotated[Optional[int], typer.Option("--keep", help="Experts to keep per layer.")] = None,
    keep_ratio: Annotated[Optional[float], typer.Option("--keep-ratio", help="Share of experts to keep.")] = None,
    max_distance: Annotated[Optional[float], typer.Option(
        "--max-distance", help="Fall back to the generalist pattern beyond this distance (default: per task, "
                               "from the store).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload_hidden: OffloadOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Match a prompt to the nearest task pattern and build that task's pruned model, reading only kept experts."""
    with handled():
        from moecompress.pipeline import run as run_pipeline
        from moecompress.recipe import validate_command

        if (prompt is None) == (prompt_file is None):
            raise MoecompressError("give exactly one of --prompt or --prompt-file", "e.g. --prompt 'Solve x^2 = 4'")
        if prompt_file is not None:
            try:
                prompt = prompt_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise MoecompressError(f"cannot read {str(prompt_file)!r} ({e.__class__.__name__})",
                                       "give a UTF-8 text file") from None
        stage = {"stage": "retrieve", "store": str(store), "prompt": prompt, "keep": keep, "keep_ratio": keep_ratio,
                 "max_distance": max_distance}
        recipe = validate_command("retrieve", model, {}, stage, {"store": "--store", "prompt": "--prompt"},
                                  _run(device, dtype, offload_hidden))
        result = run_pipeline(recipe, output=output, force=force, progress=RichProgress())
        r = result.report["stages"][0]["result"]
        print_table("Distance from the prompt to each task pattern (cosine)", ["task", "distance"],
                    [[t, f"{d:.4f}"] for t, d in sorted(r["distances"].items(), key=lambda kv: kv[1])])
        if r["fallback_to_generalist"]:
            console.print(f"[yellow]the prompt is far from every pattern (nearest: {r['nearest_task']}, "
                          f"{r['distance']:.3f} > {r['threshold']:.3f}): using the generalist pattern[/]")
        else:
            console.print(f"matched task: [bold]{r['matched_task']}[/] (distance {r['distance']:.4f}, "
                          f"threshold {r['threshold']:.4f}), in {r['match_seconds']:.2f} s")
        console.print(f"kept {r['experts_after']} of {r['experts_before']} experts per layer; read "
                      f"{r['expert_bytes_read'] / 1e6:.2f} MB of {r['expert_bytes_total'] / 1e6:.2f} MB of expert "
                      f"weights ({r['expert_bytes_read_share']:.1%}), {r['bytes_read_total'] / 1e6:.2f} MB in all")
        success(f"wrote {result.output}")


@app.command()
def generate(
    model: ModelArg = None,
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")] = ...,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 40,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    device: DeviceOpt = None,
) -> None:
    """Generate text from any model directory moecompress writes (or the demo model).

    A demonstration: the whole model is loaded onto the device (float32 on the CPU, its stored dtype on a GPU),
    so it must fit there; the other commands stream large models one decoder layer at a time."""
    with handled():
        from moecompress.runtime.source import generate_text

        console.print(generate_text(model, prompt, max_new_tokens, temperature, seed, device), soft_wrap=True,
                      markup=False, highlight=False)


@app.command("eval")
def eval_cmd(
    model: ModelArg = None,
    baseline: Annotated[Optional[str], typer.Option(
        "--baseline", "-b", help="Model to compare with (default: the original recorded in the model's "
                                 "moecompress.json, if any).")] = None,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="Evaluate the model alone.")] = False,
    tasks: TasksOpt = None,
    data: DataOpt = None,
    samples: Annotated[int, typer.Option(help="Held-out windows per task (0 = all).")] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the full report here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --json file.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload_hidden: OffloadOpt = False,
) -> None:
    """Evaluate on held-out text, side by side with a baseline: perplexity, KL, agreement, size, speed.

    Both models are streamed from disk one decoder layer at a time (tokens/s includes the reads)."""
    with handled():
        import json

        from moecompress.pipeline import run as run_pipeline
        from moecompress.recipe import validate_command
        from moecompress.io.model import read_sidecar
        from moecompress.io.outdir import atomic_write, check_output_file

        base = None if no_baseline else baseline
        if base is None and not no_baseline and model not in (None, "demo") and not str(model).startswith("tiny:"):
            side = read_sidecar(Path(model)) if Path(model).is_dir() else None
            base = "original" if side and side.get("source_model") else None
        recipe = validate_command("eval", model, _calibration(tasks, data, samples, seq_len, 0),
                                  {"stage": "evaluate", "baseline": base, "samples": samples, "batch_size": batch_size},
                                  run=_run(device, dtype, offload_hidden))
        if json_path is not None:  # never a directory, an input, or a file inside an input
            side = read_sidecar(Path(model)) if model and Path(model).is_dir() else None
            check_output_file(json_path, force, [model or "demo", base, (side or {}).get("source_model"),
                                                 *recipe.calibration.data.values()])
        result = run_pipeline(recipe, progress=RichProgress())
        if not _rank0():
            return
        report = result.report["stages"][0]["result"]
        print_eval(report)
        if json_path is not None:
            atomic_write(json_path, json.dumps(report, indent=1) + "\n", replace=force)
            success(f"wrote {json_path}")


if __name__ == "__main__":  # pragma: no cover
    app()
