"""The CLI through Typer's CliRunner: the commands work, and bad input is one line with exit status != 0."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from moecompress.cli import app
from moecompress.models import ARCHS

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code != 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_help_and_version():
    r = invoke("--help")
    assert r.exit_code == 0 and "list" in r.output and "run" in r.output
    assert invoke("--version").output.startswith("moecompress ")


def test_list_shows_every_family_and_stage():
    r = invoke("list")
    assert r.exit_code == 0, r.output
    for name in ARCHS.names():
        assert name in r.output
    assert "keep_experts" in r.output and "prose" in r.output


@pytest.mark.parametrize("spec", ["tiny:deepseek_v3", "tiny:gpt_oss"])
def test_info_on_tiny_models(spec):
    r = invoke("info", spec)
    assert r.exit_code == 0, r.output
    assert "experts_per_layer" in r.output and "params_routed_experts" in r.output


def test_run_recipe_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "o"
    r = invoke("run", "recipes/_smoke/tiny_keep.yaml", "-o", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "moecompress.json").read_text())
    assert report["kept_experts"] == {"1": [0, 1, 2, 4, 5, 6], "2": [1, 2, 3, 5, 6, 7]}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_routed_experts == 6
    assert not list(tmp_path.glob(".o.tmp-*"))
    # an existing output is refused without --force, and replaced with it
    one_line_error(invoke("run", "recipes/_smoke/tiny_keep.yaml", "-o", out), "already exists", "--force")
    assert invoke("run", "recipes/_smoke/tiny_keep.yaml", "-o", out, "--force").exit_code == 0


def test_missing_model_path(tmp_path):
    one_line_error(invoke("info", tmp_path / "nope"), "does not exist", "local Hugging Face model directory")


def _save_config(path: Path, model_type: str, **kw):
    cfg = AutoConfig.for_model(model_type, **kw)
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    return path


def test_dense_model_is_refused(tmp_path):
    d = tmp_path / "llama"
    cfg = AutoConfig.for_model("llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                               num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    one_line_error(invoke("info", d), "'llama' is a dense model, not a Mixture-of-Experts")


def test_unknown_moe_architecture_names_the_file_to_add(tmp_path):
    d = _save_config(tmp_path / "dbrx", "dbrx")
    one_line_error(invoke("info", d), "unknown MoE architecture 'dbrx'", "moecompress/models/dbrx.py")


def test_architecture_transformers_does_not_know(tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "weird_moe", "num_experts": 8}))
    one_line_error(invoke("info", d), "unknown architecture 'weird_moe'")


def test_recipe_with_unknown_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - stage: keep_experts\n    drop: {all: [7]}\n    dorp: 1\n")
    one_line_error(invoke("run", bad, "-m", "tiny:mixtral", "-o", tmp_path / "o"), "unknown key 'dorp'")
    bad.write_text("stages:\n  - stage: keep_experts\n    drop: {all: [7]}\nmodle: x\n")
    one_line_error(invoke("run", bad, "-o", tmp_path / "o"), "unknown key 'modle'")
    assert not (tmp_path / "o").exists()


def test_impossible_budget_fails_before_loading(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("stages:\n  - stage: keep_experts\n    keep: {all: [3]}\n")
    one_line_error(invoke("run", r, "-m", "tiny:mixtral", "-o", tmp_path / "o"), "top_k is 2", "at least 2")
    assert not (tmp_path / "o").exists()


def test_corrupt_weights(tmp_path):
    d = tmp_path / "m"
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mixtral", num_hidden_layers=1, hidden_size=32, intermediate_size=16, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, num_local_experts=4))
    model.save_pretrained(d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    r = tmp_path / "r.yaml"
    r.write_text("stages:\n  - stage: keep_experts\n    drop: {all: [3]}\n")
    one_line_error(invoke("run", r, "-m", d, "-o", tmp_path / "o"), "is truncated", "copy the file again")
    assert not (tmp_path / "o").exists()


def test_profile_then_eval_on_tiny(tmp_path):
    prof = tmp_path / "prof"
    r = invoke("profile", "tiny:olmoe", "--tasks", "prose,math", "--samples", 2, "--seq-len", 32, "-o", prof,
               "--plot", tmp_path / "png")
    assert r.exit_code == 0, r.output
    assert (prof / "profile.json").is_file() and (prof / "profile.safetensors").is_file()
    assert (tmp_path / "png" / "expert_usage.png").stat().st_size > 1000
    assert "Most and least used experts" in r.output and "tokens/s" in r.output
    out = tmp_path / "e.json"
    r = invoke("eval", "tiny:olmoe", "--baseline", "tiny:olmoe", "--tasks", "prose", "--samples", 2,
               "--seq-len", 32, "--json", out)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["tasks"]["prose"]["kl"] < 1e-6 and report["tasks"]["prose"]["top1_agreement"] == 1.0
    one_line_error(invoke("eval", "tiny:olmoe", "--tasks", "prose", "--samples", 2, "--seq-len", 32, "--json", out),
                   "already exists")


def test_eval_samples_zero_reads_every_held_out_window(tmp_path):
    """``--samples 0`` means every held-out window, as its help says (it was refused by the calibration check)."""
    outs = {}
    for n in (2, 0):
        outs[n] = tmp_path / f"e{n}.json"
        r = invoke("eval", "tiny:olmoe", "--no-baseline", "--tasks", "chat", "--samples", n, "--seq-len", 128,
                   "--json", outs[n])
        assert r.exit_code == 0, r.output
    every, two = (json.loads(outs[n].read_text())["tasks"]["chat"]["windows"] for n in (0, 2))
    assert two == 2 and every > 2


def test_profile_bad_inputs(tmp_path):
    base = ["profile", "tiny:mixtral", "--samples", 2, "--seq-len", 32, "-o", tmp_path / "p"]
    one_line_error(invoke(*base, "--tasks", "poetry"), "unknown task 'poetry'", "--data poetry=PATH")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_error(invoke(*base, "--data", f"mine={empty}"), "is empty")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\xfa" * 10)
    one_line_error(invoke(*base, "--data", f"mine={binary}"), "cannot read")
    one_line_error(invoke(*base, "--data", f"mine={tmp_path / 'missing.txt'}"), "does not exist")
    one_line_error(invoke("profile", "--seq-len", 4096, "-o", tmp_path / "p"), "above the model's limit of 512")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    one_line_error(invoke(*base, "--data", f"mine={short}", "--tasks", "mine"), "fewer than one window")
    assert not (tmp_path / "p").exists()


def _tiny_dir(tmp_path, family="mixtral", seed=0):
    from moecompress.models import find_arch
    from moecompress.io.model import LoadedModel, save_model, tiny_tokenizer
    from moecompress.testing import tiny_moe

    m = tiny_moe(family, seed=seed)
    d = tmp_path / f"{family}{seed}"
    save_model(LoadedModel(m, tiny_tokenizer(), find_arch(m.config), family, None, torch.float32), d)
    return d


def test_prune_patterns_retrieve_generate(tmp_path):
    d = _tiny_dir(tmp_path)
    prof = tmp_path / "prof"
    small = ["--samples", 2, "--seq-len", 32]
    assert invoke("profile", d, "--tasks", "prose,code", *small, "-o", prof).exit_code == 0
    r = invoke("prune", d, "-p", prof, "--task", "code", "--keep-ratio", 0.5, "--score", "reap", "-o", tmp_path / "pr")
    assert r.exit_code == 0, r.output
    assert "Kept 4 of 8 experts" in r.output
    side = json.loads((tmp_path / "pr" / "moecompress.json").read_text())
    assert len(side["kept_experts"]["0"]) == 4
    r = invoke("eval", tmp_path / "pr", "--tasks", "code", *small)  # baseline = the recorded original
    assert r.exit_code == 0, r.output
    assert "route J" in r.output
    r = invoke("patterns", d, "-p", prof, *small, "-o", tmp_path / "store")
    assert r.exit_code == 0, r.output
    r = invoke("retrieve", d, "-s", tmp_path / "store", "--keep", 4, "--prompt", "def f(x):\n    return x\n" * 3,
               "--max-distance", 10, "-o", tmp_path / "ret")
    assert r.exit_code == 0, r.output
    assert "matched task" in r.output and "of expert weights" in r.output
    r = invoke("generate", tmp_path / "ret", "--prompt", "hello", "--max-new-tokens", 3)
    assert r.exit_code == 0 and r.output.startswith("hello")


def test_run_shows_each_stage_as_its_command_does(tmp_path):
    """`run` renders patterns, retrieve and ternary results with their commands' tables and sentences, not as
    raw key=value dumps."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {tasks: [prose, code], samples: 2, seq_len: 32}\nstages:\n"
                      "  - stage: profile\n  - stage: patterns\n  - stage: retrieve\n"
                      "    prompt: 'def f(x): return x'\n    keep: 4\n    max_distance: 10\n  - stage: ternary\n"
                      "    method: rtn\n    group_size: 8\n")
    r = invoke("run", recipe, "-m", _tiny_dir(tmp_path), "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "matched to their own task" in r.output and "matched task" in r.output and "kept 4 of 8" in r.output
    assert "ternary experts by" in r.output
    assert "accuracy=" not in r.output and "distance=" not in r.output


def test_prune_bad_inputs(tmp_path):
    d = _tiny_dir(tmp_path)
    other = _tiny_dir(tmp_path, seed=9)
    prof = tmp_path / "prof"
    assert invoke("profile", d, "--tasks", "prose", "--samples", 2, "--seq-len", 32, "-o", prof).exit_code == 0
    out = tmp_path / "o"
    one_line_error(invoke("prune", other, "-p", prof, "--keep", 4, "-o", out),
                   "profile was taken on another model (router weights differ)", "moecompress profile")
    one_line_error(invoke("prune", d, "-p", prof, "--task", "math", "--keep", 4, "-o", out),
                   "task 'math' is not in the profile", "it has prose")
    one_line_error(invoke("prune", d, "-p", prof, "--keep", 1, "-o", out), "top_k is 2", "keep at least 2")
    one_line_error(invoke("prune", d, "-p", tmp_path / "nothing", "--keep", 4, "-o", out), "no profile")
    one_line_error(invoke("prune", d, "-p", prof, "--keep", 4, "--keep-ratio", 0.5, "-o", out), "exactly one budget")
    assert not out.exists() and not list(tmp_path.glob(".o.*"))
    assert invoke("prune", d, "-p", prof, "--keep", 4, "-o", out).exit_code == 0
    one_line_error(invoke("prune", d, "-p", prof, "--keep", 4, "-o", out), "already exists", "--force")
    one_line_error(invoke("retrieve", d, "-s", tmp_path / "none", "--keep", 4, "-o", tmp_path / "r"),
                   "exactly one of --prompt or --prompt-file")


def test_quantize_then_eval(tmp_path):
    out = tmp_path / "q"
    r = invoke("quantize", "tiny:qwen3_moe", "--scheme", "w4a4", "--group-size", 8, "--router-bits", 8,
               "--tasks", "prose", "--samples", 2, "--seq-len", 32, "-o", out)
    assert r.exit_code == 0, r.output
    assert "top-k routing agreement" in r.output
    side = json.loads((out / "moecompress.json").read_text())
    assert side["quantization"]["scheme"] == "w4a4" and "packed" in side
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "moecompress" and cfg["activations"]["bits"] == 4
    r = invoke("eval", out, "--baseline", "tiny:qwen3_moe", "--tasks", "prose", "--samples", 2, "--seq-len", 32)
    assert r.exit_code == 0, r.output


def test_quantize_fake_quant_with_eaquant_alignment(tmp_path):
    out = tmp_path / "fq"
    r = invoke("quantize", "tiny:mixtral", "--scheme", "w4a16", "--group-size", 8, "--router-bits", 4,
               "--align-objective", "topk", "--fake-quant", "--tasks", "prose", "--samples", 2, "--seq-len", 32,
               "-o", out)
    assert r.exit_code == 0, r.output
    assert "fake-quantized" in r.output and (out / "quantization.safetensors").exists()
    side = json.loads((out / "moecompress.json").read_text())
    assert "packed" not in side and side["quantization"]["router_bits"] == 4
    one_line_error(invoke("quantize", "tiny:mixtral", "--align-objective", "kl", "-o", tmp_path / "x"),
                   "--align-objective kl", "'topk_rest' or 'topk'")
    one_line_error(invoke("quantize", "tiny:mixtral", "--clip-floor", "0.1", "-o", tmp_path / "x"),
                   "--clip-floor 0.1", "0.2")


def test_no_clip_search_keeps_min_max_ranges(tmp_path):
    """``--no-clip-search``: every group keeps its full min-max range; the default search only ever shrinks it."""
    from safetensors.torch import load_file

    scales = {}
    for flag in ("--clip-search", "--no-clip-search"):
        out = tmp_path / flag
        r = invoke("quantize", "tiny:mixtral", "--method", "rtn", "--group-size", 8, flag, "--fake-quant",
                   "--tasks", "prose", "--samples", 2, "--seq-len", 32, "-o", out)
        assert r.exit_code == 0, r.output
        rec = load_file(str(out / "quantization.safetensors"))
        scales[flag] = {k: v for k, v in rec.items() if k.endswith(".scales")}
    assert scales["--clip-search"].keys() == scales["--no-clip-search"].keys()
    shrunk = 0
    for k, full in scales["--no-clip-search"].items():
        assert (full >= scales["--clip-search"][k]).all(), k
        shrunk += int((full > scales["--clip-search"][k]).sum())
    assert shrunk > 0


def test_quantize_bad_inputs(tmp_path):
    base = ["quantize", "tiny:mixtral", "--tasks", "prose", "--samples", 2, "--seq-len", 32]
    one_line_error(invoke(*base, "--scheme", "w5a5", "-o", tmp_path / "q"), "scheme", "w4a16")
    one_line_error(invoke(*base, "--group-size", 16, "-o", tmp_path / "q"), "group size 16 does not divide",
                   "--group-size 8")
    one_line_error(invoke(*base, "--method", "awq", "-o", tmp_path / "q"), "method")
    short = tmp_path / "s.txt"
    short.write_text("tiny")
    one_line_error(invoke("quantize", "tiny:mixtral", "--data", f"mine={short}", "--tasks", "mine", "--samples", 2,
                          "--seq-len", 32, "--group-size", 8, "-o", tmp_path / "q"), "fewer than one window")
    assert not (tmp_path / "q").exists()
    (tmp_path / "q").mkdir()
    one_line_error(invoke(*base, "--group-size", 8, "-o", tmp_path / "q"), "already exists")


def test_tables_into_a_pipe_never_wrap(tmp_path):
    r = invoke("info", "tiny:deepseek_v3")
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert max(len(ln) for ln in lines) > 80, r.output  # wider than rich's 80-column default for pipes
    rows = [ln for ln in lines if ln.startswith("│")]
    assert rows and all(ln.count("│") == 3 for ln in rows), r.output  # no row folded onto a second line
    assert any("routing" in ln and "sigmoid" in ln for ln in rows), r.output


def test_a_bug_is_still_one_line(monkeypatch):
    import moecompress.io.describe as describe

    def boom(*args, **kwargs):
        raise RuntimeError("something\nwent wrong")

    monkeypatch.setattr(describe, "describe_model", boom)
    r = invoke("info", "tiny:mixtral")
    assert r.exit_code == 1
    line = one_line_error(r, "unexpected RuntimeError: something went wrong", "--verbose")
    assert "Traceback" not in r.output and line


class _Panic(BaseException):
    """What pyo3 raises for a Rust panic: not an Exception."""


@pytest.mark.parametrize("swallowed,error", [(False, ModuleNotFoundError), (True, ModuleNotFoundError), (True, _Panic)],
                         ids=["chained", "swallowed", "swallowed-panic"])
def test_a_signal_a_library_turned_into_its_own_error_is_still_an_interrupt(swallowed, error, capsys):
    """CI caught this: SIGTERM mid-import, and transformers' lazy module answered with ModuleNotFoundError;
    the run said 'a bug in moecompress', exit 1. Whether the interrupt stays in the exception chain or the
    library dropped it, the run reports the signal and exits 128 + SIGTERM."""
    import os
    import signal
    import time

    import typer

    from moecompress.cli.core import handled

    with pytest.raises(typer.Exit) as exit_info, handled():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this returns
            pytest.fail("SIGTERM was not turned into an interrupt")
        except KeyboardInterrupt:
            if not swallowed:
                raise error("Could not import module 'DeepseekV3ForCausalLM'")  # noqa: B904
        raise error("Could not import module 'DeepseekV3ForCausalLM'")
    assert exit_info.value.exit_code == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM)" in capsys.readouterr().err
    with pytest.raises(typer.Exit) as exit_info, handled():  # a later run without a signal: a bug again
        raise ModuleNotFoundError("x")
    assert exit_info.value.exit_code == 1


