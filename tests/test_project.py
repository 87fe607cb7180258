"""Project set-up: launch.sh behaviour and the dependency lists that must agree."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pip_lines_of_environment_yml() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    out = []
    for line in lines[start + 1 :]:
        m = re.match(r"^\s+- (\S.*)$", line)
        if not m:
            break
        out.append(m.group(1).strip())
    return out


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert _pip_lines_of_environment_yml() == wanted
    assert "python=3.11" in (ROOT / "environment.yml").read_text()


def test_layout_of_the_design_card():
    for name in ("pipeline", "model", "train", "tools", "tests", "docs"):
        assert (ROOT / name).is_dir(), name
    for name in ("launch.sh", "environment.yml", "pyproject.toml", "README.md", ".ci/run", "LICENSE", "CITATION.cff"):
        assert (ROOT / name).is_file(), name


def test_license_and_citation():
    assert "Apache License\n                           Version 2.0" in (ROOT / "LICENSE").read_text()
    cff = (ROOT / "CITATION.cff").read_text()
    assert cff.startswith("cff-version: 1.2.0") and "license: Apache-2.0" in cff
    for cited in ("arXiv:2205.14540", "family-names: Marculescu", "Masked Autoencoders Are Scalable Vision Learners",
                  "family-names: Girshick"):
        assert cited in cff, cited


def _launch(*args, cwd="/") -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "launch.sh"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_launch_help_lists_every_subcommand_from_any_directory():
    res = _launch("help")
    assert res.returncode == 0
    for sub in ("setup", "bundle", "test", "help", "shard", "pretrain", "finetune", "linprobe", "knn", "export",
                "visualize", "bench", "demo"):
        assert re.search(rf"^\s+{sub}\s", res.stdout, re.M), sub


def test_launch_unknown_subcommand_is_a_clear_error():
    res = _launch("pretrian")
    assert res.returncode == 2
    assert "unknown subcommand 'pretrian'" in res.stderr and "usage:" in res.stderr


def test_ci_runs_setup_then_the_readme_test_command():
    ci = (ROOT / ".ci/run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "./launch.sh setup\n./launch.sh test\n" in ci
    assert "./launch.sh test" in readme and "./launch.sh demo" in readme


# --- the house: folders tell the architecture -------------------------------------------------------------------

PACKAGES = ("pipeline", "model", "train", "tools")
MAX_MODULES_PER_FOLDER = 12


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imported_modules(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports, at module level or inside functions; `if TYPE_CHECKING:` blocks excluded."""
    import ast

    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def type_checking(node: ast.AST) -> bool:
        test = getattr(node, "test", None)
        return isinstance(node, ast.If) and (
            (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = name.split(".") if is_package else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - child.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in modules else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


def _import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def test_no_import_cycles():
    modules = _project_modules()
    graph = {name: _imported_modules(path, name, modules) for name, path in modules.items()}
    assert _import_cycles(graph) == []


def test_import_cycle_detection_sees_function_level_imports(tmp_path):
    # The checker itself: a lazy import inside a function closes a cycle; a TYPE_CHECKING import does not.
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n")
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py", "c": tmp_path / "c.py"}
    graph = {n: _imported_modules(p, n, modules) for n, p in modules.items()}
    assert graph == {"a": {"b"}, "b": {"a"}, "c": set()}
    assert _import_cycles(graph) == [["a", "b"]]


def test_no_package_folder_holds_more_than_twelve_modules():
    crowded = {}
    for pkg in PACKAGES:
        for folder in [ROOT / pkg, *(p for p in (ROOT / pkg).rglob("*") if p.is_dir())]:
            if (folder / "__init__.py").exists():
                count = len([p for p in folder.glob("*.py") if p.name != "__init__.py"])
                if count > MAX_MODULES_PER_FOLDER:
                    crowded[str(folder.relative_to(ROOT))] = count
    assert crowded == {}


def test_layers_import_downwards_only():
    # tools -> train -> pipeline, model; the library never imports its command-line tools, and pipeline/ and
    # model/ never import train/ (data and compute do not depend on orchestration).
    modules = _project_modules()
    upward = []
    for name, path in modules.items():
        top = name.split(".")[0]
        for dep in _imported_modules(path, name, modules):
            dep_top = dep.split(".")[0]
            if (top != "tools" and dep_top == "tools") or (top in ("pipeline", "model") and dep_top == "train"):
                upward.append(f"{name} -> {dep}")
    assert upward == []
