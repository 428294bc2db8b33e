"""Evaluation: against itself it is perfect, against a perturbed copy measurably worse; the layer-streamed
evaluation equals the whole-model (in-memory) one bit for bit in float32 for every family, for a pruned
candidate mapped through its kept experts, and for packed and fake-quantized checkpoints; a damaged packed
tensor is a one-line error; ``eval`` and ``generate`` take --device."""

import copy
import json
import math
import resource

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moecompress.calib import resolve_tasks, task_windows
from moecompress.cli import app
from moecompress.errors import MoecompressError
from moecompress.eval.compare import _routing_agreement, evaluate_models
from moecompress.formats.inspect import inspect_dir
from moecompress.models import ARCHS, find_arch
from moecompress.pipeline import run
from moecompress.recipe import validate_recipe
from moecompress.runtime.executor import ModelSource
from moecompress.runtime.hooks import capture_routing
from moecompress.io.model import SIDECAR, LoadedModel, load_config, save_model, tiny_tokenizer
from moecompress.runtime.source import load_model
from moecompress.testing import tiny_moe

CALIB = {"tasks": ["prose", "code"], "samples": 3, "seq_len": 24}
TASK_KEYS = ("windows", "tokens", "nll", "ppl", "ppl_ratio", "nll_diff_ci95", "kl", "top1_agreement",
             "routing_agreement", "routing_top1_agreement")


def _loaded(model, path=None):
    return LoadedModel(model, tiny_tokenizer(), find_arch(model.config), "tiny", path, torch.float32)


def _windows():
    return task_windows(tiny_tokenizer(), resolve_tasks(["prose", "code"]), "eval", 24, 3, 0)


@torch.no_grad()
def _perturbed(model, scale=0.3, seed=0):
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for p in noisy.parameters():
        p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return noisy


def _save(model, d):
    save_model(_loaded(model), d)
    return d


def _source(d):
    config = load_config(str(d))
    return ModelSource(config, find_arch(config), directory=d, tokenizer=tiny_tokenizer(), label=str(d), path=d)


@torch.no_grad()
def _reference(candidate, windows, baseline, kept=None, batch_size=8):
    """The evaluation before streaming: both whole models in memory, one forward per batch (the metrics only)."""
    arch, barch = find_arch(candidate.config), find_arch(baseline.config)
    layers = arch.moe_layer_indices(candidate.config)
    tasks, base = {}, {}
    for task, w in windows.items():
        nll_sum = bnll_sum = kl = 0.0
        agree = tokens = routed = 0
        wn, bwn = [], []
        jac, top1 = torch.zeros(len(layers)), torch.zeros(len(layers))
        for i in range(0, len(w), batch_size):
            x = w[i:i + batch_size]
            with capture_routing(candidate, arch) as traces:
                logp = candidate(input_ids=x).logits[:, :-1].float().log_softmax(-1)
            nll = -logp.gather(-1, x[:, 1:, None])[..., 0]
            nll_sum += float(nll.sum())
            wn += nll.mean(1).tolist()
            tokens += nll.numel()
            with capture_routing(baseline, barch) as btraces:
                blogp = baseline(input_ids=x).logits[:, :-1].float().log_softmax(-1)
            bnll = -blogp.gather(-1, x[:, 1:, None])[..., 0]
            bnll_sum += float(bnll.sum())
            bwn += bnll.mean(1).tolist()
            kl += float((blogp.exp() * (blogp - logp)).sum())
            agree += int((blogp.argmax(-1) == logp.argmax(-1)).sum())
            for j, layer in enumerate(layers):
                _, idx, wts = traces[layer].cat()
                _, bidx, bwts = btraces[layer].cat()
                a, b, _ = _routing_agreement((idx, wts), (bidx, bwts), kept, layer)
                jac[j] += a
                top1[j] += b
            routed += x.numel()
        ppl = float(torch.exp(torch.tensor(nll_sum / tokens)))
        base[task] = {"nll": bnll_sum / tokens, "ppl": float(torch.exp(torch.tensor(bnll_sum / tokens)))}
        diff = torch.tensor(wn) - torch.tensor(bwn)
        half = 1.96 * float(diff.std()) / len(diff) ** 0.5
        tasks[task] = {"windows": len(w), "tokens": tokens, "nll": nll_sum / tokens, "ppl": ppl,
                       "ppl_ratio": ppl / base[task]["ppl"],
                       "nll_diff_ci95": [float(diff.mean()) - half, float(diff.mean()) + half],
                       "kl": kl / tokens, "top1_agreement": agree / tokens,
                       "routing_agreement": [float(v) for v in jac / routed],
                       "routing_top1_agreement": [float(v) for v in top1 / routed]}
    return tasks, base


