"""LM calls per user per alignment iteration, for each loss mode, counted with a scripted engine.

    python bench/alignment_calls.py [--batch 3] [--iterations 3] [--max-iters 1]

The scripted agent answers wrongly until the profile names the user's label, so every
iteration writes a candidate; the counts are what a real LM would be asked, call by call.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
import pandas as pd  # noqa: E402

from persona_agent.eval.tasks import LAMP_2M  # noqa: E402
from persona_agent.optimizers import PersonaAlignment  # noqa: E402
from persona_agent.pipelines.agent import PersonaAgent  # noqa: E402
from persona_agent.pipelines.memory import EpisodicMemory, MemoryItem, UserMemory  # noqa: E402
from persona_agent.pipelines.persona import Persona  # noqa: E402
from persona_agent.testing import FakeEngine  # noqa: E402


def policy(fields, system, user):
    if "next_tool_name" in fields:
        return {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}}
    if fields == ["answer"]:
        return {"answer": "action" if "Prefers action" in system else "comedy"}
    if fields == ["critique"]:
        return {"critique": "The user chose action."}
    return {"new_profile": "Prefers action over comedy."}  # the update


def run(loss, guard, batch, iterations, max_iters):
    memory = EpisodicMemory.open(":memory:")
    memory.add("u", [MemoryItem(f"h{i}", f"A film about heist {i}.", "action") for i in range(10)])
    train = [dspy.Example(query=LAMP_2M.make_input(f"A film about heist {i}.", LAMP_2M.labels), answer="action",
                          item_id=f"h{i}").with_inputs("query") for i in range(10)]
    student = PersonaAgent(Persona(LAMP_2M, "Likes comedy."), UserMemory(memory, "u", k=5), max_iters=max_iters)
    lm = dspy.LM("fake/counting", engine=FakeEngine(policy), cache=False)
    opt = PersonaAlignment(batch, iterations, loss=loss, guard=guard)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        opt.compile(student, trainset=train)
    memory.close()
    return [s.lm_calls for s in opt.steps], [s.reason for s in opt.steps]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--max-iters", type=int, default=1, help="ReAct steps per simulated answer")
    a = ap.parse_args()
    rows = []
    for loss in ("per_interaction", "batch"):
        for guard in (False, True):
            calls, reasons = run(loss, guard, a.batch, a.iterations, a.max_iters)
            rows.append({"loss": loss, "guard": guard, "calls per iteration": calls, "total": sum(calls),
                         "stopped": reasons[-1]})
    print(f"n={a.batch}, T={a.iterations}, {a.max_iters + 1} LM calls per simulated answer")
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
