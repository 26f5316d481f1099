"""The package's shape, read with `ast`: no import cycles, gradio only under assistant/ui/, no module far
past 500 lines. (What the imports say, not what runs: cheap, and it fails the moment a cycle appears.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "assistant"
MAX_MODULE_LINES = 520   # about 500: a module past it is asking to be split


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.with_suffix("").relative_to(PKG.parent).parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's own modules that `name` imports (a `from . import x` names the submodule x)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & modules.keys()
            found |= subs or ({target} & modules.keys())
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & modules.keys()
    return found - {name}


def test_no_import_cycles():
    modules = _modules()
    graph = {n: _imports(n, p, modules) for n, p in modules.items()}
    cycles = []

    def visit(node, path):
        for nxt in graph[node]:
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif len(path) < len(graph):
                visit(nxt, path + [nxt])

    for start in graph:
        visit(start, [start])
    assert not cycles, cycles[:5]
    assert "assistant.engine.lm" in graph["assistant.training.recipe"]
    assert "assistant.engine.lm" in graph["assistant.gate.evaluation"]


def test_gradio_is_imported_only_under_the_ui_package():
    outside = []
    for name, path in _modules().items():
        if name.startswith("assistant.ui"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "gradio" for n in names):
                outside.append(name)
    assert not outside, outside


def test_no_module_is_far_past_500_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert not {n: c for n, c in long.items() if c > MAX_MODULE_LINES}, long


# The shells (CLI, HTTP routes, UI) reach the library through the Workspace and the Serving only. They may
# read typed settings and named limits (`FooSettings`, UPPER_CASE names) from a recipe's module.
SHELLS = ("assistant.cli", "assistant.api", "assistant.ui")
MACHINERY = {"data.store", "data.registry", "data.curation", "data.embeddings", "data.dedup", "jobs.run",
             "engine.engine", "engine.model", "engine.lora", "engine.runner", "engine.kernels", "engine.graph_step",
             "training.recipe", "training.memory", "gate.evaluation", "gate.verdict", "monitoring.report"}


def _settings_or_limit(name: str) -> bool:
    return name.endswith("Settings") or name.isupper()


def test_the_cli_api_and_ui_use_only_the_workspace_and_the_serving():
    modules = _modules()
    reached = []
    for name, path in modules.items():
        if not name.startswith(SHELLS):
            continue
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                imported = [(target, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported = [(node.module or "", a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                imported = [(a.name, "") for a in node.names]
            else:
                continue
            for module, what in imported:
                sub = module.removeprefix("assistant.")
                sub = f"{sub}.{what}" if f"{sub}.{what}" in MACHINERY else sub   # from assistant.jobs import run
                if sub in MACHINERY and not (what and _settings_or_limit(what) and module.endswith(sub)):
                    reached.append(f"{name} imports {module}{'.' + what if what else ''}")
    assert not reached, reached
    assert {"assistant.workspace", "assistant.serving"} <= modules.keys()


def test_errors_live_in_errors_py():
    """Every exception class of the package is defined in assistant/errors.py, and none is changed in place."""
    elsewhere, mutated = [], []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and name != "assistant.errors" and any(
                    isinstance(b, (ast.Name, ast.Attribute)) and (getattr(b, "id", None) or getattr(b, "attr", ""))
                    .endswith(("Error", "Exception", "Busy", "Stopped", "Failed", "Unavailable", "Memory"))
                    for b in node.bases):
                elsewhere.append(f"{name}.{node.name}")
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr in ("status", "code")
                                                    and not (isinstance(t.value, ast.Name) and t.value.id == "self")
                                                    for t in node.targets):
                mutated.append(f"{name}:{node.lineno}")
    assert not elsewhere, elsewhere
    assert not mutated, mutated


# Engines: both implement the one interface, and only the composition root builds them. gate/evaluation.py
# builds a private in-process engine to answer the gate's prompts inside a training job's process (it
# evaluates an adapter file, not what is served).
ENGINE_CLASSES = {"Engine", "VllmEngine"}
ENGINE_BUILDERS = {"assistant.server", "assistant.gate.evaluation"}


def test_both_engines_implement_the_engine_interface_and_only_the_root_builds_them():
    from assistant.engine.engine import Engine
    from assistant.engine.protocol import EngineProtocol
    from assistant.vllm.engine import VllmEngine
    assert issubclass(Engine, EngineProtocol) and issubclass(VllmEngine, EngineProtocol)
    assert not Engine.__abstractmethods__ and not VllmEngine.__abstractmethods__
    required = {"submit", "cancel", "load_adapter", "unload_adapter", "pin_adapter", "unpin", "status", "close"}
    assert required <= set(dir(EngineProtocol))
    built, probed = [], []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ENGINE_CLASSES \
                    and name not in ENGINE_BUILDERS:
                built.append(f"{name}:{node.lineno} builds {node.func.id}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr" \
                    and "engine" in ast.unparse(node.args[0]):
                probed.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert not built, built
    assert not probed, f"ask the engine interface, not hasattr: {probed}"


# Floors: the house is a package per subsystem (assistant/engine/, data/, ...) plus a few modules at the top
# (the foundation, the Workspace and the Serving, the composition root, the CLI). Each unit may import units
# on lower floors only, so no two subsystems lean on each other, and each package's docstring says which
# units it may import ("May import: ..."): the docstring and the code agree.
FOUNDATION = ("settings", "errors", "files")
FLOORS = {"errors": 0, "settings": 1, "files": 1,
          "engine": 2, "cluster": 2, "people": 2,
          "data": 3, "vllm": 3,
          "gate": 4, "training": 4, "monitoring": 4,
          "jobs": 5,
          "replicas": 6,
          "workspace": 7,
          "serving": 8,
          "api": 9,
          "ui": 10,
          "server": 11,
          "flags": 12,
          "cli": 13}


def _unit(module: str) -> str:
    """assistant.engine.lora -> engine; assistant.workspace -> workspace; assistant -> the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _packages() -> dict[str, Path]:
    return {p.parent.name: p for p in PKG.glob("*/__init__.py")}


