"""How much does the persona move the answer? The answer steps measured side by side.

    python bench/answer_step.py [--task lamp2m] [--users 8] [--queries 3] [--lm local]
                                [--strengths 0,1,2,4,8] [--json]

On the shipped synthetic users (their planted rules known), the same agent and memory answer each
user's first queries with only the persona's profile changed: empty, the production profile the
LM writes (semantic memory), and the user's planted rule written out (what an oracle would write).

- evidence: the LM's label log-probabilities are taken once per query (under the shared
  instruction: they do not depend on the persona), calibrated against the same request with
  the item blanked out, then each profile's prior is added at each strength; so one pass
  measures every strength. "evidence, uncalibrated" leaves the blanked request out.
  Each prior is combined both ways: added as log-odds ("add") and as an order of choice ("first
  fit": the first label in the profile's order that fits the item; the default for labels).
- prompt: the paper's agent, the profile in the instruction, one pass per profile.

Printed: accuracy (or MAE) per (answer step, strength, profile), oracle - empty, and LM calls and
seconds per answer of each step.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
import pandas as pd  # noqa: E402
from rich.console import Console  # noqa: E402

from persona_agent.adapters.llm import adapter_for, build_lm  # noqa: E402
from persona_agent.data.loaders import load_users  # noqa: E402
from persona_agent.data.synthetic import rule_profile, shipped_data_dir  # noqa: E402
from persona_agent.data.tasks import get_task  # noqa: E402
from persona_agent.pipelines.evidence import add_prior, first_fit  # noqa: E402
from persona_agent.pipelines.memory import history_items  # noqa: E402
from persona_agent.pipelines.metering import metered  # noqa: E402
from persona_agent.pipelines.persona import Persona  # noqa: E402
from persona_agent.runtime.progress import progress_bar  # noqa: E402
from persona_agent.runtime.store import Store  # noqa: E402
from persona_agent.runtime.wiring import user_flow  # noqa: E402
from persona_agent.settings import LMConfig, Settings  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="lamp2m")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--queries", type=int, default=3)
    p.add_argument("--lm", default="local")
    p.add_argument("--strengths", default="0,1,2,4,8")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.add_argument("--save", help="write the LM's label scores and every answer to this JSON file")
    p.add_argument("--no-prompt", action="store_true", help="measure the evidence step only")
    a = p.parse_args()
    strengths = [float(s) for s in a.strengths.split(",")]
    task = get_task(a.task)
    console = Console(stderr=True)
    settings = Settings(store=Path(tempfile.mkdtemp(prefix="answer-step-")), lm=LMConfig(model=a.lm))
    users = load_users(shipped_data_dir(task), task)[:a.users]
    lm = build_lm(settings.lm)
    rows, logps, cost = [], [], {"evidence": [0, 0.0, 0], "prompt": [0, 0.0, 0]}  # calls, seconds, answers
    with Store.open(settings, memory="run", tracking=False) as store, \
            dspy.context(lm=lm, adapter=adapter_for(lm)), progress_bar(console) as progress:
        bar = progress.add_task("users", total=len(users))
        for user in users:
            flow = user_flow(settings, task, user.unit, history=history_items(task, user.history), memory=store.memory)
            flow.remember()
            profiles = {"empty": "", "production": flow.profile(), "oracle": rule_profile(task, user.rule)}
            queries = user.queries[:a.queries]
            scorer = flow.agent(Persona.neutral(task))
            scorer.act.extract.exact = True
            for q in queries:
                with metered() as c:
                    started = time.perf_counter()
                    pred = scorer(query=q.input)
                cost["evidence"][0] += c.lm_calls
                cost["evidence"][1] += time.perf_counter() - started
                cost["evidence"][2] += 1
                logps.append((user.user_id, q, pred.logprobs, pred.bias, profiles))
            for name, text in profiles.items() if not a.no_prompt else ():
                agent = flow.agent(Persona(task, text), answer_step="prompt")
                for q in queries:
                    with metered() as c:
                        started = time.perf_counter()
                        answer = agent(query=q.input).answer
                    cost["prompt"][0] += c.lm_calls
                    cost["prompt"][1] += time.perf_counter() - started
                    cost["prompt"][2] += 1
                    rows.append({"step": "prompt", "strength": None, "profile": name, "user": user.user_id,
                                 "gold": q.gold, "answer": answer})
            progress.update(bar, advance=1, description=user.user_id)
    combines = {"add": add_prior, "first fit": first_fit}
    for user_id, q, logp, bias, profiles in logps:
        for name, text in profiles.items():
            prior = task.prior(text, q.input)
            for step, base in (("evidence", {k: logp[k] - bias[k] for k in logp}), ("evidence, uncalibrated", logp)):
                for rule, combine in combines.items():
                    for s in strengths:
                        answer = max(task.labels, key=lambda label, sc=combine(base, prior, s): (sc[label], logp[label]))
                        rows.append({"step": f"{step}, {rule}", "strength": s, "profile": name, "user": user_id,
                                     "gold": q.gold, "answer": answer})
    if a.save:  # the LM's scores and the prompt answers, to re-read without the LM
        Path(a.save).write_text(json.dumps({"rows": rows, "scores": [
            {"user": u, "query": q.id, "gold": q.gold, "logprobs": lp, "bias": b, "profiles": pr}
            for u, q, lp, b, pr in logps]}))
    frame = pd.DataFrame(rows)
    metric = task.metric_names[0]
    table = (frame.groupby(["step", "strength", "profile"], dropna=False)
             .apply(lambda g: task.score(list(g.gold), list(g.answer))[metric], include_groups=False)
             .unstack("profile")[["empty", "production", "oracle"]])
    table["oracle - empty"] = table["oracle"] - table["empty"]
    per_answer = {step: {"lm_calls": c / n, "seconds": s / n} for step, (c, s, n) in cost.items() if n}
    print(f"{task.name}, {len(users)} users x {a.queries} queries ({metric}), LM {a.lm}")
    print(table.round(3).to_string())
    for step, v in per_answer.items():
        note = " (every label scored exactly: an answer stops once its winner is sure)" if step == "evidence" else ""
        print(f"{step}: {v['lm_calls']:.2f} LM calls and {v['seconds']:.2f} s per answer{note}")
    if a.json:
        print(json.dumps({"task": task.key, "metric": metric, "n": len(logps),
                          "table": {f"{step}|{s}": row for (step, s), row in table.round(4).to_dict("index").items()},
                          "per_answer": per_answer}))


if __name__ == "__main__":
    main()
