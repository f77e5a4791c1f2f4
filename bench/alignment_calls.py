"""LM calls per alignment iteration: the guarded loop against the paper's, per batch size n.

    python bench/alignment_calls.py [--batch 1,3,5] [--iterations 3] [--max-iters 1]

The scripted agent answers wrongly until the profile names the user's label, so every
iteration writes a candidate; the counts are what a real LM would be asked, call by call.
The paper's loop (`--no-guard`) replays the batch, critiques each answer and rewrites; the
guarded loop (the default) also replays the batch with the candidate before promoting it.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
import pandas as pd  # noqa: E402

from persona_agent.adapters.fakes import FakeEngine  # noqa: E402
from persona_agent.adapters.points import open_memory
from persona_agent.data.tasks import LAMP_2M  # noqa: E402
from persona_agent.optimizers import PersonaAlignment  # noqa: E402
from persona_agent.pipelines.agent import PersonaAgent  # noqa: E402
from persona_agent.pipelines.memory import MemoryItem, UserMemory  # noqa: E402
from persona_agent.pipelines.persona import Persona  # noqa: E402


def policy(fields, system, user):
    if "next_tool_name" in fields:
        return {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}}
    if fields == ["answer"]:
        return {"answer": "action" if "Prefers action" in system else "comedy"}
    if fields == ["critique"]:
        return {"critique": "The user chose action."}
    return {"preferences": ["action"], "new_profile": "Prefers action over comedy."}  # the update (typed)


def run(loss, guard, batch, iterations, max_iters):
    memory = open_memory(":memory:")
    memory.add("u", [MemoryItem(f"h{i}", f"A film about heist {i}.", "action") for i in range(10)])
    train = [dspy.Example(query=LAMP_2M.make_input(f"A film about heist {i}.", LAMP_2M.labels), answer="action",
                          item_id=f"h{i}").with_inputs("query") for i in range(10)]
    student = PersonaAgent(Persona(LAMP_2M, "Likes comedy."), UserMemory(memory, "u", k=5), max_iters=max_iters)
    lm = dspy.LM("fake/counting", engine=FakeEngine(policy), cache=False)
    opt = PersonaAlignment(batch_size=batch, iterations=iterations, loss=loss, guard=guard)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        opt.compile(student, trainset=train)
    memory.close()
    return [s.lm_calls for s in opt.steps], [s.reason for s in opt.steps]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,3,5", help="batch sizes n, comma-separated")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--max-iters", type=int, default=1, help="ReAct steps per simulated answer")
    a = ap.parse_args()
    rows = []
    for n in [int(b) for b in a.batch.split(",")]:
        for loss in ("per_interaction", "batch"):
            paper, _ = run(loss, False, n, a.iterations, a.max_iters)
            guarded, reasons = run(loss, True, n, a.iterations, a.max_iters)
            rows.append({"n": n, "loss": loss, "paper calls/iteration": paper[0], "guarded calls/iteration": guarded[0],
                         "ratio": guarded[0] / paper[0], "guarded, per iteration": guarded, "stopped": reasons[-1]})
    print(f"T={a.iterations}, {a.max_iters + 1} LM calls per simulated answer; first iteration (every one writes a candidate)")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
