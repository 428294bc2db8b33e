"""The bad-input matrix: the CLI driven through broken files of every kind, malformed profiles and sidecars,
impossible budgets, senseless recipes, bad option values and hostile paths. Every case must end with exit
status != 0, exactly one line on stderr that starts with "error:" and names the problem (and, where it can,
the fix), nothing written at the output, no temporary files left, and the inputs unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moecompress.cli import app

SMALL = ["--samples", "2", "--seq-len", "32", "--tasks", "prose"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Mixtral directory, its profile, and a packed W4A16 copy (built once)."""
    from moecompress.models import find_arch
    from moecompress.io.model import LoadedModel, save_model, tiny_tokenizer
    from moecompress.testing import tiny_moe

    root = tmp_path_factory.mktemp("bad")
    m = tiny_moe("mixtral", seed=0)
    save_model(LoadedModel(m, tiny_tokenizer(), find_arch(m.config), "mixtral", None, torch.float32), root / "model")
    r = CliRunner().invoke(app, ["profile", str(root / "model"), *SMALL, "-o", str(root / "profile")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["quantize", str(root / "model"), *SMALL, "--group-size", "8", "--method", "rtn",
                                 "-o", str(root / "packed")])
    assert r.exit_code == 0, r.output
    return root


@dataclass
class Case:
    name: str
    make: Callable[[Path, Path], list[str]]  # (prepared copy of `base`, work dir) -> CLI arguments
    needles: tuple[str, ...]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _weights(d: Path) -> Path:
    return d / "model.safetensors"


def _edit_tensor(d: Path, fn) -> None:
    sd = load_file(str(_weights(d)))
    fn(sd)
    save_file(sd, str(_weights(d)), metadata={"format": "pt"})


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def model_case(name, edit, needles, command=("info",)):
    """A damaged copy of the tiny model, given to ``command`` (info reads the config; others the weights)."""

    def make(b: Path, w: Path) -> list[str]:
        d = _copy(b / "model", w / "m")
        edit(d)
        return [*command, str(d), *(["-o", str(w / "out")] if command[0] != "info" else [])]

    return Case(name, make, needles)


KEEP = ("run", str(Path(__file__).resolve().parents[1] / "recipes" / "_smoke" / "tiny_keep.yaml"))


def _keep_recipe(w: Path) -> str:
    return str(_write(w / "keep.yaml", "stages:\n  - stage: keep_experts\n    drop: {all: [7]}\n"))


def weights_case(name, edit, needles):
    def make(b: Path, w: Path) -> list[str]:
        d = _copy(b / "model", w / "m")
        edit(d)
        return ["run", _keep_recipe(w), "-m", str(d), "-o", str(w / "out")]

    return Case(name, make, needles)


def _nan(sd):
    k = next(k for k in sorted(sd) if "experts" in k)
    sd[k].view(-1)[0] = float("nan")


def _shard(d: Path) -> None:
    sd = load_file(str(_weights(d)))
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(d / "model-00002-of-00002.safetensors"))
    _weights(d).unlink()
    wm = {k: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
          for i, k in enumerate(keys)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _missing_shard(d: Path) -> None:
    _shard(d)
    (d / "model-00002-of-00002.safetensors").unlink()


def _bad_dtype(d: Path) -> None:
    def fn(sd):
        k = next(k for k in sorted(sd) if k.endswith("q_proj.weight"))
        sd[k] = sd[k].to(torch.int8)

    _edit_tensor(d, fn)


def _wrong_shape(d: Path) -> None:
    def fn(sd):
        k = next(k for k in sorted(sd) if k.endswith("q_proj.weight"))
        sd[k] = sd[k][:-1]

    _edit_tensor(d, fn)


def _config(d: Path, **kw) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    for k, v in kw.items():
        if v is None:
            del cfg[k]
    (d / "config.json").write_text(json.dumps(cfg))


def profile_case(name, edit, needles, extra=("--keep", "4")):
    def make(b: Path, w: Path) -> list[str]:
        p = _copy(b / "profile", w / "p")
        edit(p, b)
        return ["prune", str(b / "model"), "-p", str(p), *extra, "-o", str(w / "out")]

    return Case(name, make, needles)


def _profile_tensor(fn):
    def edit(p: Path, b: Path) -> None:
        sd = load_file(str(p / "profile.safetensors"))
        fn(sd)
        save_file(sd, str(p / "profile.safetensors"))

    return edit


def _profile_json(**kw):
    def edit(p: Path, b: Path) -> None:
        meta = json.loads((p / "profile.json").read_text())
        meta.update(kw)
        (p / "profile.json").write_text(json.dumps(meta))

    return edit


def _profile_without_windows(p: Path, b: Path) -> None:  # a profile made before profiles recorded them
    meta = json.loads((p / "profile.json").read_text())
    del meta["settings"]["windows"]
    (p / "profile.json").write_text(json.dumps(meta))


def prune_case(name, args, needles):
    return Case(name, lambda b, w: ["prune", str(b / "model"), "-p", str(b / "profile"), *args,
                                     "-o", str(w / "out")], needles)


def recipe_case(name, text, needles, model=True):
    def make(b: Path, w: Path) -> list[str]:
        r = _write(w / "r.yaml", text.replace("PROFILE", str(b / "profile")))
        return ["run", str(r), *(["-m", str(b / "model")] if model else []), "-o", str(w / "out")]

    return Case(name, make, needles)


def command_case(name, args, needles):
    return Case(name, lambda b, w: [a.replace("MODEL", str(b / "model")).replace("PACKED", str(b / "packed"))
                                    .replace("WORK", str(w)) for a in args], needles)


def _existing_file_output(b: Path, w: Path) -> list[str]:
    _write(w / "out", "precious")
    return ["run", _keep_recipe(w), "-m", str(b / "model"), "-o", str(w / "out")]


def _existing_dir_output(b: Path, w: Path) -> list[str]:
    _write(w / "out" / "precious.txt", "precious")
    return ["run", _keep_recipe(w), "-m", str(b / "model"), "-o", str(w / "out")]


def _original_gone(b: Path, w: Path) -> list[str]:
    """A packed checkpoint whose recorded original was deleted since: eval with its default baseline."""
    d = _copy(b / "packed", w / "p")
    side = json.loads((d / "moecompress.json").read_text())
    side["source_model"] = str(w / "deleted-model")
    (d / "moecompress.json").write_text(json.dumps(side))
    return ["eval", str(d), *SMALL]


CASES = [
    # model directories: every kind of broken file
    command_case("model-missing", ["info", "WORK/nope"], ("does not exist", "local Hugging Face model directory")),
    model_case("no-config", lambda d: (d / "config.json").unlink(), ("has no config.json",)),
    model_case("config-not-json", lambda d: (d / "config.json").write_text("{oops"), ("not valid JSON", "line 1")),
    model_case("config-no-model-type", lambda d: _config(d, model_type=None), ("has no model_type",)),
    model_case("config-unknown-type", lambda d: _config(d, model_type="weird_moe"), ("unknown architecture",)),
    weights_case("no-weights", lambda d: _weights(d).unlink(), ("has no safetensors weights",)),
    weights_case("bin-weights-only", lambda d: (_weights(d).rename(d / "pytorch_model.bin")),
                 ("PyTorch .bin weights only", "save_pretrained")),
    weights_case("truncated", lambda d: _weights(d).write_bytes(_weights(d).read_bytes()[:-100]),
                 ("is truncated", "copy the file again")),
    weights_case("corrupt-header", lambda d: _weights(d).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" +
                                                                      b" " * 64), ("corrupt header",)),
    weights_case("garbage-header-length", lambda d: _weights(d).write_bytes(b"\xff" * 64),
                 ("not a valid safetensors file",)),
    weights_case("empty-weights", lambda d: _weights(d).write_bytes(b""), ("empty or truncated",)),
    weights_case("missing-shard", _missing_shard, ("model-00002-of-00002.safetensors", "is missing")),
    weights_case("corrupt-index", lambda d: (_shard(d), (d / "model.safetensors.index.json").write_text("[")),
                 ("shard index", "corrupt")),
    weights_case("nan-weights", lambda d: _edit_tensor(d, _nan), ("NaN or infinite", "experts")),
    weights_case("integer-weights-no-quant", _bad_dtype, ("stored as I8", "declares no quantization")),
    weights_case("wrong-shape", _wrong_shape, ("has shape [63, 64], config.json implies [64, 64]",)),
    weights_case("corrupt-sidecar", lambda d: (d / "moecompress.json").write_text("{"), ("moecompress.json", "corrupt")),
    # profiles
    profile_case("profile-missing", lambda p, b: shutil.rmtree(p), ("no profile at",)),
    profile_case("profile-json-corrupt", lambda p, b: (p / "profile.json").write_text("{"), ("corrupt",)),
    profile_case("profile-wrong-format", _profile_json(format="something"), ("not a version-1 moecompress profile",)),
    profile_case("profile-no-tasks", _profile_json(tasks=None), ("lacks its tasks",)),
    profile_case("profile-nan", _profile_tensor(lambda sd: sd["prose/count"].fill_(float("nan"))),
                 ("prose/count", "NaN")),
    profile_case("profile-wrong-shape", _profile_tensor(lambda sd: sd.update({"prose/count": sd["prose/count"][:, :3].contiguous()})),
                 ("has shape", "profile the model again")),
    profile_case("profile-missing-tensor", _profile_tensor(lambda sd: sd.pop("prose/count")), ("lacks tensor",)),
    profile_case("profile-stats-corrupt", lambda p, b: (p / "profile.safetensors").write_bytes(b"garbage!"),
                 ("profile statistics", "corrupt")),
    profile_case("profile-of-another-model", _profile_json(model={"architecture": "mixtral", "num_experts": 8,
                                                                  "moe_layers": [0, 1], "hidden_size": 64,
                                                                  "config_hash": "0" * 16}),
                 ("another model (config differ)",)),
    profile_case("profile-unknown-task", lambda p, b: None, ("task 'math' is not in the profile", "it has prose"),
                 extra=("--keep", "4", "--task", "math")),
    # impossible budgets and option values
    prune_case("keep-below-top-k", ["--keep", "1"], ("top_k is 2", "keep at least 2")),
    prune_case("keep-above-experts", ["--keep", "9"], ("more than the model's 8 experts",)),
    prune_case("keep-ratio-zero", ["--keep-ratio", "0"], ("--keep-ratio 0.0",)),
    prune_case("two-budgets", ["--keep", "4", "--keep-ratio", "0.5"], ("exactly one budget", "--keep-ratio")),
    prune_case("no-budget", [], ("exactly one budget",)),
    prune_case("cumulative-with-tcess", ["--cumulative", "0.9"], ("--cumulative", "tcess_prob")),
    prune_case("bad-score", ["--keep", "4", "--score", "magic"], ("--score magic",)),
    profile_case("profile-without-windows-auto", _profile_without_windows,
                 ("does not record which calibration windows", "moecompress profile")),
    prune_case("bad-candidate", ["--keep", "4", "--candidates", "tcess,magic"],
               ("--candidates", "unknown score 'magic'")),
    prune_case("cumulative-with-auto", ["--cumulative", "0.9", "--score", "auto"], ("--cumulative", "not 'auto'")),
    command_case("bad-scheme", ["quantize", "MODEL", "--scheme", "w5a16", "-o", "WORK/out"], ("--scheme w5a16",)),
    command_case("samples-zero", ["quantize", "MODEL", "--samples", "0", "-o", "WORK/out"], ("--samples 0",)),
    command_case("samples-not-int", ["quantize", "MODEL", "--samples", "many", "-o", "WORK/out"], ("'--samples'",)),
    command_case("unknown-option", ["quantize", "MODEL", "--bits", "4", "-o", "WORK/out"], ("--bits",)),
    command_case("layer-bits-malformed", ["quantize", "MODEL", "--layer-bits", "0:4,x", "-o", "WORK/out"],
                 ("'x' is not LAYER:BITS", "0:4,1:3")),
    command_case("layer-bits-no-such-layer", ["quantize", "MODEL", *SMALL, "--layer-bits", "5:4", "-o", "WORK/out"],
                 ("names layer 5", "decoder layers")),
    command_case("linear-bits-too-wide", ["quantize", "MODEL", "--linear-bits", "9", "-o", "WORK/out"],
                 ("--linear-bits",)),
    command_case("group-size-not-dividing", ["quantize", "MODEL", *SMALL, "--group-size", "7", "-o", "WORK/out"],
                 ("group size 7 does not divide",)),
    command_case("seq-len-too-long", ["profile", "MODEL", "--seq-len", "4096", "-o", "WORK/out"],
                 ("above the model's limit",)),
    command_case("bad-data-spec", ["profile", "MODEL", "--data", "nofile", "-o", "WORK/out"], ("TASK=PATH",)),
    command_case("data-file-missing", ["profile", "MODEL", "--data", "x=WORK/none.txt", "-o", "WORK/out"],
                 ("does not exist",)),
    command_case("unknown-task", ["profile", "MODEL", "--tasks", "maths", "-o", "WORK/out"], ("unknown task 'maths'",)),
    command_case("ternary-bad-codec", ["ternary", "MODEL", "--codec", "b4", "-o", "WORK/out"], ("--codec b4",)),
    # packed input to commands that need the original weights: the fix names the original
    command_case("quantize-packed", ["quantize", "PACKED", "-o", "WORK/out"], ("packed w4a16 checkpoint", "original")),
    command_case("profile-packed", ["profile", "PACKED", "-o", "WORK/out"], ("packed", "needs the original")),
    command_case("ternary-packed", ["ternary", "PACKED", "-o", "WORK/out"], ("packed", "needs the original")),
    # recipes
    command_case("recipe-missing", ["run", "WORK/none.yaml", "-o", "WORK/out"], ("does not exist",)),
    recipe_case("recipe-not-yaml", "stages: [\n", ("not valid YAML",)),
    recipe_case("recipe-not-mapping", "- 1\n- 2\n", ("is not a mapping",)),
    recipe_case("recipe-unknown-key", "stages:\n  - stage: profile\n    dorp: 1\n", ("unknown key 'dorp'",)),
    recipe_case("recipe-unknown-stage", "stages:\n  - stage: distill\n", ("unknown stage 'distill'",)),
    recipe_case("recipe-stages-not-list", "stages: profile\n", ("must be a list",)),
    recipe_case("recipe-no-stages", "stages: []\n", ("stages",)),
    recipe_case("recipe-quantize-then-prune", "stages:\n  - stage: quantize\n  - stage: profile\n"
                "  - stage: prune\n    keep: 4\n", ("needs the original weights", "profile, prune, quantize")),
    recipe_case("recipe-quantize-twice", "stages:\n  - stage: quantize\n  - stage: quantize\n",
                ("already quantized", "quantize once")),
    recipe_case("recipe-prune-no-profile", "stages:\n  - stage: prune\n    keep: 4\n", ("needs a profile",)),
    recipe_case("recipe-prune-task-typo", "calibration: {tasks: [math]}\nstages:\n  - stage: profile\n"
                "  - stage: prune\n    keep: 4\n    tasks: [maths]\n", ("task 'maths'",)),
    recipe_case("recipe-data-missing", "calibration: {data: {x: /nonexistent.txt}}\nstages:\n  - stage: profile\n",
                ("does not exist",)),
    recipe_case("recipe-keep-out-of-range", "stages:\n  - stage: keep_experts\n    keep: {all: [0, 9]}\n",
                ("out of range",)),
    recipe_case("recipe-stale-profile", "stages:\n  - stage: keep_experts\n    drop: {all: [7]}\n"
                "  - stage: prune\n    profile: PROFILE\n    keep: 4\n", ("describes the model before",)),
    # hostile outputs
    Case("output-is-a-file", _existing_file_output, ("is a file, not a directory",)),
    Case("output-exists", _existing_dir_output, ("already exists", "--force")),
    command_case("eval-json-is-a-dir", ["eval", "MODEL", "--no-baseline", *SMALL, "--json", "WORK"],
                 ("is a directory",)),
    command_case("eval-json-into-the-model", ["eval", "MODEL", "--no-baseline", *SMALL, "--json",
                                              "MODEL/config.json", "--force"], ("input",)),
    command_case("force-onto-the-input", ["run", KEEP[1], "-m", "MODEL", "-o", "MODEL", "--force"], ("input",)),
    command_case("force-onto-an-ancestor", ["run", KEEP[1], "-m", "MODEL", "-o", "MODEL/..", "--force"],
                 ("contains the input",)),
    Case("eval-original-gone", _original_gone, ("deleted-model", "is gone", "--baseline", "--no-baseline")),
    command_case("export-not-packed", ["export", "MODEL", "-o", "WORK/out"], ("packed",)),
    command_case("retrieve-no-store", ["retrieve", "MODEL", "-s", "WORK/none", "--prompt", "x", "--keep", "4",
                                       "-o", "WORK/out"], ("WORK",)),
    command_case("generate-empty-prompt", ["generate", "MODEL", "--prompt", ""], ("prompt is empty",)),
    command_case("generate-no-new-tokens", ["generate", "MODEL", "--prompt", "x", "--max-new-tokens", "0"],
                 ("--max-new-tokens", "greater than or equal to 1")),
    command_case("generate-negative-temperature", ["generate", "MODEL", "--prompt", "x", "--temperature", "-1"],
                 ("--temperature", "greater than or equal to 0")),
    command_case("quantize-width-without-codec", ["quantize", "MODEL", *SMALL, "--scheme", "w4a16",
                                                  "--linear-bits", "6", "--group-size", "8", "-o", "WORK/out"],
                 ("--linear-bits 6", "--fake-quant")),
]


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _tree_digest(base)
    work = tmp_path / "work"
    work.mkdir()
    args = case.make(base, work)
    listing = {p.name for p in work.iterdir()}
    out_before = _tree_digest(work / "out") if (work / "out").exists() else None
    out_file = (work / "out").read_bytes() if (work / "out").is_file() else None
    result = CliRunner().invoke(app, args)
    assert result.exit_code not in (0, None), result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    needles = [n.replace("WORK", str(work)) for n in case.needles]
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert _tree_digest(base) == before, "an input was changed"
    if out_file is not None:
        assert (work / "out").read_bytes() == out_file
    elif out_before is not None:
        assert _tree_digest(work / "out") == out_before
    else:
        assert not (work / "out").exists(), "a failed command wrote its output"
    assert {p.name for p in work.iterdir()} <= listing | {"m", "p", "r.yaml", "keep.yaml"}, \
        f"left behind: {sorted(p.name for p in work.iterdir())}"
    assert not [p for p in work.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
