"""Where the demo's time goes: LM calls by kind, prompt and generated tokens, prompt-cache hits.

    python bench/demo_time.py [--task lamp2m] [--users 3] [--queries 3] [--store DIR]

Runs `persona-agent demo` in process on a fresh store and a fresh, empty DSPy cache (as on a
fresh clone: only a prompt repeated within the run is answered from it), and prints one row per call kind (the DSPy signature the call
answers): calls, prompt tokens, of which llama.cpp served from its prompt cache, generated
tokens, and the milliseconds llama.cpp spent reading prompts and generating. The rest of the
wall time (MLflow, Qdrant, DSPy itself) is the last line.
"""

import argparse
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
import pandas as pd  # noqa: E402
from dspy.utils.callback import BaseCallback  # noqa: E402

from persona_agent.adapters.llm import LlamaCppEngine, build_lm  # noqa: E402
from persona_agent.demo import run_demo  # noqa: E402
from persona_agent.overrides import engine_of
from persona_agent.runtime.store import Store  # noqa: E402
from persona_agent.settings import LMConfig, Settings, offline_environment  # noqa: E402

KINDS = {("next_thought", "next_tool_name", "next_tool_args"): "ReAct step", ("answer",): "answer",
         ("preferences", "profile"): "profile", ("critique",): "critique", ("preferences", "new_profile"): "update"}


class CallKinds(BaseCallback):
    """Remembers, per thread, which signature the adapter is formatting: the kind of the LM call
    that follows it, named by the signature's output fields (a ReAct step, an answer, a profile,
    a critique, an update)."""

    def __init__(self):
        self.local = threading.local()

    def on_adapter_format_start(self, call_id, instance, inputs):
        signature = inputs.get("signature")
        outputs = list(getattr(signature, "output_fields", {}))
        self.local.kind = KINDS.get(tuple(outputs), ",".join(outputs) or "?")

    @property
    def kind(self) -> str:
        return getattr(self.local, "kind", "?")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="lamp2m")
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--queries", type=int, default=3)
    p.add_argument("--store", type=Path, help="default: a fresh temporary directory")
    args = p.parse_args()
    offline_environment()
    store_dir = args.store or Path(tempfile.mkdtemp(prefix="demo-time-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store_dir.resolve() / 'mlflow.db'}"
    dspy.configure_cache(disk_cache_dir=str(store_dir / "dspy-cache"))
    settings = Settings.for_demo(store=store_dir, lm=LMConfig())

    kinds, rows = CallKinds(), defaultdict(lambda: defaultdict(float))
    lm = build_lm(settings.lm)
    engine = engine_of(lm)
    assert isinstance(engine, LlamaCppEngine), "this bench measures the in-process engine"

    def record(timings: dict) -> None:
        row = rows[kinds.kind]
        row["calls"] += 1
        for key in ("prompt_n", "cache_n", "predicted_n", "prompt_ms", "predicted_ms"):
            row[key] += timings.get(key) or 0

    engine.on_timings = record
    started = time.perf_counter()
    with dspy.context(callbacks=[kinds]), Store.open(settings, memory="persistent") as store:
        run_demo(settings, store, args.task, users=args.users, queries=args.queries, lm=lm)
    wall = time.perf_counter() - started

    table = pd.DataFrame(rows).T.rename(columns={
        "prompt_n": "prompt tokens evaluated", "cache_n": "prompt tokens from cache", "predicted_n": "generated tokens",
        "prompt_ms": "prompt ms", "predicted_ms": "generate ms"}).sort_values("calls", ascending=False)
    table.loc["all"] = table.sum()
    table["LM s"] = (table["prompt ms"] + table["generate ms"]) / 1000
    table["share of wall"] = table["LM s"] / wall
    pd.set_option("display.width", 200)
    print(table.round(2).to_string())
    print(f"\nwall time {wall:.1f} s, of which LM {table.loc['all', 'LM s']:.1f} s; "
          f"other (load, MLflow, Qdrant, DSPy) {wall - table.loc['all', 'LM s']:.1f} s; store {store_dir}")


if __name__ == "__main__":
    main()
