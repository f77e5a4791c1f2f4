"""The LLM answer cache: keyed by endpoint, and an unusable answer is never replayed."""

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError

from persona_agent.adapters.fakes import FaultyEngine, default_policy
from persona_agent.adapters.llm import adapter_for, build_lm
from persona_agent.adapters.registry import PersonaRegistry
from persona_agent.data.tasks import LAMP_2M
from persona_agent.pipelines.persona import Persona
from persona_agent.settings import LMConfig


def _ask(lm, question="Which genre fits a heist film?"):
    with dspy.context(lm=lm, adapter=adapter_for(lm)):
        return dspy.Predict("question -> answer")(question=question).answer


@pytest.mark.parametrize("kind", ["empty", "malformed"])
def test_answer_recovers_once_the_endpoint_is_healthy(kind, mlflow_store, fake_llm_server, monkeypatch, capsys):
    from persona_agent.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake")
    PersonaRegistry(LAMP_2M).register("u1", Persona(LAMP_2M, "Likes comedy."), "v1", production=True)
    server, url = fake_llm_server.serve_in_background(latency=0.0, faults=1.0, kinds=(kind,))
    query = LAMP_2M.make_input(f"A film about a {kind} heist.", LAMP_2M.labels)
    command = ["answer", "u1", query, "--lm", "openai/gpt-4o-mini", "--api-base", url,
               "--store", str(mlflow_store.store)]
    try:
        assert main(command) == 4  # cache on (the default)
        server.handler.faults = 0.0  # the endpoint recovers
        capsys.readouterr()
        assert main(command) == 0
        assert capsys.readouterr().out.strip() == "comedy"
    finally:
        server.shutdown()
    assert server.handler.injected[kind] >= 1


def test_two_endpoints_serving_one_model_name_do_not_share_answers(fake_llm_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake")

    def drama(fields, system, user):
        return {**default_policy(fields, system, user), "answer": "drama"}

    a, url_a = fake_llm_server.serve_in_background(latency=0.0)
    b, url_b = fake_llm_server.serve_in_background(latency=0.0, policy=drama)
    try:
        answers = [_ask(build_lm(LMConfig("openai/gpt-4o-mini", api_base=url))) for url in (url_a, url_b, url_a)]
    finally:
        a.shutdown(), b.shutdown()
    assert answers == ["comedy", "drama", "comedy"]
    assert (a.handler.calls, b.handler.calls) == (1, 1)  # the third call was answered from the cache


def test_an_unusable_answer_already_in_the_cache_is_dropped_when_it_fails_to_parse():
    build_lm(LMConfig("scripted"))  # installs the endpoint-keyed cache
    question = "Which genre fits a caper?"
    broken = dspy.LM("scripted/policy", engine=FaultyEngine(rate=1.0, kinds=("empty",)), cache=True, num_retries=0)
    with dspy.context(lm=broken, adapter=dspy.JSONAdapter()):  # an adapter that forgets nothing (an older run)
        with pytest.raises(AdapterParseError):
            dspy.Predict("question -> answer")(question=question)
    healthy = build_lm(LMConfig("scripted"))  # the same model name, so the same cache key
    with pytest.raises(AdapterParseError):
        _ask(healthy, question)  # replays the cached empty answer once, and drops it
    assert dspy.cache.forgotten >= 1
    assert _ask(healthy, question) == "comedy"
