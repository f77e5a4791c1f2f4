"""What DSPy and the agent add on top of the LLM's own time, on the local model.

    python bench/engine_overhead.py [--answers 12] [--users 3] [--max-iters 1]

1. The persona agent answers N queries of synthetic LaMP-2M users (persona, episodic memory in
   Qdrant Edge, ReAct step + extraction), on a fresh llama.cpp engine, DSPy's cache off. Every
   completion request the engine sends to llama.cpp is recorded, byte for byte.
2. The same requests, in the same order (same slots, so the same prompt-cache reuse), go
   straight to llama.cpp on a second fresh engine: the raw completion calls.

overhead = agent wall time / raw wall time (target <= 1.10): formatting prompts, parsing
answers, retrieval, tools, metering, everything that is not llama.cpp. Model loading is
outside both clocks. Two runs of the same requests differ by a few percent in llama.cpp alone,
so the time the agent spends outside llama.cpp is printed too: that part is the overhead.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
import pandas as pd  # noqa: E402

from persona_agent.adapters.llm import LlamaCppEngine, adapter_for, build_lm  # noqa: E402
from persona_agent.adapters.points import open_memory
from persona_agent.data.loaders import load_users  # noqa: E402
from persona_agent.data.synthetic import write_dataset  # noqa: E402
from persona_agent.data.tasks import LAMP_2M  # noqa: E402
from persona_agent.overrides import engine_of
from persona_agent.pipelines.flow import examples  # noqa: E402
from persona_agent.pipelines.memory import history_items  # noqa: E402
from persona_agent.pipelines.metering import answer_or_none  # noqa: E402
from persona_agent.pipelines.persona import Persona  # noqa: E402
from persona_agent.runtime.wiring import user_flow  # noqa: E402
from persona_agent.settings import LMConfig, Settings, offline_environment  # noqa: E402


class Recording:
    """Wraps a loaded llama.cpp server: records each completion request and its time."""

    def __init__(self, server):
        self.server, self.requests, self.seconds = server, [], 0.0

    def _timed(self, kind, body):
        started = time.perf_counter()
        out = getattr(self.server, kind)(body)
        self.seconds += time.perf_counter() - started
        self.requests.append((kind, body))
        return out

    def handle_completions(self, body):
        return self._timed("handle_completions", body)

    def handle_chat_completions(self, body):
        return self._timed("handle_chat_completions", body)


def fresh_engine(lm: dspy.LM) -> LlamaCppEngine:
    engine = engine_of(lm)
    engine.close()
    engine._slots = [(i, "") for i in range(engine.n_parallel)]
    engine._load()  # outside the clock
    return engine


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", type=int, default=12, help="queries answered (spread over the users)")
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--max-iters", type=int, default=1, help="ReAct steps per answer")
    a = ap.parse_args()
    offline_environment()
    settings = Settings(lm=LMConfig(cache=False), max_iters=a.max_iters, top_k=3)
    lm = build_lm(settings.lm)
    adapter = adapter_for(lm)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp), LAMP_2M, n_users=a.users, n_history=12, n_queries=1, seed=11)
        users = load_users(data, LAMP_2M)
        memory = open_memory(":memory:")
        agents, queries = [], []
        for i, user in enumerate(users):
            flow = user_flow(settings, LAMP_2M, user.user_id, history=history_items(LAMP_2M, user.history),
                             memory=memory)
            flow.remember()
            labels = [it.response for it in flow.history]
            top = max(set(labels), key=labels.count)
            # A fixed persona (no profile call): this bench times answering, not profiling.
            agent = flow.agent(Persona(LAMP_2M, f"Tags this user gives most: {top}."), semantic=False)
            agents.append(agent)
            queries += [(i, ex.query) for ex in examples(LAMP_2M, flow.history)]
        queries = [queries[(j * len(queries)) // a.answers] for j in range(a.answers)]

        # 1. through the agent
        engine = fresh_engine(lm)
        recording = Recording(engine._server)
        engine._server = recording
        answers = 0
        started = time.perf_counter()
        with dspy.context(lm=lm, adapter=adapter):
            for i, query in queries:
                answers += answer_or_none(agents[i], query, "bench") is not None
        agent_wall = time.perf_counter() - started
        memory.close()

    # 2. the same requests, straight to llama.cpp
    server = fresh_engine(lm)._server
    started = time.perf_counter()
    for kind, body in recording.requests:
        getattr(server, kind)(body)
    raw_wall = time.perf_counter() - started
    engine_of(lm).close()

    calls = len(recording.requests)
    print(pd.DataFrame([
        {"path": "persona agent", "answers": a.answers, "LM calls": calls, "wall s": agent_wall,
         "ms per answer": agent_wall / a.answers * 1000, "of which llama.cpp s": recording.seconds},
        {"path": "raw llama.cpp", "answers": a.answers, "LM calls": calls, "wall s": raw_wall,
         "ms per answer": raw_wall / a.answers * 1000, "of which llama.cpp s": raw_wall},
    ]).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    outside = agent_wall - recording.seconds
    print(f"\noverhead ratio (agent wall / raw wall) {agent_wall / raw_wall:.3f}: it also holds llama.cpp's own "
          f"run-to-run spread on identical requests ({recording.seconds / raw_wall:.3f} here)")
    print(f"agent time outside llama.cpp {outside:.2f} s = {outside / calls * 1000:.1f} ms per LM call; "
          f"agent wall / its llama.cpp time {agent_wall / recording.seconds:.4f}; "
          f"{answers}/{a.answers} answers parsed; {calls / a.answers:.1f} LM calls per answer")


if __name__ == "__main__":
    main()
