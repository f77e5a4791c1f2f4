"""`Settings`: every default of the pipeline in one object, built from the command line and
passed down. It imports no LLM runtime, no MLflow and no Qdrant, so reading it is cheap."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LMConfig:
    model: str = "local"  # in-process Gemma 3 270M; `local:/path.gguf`, `scripted`, or any LiteLLM model
    api_base: str | None = None
    max_tokens: int = 384
    temperature: float = 0.0
    cache: bool = True
    retries: int = 3  # per call, with DSPy's backoff, for timeouts, 429s and 5xx (not for bad answers)
    timeout: float = 120.0  # seconds per remote request


@dataclass(frozen=True)
class Settings:
    store: Path = Path("mlruns")  # MLflow database, artifacts and embedded Qdrant all live here
    lm: LMConfig = field(default_factory=LMConfig)
    qdrant_url: str | None = None  # a Qdrant server instead of the embedded store
    experiment: str = "persona-agent"
    top_k: int = 5  # memories retrieved per query
    batch_size: int = 3  # n: latest interactions replayed per alignment iteration
    iterations: int = 3  # T: alignment iterations
    max_iters: int = 1  # ReAct steps per answer
    answer_step: str = "evidence"  # or "prompt": the paper's prompt-only agent (pipelines.evidence)
    prior_strength: float = 2.0  # evidence: how much the persona weighs (pipelines.evidence: first_fit, add_prior)
    support_margin: float = 3.5  # evidence, LaMP-2: nats below the reading's best a supported label may score (tuned on seed 1)
    loss: str = "per_interaction"  # or "batch": one critique call for the whole batch
    guard: bool = True  # False: the paper's loop, as acceptance "paper"
    acceptance: str = "consistent"  # which rewrite ships: optimizers.acceptance.ACCEPTANCE (docs/evaluation.md)
    holdout: int = 0  # older interactions a rewrite must not score worse on either
    redraw_temperature: float = 0.7  # after an iteration that shipped nothing, the next rewrite is drawn at this
    profile_items: int = 20  # latest history items the initial profile is written from
    workers: int = 4  # users in flight at once (eval, sweep, nightly)
    max_calls_per_user: int = 0  # nightly: LM calls one user may use per night (0: no limit)
    max_calls: int = 0  # nightly: LM calls per night in all (0: no limit)
    rollback_after: int = 0  # nightly: K > 0 rolls production back when it scores below its last K nights
    score_max: int = 5  # nightly: newest unseen interactions per user the production persona is scored on
    progress_every: float = 30.0  # seconds between progress lines when stderr is a log, not a terminal
    store_wait: float = 60.0  # seconds a command waits for another process to release the embedded memory
    committers: int = 4  # nightly: commit processes against a tracking server (a local SQLite store: 1)
    plan_all: bool = False  # nightly: read every user's memory to plan, not only the users `ingest` marked changed
    min_free_mb: int = 200  # a command that writes the store refuses to start (a commit, to go on) with less free

    @classmethod
    def for_demo(cls, **overrides) -> "Settings":
        """The demo's smaller budget (n=2, T=2, k=3): a first run should take a couple of minutes."""
        return cls(**{"batch_size": 2, "iterations": 2, "top_k": 3, **overrides})

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.database_path}"

    @property
    def database_path(self) -> Path:
        """MLflow's database, as the tracking URI names it. In a URL, `%`, `?` and `#` start an
        escape, a query and a fragment; percent-encoding them satisfies SQLAlchemy but not MLflow
        (it makes the encoded name as a directory). A store path holding them is reached through a
        plain-named symlink in the user's cache instead, which `tracking.setup` keeps pointing here."""
        path = self.store.resolve() / "mlflow.db"
        return self.store_alias / "mlflow.db" if set(str(path)) & set("%?#") else path

    @property
    def store_alias(self) -> Path:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cache / "persona-agent" / "stores" / hashlib.sha256(str(self.store.resolve()).encode()).hexdigest()[:16]

    # Every path under the store is named here, and nowhere else.

    @property
    def artifacts_path(self) -> Path:
        """Where runs keep their artifacts on a local tracking database."""
        return self.store.resolve() / "artifacts"

    @property
    def memory_lock(self) -> Path:
        """Taken while a command holds the embedded memory (one process at a time)."""
        return self.store / "memory.lock"

    @property
    def nightly_lock(self) -> Path:
        """Held by the one nightly run a store allows at a time."""
        return self.store / "nightly.lock"

    @property
    def state_db(self) -> Path:
        """Nightly state and which users changed (`adapters/state.py`)."""
        return self.store / "state.db"

    def eval_out(self, task_key: str, stamp: str) -> Path:
        """Where one `eval` writes its tables and predictions by default."""
        return self.store / "eval" / f"{task_key}-{stamp}"

    @property
    def sweeps_path(self) -> Path:
        return self.store / "sweeps"

    @property
    def reports_path(self) -> Path:
        return self.store / "reports"

    @property
    def qdrant_path(self) -> Path:
        """The embedded memory: a Qdrant Edge shard."""
        return self.store / "qdrant-edge"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local tracking URI: `sqlite:///PATH`, or SQLite's URI form
    `sqlite:///file:PATH?mode=ro&uri=true` (a store opened read-only); None for a tracking server."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///")
    return Path(path.removeprefix("file:").split("?")[0] if path.startswith("file:") else path)


def offline_environment() -> None:
    """Keep libraries from reaching for the network: no telemetry, no price lists, no hub."""
    for key, value in {"MLFLOW_DISABLE_TELEMETRY": "true", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1",
                       # MLflow's "Downloading artifacts" bars on stderr (forget reads every artifact table)
                       "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
        os.environ.setdefault(key, value)