def _may_import(docstring: str) -> set[str]:
    """The units named by a docstring's "May import: ..." paragraph ("the foundation" names all three)."""
    paragraph = next((p for p in docstring.split("\n\n") if p.startswith("May import:")), "")
    text = re.sub(r"\([^)]*\)", "", paragraph.removeprefix("May import:")).replace("\n", " ")
    words = {w.strip(" .") for w in text.split(";")[0].split(",")}
    return {w for w in words if w in FLOORS} | (set(FOUNDATION) if "the foundation" in words else set())


def test_every_unit_has_a_floor_and_imports_only_lower_floors():
    modules = _modules()
    units = {_unit(n) for n in modules} - {"__init__"}
    assert units == FLOORS.keys(), f"place each package or top-level module on a floor: {units ^ FLOORS.keys()}"
    upward = sorted({f"{n} (floor {FLOORS[_unit(n)]}) imports {m} (floor {FLOORS[_unit(m)]})"
                     for n, p in modules.items() if _unit(n) != "__init__"
                     for m in _imports(n, p, modules) if _unit(m) != _unit(n) and FLOORS[_unit(m)] >= FLOORS[_unit(n)]})
    assert not upward, upward


def test_each_package_imports_what_its_docstring_says_it_may():
    modules = _modules()
    for package, init in _packages().items():
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Entry points" in doc or package == "ui", f"assistant/{package}/__init__.py names its entry points"
        declared = _may_import(doc)
        assert declared, f"assistant/{package}/__init__.py says what it may import (May import: ...)"
        assert all(FLOORS[d] < FLOORS[package] for d in declared), (package, declared)
        used = {_unit(m) for n, p in modules.items() if _unit(n) == package for m in _imports(n, p, modules)} - {package}
        assert used <= declared, f"assistant/{package} imports {sorted(used - declared)}, which its docstring does not allow"
        unused = declared - set(FOUNDATION) - used
        assert not unused, f"assistant/{package}'s docstring allows {sorted(unused)}, which it never imports"


# Training settings are checked once, where they enter: the one checker is TrainSettings.from_dict (the
# type and range of each field), called by the Workspace (API body, CLI flags) and the Train form; a job
# and its ranks restore the checked record (`from_record`).
SETTINGS_CHECKERS = {"assistant.training.recipe", "assistant.workspace", "assistant.ui.train"}


def test_training_settings_have_one_checker():
    calls = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_dict" \
                    and ast.unparse(node.func.value) in ("TrainSettings", "cls") and name not in SETTINGS_CHECKERS:
                calls.append(f"{name}:{node.lineno}")
    assert not calls, calls
