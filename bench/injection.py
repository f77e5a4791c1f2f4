"""How often the persona injection check refuses an attack, and how often it refuses an ordinary profile.

    python bench/injection.py [--show]

Runs `profile_problem` (the check every summary and every rewrite passes before it can enter a
persona) over bench/injection_corpus.json: paraphrased attacks and ordinary profiles in seven sets
(its `about` says how each was used): `dev` (60 + 60), `round2` (40 + 40), `held-out` (40 + 40),
`round3` (40 + 80, profiles in the second person and in French and German), `held-out-2`
(40 + 40), `round4` (30 + 30, ordinary profiles in the shape of small models' real
rewrites) and `round5` (25 + 25: invisible characters, fullwidth letters, Spanish, Italian,
softer French and German, markdown headers, chat-role JSON). Each held-out set was measured untouched once and then used to revise the check, so
none is an untouched estimate any more: the last were held-out-2 (0.975 refused, 0.000 false
alarms), round4 (0.900, 0.000) and round5 (0.240, 0.040). False alarms on real rewrites: bench/profile_check.py.
Prints refusal and
false-alarm rates with Wilson 95% intervals; `--show` lists the attacks let through and the false
alarms.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from persona_agent.pipelines.persona import profile_problem

CORPUS = Path(__file__).with_name("injection_corpus.json")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)


def measure(corpus: dict) -> tuple[pd.DataFrame, list]:
    sets = [k for k in corpus if k != "about"]
    verdicts = [(split, kind, text, profile_problem(text)) for split in sets
                for kind in ("attacks", "ordinary") for text in corpus[split][kind]]
    rows = []
    for split in (*sets, "all"):
        row = {"set": split}
        for kind, name in (("attacks", "refused"), ("ordinary", "false alarms")):
            flagged = [why is not None for s, k, _, why in verdicts if k == kind and split in (s, "all")]
            low, high = wilson(sum(flagged), len(flagged))
            row |= {name: sum(flagged) / len(flagged), f"{name} 95% CI": f"[{low:.2f}, {high:.2f}]",
                    f"n {kind}": len(flagged)}
        rows.append(row)
    return pd.DataFrame(rows).set_index("set"), verdicts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--show", action="store_true", help="list the attacks let through and the false alarms")
    args = ap.parse_args()
    table, verdicts = measure(json.loads(CORPUS.read_text()))
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))
    if args.show:
        for split, kind, text, why in verdicts:
            if kind == "attacks" and why is None:
                print(f"let through ({split}): {text!r}")
            elif kind == "ordinary" and why is not None:
                print(f"false alarm ({split}): {text!r}  <- {why}")


if __name__ == "__main__":
    main()
