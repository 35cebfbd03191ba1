"""The package's shape: imports flow one way (cli -> train/bench/interop/detection -> data, models -> layers
-> reversible), nothing imports the CLI, and no source file is over 500 lines."""
import ast
from pathlib import Path

import pytest

import revvit

ROOT = Path(revvit.__file__).parent
# what each part of the package may import of revvit; `io` is the package's small shared file utility
ALLOWED = {
    "reversible": set(),
    "io": set(),
    "layers": {"reversible"},
    "models": {"layers", "reversible"},
    "data": {"io"},
    "interop": {"models", "layers", "reversible", "io"},
    "bench": {"models", "layers", "reversible", "io"},
    "detection": {"data", "models", "layers", "reversible", "interop", "train", "io"},  # train: checkpoint RNG state
    "train": {"data", "models", "layers", "reversible", "interop", "bench", "io"},
    "cli": {"train", "bench", "interop", "detection", "data", "models", "layers", "reversible", "io"},
}
SOURCES = sorted(p for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT)


def part_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def revvit_imports(path: Path) -> set[str]:
    """The parts of revvit (first name below `revvit.`) that a source file imports."""
    package = ["revvit", *path.relative_to(ROOT).parent.parts]
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = [*base, *(node.module.split(".") if node.module else [])]
            names = [module + [a.name] for a in node.names] if not node.module else [module]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        parts.update(n[1] for n in names if len(n) > 1 and n[0] == "revvit")
    return parts


def test_the_layout_knows_every_part_of_the_package():
    assert {part_of(p) for p in SOURCES} <= set(ALLOWED)


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_imports_flow_one_way(path):
    part = part_of(path)
    wrong = revvit_imports(path) - ALLOWED[part] - {part, "__version__"}  # a constant of the root module
    assert not wrong, f"{path.relative_to(ROOT)} ({part}) imports {sorted(wrong)} of revvit"


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_source_file_is_over_500_lines(path):
    assert len(path.read_text().splitlines()) <= 500