def _metrics(report):
    return ({t: {k: d[k] for k in TASK_KEYS} for t, d in report["tasks"].items()}, report["baseline"]["tasks"])


def test_model_against_itself():
    model = tiny_moe("deepseek_v3")
    r = evaluate_models(_loaded(model), _windows(), _loaded(copy.deepcopy(model)))
    assert set(r) >= {"tasks", "size_bytes", "params", "bits_per_param", "baseline", "peak_memory_bytes",
                      "tokens_per_second", "tokens_per_second_note"}
    for t, d in r["tasks"].items():
        assert set(d) >= {"ppl", "kl", "top1_agreement", "routing_agreement"}
        assert abs(d["kl"]) < 1e-6 and d["top1_agreement"] == 1.0
        assert d["routing_agreement"] == [1.0] * 2 and d["routing_top1_agreement"] == [1.0] * 2
        assert abs(d["ppl"] - r["baseline"]["tasks"][t]["ppl"]) < 1e-4
    assert r["params"] == r["baseline"]["params"] and abs(r["bits_per_param"] - 32.0) < 0.01  # fp32 + buffers


def test_perturbed_copy_is_worse():
    model = tiny_moe("mixtral")
    r = evaluate_models(_loaded(_perturbed(model)), _windows(), _loaded(model))
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


@pytest.mark.parametrize("family", ARCHS.names())
def test_streamed_equals_the_whole_model_bitwise(family, tmp_path):
    """Streamed from directories (one decoder layer at a time), in memory through the same runner, and the
    whole-model forward of before: the same numbers, bit for bit (float32, CPU); batches of 2 and 1 windows."""
    model = tiny_moe(family)
    noisy = _perturbed(model, 0.2)
    windows = _windows()
    want, want_base = _reference(noisy, windows, model, batch_size=2)
    in_memory = evaluate_models(_loaded(noisy), windows, _loaded(model), batch_size=2)
    streamed = evaluate_models(_source(_save(noisy, tmp_path / "c")), windows, _source(_save(model, tmp_path / "b")),
                               batch_size=2)
    for r in (in_memory, streamed):
        assert _metrics(r) == (want, want_base)
    assert min(min(d["routing_agreement"]) for d in want.values()) < 1.0 and want["prose"]["kl"] > 0  # not trivial
    assert streamed["memory_weights_bytes"] == in_memory["memory_weights_bytes"]
    assert streamed["params"] == in_memory["params"] and streamed["size_source"] == "files"
    assert "disk reads included" in streamed["tokens_per_second_note"]
    assert streamed["device"] == "cpu" and streamed["dtype"] == "float32" and "peak_gpu_bytes" not in streamed


def _tiny_dir(tmp_path, family="qwen3_moe"):
    return _save(tiny_moe(family), tmp_path / family)


