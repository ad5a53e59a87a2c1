"""The shape of the code: the library imports nothing from the experiment layer, nothing but the CLI imports the
benchmarks (which use public functions only), and every function and class stays readable in size."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "distillmt"
LIBRARY = {
    "errors", "io", "data", "prompts", "models", "engines", "losses", "forward", "checkpoints", "train", "generate",
    "logit_cache", "teacher_labels", "metrics", "comet", "stats", "e5", "store", "sections", "languages", "tracking",
}  # fmt: skip
EXPERIMENT = {"config", "systems", "stages", "pipeline", "sweep", "report", "plots", "export"}
TOOLS = {"cli", "bench", "__main__", "__init__", "api"}


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.glob("*.py"))}


def imported(tree: ast.Module) -> set[tuple[str, str | None]]:
    """``(module, name)`` for every distillmt import in the file, at the top or inside functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distillmt"):
            if node.module == "distillmt":  # from distillmt import engines
                out |= {(a.name, None) for a in node.names}
            else:
                out |= {(node.module.split(".")[1], a.name) for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {(a.name.split(".")[1], None) for a in node.names if a.name.startswith("distillmt.")}
    return out


def test_every_module_has_a_layer():
    assert set(modules()) == LIBRARY | EXPERIMENT | TOOLS


def test_the_library_imports_nothing_from_the_experiment_layer_or_the_tools():
    for name, tree in modules().items():
        if name in LIBRARY:
            bad = {m for m, _ in imported(tree)} - LIBRARY
            assert not bad, f"library module {name} imports {sorted(bad)}"


def test_the_experiment_layer_imports_no_tools_and_only_the_cli_imports_the_benchmarks():
    for name, tree in modules().items():
        targets = {m for m, _ in imported(tree)}
        if name in EXPERIMENT:
            assert not targets & TOOLS, f"{name} imports {sorted(targets & TOOLS)}"
        if name != "cli":
            assert "bench" not in targets or name == "bench", f"{name} imports the benchmarks"


def test_inference_does_not_import_training():
    for name in ("generate", "logit_cache", "teacher_labels"):
        assert "train" not in {m for m, _ in imported(modules()[name])}, name


def test_the_benchmarks_use_public_functions_only():
    private = {(m, n) for m, n in imported(modules()["bench"]) if n and n.startswith("_")}
    assert not private, f"bench imports private names: {sorted(private)}"


def test_functions_and_classes_stay_within_size():
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            size = node.end_lineno - node.lineno + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert size <= 100, f"{name}.{node.name}: {size} lines"
            elif isinstance(node, ast.ClassDef):
                assert size <= 300, f"{name}.{node.name}: {size} lines"
