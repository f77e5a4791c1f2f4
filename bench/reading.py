"""Can the model read the items? How often an answer is one of the labels an item supports.

    python bench/reading.py [--task lamp2m] [--set readable] [--users 8] [--queries 3] [--margins 2,3,3.5,4]

On a shipped set whose items name what they support (LaMP-2, the readable level), per query:
the non-personalized answer (the shared task instruction, no user) and the answer step's item
reading (`Task.reading`: a plain few-shot completion, no user), each checked against the
labels the generator cued; and for each margin, the support the answer step would take (the
labels within the margin of the reading's best): whether it holds every cued label, and how
many labels it adds that the item does not cue. No user data is read: this measures the
model's reading, not the user.
"""

import argparse
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
import pandas as pd  # noqa: E402

from persona_agent.adapters.llm import adapter_for, build_lm  # noqa: E402
from persona_agent.data.loaders import load_users  # noqa: E402
from persona_agent.data.synthetic import CUES_2M, CUES_2N, SETS, _labels_cued, shipped_data_dir  # noqa: E402
from persona_agent.data.tasks import get_task  # noqa: E402
from persona_agent.pipelines import evidence  # noqa: E402
from persona_agent.pipelines.agent import non_personalized  # noqa: E402
from persona_agent.settings import LMConfig  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="lamp2m", choices=["lamp2m", "lamp2n"])
    p.add_argument("--set", default="readable", choices=SETS)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--queries", type=int, default=3)
    p.add_argument("--margins", default="2,3,3.5,4")
    p.add_argument("--lm", default="local")
    a = p.parse_args()
    task = get_task(a.task)
    cues = CUES_2M if task.key == "lamp2m" else CUES_2N
    lm = build_lm(LMConfig(model=a.lm))
    margins = [float(m) for m in a.margins.split(",")]
    rows = []
    with dspy.context(lm=lm, adapter=adapter_for(lm)):
        plain = non_personalized(task)
        for user in load_users(shipped_data_dir(task, a.set), task)[:a.users]:
            for q in user.queries[:a.queries]:
                cued = set(_labels_cued(cues, task.query_content(q.input), a.set.startswith("readable")))
                text, prefix = task.reading(q.input)
                read = evidence.label_logprobs(lm, [{"role": "user", "content": text}], prefix, labels=task.labels,
                                               expand="all", missing=-math.inf, lead=" ")
                row = {"user": user.user_id, "non-personalized in cued": task.normalize(plain(query=q.input).answer) in cued,
                       "reading's best in cued": max(read, key=read.get) in cued}
                for m in margins:
                    support = set(evidence.supported(read, m))
                    row[f"m={m:g}: covers"] = cued <= support
                    row[f"m={m:g}: extra"] = len(support - cued)
                rows.append(row)
    table = pd.DataFrame(rows).drop(columns="user").mean().to_frame(f"{task.name} {a.set}, n={len(rows)}")
    print(table.to_string(float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