def test_pruned_in_a_recipe_and_from_its_directory(tmp_path):
    """keep_experts -> evaluate (the candidate is the checkpoint the run just wrote, the baseline the run's
    input), then `eval` of the written directory (baseline and kept experts from its moecompress.json), with
    hidden states offloaded: all equal the whole-model evaluation with routing mapped through the kept experts."""
    d = _tiny_dir(tmp_path, "mixtral")
    calib = {**CALIB, "samples": 3}
    out = tmp_path / "pruned"
    r = run(validate_recipe({"model": str(d), "calibration": calib, "stages": [
        {"stage": "keep_experts", "drop": {"all": [1, 5]}}, {"stage": "evaluate", "samples": 3, "batch_size": 2}]}),
        output=out)
    in_run = r.report["stages"][1]["result"]
    kept = {int(k): v for k, v in r.report["kept_experts"].items()}
    assert kept == {0: [0, 2, 3, 4, 6, 7], 1: [0, 2, 3, 4, 6, 7]}
    windows = _windows()
    want = _reference(load_model(str(out)).model, windows, load_model(str(d)).model, kept, batch_size=2)
    assert _metrics(in_run) == want
    assert in_run["model"].endswith("(compressed in this run)") and in_run["baseline"]["model"] == str(d)
    assert json.loads((out / "eval.json").read_text())["tasks"] == in_run["tasks"]
    again = run(validate_recipe({"model": str(out), "calibration": calib, "offload_hidden": True, "stages": [
        {"stage": "evaluate", "samples": 3, "batch_size": 2}]}))
    e = again.report["stages"][0]["result"]
    assert _metrics(e) == want and e["baseline"]["model"] == str(d)
    assert min(min(t["routing_agreement"]) for t in want[0].values()) < 1.0


def test_keep_experts_recipe_with_evaluate_on_tiny(tmp_path):
    """The recipe path on a tiny model: tiny input and tiny baseline are materialised and streamed."""
    r = run(validate_recipe({"model": "tiny:deepseek_v3", "calibration": {**CALIB, "samples": 2}, "stages": [
        {"stage": "keep_experts", "keep": {"all": [0, 1, 2, 4, 5, 6]}}, {"stage": "evaluate", "samples": 2},
        {"stage": "evaluate", "samples": 2, "baseline": "tiny:deepseek_v3"}]}), output=tmp_path / "o")
    a, b = (s["result"] for s in r.report["stages"][1:])
    assert a["tasks"] == b["tasks"] and a["baseline"]["model"] == b["baseline"]["model"] == "tiny:deepseek_v3"
    assert a["size_source"] == "files" and a["params"] == r.report["size"]["params"]
    for d in a["tasks"].values():
        assert 0 < min(d["routing_agreement"]) <= 1.0 and d["kl"] > 0


# ---------------------------------------------------------------------------------------------- quantized
def _quantized(tmp_path, family, scheme, save_format):
    """A quantized checkpoint written by the quantize stage: packed, or fake-quantized (plain weights; the
    scheme, with its activation quantization, in moecompress.json)."""
    out = tmp_path / f"{family}-{scheme}-{save_format}"
    run(validate_recipe({"model": f"tiny:{family}", "calibration": {"tasks": ["prose"], "samples": 2, "seq_len": 32},
                         "stages": [{"stage": "quantize", "scheme": scheme, "group_size": 8, "method": "rtn",
                                     "save_format": save_format}]}), output=out)
    assert json.loads((out / SIDECAR).read_text())["source_model"] == f"tiny:{family}"
    return out


@pytest.mark.parametrize("family,scheme,save_format", [("qwen3_moe", "w4a4", "packed"), ("mixtral", "w4a16", "packed"),
                                                       ("mixtral", "w4a8", "fake-quant")])
