"""Everything the terminal shows: errors as one line, rich tables, progress bars."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["SHOW", "RichProgress", "console", "error", "print_eval", "print_table", "setup_console", "show_generic",
           "show_inspect", "show_prune", "show_quantize", "success", "warn"]

console = Console()
_err = Console(stderr=True)


def setup_console(quiet: bool = False) -> None:
    """Into a file or a pipe (logs, CI) nothing wraps: rich would fold tables and numbers at 80 columns.
    ``quiet``: print nothing on stdout (the other ranks of a torchrun group)."""
    console.quiet = quiet
    for c in (console, _err):
        c.width = None  # back to auto-detection (tests reuse the console across invocations)
        if not c.is_terminal:
            c.width = 4096


def error(message: str) -> None:
    """One line on stderr, never wrapped."""
    _err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)


def warn(message: str) -> None:
    """One line on stderr, never wrapped."""
    _err.print(f"[bold yellow]warning:[/] {escape(message)}", soft_wrap=True, highlight=False)


def success(message: str) -> None:
    console.print(f"[bold green]✓[/] {escape(message)}", soft_wrap=True, highlight=False)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> None:
    table = Table(title=title, caption=caption, header_style="bold cyan", title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, overflow="fold", no_wrap=i == 0)  # the key column stays whole (greppable)
    for r in rows:
        table.add_row(*[escape(_fmt(v)) for v in r])
    console.print(table)


class _Task:
    def __init__(self, bar: Progress, task_id: int) -> None:
        self.bar, self.task_id = bar, task_id

    def advance(self, n: float = 1, **fields: object) -> None:
        self.bar.update(self.task_id, advance=n, **fields)


class RichProgress:
    """`moecompress.progress.Progress` drawn with rich (one bar per task, removed when done)."""

    @contextlib.contextmanager
    def task(self, description: str, total: float | None) -> Iterator[_Task]:
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                       console=console, transient=True)
        with bar:
            tid = bar.add_task(description, total=total, rate="")
            yield _Task(bar, tid)


def show_generic(result: dict) -> None:
    console.print(", ".join(f"{k}={_fmt(v)}" for k, v in result.items() if not isinstance(v, (dict, list))),
                  soft_wrap=True)


def show_patterns(r: dict) -> None:
    print_table("Patterns", ["task", "fallback distance (q99 of its own windows)"],
                [[t, f"{v:.4f}"] for t, v in r["threshold"].items()])
    console.print(f"signature: mean router logits of MoE layers {r['signature_layers']}; calibration windows "
                  f"matched to their own task: {r['accuracy']:.1%} of {r['windows']}")


def show_retrieve(r: dict) -> None:
    print_table("Distance from the prompt to each task pattern (cosine)", ["task", "distance"],
                [[t, f"{d:.4f}"] for t, d in sorted(r["distances"].items(), key=lambda kv: kv[1])])
    if r["fallback_to_generalist"]:
        console.print(f"[yellow]the prompt is far from every pattern (nearest: {escape(r['nearest_task'])}, "
                      f"{r['distance']:.3f} > {r['threshold']:.3f}): using the generalist pattern[/]")
    else:
        console.print(f"matched task: [bold]{escape(r['matched_task'])}[/] (distance {r['distance']:.4f}, "
                      f"threshold {r['threshold']:.4f}), in {r['match_seconds']:.2f} s")
    read = (f"; read {r['expert_bytes_read'] / 1e6:.2f} MB of {r['expert_bytes_total'] / 1e6:.2f} MB of expert "
            f"weights ({r['expert_bytes_read_share']:.1%}), {r['bytes_read_total'] / 1e6:.2f} MB in all"
            if "expert_bytes_read" in r else "")
    console.print(f"kept {r['experts_after']} of {r['experts_before']} experts per layer{read}")


def show_profile(r: dict) -> None:
    console.print(f"profiled {r['tokens']:,} tokens of {', '.join(r['tasks'])} at {r['tokens_per_second']:,.0f} "
                  f"tokens/s; mean JS divergence between tasks per layer: {r['js_divergence_mean_per_layer']}; "
                  f"super experts: {r['super_experts'] or 'none'}", soft_wrap=True)


def show_prune(r: dict) -> None:
    auto = r.get("score_auto")
    if auto:
        tasks = list(auto["unpruned"]["per_task"])
        rows = [[c + (" (chosen)" if c == auto["chosen"] else ""), v["loss"]]
                + [f"{p['ppl']:.2f} (x{p['ppl_ratio']:.3f})" for p in (v["per_task"][t] for t in tasks)]
                + [v["same_experts_as"] or ""] for c, v in auto["candidates"].items()]
        rows.append(["unpruned", auto["unpruned"]["loss"]]
                    + [f"{auto['unpruned']['per_task'][t]['ppl']:.2f}" for t in tasks] + [""])
        windows = ", ".join(f"{t} {h['windows']}" for t, h in auto["heldout"].items())
        lw = auto["candidates"].get("layerwise")
        per_layer = "" if lw is None else "; layerwise took " + ", ".join(
            f"layer {i}: {c}" for i, c in lw["layers"].items())
        print_table("--score auto: each score's experts on held-out calibration windows",
                    ["score", "loss (nats)", *(f"{t} ppl (x unpruned)" for t in tasks), "same experts as"], rows,
                    caption=f"held-out windows per task: {windows} (calibration text the profile did not read)"
                            + per_layer)
    rows = [[layer, " ".join(map(str, ids)), f"{cov:.1%}"]
            for (layer, ids), cov in zip(r["kept_experts"].items(), r["score_coverage_per_layer"])]
    print_table(f"Kept {r['experts_after']} of {r['experts_before']} experts per layer by {r['score']} "
                f"for {', '.join(r['tasks'])}", ["layer", "kept experts (original ids)", "score covered"], rows)
    if r.get("needed_per_layer"):
        console.print(f"cumulative coverage needs {r['needed_per_layer']} experts per layer")
    if r.get("router_recalibration"):
        kd = r["router_recalibration"]
        errors = ", ".join(f"{r['layer']}: {r['error_before']:.3f} -> {r['error_after']:.3f}" for r in kd["layers"])
        console.print(f"router recalibration (layer-wise): block reconstruction error per MoE layer {errors}; "
                      f"next-token KL vs the unpruned model {kd['kl_before']:.3g} -> {kd['kl_after']:.3g}")
    console.print(f"parameters {r['params_before']:,} -> {r['params_after']:,} "
                  f"({r['params_after'] / r['params_before']:.1%})")


def show_keep(r: dict) -> None:
    console.print(f"experts {r['experts_before']} -> {r['experts_after']} per layer; parameters "
                  f"{r['params_before']:,} -> {r['params_after']:,}")


def show_quantize(r: dict) -> None:
    acts = r["activations"]
    w = r["weights"]
    ex = (r.get("experts") or w)["bits"]
    width = f"{w['bits']}-bit weights" if ex == w["bits"] else f"{ex}-bit experts, {w['bits']}-bit other linears"
    if r.get("layer_bits"):
        width += " (" + ", ".join(f"layer {i} {b}-bit" for i, b in r["layer_bits"].items()) + ")"
    console.print(f"{r['scheme']}: {width} ({w['method']}, group {w['group_size']}), "
                  f"{'activations ' + str(acts['bits']) + '-bit per token' if acts else 'activations unquantized'}"
                  f"{', smoothing' if r['smooth'] else ''}{', router ' + str(r['router_bits']) + '-bit' if r['router_bits'] else ''}"
                  f"; {r['calibration_windows']} calibration windows in {r['seconds']:.1f} s", soft_wrap=True)
    if r.get("packed_bits_per_weight"):
        console.print(f"packed {r['packed_weights']:,} weights at {r['packed_bits_per_weight']:.3f} bits/weight "
                      "(codes, scales, zeros)")
    pooled = r.get("pooled_experts_per_layer", {})
    print_table("Per MoE layer", ["layer", "top-k routing agreement (calibration)", "experts on RTN fallback",
                                  "experts topped up with pooled tokens"],
                [[k, f"{a:.1%}", r["rtn_fallback_experts_per_layer"].get(k, 0), pooled.get(k, 0)]
                 for k, a in zip(r["rtn_fallback_experts_per_layer"], r["routing_topk_agreement_calib"])])


def _ebits(r: dict) -> str:
    v = r.get("expert_bits_per_weight")
    return "-" if v is None else f"{v:.3f}"


def show_ternary(r: dict) -> None:
    e = r["experts"]
    how = f"{e['method']} on the {e['rule']} grid" if e["method"] in ("gptq", "rtn") else e["method"]
    console.print(f"ternary experts by {how} (group {e['group_size']}): {r['zero_fraction']:.1%} zeros; "
                  f"{r['calibration_windows']} calibration windows in {r['seconds']:.1f} s", soft_wrap=True)
    per = r.get("per_layer") or {}
    if per:
        print_table("Per MoE layer (routed experts)", ["layer", "zeros", "rel. error", "gate/up", "down"],
                    [[k, f"{d['zero_fraction']:.1%}", f"{d['relative_mse']:.3f}", f"{d['relative_mse_gate_up']:.3f}",
                      f"{d['relative_mse_down']:.3f}"] for k, d in per.items()])


def print_eval(r: dict) -> None:
    base = r.get("baseline")
    cols = ["task", "windows", "ppl"]
    if base:
        cols = ["task", "n", "ppl base", "ppl", "change ±95%", "KL", "token agree", "route J (min)", "route top1"]
    rows = []
    for t, d in r["tasks"].items():
        if not base:
            rows.append([t, d["windows"], f"{d['ppl']:.2f}"])
            continue
        lo, hi = d["nll_diff_ci95"]
        ra, rt = d.get("routing_agreement"), d.get("routing_top1_agreement")
        rows.append([t, d["windows"], f"{base['tasks'][t]['ppl']:.2f}", f"{d['ppl']:.2f}",
                     f"{d['ppl_ratio'] - 1:+.1%}±{_half(lo, hi)}", f"{d['kl']:.3f}",
                     f"{d['top1_agreement']:.1%}",
                     "-" if ra is None else f"{sum(ra) / len(ra):.2f} ({min(ra):.2f})",
                     "-" if rt is None else f"{sum(rt) / len(rt):.2f}"])
    title = f"Held-out evaluation: {_short(r['model'])}" + (f" vs {_short(base['model'])}" if base else "")
    print_table(title, cols, rows)
    size_rows = [[_short(r["model"]), _mb(r["size_bytes"]), r["params"], f"{r['bits_per_param']:.2f}",
                  _ebits(r), _mb(r["peak_memory_bytes"]), f"{r['tokens_per_second']:,.0f}"]]
    if base:
        size_rows.append([_short(base["model"]), _mb(base["size_bytes"]), base["params"],
                          f"{base['bits_per_param']:.2f}", _ebits(base), "-", "-"])
    print_table("Size and speed", ["model", "size", "params", "bits/param", "expert bits/weight", "peak memory",
                                   "tokens/s"], size_rows)
    if r.get("routing_note"):
        console.print(r["routing_note"])


def _short(label: str) -> str:
    parts = Path(label).parts
    return "demo" if label.endswith("assets/demo-moe") else str(Path(*parts[-2:])) if len(parts) > 2 else label


def _half(lo: float, hi: float) -> str:
    """Half-width, in percentage points, of a 95 % interval on the log-perplexity difference."""
    return f"{(math.exp(hi) - math.exp(lo)) / 2 * 100:.1f}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def show_inspect(directory: Path) -> None:
    from moecompress.formats.inspect import inspect_dir

    d = inspect_dir(directory)
    if d["modules"]:
        print_table(f"{d['directory']} ({d['format']})", ["module", "codec", "group", "bits/weight", "bytes"],
                    [[r["module"], r["codec"], r["group_size"], f"{r['bits_per_weight']:.3f}", r["bytes"]]
                     for r in d["modules"]])
        console.print(f"packed weights: {d['packed_weights']:,} at {d['packed_bits_per_weight']:.3f} bits/weight")
        if d["expert_bits_per_weight"] is not None:
            console.print(f"routed experts: {d['expert_weights']:,} weights at {d['expert_bits_per_weight']:.3f} "
                          "bits/weight (codes, scales, row indices and dictionaries)")
    console.print(f"files {d['file_bytes'] / 1e6:.2f} MB for {d['params']:,} parameters: {d['bits_per_param']:.2f} "
                  f"bits/parameter, {d['compression_vs_16bit']:.2f}x smaller than 16-bit")


SHOW = {"profile": show_profile, "prune": show_prune, "keep_experts": show_keep, "quantize": show_quantize,
        "ternary": show_ternary, "patterns": show_patterns, "retrieve": show_retrieve, "evaluate": print_eval}
