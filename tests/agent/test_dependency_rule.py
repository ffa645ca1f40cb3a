"""The dependency rule between the agent's subpackages, read from the source itself.

Layers, bottom up: ``errors`` and ``plumbing`` (shared with the SDK); ``bundle``, the pure
trust core; ``messages``; then ``serve``, ``telemetry`` and ``install``; then ``config``,
``daemon`` and ``cli``, which wire the rest. A package imports only from the packages
below it (and the install step may use the serving path, never the reverse). The bundle
core imports no I/O package: no network, process, database or MQTT module. Every import
counts, also those inside functions.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import agent

AGENT_DIR = Path(agent.__file__).parent

# What each subpackage may import from the agent (besides itself): the layers below it.
_BELOW_PARTS = {"errors", "plumbing", "bundle", "messages", "serve"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "plumbing": {"errors"},
    "bundle": {"errors", "plumbing"},
    "messages": {"errors", "plumbing", "bundle"},
    "serve": {"errors", "plumbing", "bundle", "messages"},
    "telemetry": _BELOW_PARTS,
    "install": _BELOW_PARTS,
    "config": _BELOW_PARTS | {"telemetry", "install"},
    # A model's host and its stage are one layer, split in two modules.
    "_stage": _BELOW_PARTS | {"telemetry", "install", "config", "_host"},
    "_host": _BELOW_PARTS | {"telemetry", "install", "config", "_stage"},
    "daemon": _BELOW_PARTS | {"telemetry", "install", "config", "_host"},
    "cli": _BELOW_PARTS | {"telemetry", "install", "config", "_host", "daemon"},
}
# The bundle core is pure: bytes, a policy and a clock in, a verdict out.
IO_PACKAGES = {
    "asyncio",
    "http",
    "multiprocessing",
    "paho",
    "selectors",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "subprocess",
    "urllib",
}
# Within plumbing, only these modules may be used by the bundle core.
PURE_PLUMBING = {"agent.plumbing.files", "agent.plumbing.lazy", "agent.plumbing.strict"}
# Never in the agent: the SDK and what only builds need.
BUILD_ONLY = {"sdk", "onnx", "litert_quantizer", "rich", "sklearn", "skl2onnx", "sympy"}
# Imported only inside the function that loads a model of their kind.
RUNTIMES = {"onnxruntime", "ai_edge_litert", "tflite_runtime"}


def _part(module: str) -> str:
    """``agent.serve._slot`` -> ``serve``; ``agent.errors`` -> ``errors``."""
    return module.split(".")[1]


def _sources() -> list[Path]:
    return sorted(p for p in AGENT_DIR.rglob("*.py") if p.name != "__init__.py" or p != AGENT_DIR)


def _module_name(path: Path) -> str:
    rel = path.relative_to(AGENT_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _known_modules() -> set[str]:
    return {_module_name(p) for p in AGENT_DIR.rglob("*.py")}


KNOWN = _known_modules()


def _as_module(name: str) -> str:
    """``agent.plumbing.files.write_new`` -> ``agent.plumbing.files`` (longest known prefix)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in KNOWN:
            return ".".join(parts[:end])
    return name


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = (
        _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    )
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            found.add(base)
            # `from agent.plumbing import files` imports agent.plumbing.files.
            found.update(_as_module(f"{base}.{alias.name}") for alias in node.names)
    return {_as_module(m) if m.startswith("agent.") else m for m in found}


def _lazy_map_strings(path: Path) -> set[str]:
    """Modules named as strings in a public face's lazy map (they are imports too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("agent.")
    }


SOURCES = [p for p in _sources() if _module_name(p) not in ("agent",)]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(AGENT_DIR)))
def test_a_module_imports_only_from_the_layers_below_it(path: Path) -> None:
    me = _part(_module_name(path))
    used = _imports(path) | (_lazy_map_strings(path) if path.name == "__init__.py" else set())
    wrong = sorted(
        m for m in used if m.startswith("agent.") and _part(m) != me and _part(m) not in ALLOWED[me]
    )
    assert not wrong, f"{me} may not import {wrong}"


@pytest.mark.parametrize(
    "path",
    [p for p in SOURCES if _part(_module_name(p)) == "bundle"],
    ids=lambda p: str(p.relative_to(AGENT_DIR)),
)
def test_the_bundle_core_imports_no_io_package(path: Path) -> None:
    used = _imports(path)
    io = sorted(m for m in used if m.split(".")[0] in IO_PACKAGES)
    assert not io, f"the pure bundle core imports {io}"
    plumbing = {m for m in used if m.startswith("agent.plumbing.")}
    assert plumbing <= PURE_PLUMBING, f"the bundle core imports {sorted(plumbing - PURE_PLUMBING)}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(AGENT_DIR)))
def test_the_agent_never_imports_the_sdk_or_a_build_only_package(path: Path) -> None:
    assert not {m.split(".")[0] for m in _imports(path)} & BUILD_ONLY


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(AGENT_DIR)))
def test_a_runtime_is_imported_only_inside_a_function(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {
        alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
    }
    assert not top & RUNTIMES


def test_importing_every_agent_module_loads_no_sdk_build_or_runtime_package() -> None:
    names = sorted(KNOWN)
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    )
    assert len(names) > 40
    assert not set(json.loads(out.stdout)) & (BUILD_ONLY | RUNTIMES)


def test_the_serving_path_never_imports_the_install_path() -> None:
    serving = [p for p in SOURCES if _part(_module_name(p)) == "serve"]
    assert serving
    for path in serving:
        assert not {m for m in _imports(path) if m.startswith("agent.install")}, path


@pytest.mark.parametrize("package", ["bundle", "install", "serve", "telemetry"])
def test_a_public_face_resolves_every_name_it_exports(package: str) -> None:
    module = importlib.import_module(f"agent.{package}")
    assert module.__all__ == sorted(module.__all__, key=lambda n: (not n.isupper(), n))
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_importing_public_faces_imports_nothing_behind_them() -> None:
    code = (
        "import json, sys\n"
        "import agent.bundle, agent.install, agent.serve, agent.telemetry\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('agent.'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    )
    loaded = set(json.loads(out.stdout))
    assert loaded == {
        "agent.bundle",
        "agent.install",
        "agent.serve",
        "agent.telemetry",
        "agent.plumbing",
        "agent.plumbing.lazy",
    }


def test_an_agent_without_broker_or_endpoint_loads_no_network_tls_or_crypto_library() -> None:
    # What `edgeship-agent run` imports before the configuration asks for more
    # (bench/footprint.py measures what this saves).
    code = (
        "import json, sys\n"
        "import agent.cli, agent.config, agent.daemon\n"
        "agent.cli.build_parser()\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    )
    loaded = {m.split(".")[0] for m in json.loads(out.stdout)}
    assert not loaded & {"ssl", "cryptography", "paho", "sqlite3", "http", "sdk"}
