"""The house: folders are layers that import one way (cli > commands > rooms > runtime > adapters >
settings > optimizers > pipelines > signatures > data > overrides), with no cycles, as declared in
pyproject.toml's import-linter contracts, and docs/architecture.md draws every room of it."""

import ast
import re
from pathlib import Path

import grimp
import tomllib
from importlinter.cli import lint_imports

ROOT = Path(__file__).parents[1]
LINKED = ("signatures", "pipelines", "optimizers", "eval", "data")  # top-level folders, linked into persona_agent/


def test_every_folder_is_part_of_the_checked_package():
    # persona_agent/X links to the top-level folder X/; were a link missing, the contract would
    # pass without ever reading that folder.
    modules = grimp.build_graph("persona_agent").modules
    for folder in LINKED:
        files = {p.stem for p in (ROOT / folder).glob("*.py") if p.stem != "__init__"}
        assert files and {f"persona_agent.{folder}.{f}" for f in files} <= modules, folder


def _bare_imports(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        found += [f"{path.relative_to(root)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in LINKED]
    return found


def test_no_module_imports_a_top_level_folder_by_its_bare_name(tmp_path):
    # From the repository root `pipelines.metering` would import as a second module beside
    # `persona_agent.pipelines.metering`, with its own context variables and caches.
    sources = [p for folder in (*LINKED, "persona_agent", "tests", "bench", "examples")
               for p in (ROOT / folder).rglob("*.py") if not any(part in LINKED for part in p.relative_to(ROOT).parts[1:-1])]
    assert len(sources) > 40
    assert [hit for p in sources for hit in _bare_imports(p)] == []
    planted = tmp_path / "planted.py"  # the check sees each form of a bare import
    planted.write_text("import os\nfrom pipelines.metering import metered\nimport eval.harness\n"
                       "def f():\n    from data import tasks\nfrom persona_agent.data import tasks\nfrom . import x\n")
    assert _bare_imports(planted, tmp_path) == ["planted.py:2: pipelines.metering", "planted.py:3: eval.harness",
                                                "planted.py:5: data"]


def test_the_import_contracts_hold():
    # Exit code 0 only if every contract is kept; the report names each broken import.
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_reading_settings_loads_no_llm_runtime_store_or_tracking():
    import subprocess
    import sys

    probe = ("import sys, persona_agent.settings, persona_agent.cli; "
             "print(sorted(m for m in ('dspy', 'mlflow', 'qdrant_client', 'xllamacpp', 'litellm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _rooms() -> set[str]:
    """Every folder of the package (its path as the docs write it) and every module in it."""
    rooms = set()
    for path in (ROOT / "persona_agent").rglob("*.py"):
        rel = path.resolve().relative_to(ROOT)
        if path.stem != "__init__":
            rooms.add(path.stem)
        rooms.add(f"{rel.parent}/" if rel.parent != Path(".") else str(rel))
    return rooms


def test_the_architecture_page_names_every_layer_folder_and_module():
    """A folder, module or layer added without its line in docs/architecture.md fails here."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layers = {name.strip() for layer in contract["layers"] for name in re.split(r"[:|]", layer)}
    table = {row.split("|")[1].strip() for row in page.splitlines() if row.startswith("| ") and row.count("|") >= 4}
    named = set(re.findall(r"[\w/.]+", page))
    missing = sorted(room for room in _rooms() if room.rstrip("/").split("/")[-1] not in named and room not in named)
    assert missing == [], f"docs/architecture.md does not name {missing}"
    rows = {"cli", "commands", "rooms", "runtime", "adapters", "settings", "optimizers", "pipelines", "signatures",
            "data",
            "overrides"}
    assert table - {"layer", "", "---"} == rows, table
    assert layers - {"cli", "demo", "eval", "nightly", "serving", "operations"} <= rows, layers
