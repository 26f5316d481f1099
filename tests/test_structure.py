"""The package's shape, read with `ast`: no import cycles, gradio only under assistant/ui/, no module far
past 500 lines. (What the imports say, not what runs: cheap, and it fails the moment a cycle appears.)"""

from __future__ import annotations

import ast
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
    assert "assistant.lm" in graph["assistant.training"] and "assistant.lm" in graph["assistant.evaluation"]


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
MACHINERY = {"store", "registry", "curation", "jobs", "engine", "model", "lora", "runner", "training", "evaluation",
             "monitoring", "embeddings", "dedup", "gate", "memory", "kernels", "graph_step", "service"}


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
                parts = module.split(".")
                sub = parts[1] if len(parts) > 1 and parts[0] == "assistant" else (what if module == "assistant" else "")
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


# Engines: both implement the one interface, and only the composition root builds them. evaluation.py
# builds a private in-process engine to answer the gate's prompts inside a training job's process (it
# evaluates an adapter file, not what is served).
ENGINE_CLASSES = {"Engine", "VllmEngine"}
ENGINE_BUILDERS = {"assistant.server", "assistant.evaluation"}


def test_both_engines_implement_the_engine_interface_and_only_the_root_builds_them():
    from assistant.engine import Engine
    from assistant.engine_protocol import EngineProtocol
    from assistant.vllm_engine import VllmEngine
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


# Floors: each module may import only modules on its own floor or below. The CLI sits on the server (the
# composition root), which sits on the shells (HTTP routes, UI), which sit on Workspace and Serving, which
# sit on the library. The library never imports upwards.
FLOORS = {"assistant.cli": 4, "assistant.server": 3, "assistant.api": 2, "assistant.api_openai": 2, "assistant.ui": 2,
          "assistant.workspace": 1, "assistant.serving": 1}


def _floor(name: str) -> int:
    return max((f for prefix, f in FLOORS.items() if name == prefix or name.startswith(prefix + ".")), default=0)


def test_no_module_imports_one_on_a_higher_floor():
    modules = _modules()
    upward = [f"{n} (floor {_floor(n)}) imports {m} (floor {_floor(m)})"
              for n, p in modules.items() for m in _imports(n, p, modules) if _floor(m) > _floor(n)]
    assert not upward, upward
    assert _floor("assistant.ui.chat") == 2 and _floor("assistant.engine") == 0


# Training settings are checked once, where they enter: the one checker is TrainSettings.from_dict (the
# type and range of each field), called by the Workspace (API body, CLI flags) and the Train form; a job
# and its ranks restore the checked record (`from_record`).
SETTINGS_CHECKERS = {"assistant.training", "assistant.workspace", "assistant.ui.train"}


def test_training_settings_have_one_checker():
    calls = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_dict" \
                    and ast.unparse(node.func.value) in ("TrainSettings", "cls") and name not in SETTINGS_CHECKERS:
                calls.append(f"{name}:{node.lineno}")
    assert not calls, calls
