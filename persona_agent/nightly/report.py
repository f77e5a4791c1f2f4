"""`persona-agent report`: is personalization getting better or worse, night after night?

Every nightly run scores each changed user's production persona on the interactions that
arrived since it was aligned, before they are learned from (`jobs.prequential`), and
logs one row per scored interaction (`prequential.json`). This collects those rows over the
nights into a CSV and a PNG, overall and per user, and names the users whose score fell.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402

from persona_agent.adapters import tracking  # noqa: E402
from persona_agent.data.tasks import Task  # noqa: E402
from persona_agent.nightly.jobs import fell  # noqa: E402

SCORES = ["production_score", "non_personalized_score"]


def scored_interactions(task: Task) -> pd.DataFrame:
    """Every interaction any nightly run of `task` scored, in the current experiment."""
    client, frames = mlflow.MlflowClient(), []
    for run in mlflow.search_runs(filter_string=f"tags.nightly_task = '{task.key}'", output_format="list"):
        if any(f.path == "prequential.json" for f in client.list_artifacts(run.info.run_id)):
            frames.append(mlflow.load_table("prequential.json", run_ids=[run.info.run_id]))
    columns = ["night", "user_id", "item_id", *SCORES]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def per_night(scored: pd.DataFrame) -> pd.DataFrame:
    """Mean scores and n per (night, user), and per night over all users (user_id "all")."""
    stats = {"n": ("production_score", "size"), **{name: (name, "mean") for name in SCORES}}
    users = scored.groupby(["night", "user_id"], as_index=False).agg(**stats)
    overall = scored.groupby("night", as_index=False).agg(**stats).assign(user_id="all")
    table = pd.concat([users, overall], ignore_index=True)
    return table.sort_values(["night", "user_id"], ignore_index=True)[["night", "user_id", "n", *SCORES]]


def regressions(table: pd.DataFrame, k: int) -> pd.DataFrame:
    """Users whose production score on their latest scored night is below their mean over the up
    to `k` scored nights before it."""
    rows = []
    for user, t in table[table.user_id != "all"].groupby("user_id"):
        t = t.sort_values("night")
        if len(t) < 2:
            continue
        last, before = t.iloc[-1], t.iloc[-1 - k:-1]
        if fell(last.production_score, before.production_score.tolist()):
            mean = before.production_score.mean()
            rows.append({"user_id": user, "night": int(last.night), "score": last.production_score,
                         f"mean of previous {len(before)}": mean, "drop": mean - last.production_score})
    return pd.DataFrame(rows)


@dataclass
class Report:
    table: pd.DataFrame
    fell: pd.DataFrame
    csv: Path
    png: Path


def write_report(task: Task, out: Path, k: int = 3) -> Report:
    scored = scored_interactions(task)
    if scored.empty:
        raise LookupError(f"no nightly run of {task.key} has scored anything yet: the first night aligns new users, "
                          "the nights after it score them")
    table = per_night(scored)
    fell = regressions(table, k)
    out.mkdir(parents=True, exist_ok=True)
    csv, png = out / f"prequential-{task.key}.csv", out / f"prequential-{task.key}.png"
    table.to_csv(csv, index=False)
    _plot(table, task, png)
    with mlflow.start_run(run_name=f"report-{task.key}-last{k}-{time.strftime('%m%d-%H%M')}",
                          tags=tracking.owner_tags("report")):
        mlflow.log_params({"task": task.key, "last": k, "nights": table.night.nunique()})
        mlflow.log_artifact(str(csv))
        mlflow.log_artifact(str(png))
        mlflow.log_metric("users_fell", len(fell))
    return Report(table, fell, csv, png)


def _plot(table: pd.DataFrame, task: Task, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for user, t in table[table.user_id != "all"].groupby("user_id"):
        ax.plot(t.night, t.production_score, color="tab:blue", alpha=0.15, linewidth=1)
    overall = table[table.user_id == "all"]
    ax.plot(overall.night, overall.production_score, "o-", color="tab:blue", linewidth=2.5,
            label="production persona (all users)")
    ax.plot(overall.night, overall.non_personalized_score, "s--", color="tab:gray", linewidth=2,
            label="non-personalized (same items)")
    for _, row in overall.iterrows():
        ax.annotate(f"n={int(row.n)}", (row.night, row.production_score), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=8)
    ax.set(xlabel="night", ylabel=f"score per interaction ({task.name}; 1 = right)", ylim=(-0.05, 1.1),
           title=f"{task.name}: production personas on each night's new interactions (thin: one user)")
    ax.set_xticks(sorted(overall.night.unique()))
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
