"""The house: layers import one way (application > optimizers > pipelines > signatures > eval),
with no cycles, as declared in pyproject.toml's import-linter contracts."""

from pathlib import Path

import grimp
from importlinter.cli import lint_imports

ROOT = Path(__file__).parents[1]


def test_every_folder_is_part_of_the_checked_package():
    # persona_agent/X links to the top-level folder X/; were a link missing, the contract would
    # pass without ever reading that folder.
    modules = grimp.build_graph("persona_agent").modules
    for folder in ("signatures", "pipelines", "optimizers", "eval"):
        files = {p.stem for p in (ROOT / folder).glob("*.py") if p.stem != "__init__"}
        assert files and {f"persona_agent.{folder}.{f}" for f in files} <= modules, folder


def test_the_import_contracts_hold():
    # Exit code 0 only if every contract is kept; the report names each broken import.
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_reading_settings_loads_no_llm_runtime_store_or_tracking():
    import subprocess
    import sys

    probe = ("import sys, persona_agent.runtime.settings, persona_agent.cli; "
             "print(sorted(m for m in ('dspy', 'mlflow', 'qdrant_client', 'xllamacpp', 'litellm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
