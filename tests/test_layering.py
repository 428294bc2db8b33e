"""Imports point down, through the layers the code really has (docs: README "Layout").

    0  types errors registry progress version, algorithms/ kernels/   pure math, kernels, small shared types
    1  models/ calib/ testing                                          adapters (and tiny models of them); text
    2  io/                                                             checkpoints, whole models, outputs on disk
    3  formats/                                                        the packed format, its record, exports
    4  nn/                                                             packed runtime modules
    5  runtime/                                                        the layer-streaming executor, hooks, calibration
    6  eval/                                                           metrics
    7  stages/                                                         one file per stage
    8  pipeline recipe context                                         recipe -> stages -> output
    9  cli console __main__, the package root                         Typer + rich

A module may import its own level and the levels below. Checked with ``ast`` over every module, imports inside
functions included; ``from moecompress import x`` counts as importing ``moecompress.x``. Only console and the
cli package (every module of it) touch typer/rich.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "moecompress"
LEVEL = {
    "types": 0, "errors": 0, "registry": 0, "progress": 0, "version": 0, "algorithms": 0, "kernels": 0,
    "models": 1, "calib": 1, "testing": 1,
    "io": 2,
    "formats": 3,
    "nn": 4,
    "runtime": 5,
    "eval": 6,
    "stages": 7,
    "pipeline": 8, "recipe": 8, "context": 8,
    "cli": 9, "console": 9, "__main__": 9, "__init__": 9,
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
            if node.module == "moecompress":  # from moecompress import x: the submodule x, or the package root
                for a in node.names:
                    top = a.name if a.name in LEVEL else "__init__"
                    yield ("moecompress" if top == "__init__" else f"moecompress.{top}"), node.lineno
            else:
                yield node.module, node.lineno


def test_every_module_has_a_level():
    for name, _ in _modules():
        _level(name)
    assert {p.stem if p.is_file() else p.name for p in PKG.iterdir()
            if (p.suffix == ".py" or (p / "__init__.py").is_file())} <= set(LEVEL)


def test_imports_point_down():
    bad = []
    for name, path in _modules():
        mine = _level(name)
        for target, line in _imports(path):
            if (target == "moecompress" or target.startswith("moecompress.")) and _level(target) > mine:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_function_level_and_package_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from moecompress.runtime.executor import LayerStream\n"
                 "from moecompress import __version__, nn\n")
    assert sorted(_imports(f)) == [("moecompress", 3), ("moecompress.nn", 3), ("moecompress.runtime.executor", 2)]


def _may_touch_typer_and_rich(module: str) -> bool:
    return module in ("moecompress.cli", "moecompress.console") or module.startswith("moecompress.cli.")


def test_only_cli_and_console_touch_typer_and_rich():
    bad = []
    for name, path in _modules():
        if _may_touch_typer_and_rich(name):
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


def test_the_typer_and_rich_exemption_is_exactly_the_cli_package_and_console():
    exempt = {path.relative_to(PKG) for name, path in _modules() if _may_touch_typer_and_rich(name)}
    cli_files = {path.relative_to(PKG) for path in (PKG / "cli").rglob("*.py")}
    assert len(cli_files) > 1 and exempt == cli_files | {Path("console.py")}
    assert all(_level(name) == 9 for name, _ in _modules() if _may_touch_typer_and_rich(name))
    assert not any(map(_may_touch_typer_and_rich, ("moecompress.client", "moecompress.consoles", "moecompress.io.cli")))
