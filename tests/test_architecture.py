"""The import graph of hm_export (docs/architecture.md): no cycles among its modules, and a runtime that does not
import the exporter.

Edges are read from the sources (``ast``): every ``import`` of an ``hm_export`` module, at module level or
inside a function (a lazy import is still a dependency), except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The import root and its folders (pyproject.toml's package-dir).
PACKAGES = {
    "hm_export": ROOT / "hm_export",
    "hm_export.passes": ROOT / "passes",
    "hm_export.runtime_stubs": ROOT / "runtime_stubs",
    "hm_export.kernels": ROOT / "kernels",
}
RUNTIME = "hm_export.runtime_stubs"
# What the runtime (loader, block cache, generation) must not depend on: the exporter.
EXPORT_SIDE = (
    "hm_export.export",
    "hm_export.trace",
    "hm_export.passes",
    "hm_export.architectures",
    "hm_export.anchor_quant",
    "hm_export.router_program",
    "hm_export.training",
    "hm_export.hf.intake",
    "hm_export.hf.recipe",
    "hm_export.targets.executorch",
    "hm_export.targets.onnx",
    "hm_export.targets.onnx_quant",
    "hm_export.targets.coreml",
    "hm_export.bank.quantize",
    "hm_export.bank.tools",
)
# Modules a direct import of the runtime may not name: the exporter, the emitters, the Hugging Face hosts.
RUNTIME_FORBIDDEN = (*EXPORT_SIDE, "hm_export.hf")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """The hm_export modules ``name`` imports, TYPE_CHECKING blocks aside."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            out.update(f"{base}.{alias.name}" for alias in node.names)
            out.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in out if m.startswith("hm_export")}


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        targets = set()
        for imported in _imports(name, path):
            while imported and imported not in known:  # `from pkg import name`: name may be an attribute
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_reader_sees_lazy_imports_and_skips_type_only_ones() -> None:
    edges = graph()
    assert len(edges) > 60 and "hm_export.runtime_stubs.loader" in edges
    assert "hm_export.hf" in edges["hm_export.architectures"]  # build_model's lazy import of the hosts
    assert "hm_export.kernels.strategies" not in edges["hm_export.model"]  # only under TYPE_CHECKING there
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_the_runtime_imports_nothing_of_the_exporter() -> None:
    edges = graph()
    bad = {
        (name, target)
        for name, targets in edges.items()
        if name.startswith(RUNTIME)
        for target in targets
        if target.startswith(RUNTIME_FORBIDDEN)
    }
    assert bad == set()


def test_loading_the_runtime_loads_no_exporter_module() -> None:
    """What a device-side process gets: the loader, block cache and generation import no exporter module and no
    Hugging Face host code (the target registry opens a target's module only when that target's program is run;
    the hosts load only for a host model's bundle)."""
    code = (
        "import sys, hm_export.runtime_stubs.loader, hm_export.runtime_stubs.generate; "
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('hm_export'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "hm_export.runtime_stubs.loader" in loaded and "hm_export.formats.manifest" in loaded
    assert [m for m in loaded if m.startswith(RUNTIME_FORBIDDEN)] == []


def test_running_a_bundle_loads_no_exporter_module(decode_bundle) -> None:
    """A device-side process that opens a bundle and runs its programs (ExecuTorch and ONNX: window logits and a
    decode step) imports the targets' runners, never their emitters, the passes or the tracer."""
    _, bundle = decode_bundle
    code = f"""
import sys, torch
from hm_export.runtime_stubs.loader import BundleLoader
loader = BundleLoader({str(bundle)!r})
loader.set_path([0] * loader.config.memory.num_levels)
for target in ("executorch", "onnx"):
    loader.use_target(target)
    assert loader.logits([1, 2, 3]).shape[0] == 3
    decoder = loader.open_decoder(target)
    assert decoder(torch.tensor([[1, 2]]), 0, loader.slot).shape[0] == 2
print("\\n".join(sorted(m for m in sys.modules if m.startswith("hm_export"))))
"""
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert {"hm_export.runtime_stubs.executorch_runner", "hm_export.runtime_stubs.onnx_runner"} <= set(loaded)
    assert [m for m in loaded if m.startswith(RUNTIME_FORBIDDEN)] == []