def test_quantized_checkpoint_streams_as_from_pretrained_loads_it(tmp_path, family, scheme, save_format):
    """Packed (modules built on the skeleton, checksums verified per layer; w4a4: A4 and the online rotation
    inside the packed modules) and fake-quantized with simulated activation quantization (installed per layer):
    the streamed `eval` (baseline: the recorded original) equals the whole-model evaluation of the checkpoint
    as `load_model` / from_pretrained loads it. Tolerance: none needed on the CPU in float32 (the same kernels
    run on the same tensors); asserted bit for bit."""
    q = _quantized(tmp_path, family, scheme, save_format)
    r = run(validate_recipe({"model": str(q), "calibration": CALIB,
                             "stages": [{"stage": "evaluate", "samples": 3, "batch_size": 2}]}))
    e = r.report["stages"][0]["result"]
    loaded = load_model(str(q))
    if save_format == "fake-quant":  # the simulated activation quantization is part of the model
        assert loaded.model.model.layers[0].self_attn.q_proj._forward_pre_hooks
    want = _reference(loaded.model, _windows(), load_model(f"tiny:{family}").model, batch_size=2)
    assert _metrics(e) == want
    assert e["baseline"]["model"] == f"tiny:{family}" and e["size_source"] == "files"
    assert all(d["kl"] > 0 for d in want[0].values())
    seen = inspect_dir(q)  # one count for all: sizes as inspect counts them; the process peak
    assert (e["params"], e["size_bytes"], e["bits_per_param"]) == (seen["params"], seen["file_bytes"],
                                                                   seen["bits_per_param"])
    assert (e["bits_per_param"] < 16) == (save_format == "packed")
    assert 0 < e["peak_memory_bytes"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_a_damaged_packed_tensor_is_a_one_line_error(tmp_path):
    q = _quantized(tmp_path, "mixtral", "w4a16", "packed")
    sd = load_file(str(q / "model.safetensors"))
    name = "model.layers.1.mlp.experts.down_packed"
    sd[name].view(-1)[3] ^= 1
    save_file(sd, str(q / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MoecompressError, match=f"packed tensor {name} does not match its checksum") as e:
        run(validate_recipe({"model": str(q), "calibration": CALIB, "stages": [{"stage": "evaluate", "samples": 2}]}))
    assert "\n" not in str(e.value)
    config = json.loads((q / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (q / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoecompressError, match="format version 99"):
        evaluate_models(_source(q), _windows())


# ---------------------------------------------------------------------------------------------- CLI
def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_eval_device_flags_and_generate_on_every_kind_of_directory(tmp_path):
    d = _tiny_dir(tmp_path, "mixtral")
    small = ["--tasks", "prose", "--samples", 2, "--seq-len", 24]
    if not torch.cuda.is_available():
        r = _invoke("eval", d, "--no-baseline", *small, "--device", "cuda")
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and "asks for a GPU" in lines[0] and "--device cpu" in lines[0]
        r = _invoke("generate", d, "--prompt", "hi", "--device", "cuda:0")
        assert r.exit_code == 2 and "asks for a GPU" in r.stderr
    j1, j2 = tmp_path / "a.json", tmp_path / "b.json"
    r = _invoke("eval", d, "--baseline", "tiny:mixtral", *small, "--device", "cpu", "--json", j1)
    assert r.exit_code == 0, r.output
    r = _invoke("eval", d, "--baseline", "tiny:mixtral", *small, "--device", "auto", "--dtype", "float32",
                "--offload-hidden", "--json", j2)
    assert r.exit_code == 0, r.output
    a, b = json.loads(j1.read_text()), json.loads(j2.read_text())
    assert a["tasks"] == b["tasks"] and math.isfinite(a["tasks"]["prose"]["kl"])
    r = _invoke("eval", d, "--no-baseline", *small, "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    pruned = tmp_path / "pruned"
    assert _invoke("run", "recipes/demo/keep_experts.yaml", "-m", d, "-o", pruned).exit_code == 0
    packed = _quantized(tmp_path, "mixtral", "w4a16", "packed")
    fake = _quantized(tmp_path, "mixtral", "w4a8", "fake-quant")
    for m in (d, pruned, packed, fake):
        r = _invoke("generate", m, "--prompt", "hello", "--max-new-tokens", 3, "--device", "cpu")
        assert r.exit_code == 0 and r.output.startswith("hello"), r.output
    assert "whole model" in _invoke("generate", "--help").output



def test_the_stage_over_an_in_memory_context_equals_the_streamed_run(tmp_path):
    """The Python API (a Context over a model held in memory, changed in place): the stage reads the original
    again for its baseline, and its numbers are the streamed run's."""
    from moecompress.context import Context
    from moecompress.recipe import CalibrationConfig
    from moecompress.stages import STAGES

    entries = [{"stage": "keep_experts", "drop": {"all": [1, 5]}}, {"stage": "evaluate", "samples": 2}]
    ctx = Context(load_model("tiny:mixtral"), CalibrationConfig(**CALIB), None)
    for entry in entries:
        spec = STAGES.get(entry["stage"])
        result = spec.run(ctx, spec.config.model_validate(entry))
        ctx.artifacts["model_modified"] = ctx.artifacts.get("model_modified") or spec.modifies_model
    streamed = run(validate_recipe({"model": "tiny:mixtral", "calibration": CALIB, "stages": entries}),
                   output=tmp_path / "o").report["stages"][1]["result"]
    assert result["tasks"] == streamed["tasks"] and result["baseline"]["tasks"] == streamed["baseline"]["tasks"]
    assert result["model"] == "tiny:mixtral (compressed in this run)" and result["baseline"]["model"] == "tiny:mixtral"
    assert "held in memory" in result["tokens_per_second_note"]


def test_routing_agreement_follows_the_lineage_to_any_earlier_model(tmp_path):
    """A model pruned twice, or pruned then quantized in another run, compared with the model before any pruning
    (or the one in between): the kept-expert maps recorded along the way (``derived_from`` in moecompress.json)
    are chained, in a run that changes the model too; the result equals the whole-model evaluation mapped
    through the chained map."""
    d = _tiny_dir(tmp_path, "mixtral")
    calib = {**CALIB, "samples": 3}

    def recipe(model, stages, out=None):
        return run(validate_recipe({"model": str(model), "calibration": calib, "stages": stages}), output=out)

    once, twice, quant = tmp_path / "once", tmp_path / "twice", tmp_path / "quant"
    recipe(d, [{"stage": "keep_experts", "drop": {"all": [1, 5]}}], once)  # kept 0 2 3 4 6 7
    recipe(once, [{"stage": "keep_experts", "drop": {"all": [0, 2]}}], twice)  # of those: 2 4 6 7
    recipe(once, [{"stage": "quantize", "scheme": "w4a16", "group_size": 8, "method": "rtn",
                   "save_format": "fake-quant"}], quant)
    side = json.loads((twice / SIDECAR).read_text())
    assert side["derived_from"]["source_model"] == str(d) and side["source_model"] == str(once)
    windows = _windows()
    first, second = [0, 2, 3, 4, 6, 7], [2, 4, 6, 7]
    cases = [(twice, d, second), (twice, once, [1, 3, 4, 5]), (quant, d, first), (quant, once, None)]
    for model, base, kept in cases:
        got = recipe(model, [{"stage": "evaluate", "samples": 3, "batch_size": 2, "baseline": str(base)}])
        want = _reference(load_model(str(model)).model, windows, load_model(str(base)).model,
                          None if kept is None else {0: kept, 1: kept}, batch_size=2)
        assert _metrics(got.report["stages"][0]["result"]) == want, (model.name, base.name)
    # in a run that prunes again: this run's map chained with the input's
    got = recipe(once, [{"stage": "keep_experts", "drop": {"all": [0, 2]}},
                        {"stage": "evaluate", "samples": 3, "batch_size": 2, "baseline": str(d)}], tmp_path / "again")
    want = _reference(load_model(str(twice)).model, windows, load_model(str(d)).model, {0: second, 1: second},
                      batch_size=2)
    assert _metrics(got.report["stages"][1]["result"]) == want
    assert min(min(t["routing_agreement"]) for t in want[0].values()) < 1.0


def test_recorded_original_is_absolute_so_eval_works_from_another_directory(tmp_path, monkeypatch):
    """A model given by a relative path is recorded in moecompress.json by its absolute path: `eval` of the
    output from another working directory finds its original (it used to look the relative path up there)."""
    _tiny_dir(tmp_path, "mixtral")
    monkeypatch.chdir(tmp_path)
    run(validate_recipe({"model": "mixtral", "calibration": CALIB, "stages": [
        {"stage": "keep_experts", "drop": {"all": [1, 5]}}]}), output="pruned")
    side = json.loads((tmp_path / "pruned" / SIDECAR).read_text())
    assert side["source_model"] == str(tmp_path / "mixtral")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = run(validate_recipe({"model": str(tmp_path / "pruned"), "calibration": CALIB, "stages": [
        {"stage": "evaluate", "samples": 2, "batch_size": 2}]}))
    assert r.report["stages"][0]["result"]["baseline"]["model"] == str(tmp_path / "mixtral")
