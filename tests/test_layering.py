"""The straight line of docs/DESIGN.md: no itmkit module imports one above it (at module level or
inside a function), except the two lookups by name the design names."""

import ast
from pathlib import Path

import itmkit

PACKAGE = Path(itmkit.__file__).parent

# lowest first; a module may import its own layer and those below
LAYERS = [
    ("itmkit.paths", "itmkit.config_checks", "itmkit.config", "itmkit.runtime", "itmkit.encoded", "itmkit.checkpoints",
     "itmkit.distributed"),
    ("itmkit.data",),
    ("itmkit.models",),
    ("itmkit.similarity",),
    ("itmkit.losses",),
    ("itmkit.methods", "itmkit.reported"),
    ("itmkit.evaluate",),
    ("itmkit.train",),
    ("itmkit.runs",),
    ("itmkit.figures",),
    ("itmkit.explorer",),
    ("itmkit.course", "itmkit.cli", "itmkit.__main__", "itmkit"),
]
# (importer, imported): lookups by name that cross the line inside a function (docs/DESIGN.md)
ALLOWED = {
    ("itmkit.models.base", "itmkit.similarity.engine"),  # MatchingModel.similarity hands pairwise methods to the engine
    ("itmkit.config", "itmkit.methods.registry"),  # config_from_run_dict: a method name -> its config class
}


def layer(module: str) -> int:
    """The rank of ``module``'s layer (``itmkit`` itself, the package root, is the top)."""
    for rank, prefixes in enumerate(LAYERS):
        if any(module.startswith(prefix + ".") or module == prefix for prefix in prefixes if prefix != "itmkit"):
            return rank
    return len(LAYERS) - 1


def imports(path: Path):
    """Every module ``path`` imports, anywhere in the file (``from a import b`` gives ``a`` and, when
    ``b`` is a module, ``a.b``)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}"))
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")
    base = PACKAGE.parent.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_one_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for imported in imports(path):
            if imported.split(".")[0] != "itmkit" or (importer, imported) in ALLOWED:
                continue
            if layer(imported) > layer(importer):
                upward.append(f"{importer} -> {imported}")
    assert not upward, "imports that run back up the line:\n" + "\n".join(sorted(set(upward)))


def test_the_trainer_does_not_open_runs_through_itmkit_runs():
    source = (PACKAGE / "train" / "trainer.py").read_text(encoding="utf-8")
    assert "itmkit.runs" not in source
