"""The package's layering (docs/architecture.md): data flows one way, and no module reaches back up.

    validation, schema, options  (import nothing from the package)
    sampling                     (the unit draws both halves use: imports only the bottom layer)
    extraction/  analysis/       (the two halves: each imports only the bottom layer, never the other half)
    plot, demo, cli              (on top)

Only ``extraction/backends/keras.py`` imports Keras or TensorFlow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cnndiff_xr

PACKAGE = Path(cnndiff_xr.__file__).parent
HEAVY = {"keras", "tensorflow"}


def _imports(path: Path) -> set[str]:
    """Absolute names of what ``path`` imports (relative imports resolved against its package)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                found.add(name)
                found |= {f"{name}.{alias.name}" for alias in node.names}  # from . import x: a module x
            else:
                found.add(node.module or "")
    return found


def _modules(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py")) if sub else []


def _reaches(path: Path, prefixes: set[str]) -> set[str]:
    return {name for name in _imports(path)
            if any(name == p or name.startswith(p + ".") for p in prefixes)}


@pytest.mark.parametrize("path", _modules("analysis"), ids=lambda p: p.name)
def test_analysis_imports_neither_extraction_nor_the_top_nor_keras(path):
    forbidden = {"cnndiff_xr.extraction", "cnndiff_xr.plot", "cnndiff_xr.cli", "cnndiff_xr.demo", *HEAVY}
    assert not _reaches(path, forbidden)


@pytest.mark.parametrize("path", _modules("extraction"), ids=lambda p: p.name)
def test_extraction_imports_neither_analysis_nor_the_top(path):
    forbidden = {"cnndiff_xr.analysis", "cnndiff_xr.plot", "cnndiff_xr.cli", "cnndiff_xr.demo"}
    assert not _reaches(path, forbidden)


@pytest.mark.parametrize("name", ["validation.py", "schema.py", "options.py"])
def test_the_bottom_layer_imports_nothing_from_the_package(name):
    assert not _reaches(PACKAGE / name, {"cnndiff_xr"})


def test_the_shared_draws_import_only_the_bottom_layer():
    # extraction keeps the units that the analysis will draw: one draw function below both halves
    reached = _reaches(PACKAGE / "sampling.py", {"cnndiff_xr"})
    assert reached <= {"cnndiff_xr.options", "cnndiff_xr.validation", "cnndiff_xr.options.UNIT_TYPES",
                       "cnndiff_xr.options.UnitType"} | {f"cnndiff_xr.validation.{n}" for n in (
                           "ParameterTypeError", "ParameterValueError", "check_choice", "check_count", "check_int",
                           "check_n_units")}, reached


def test_only_the_keras_backend_imports_keras_or_tensorflow():
    importers = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if _reaches(p, HEAVY)}
    assert importers == {"extraction/backends/keras.py"}


def _functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}", node))
    return found


def test_no_function_takes_more_than_eight_positional_parameters():
    # parameters that can be passed by position are where a reordering gives wrong numbers with no error;
    # options are keyword-only, payloads between graph tasks are frozen dataclasses
    too_many, star_after = [], []
    for where, node in _functions():
        positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
        if len(positional) > 8:
            too_many.append(f"{where} ({len(positional)})")
        if node.args.vararg is not None and len(positional) > 4:
            star_after.append(f"{where} (*{node.args.vararg.arg} after {len(positional)})")
    assert not too_many and not star_after, too_many + star_after


def test_the_package_functions_are_found():
    assert len(_functions()) > 300  # the check above looks at the real package
