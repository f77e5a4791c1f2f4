"""A week in miniature: synthetic users' histories arrive day by day, `nightly` runs after each
day's `ingest`, then `report` draws the prequential trend.

    python bench/nightly_trend.py --store /tmp/trend [--lm scripted] [--users 4] [--nights 3]

Day 0 brings the first half of each user's history (the first night aligns them); each of the
`--nights` days after it brings an equal share of the rest, which that night's run scores the
production personas on before learning from it. Prints the report's per-night table; the CSV
and PNG land in `<store>/reports/`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from persona_agent.cli import main
from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M
from persona_agent.pipelines.ingest import read_source


def days(n_users: int, n_history: int, nights: int, seed: int) -> list[list[dict]]:
    """Events per day: day 0 is the first half of every history, then `nights` equal shares."""
    data = write_dataset(Path(tempfile.mkdtemp()), LAMP_2M, n_users=n_users, n_history=n_history, n_queries=1,
                         seed=seed)
    out = [[] for _ in range(nights + 1)]
    for user, items in read_source(data, LAMP_2M).items():
        items = sorted(items, key=lambda it: (it.date or "", it.item_id))
        half = len(items) // 2
        shares = [items[:half]] + [items[half + k::nights] for k in range(nights)]
        for day, share in enumerate(shares):
            out[day] += [{"user_id": user, "id": it.item_id, "input": LAMP_2M.make_input(it.text, LAMP_2M.labels),
                          "response": it.response, "timestamp": it.date} for it in share]
    return out


def run(store: Path, lm: str, n_users: int, n_history: int, nights: int, seed: int = 11) -> int:
    for day, events in enumerate(days(n_users, n_history, nights, seed)):
        store.mkdir(parents=True, exist_ok=True)
        path = store / f"day{day}.jsonl"
        path.write_text("\n".join(json.dumps(e) for e in events))
        print(f"== day {day}: {len(events)} new interactions")
        for argv in (["ingest", str(path)], ["nightly", "--lm", lm, "-n", "2", "-T", "1"]):
            code = main([*argv, "--store", str(store)])
            if code != 0:
                return code
    return main(["report", "--store", str(store), "--last", "2"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--lm", default="scripted")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--history", type=int, default=16)
    ap.add_argument("--nights", type=int, default=3)
    a = ap.parse_args()
    raise SystemExit(run(a.store, a.lm, a.users, a.history, a.nights))
