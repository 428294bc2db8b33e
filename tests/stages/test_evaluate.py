"""Evaluation against itself is perfect; against a perturbed copy it is measurably worse."""

import copy

import torch

from moecompress.calib import resolve_tasks, task_windows
from moecompress.eval.compare import _routing_agreement, evaluate_models
from moecompress.models import find_arch
from moecompress.runtime.modelio import LoadedModel, tiny_tokenizer
from moecompress.testing import tiny_moe


def _loaded(model):
    return LoadedModel(model, tiny_tokenizer(), find_arch(model.config), "tiny", None, torch.float32)


def _windows():
    return task_windows(tiny_tokenizer(), resolve_tasks(["prose", "code"]), "eval", 24, 3, 0)


def test_model_against_itself():
    model = tiny_moe("deepseek_v3")
    r = evaluate_models(_loaded(model), _windows(), _loaded(copy.deepcopy(model)))
    assert set(r) >= {"tasks", "size_bytes", "params", "bits_per_param", "baseline", "peak_memory_bytes",
                      "tokens_per_second"}
    for t, d in r["tasks"].items():
        assert set(d) >= {"ppl", "kl", "top1_agreement", "routing_agreement"}
        assert abs(d["kl"]) < 1e-6 and d["top1_agreement"] == 1.0
        assert d["routing_agreement"] == [1.0] * 2 and d["routing_top1_agreement"] == [1.0] * 2
        assert abs(d["ppl"] - r["baseline"]["tasks"][t]["ppl"]) < 1e-4
    assert r["params"] == r["baseline"]["params"] and abs(r["bits_per_param"] - 32.0) < 0.01  # fp32 + buffers


@torch.no_grad()
def test_perturbed_copy_is_worse():
    model = tiny_moe("mixtral")
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    for p in noisy.parameters():
        p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.3)
    r = evaluate_models(_loaded(noisy), _windows(), _loaded(model))
    for d in r["tasks"].values():
        assert d["kl"] > 1e-3 and d["top1_agreement"] < 1.0
        assert min(d["routing_agreement"]) < 1.0
        assert d["ppl_ratio"] != 1.0


def test_routing_agreement_maps_pruned_ids_to_the_original():
    base_idx = torch.tensor([[6, 2], [0, 7]])
    base_w = torch.tensor([[0.6, 0.4], [0.9, 0.1]])
    kept = {0: [0, 2, 5, 6, 7]}  # pruned expert 3 is original 6, 1 is 2, 4 is 7, 0 is 0
    mine = (torch.tensor([[3, 1], [0, 4]]), torch.tensor([[0.7, 0.3], [0.2, 0.8]]))
    jac, top1, n = _routing_agreement(mine, (base_idx, base_w), kept, 0)
    assert n == 2 and jac == 2.0 and top1 == 1.0  # token 0: same top-1 (6); token 1: top-1 7 vs 0


def test_eval_and_run_report_sizes_as_inspect_does_and_the_process_peak(tmp_path):
    """One count for all: a packed directory's parameters, bytes and bits per parameter are inspect's, in the
    run's report (from the files written, not an estimate) and when that directory is evaluated."""
    import json
    import resource

    from moecompress.formats.inspect import inspect_dir
    from moecompress.pipeline import run
    from moecompress.recipe import validate_recipe

    calib = {"tasks": ["prose"], "samples": 2, "seq_len": 32}
    out = tmp_path / "q"
    r = run(validate_recipe({"model": "tiny:mixtral", "calibration": calib, "stages": [
        {"stage": "quantize", "scheme": "w4a16", "group_size": 8, "method": "rtn"},
        {"stage": "evaluate", "samples": 2}]}), output=out)
    seen = inspect_dir(out)
    for report in (r.report["stages"][1]["result"], json.loads((out / "eval.json").read_text())):
        assert (report["params"], report["size_bytes"]) == (seen["params"], seen["file_bytes"])
        assert report["bits_per_param"] == seen["bits_per_param"] < 16
    assert r.report["size"]["params"] == seen["params"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert 0 < r.report["peak_rss_bytes"] <= peak
    again = run(validate_recipe({"model": str(out), "calibration": calib,
                                 "stages": [{"stage": "evaluate", "samples": 2}]}))
    e = again.report["stages"][0]["result"]
    assert (e["params"], e["size_bytes"], e["size_source"]) == (seen["params"], seen["file_bytes"], "files")
    assert 0 < e["peak_memory_bytes"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
