"""The package's layering rule, read from the source (ast), so a newcomer can trust the folder tree.

Each top-level part of ``nemo_speechlm`` has a layer; a module may import only from its own part
or from lower layers, and the offline jobs (layer ``JOBS``) never import each other:

    errors.py                                      0  user-fixable errors
    modules/, tts/                                 1  encoders, adapters; speech synthesizers
    parts/                                         2  LLM loading, prompting, decoding, runner, metrics, ...
    data/                                          3  manifests, utterances, conversations, batches
    models/                                        4  the core model, its objectives, loading, answering
    datagen/, evaluation/, inference.py, recipe.py 5  offline jobs and entry points, never sideways

Every import counts, also those inside functions. ``import nemo_speechlm`` (the package root:
``__version__``, ``CONF_DIR``) and the package's own ``__init__`` are outside the rule. Modules
must also not import each other in a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = "nemo_speechlm"
JOBS = 5
LAYERS = {
    "errors": 0,
    "modules": 1,
    "tts": 1,
    "parts": 2,
    "data": 3,
    "models": 4,
    "datagen": JOBS,
    "evaluation": JOBS,
    "inference": JOBS,
    "recipe": JOBS,
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, name: str, is_package: bool) -> set[str]:
    """Every ``nemo_speechlm`` module ``source`` imports, anywhere in the file (relative imports resolved)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # ``from nemo_speechlm.data import manifest`` imports the submodule
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def part_of(module: str) -> str | None:
    """The top-level part (``data``, ``models``, ``inference``, ...) a module belongs to; None for the root."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else None


def layering_violations(modules: dict[str, set[str]], known: set[str]) -> list[str]:
    """``importer -> imported: why`` for each import that breaks the rule; ``known`` are the real modules."""
    problems = []
    for importer, imports in sorted(modules.items()):
        if importer == PACKAGE:
            continue
        own = part_of(importer)
        if own not in LAYERS:
            problems.append(f"{importer}: not in any layer (add its part to LAYERS in tests/test_layering.py)")
            continue
        for imported in sorted(imports):
            if imported == PACKAGE or imported not in known:
                continue  # the root, or a name inside a module (``from x import name``)
            other = part_of(imported)
            if other == own:
                continue
            if other not in LAYERS:
                problems.append(f"{importer} -> {imported}: {other!r} is in no layer")
            elif LAYERS[other] > LAYERS[own]:
                problems.append(f"{importer} -> {imported}: upward (layer {LAYERS[own]} imports layer {LAYERS[other]})")
            elif LAYERS[other] == LAYERS[own]:
                what = "one job imports another" if own in _jobs() else "same layer, other part"
                problems.append(f"{importer} -> {imported}: sideways ({what})")
    return problems


def import_cycles(modules: dict[str, set[str]], known: set[str]) -> list[list[str]]:
    """Cycles among modules (package ``__init__`` files, which only re-export, left out)."""
    packages = {m for m in known if any(k.startswith(m + ".") for k in known)}
    graph = {m: {i for i in imps if i in known and i not in packages and i != m}
             for m, imps in modules.items() if m not in packages}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return cycles


def _jobs() -> set[str]:
    return {part for part, layer in LAYERS.items() if layer == JOBS}


def read_package(root: Path) -> tuple[dict[str, set[str]], set[str]]:
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        name = module_name(path, root)
        modules[name] = imported_modules(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
    return modules, set(modules)


def test_every_import_goes_down_the_layers():
    modules, known = read_package(REPO)
    assert len(modules) > 50 and {"nemo_speechlm.models.speechlm_model", "nemo_speechlm.data.manifest"} <= known
    assert layering_violations(modules, known) == []


def test_no_import_cycles():
    modules, known = read_package(REPO)
    assert import_cycles(modules, known) == []


def test_every_part_has_a_layer():
    parts = {part_of(m) for m in read_package(REPO)[1]} - {None}
    assert parts == set(LAYERS), f"parts without a layer: {parts - set(LAYERS)}; layers without a part: {set(LAYERS) - parts}"


# --------------------------------------------------------------------------- the checker itself


def _synthetic(tmp_path: Path, files: dict[str, str]) -> list[str]:
    for rel, text in files.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    modules, known = read_package(tmp_path)
    return layering_violations(modules, known) + [" -> ".join(c) for c in import_cycles(modules, known)]


GOOD = {
    "__init__.py": "from nemo_speechlm.data import manifest\n",
    "errors.py": "",
    "parts/__init__.py": "",
    "parts/runner.py": "from nemo_speechlm.errors import InputError\nimport nemo_speechlm\n",
    "data/__init__.py": "",
    "data/manifest.py": "from nemo_speechlm.parts.runner import run\nfrom . import audio\n",
    "data/audio.py": "",
    "models/__init__.py": "",
    "models/core.py": "from nemo_speechlm.data import manifest\n",
    "evaluation/__init__.py": "",
    "evaluation/bench.py": "from nemo_speechlm.models.core import Model\nfrom ..parts import runner\n",
    "datagen/__init__.py": "",
    "datagen/job.py": "def f():\n    from nemo_speechlm.data.manifest import read\n",
}


def test_checker_accepts_downward_imports(tmp_path):
    assert _synthetic(tmp_path, GOOD) == []


@pytest.mark.parametrize(
    "rel, text, expected",
    [
        ("data/alignment.py", "from nemo_speechlm.datagen.job import run\n", "upward"),
        ("models/core.py", "def f():\n    import nemo_speechlm.evaluation.bench\n", "upward"),
        ("datagen/job.py", "from nemo_speechlm.evaluation import bench\n", "sideways (one job imports another)"),
        ("evaluation/bench.py", "from ..datagen.job import f\n", "sideways (one job imports another)"),
        ("tools/x.py", "", "not in any layer"),
        ("data/audio.py", "from nemo_speechlm.data.manifest import read\n", "nemo_speechlm.data.audio -> nemo_speechlm.data.manifest"),
    ],
)
def test_checker_finds_a_violation(tmp_path, rel, text, expected):
    problems = _synthetic(tmp_path, {**GOOD, rel: text})
    assert any(expected in p for p in problems), problems
