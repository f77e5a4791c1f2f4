"""Do the local model's profiles find the rules planted in the shipped synthetic users?

    python bench/profile_rules.py [--tasks lamp2m,lamp2n,lamp3] [--lm local] [--users 8]

For each user of each shipped set, the profile `persona-agent` writes (semantic memory, from the
latest `profile_items` history items, as every command writes it) is checked against the
user's planted rule in `rules.json`:

- LaMP-2M / LaMP-2N: does the profile name one of the user's top-2 planted labels?
- LaMP-3: does it state the direction of the user's rating bias (harsher / more generously)?

Also printed: the stricter check on the first preference alone (LaMP-2), the same check on the
facts the profile writer is given (the three most frequent labels, or the suggested lean: what
copying the counts alone would score), and how many profiles were refused.
"""

import argparse
import json
import os
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
import pandas as pd  # noqa: E402
from rich.console import Console  # noqa: E402

from persona_agent.adapters.llm import adapter_for, build_lm  # noqa: E402
from persona_agent.data.loaders import load_users  # noqa: E402
from persona_agent.data.synthetic import shipped_data_dir  # noqa: E402
from persona_agent.data.tasks import get_task  # noqa: E402
from persona_agent.pipelines.flow import summarize  # noqa: E402
from persona_agent.pipelines.memory import history_items  # noqa: E402
from persona_agent.pipelines.metering import metered  # noqa: E402
from persona_agent.runtime.progress import progress_bar  # noqa: E402
from persona_agent.settings import LMConfig, Settings  # noqa: E402


def planted(task, rule: dict) -> str:
    """The rule as the check reads it: the top-2 labels, or the bias direction."""
    if "rating_bias" in rule:
        return "more generously" if rule["rating_bias"] > 0 else "harsher"
    return ", ".join((rule.get("tag_priority") or rule["category_priority"])[:2])


def found(task, text: str, rule: dict) -> bool:
    if "rating_bias" in rule:
        return planted(task, rule) in text.lower()
    top2 = planted(task, rule).split(", ")
    return any(re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", text.lower()) for label in top2)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="lamp2m,lamp2n,lamp3")
    p.add_argument("--lm", default="local")
    p.add_argument("--api-base")
    p.add_argument("--users", type=int, default=8)
    args = p.parse_args()
    settings = Settings(lm=LMConfig(model=args.lm, api_base=args.api_base, cache=False))
    lm = build_lm(settings.lm)
    rows = []
    started = time.perf_counter()
    with dspy.context(lm=lm, adapter=adapter_for(lm)), progress_bar(Console(stderr=True)) as progress:
        tasks = [get_task(t) for t in args.tasks.split(",")]
        people = {t.key: load_users(shipped_data_dir(t), t)[:args.users] for t in tasks}
        bar = progress.add_task("profiles", total=sum(map(len, people.values())))
        for task in tasks:
            rules = json.loads((shipped_data_dir(task) / "rules.json").read_text())
            for user in people[task.key]:
                items = history_items(task, user.history)
                with metered() as cost:
                    profile = summarize(task, items, settings.profile_items, who=user.user_id)
                facts = task.facts([(it.text, it.response) for it in items])
                # what copying the facts alone would say: the first three labels, or the suggested lean
                top_fact = ", ".join(re.findall(r"([^:,(]+) \(\d+ times\)", facts)[:3]) or facts.rsplit("score ", 1)[-1]
                rule = rules[user.user_id]
                rows.append({"task": task.name, "user": user.user_id, "planted": planted(task, rule),
                             "profile names it": found(task, profile, rule),
                             "first names it": (found(task, profile.partition(": ")[2].split(",")[0], rule)
                                                if task.preference_kind == "labels" else None),
                             "facts name it": found(task, top_fact, rule),
                             "refused": not profile, "fallbacks": cost.fallbacks, "profile": profile})
                progress.update(bar, advance=1, description=f"{task.name} {user.user_id}")
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 120)
    print(table.to_string(index=False))
    summary = table.groupby("task").agg(users=("user", "size"), profile_names_planted=("profile names it", "sum"),
                                        first_label_planted=("first names it", "sum"),
                                        facts_name_planted=("facts name it", "sum"),
                                        refused=("refused", "sum"))
    print()
    print(summary.to_string())
    print(f"\n{len(table)} profiles in {time.perf_counter() - started:.0f} s with --lm {args.lm}")


if __name__ == "__main__":
    main()
