"""The README stays true: its main command works and its Python examples run as written."""

import os
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moecompress.cli import app
from moecompress.pipeline import run
from moecompress.recipe import validate_recipe

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_readme_main_command_and_python_examples(tmp_path, monkeypatch):
    install = re.search(r"```bash\n(pip install torch==2\.13\.0 && pip install -e \S+ && moecompress .+)\n```", README)
    assert install, "the README must keep its one-line install + main job command"
    main_job = install.group(1).split("&& moecompress ", 1)[1].split()
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, main_job)
    assert result.exit_code == 0, result.output
    for block in re.findall(r"```python\n(.*?)```", README, re.S):
        exec(compile(block, "README.md", "exec"), {})
    side = (tmp_path / "out" / "demo-math" / "moecompress.json").read_text()
    assert '"kept_experts"' in side and (tmp_path / "out" / "demo-6e" / "moecompress.json").is_file()


def test_readme_test_command_is_what_ci_runs():
    assert "```bash\npython -m pytest\n```" in README
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_readme_install_command_installs_what_the_test_command_needs():
    install = re.search(r"```bash\n(pip install torch==2\.13\.0 && pip install -e (\S+) && moecompress .+)\n```", README)
    assert install and install.group(2) == '".[test]"', "the README's install must bring pytest (the [test] extra)"
    extra = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    assert "pytest" in extra.split("test =")[1].splitlines()[0]


TOUR = re.findall(r"^\| `(moecompress [a-z]+)[^`]*` \|", README, re.M)
SMALL = ["--samples", "2", "--seq-len", "64"]


@pytest.mark.slow
def test_every_tour_command_runs_with_its_defaults_on_the_demo(tmp_path, monkeypatch):
    """Each command of the README's CLI tour, once, with its defaults on the bundled demo model (sizes reduced
    where a flag allows)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    runner = CliRunner()
    p, q, s = tmp_path / "p", tmp_path / "q", tmp_path / "s"
    # export takes symmetric weights (README, "Serving with vLLM"), which `quantize` does not write: the shipped
    # recipe, with a smaller calibration and RTN
    sym = yaml.safe_load((ROOT / "recipes" / "demo" / "quantize_w4a16_sym.yaml").read_text())
    small = {**sym, "calibration": {"samples": 2, "seq_len": 64}, "stages": [{**sym["stages"][0], "method": "rtn"}]}
    run(validate_recipe(small), output=tmp_path / "qs")
    commands = {
        "list": ["list"], "info": ["info"],
        "profile": ["profile", *SMALL, "-o", p],
        "eval": ["eval", "--samples", "2"],
        "prune": ["prune", "-p", p, "--task", "math", "--keep-ratio", "0.5", "-o", tmp_path / "pr"],
        "quantize": ["quantize", *SMALL, "-o", q],
        "ternary": ["ternary", *SMALL, "-o", tmp_path / "t"],
        "inspect": ["inspect", q],
        "export": ["export", tmp_path / "qs", "-o", tmp_path / "ct"],
        "patterns": ["patterns", "-p", p, "--samples", "2", "-o", s],
        "retrieve": ["retrieve", "-s", s, "--keep-ratio", "0.5", "--prompt", "Solve x^2 = 4", "-o", tmp_path / "r"],
        "generate": ["generate", q, "--prompt", "def add(a, b):", "--max-new-tokens", "5"],
        "run": ["run", "recipes/demo/keep_experts.yaml", "-o", tmp_path / "k"],
    }
    assert sorted(c.split()[1] for c in TOUR) == sorted(commands), "a tour command without a test, or vice versa"
    for name in [c.split()[1] for c in TOUR]:
        r = runner.invoke(app, [str(a) for a in commands[name]])
        assert r.exit_code == 0, f"{name}: {r.output}"
