"""The README stays true: its main command works and its Python examples run as written."""

import os
import re
from pathlib import Path

from typer.testing import CliRunner

from moecompress.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_main_command_and_python_examples(tmp_path, monkeypatch):
    install = re.search(r"```bash\n(pip install torch==2\.13\.0 && pip install -e \. && moecompress .+)\n```", README)
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