def test_inspect_takes_the_demo_alias_like_every_model_argument(tmp_path):
    r = invoke("inspect", "demo")
    assert r.exit_code == 0, r.output
    assert "16.00 bits/parameter" in r.output  # the unpacked demo: bf16-equivalent accounting, nothing packed
    one_line_error(invoke("inspect", tmp_path / "none"), "does not exist")


def test_info_says_what_a_compressed_model_is_and_where_it_came_from(tmp_path):
    """`info` on a model pruned then quantized in two runs: its representation and scheme, the models it was made
    from (nearest first), and how many experts it kept of the first one's; an original says full precision."""
    d = _tiny_dir(tmp_path)
    recipe = tmp_path / "keep.yaml"
    recipe.write_text("stages:\n  - stage: keep_experts\n    drop: {all: [1, 5]}\n")
    assert invoke("run", recipe, "-m", d, "-o", tmp_path / "p").exit_code == 0
    r = invoke("quantize", tmp_path / "p", "--method", "rtn", "--group-size", 8, "--samples", 2, "--seq-len", 32,
               "--tasks", "prose", "-o", tmp_path / "q")
    assert r.exit_code == 0, r.output
    r = invoke("info", tmp_path / "q")
    assert r.exit_code == 0, r.output
    assert "packed (moecompress), w4a16" in r.output
    assert f"{tmp_path / 'p'} <- {d}" in r.output
    assert f"6 of 8 per MoE layer (pruned from {d})" in r.output
    r = invoke("info", d)
    assert "full precision" in r.output and "made_from" not in r.output
