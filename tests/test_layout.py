"""The package layout: rooms, the direction of imports, sizes, and the old import paths."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

import bptt_mlip
from bptt_mlip import _moved

PACKAGE = Path(bptt_mlip.__file__).parent
GENERIC_ROOMS = ("relax", "training")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _library_modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "default" not in p.parts)


def _imported_modules(path: Path) -> set[str]:
    """Modules a file imports, leaving out a module ``__getattr__`` (the shim that hands an old
    name its new home, with a warning, and is no dependency of the room)."""
    names = set()
    tree = ast.parse(path.read_text())
    shims = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
    skipped = {id(sub) for shim in shims for sub in ast.walk(shim)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("room", GENERIC_ROOMS)
def test_generic_rooms_import_no_force_model(room):
    offenders = {}
    for path in sorted((PACKAGE / room).glob("*.py")):
        bad = sorted(m for m in _imported_modules(path) if m.startswith("bptt_mlip.models") or m == "bptt_mlip.workflow"
                     or m.startswith("bptt_mlip.workflow."))
        if bad:
            offenders[path.name] = bad
    assert not offenders, f"bptt_mlip/{room} must not depend on force models or the workflow: {offenders}"


def test_data_imports_nothing_above_it():
    above = ("bptt_mlip.models", "bptt_mlip.relax", "bptt_mlip.training", "bptt_mlip.workflow")
    offenders = {p.name: sorted(m for m in _imported_modules(p) if m.startswith(above))
                 for p in sorted((PACKAGE / "data").glob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}


def _docstring_lines(node) -> int:
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno - first.lineno + 1
    return 0


def test_module_and_function_sizes():
    """Modules of at most 400 lines; functions of at most 60 lines of code (signature and body, the
    docstring not counted)."""
    too_long_modules, too_long_functions = [], []
    for path in _library_modules():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long_modules.append(f"{path.relative_to(PACKAGE)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
                if length > MAX_FUNCTION_LINES:
                    too_long_functions.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long_modules, too_long_modules
    assert not too_long_functions, too_long_functions


@pytest.mark.parametrize("old,new", sorted(_moved.MOVED.items()))
def test_old_import_paths_work_and_name_the_new_module(old, new):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # the alias must not rename the real module
    assert any(new in str(w.message) and issubclass(w.category, DeprecationWarning) for w in caught), [
        str(w.message) for w in caught]


def test_old_attribute_access_names_the_new_module():
    vars(bptt_mlip).pop("fire", None)  # an earlier `import bptt_mlip.fire` binds the attribute (no warning then)
    with pytest.warns(DeprecationWarning, match="bptt_mlip.relax.fire"):
        fire = bptt_mlip.fire
    assert fire is importlib.import_module("bptt_mlip.relax.fire")
    with pytest.raises(AttributeError, match="no_such_thing"):
        bptt_mlip.no_such_thing  # noqa: B018


@pytest.mark.parametrize("name", sorted(_moved.REMOVED))
def test_removed_names_say_what_replaced_them(name):
    with pytest.raises(AttributeError, match=f"bptt_mlip.{name} was removed: .*(use|step rule)"):
        getattr(bptt_mlip, name)


def test_normalizer_fit_moved_out_of_the_loops_names_its_new_home():
    from bptt_mlip.training import loops

    with pytest.warns(DeprecationWarning, match="bptt_mlip.models.adapt.normalizer_from_trajectories"):
        fn = loops.normalizer_from_trajectories
    assert fn is importlib.import_module("bptt_mlip.models.adapt").normalizer_from_trajectories
