"""Compare two runs metric by metric, per user (their nested runs) and overall."""

from __future__ import annotations

import mlflow
import pandas as pd


def compare_runs(run_a: str, run_b: str) -> pd.DataFrame:
    """Long table: scope (user or 'overall'), metric, value in A, value in B, B - A.

    Users are matched by their nested runs' names; metrics only one side has are left out.
    """
    rows = []
    for scope, a, b in [("overall", _metrics([run_a]), _metrics([run_b]))] + _per_user(run_a, run_b):
        for metric in sorted(set(a) & set(b)):
            rows.append({"scope": scope, "metric": metric, "a": a[metric], "b": b[metric], "delta": b[metric] - a[metric]})
    return pd.DataFrame(rows, columns=["scope", "metric", "a", "b", "delta"])


def differing_params(run_a: str, run_b: str) -> pd.DataFrame:
    """The parameters whose values differ between the two runs (one side missing counts)."""
    client = mlflow.MlflowClient()
    a, b = client.get_run(run_a).data.params, client.get_run(run_b).data.params
    rows = [{"param": k, "a": a.get(k, "-"), "b": b.get(k, "-")} for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return pd.DataFrame(rows, columns=["param", "a", "b"])


def _metrics(run_ids) -> dict[str, float]:
    client = mlflow.MlflowClient()
    return dict(client.get_run(run_ids[0]).data.metrics)


def _children(run_id: str) -> pd.DataFrame:
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{run_id}'")


def _per_user(run_a: str, run_b: str):
    a, b = _children(run_a), _children(run_b)
    if a.empty or b.empty:
        return []
    name = "tags.mlflow.runName"
    out = []
    for user in sorted(set(a[name]) & set(b[name])):
        ra, rb = a[a[name] == user].iloc[0], b[b[name] == user].iloc[0]
        ma = {c[8:]: ra[c] for c in a.columns if c.startswith("metrics.") and pd.notna(ra[c])}
        mb = {c[8:]: rb[c] for c in b.columns if c.startswith("metrics.") and pd.notna(rb[c])}
        out.append((user, ma, mb))
    return out
