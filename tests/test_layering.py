"""Imports point down: cli -> pipeline -> stages -> runtime/eval/nn -> models/formats/calib -> algorithms/kernels.

Checked with ``ast`` over every module (function-level imports included). Only cli/console touch typer/rich.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "moecompress"
LEVEL = {
    "types": 0, "errors": 0, "registry": 0, "progress": 0, "algorithms": 0, "kernels": 0,
    "models": 1, "formats": 1, "calib": 1, "io": 1, "testing": 1,
    "runtime": 2, "eval": 2, "nn": 2,
    "stages": 3,
    "pipeline": 4, "recipe": 4, "context": 4, "taer": 4,
    "cli": 5, "console": 5, "__main__": 5, "__init__": 5,
}


def _level(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    return LEVEL[top]


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__") and name != "moecompress.__init__":
            name = name[: -len(".__init__")]
        yield name, path


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno


def test_every_module_has_a_level():
    for name, _ in _modules():
        _level(name)


def test_imports_point_down():
    bad = []
    for name, path in _modules():
        mine = _level(name)
        for target, line in _imports(path):
            if target.startswith("moecompress.") and _level(target) > mine:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_only_cli_and_console_touch_typer_and_rich():
    bad = []
    for name, path in _modules():
        if name in ("moecompress.cli", "moecompress.console"):
            continue
        for target, line in _imports(path):
            if target.split(".")[0] in ("typer", "rich"):
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_algorithms_import_only_shared_types():
    for name, path in _modules():
        if _level(name) == 0 and name.split(".")[1] in ("algorithms", "kernels"):
            for target, line in _imports(path):
                if target.startswith("moecompress."):
                    assert target.split(".")[1] in ("types", "errors", "algorithms", "kernels"), f"{name}:{line}"
