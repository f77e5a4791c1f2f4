"""The answer step in which the persona is evidence (`pipelines.evidence`), on a scripted LM that
gives log-probabilities: labels the request's item names are likely, the rest are not."""

import logging
import re

import dspy
import pytest

from persona_agent.data.tasks import LAMP_1, LAMP_2M, LAMP_3
from persona_agent.pipelines.agent import PersonaAgent
from persona_agent.pipelines import evidence
from persona_agent.pipelines.evidence import label_logprobs
from persona_agent.pipelines.memory import MemoryItem, UserMemory
from persona_agent.pipelines.persona import Persona
from persona_agent.runtime.fakes import FakeEngine, ScoringFakeEngine
from persona_agent.runtime.llm import JSONAdapter

ITEM = re.compile(r"description: (.*?)(?:\n|$)")


def item_scores(prompt: str, prefix: str) -> dict[str, float]:
    """Whole labels as tokens: a label the (last) item names at -1, every other far below, but
    "comedy", this LM's favourite, at -0.5 whatever the item; with the item blanked ("N/A"),
    every label at -3 and comedy at -1 (the bias the answer step calibrates away)."""
    item = ITEM.findall(prompt)[-1].strip().lower()
    if item == "n/a":
        return {label: -1.0 if label == "comedy" else -3.0 for label in LAMP_2M.labels}
    named = {label for label in LAMP_2M.labels if re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", item)}
    return {label: -1.0 if label in named else -0.5 if label == "comedy" else -9.0 for label in LAMP_2M.labels}


@pytest.fixture
def scoring_lm():
    engine = ScoringFakeEngine(item_scores)
    lm = dspy.LM("fake/scoring", engine=engine, cache=False, num_retries=0)
    with dspy.context(lm=lm, adapter=JSONAdapter()):
        yield lm


def _agent(memory, profile, **kwargs):
    memory.add("alice", [MemoryItem("1", "A film about a heist.", "action")])
    return PersonaAgent(Persona(LAMP_2M, profile), UserMemory(memory, "alice", k=5), max_iters=1, **kwargs)


QUERIES = [LAMP_2M.make_input(text, LAMP_2M.labels) for text in (
    "An action film with a romance.", "A dystopia told as a dark comedy.", "A quiet film about a family.")]


def test_an_empty_profile_answers_as_no_persona_does(memory, scoring_lm):
    engine = scoring_lm._engine_spec
    empty = [_agent(memory, "")(query=q).answer for q in QUERIES]
    prompts_empty = list(engine.calls), list(engine.scored)
    engine.calls.clear(), engine.scored.clear()
    neutral = [PersonaAgent(Persona.neutral(LAMP_2M), UserMemory(memory, "alice", k=5), max_iters=1)(query=q).answer
               for q in QUERIES]
    # calibrated: the LM's favourite only where the item names nothing else (its bias is taken
    # out: comedy in "dark comedy" counts for nothing); a tie goes to the task's label order
    assert empty == neutral == ["action", "dystopia", "comedy"]
    assert (list(engine.calls), list(engine.scored)) == prompts_empty  # the very same LM requests


def test_a_named_label_wins_where_the_item_supports_it(memory, scoring_lm):
    agent = _agent(memory, "Tags this user gives most, strongest first: romance, dark comedy.")
    answers = [agent(query=q).answer for q in QUERIES]
    # romance where the item has it; dark comedy where that is what it has; never a label the
    # item does not support (no romance in the family film): there the LM's own choice stands
    assert answers == ["romance", "dark comedy", "comedy"]
    engine = scoring_lm._engine_spec
    assert all("romance" not in system for _, system, _ in engine.calls)  # the persona is no prompt text


def test_rewriting_the_persona_changes_only_the_prior(memory, scoring_lm):
    engine = scoring_lm._engine_spec
    a = _agent(memory, "Tags this user gives most, strongest first: romance.")
    a(query=QUERIES[0])
    first = list(engine.scored)
    engine.scored.clear()
    b = a.with_persona(a.persona.with_profile("Tags this user gives most, strongest first: action."))
    assert b(query=QUERIES[0]).answer == "action"
    assert engine.scored == first  # the same LM calls: a cache answers every candidate persona's


def test_an_lm_without_scores_answers_as_the_papers_agent(memory, caplog, monkeypatch):
    monkeypatch.setattr(evidence, "_noted", set())  # logged once per process and reason
    engine = FakeEngine()  # no log-probabilities
    lm = dspy.LM("fake/plain", engine=engine, cache=False, num_retries=0)
    with dspy.context(lm=lm, adapter=JSONAdapter()), caplog.at_level(logging.WARNING):
        agent = _agent(memory, "Tags this user gives most, strongest first: romance.")
        assert agent(query=QUERIES[0]).answer == "comedy"  # the policy's answer, generated
    assert "prompting as the paper's agent does" in caplog.text and "no log-probabilities" in caplog.text
    assert engine.calls and all("strongest first: romance" in system for _, system, _ in engine.calls)


def test_the_prompt_answer_step_puts_the_persona_in_every_instruction(memory):
    agent = _agent(memory, "Loves heists.", answer_step="prompt")
    assert all("Loves heists." in p.signature.instructions for _, p in agent.named_predictors())
    evidence = _agent(memory, "Loves heists.")
    assert not any("Loves heists." in p.signature.instructions for _, p in evidence.named_predictors())


def test_labels_sharing_a_token_are_told_apart_by_the_next_one():
    """Two-character tokens: "[1]" and "[2]" share "[", so a second call scores "1" against "2";
    only the winner's branch is expanded."""
    def scores(prompt, prefix):
        return {"[": -0.1, "x": -3.0} if prefix.endswith('"') else {"1]": -2.0, "2]": -0.2}

    engine = ScoringFakeEngine(scores)
    lm = dspy.LM("fake/tokens", engine=engine, cache=False, num_retries=0)
    logp = label_logprobs(lm, [{"role": "user", "content": "which?"}], '{"answer": "', ("[1]", "[2]", "x"))
    assert logp == pytest.approx({"[1]": -2.1, "[2]": -0.3, "x": -3.0})
    assert [prefix for _, prefix in engine.scored] == ['{"answer": "', '{"answer": "[']
    assert max(logp, key=logp.get) == "[2]"


def test_what_every_label_starts_with_is_part_of_the_prefix():
    """LaMP-1's "[1]" and "[2]": one call, after the "[" every answer starts with."""
    engine = ScoringFakeEngine(lambda prompt, prefix: {"[": -0.1} if prefix.endswith('"') else {"1]": -2.0, "2]": -0.2})
    lm = dspy.LM("fake/tokens", engine=engine, cache=False, num_retries=0)
    logp = label_logprobs(lm, [{"role": "user", "content": "which?"}], '{"answer": "', ("[1]", "[2]"))
    assert logp == pytest.approx({"[1]": -2.0, "[2]": -0.2})
    assert [prefix for _, prefix in engine.scored] == ['{"answer": "[']


def test_a_label_is_spelled_by_its_longest_token_not_by_a_letter_it_shares():
    """"c" starts both "comedy" and "classic" but is how the LM starts neither: each is scored by
    its own word (no second call); "10" is no spelling of the label "1"."""
    def scores(prompt, prefix):
        return {"c": -0.5, "comedy": -4.0, "class": -2.0, "10": -0.1, "1": -3.0, "x": -9.0}

    engine = ScoringFakeEngine(scores)
    lm = dspy.LM("fake/tokens", engine=engine, cache=False, num_retries=0)
    messages = [{"role": "user", "content": "which?"}]
    assert label_logprobs(lm, messages, '{"answer": "', ("comedy", "classic", "x")) == {
        "comedy": -4.0, "classic": -2.0, "x": -9.0}
    assert label_logprobs(lm, messages, '{"answer": "', ("1", "2")) == {"1": -3.0, "2": -9.0}
    assert len(engine.scored) == 2  # one call each: nothing shared


def test_a_ranking_is_an_order_of_choice_not_a_push():
    """`first_fit`: the first ranked label the item supports wins; a ranked label the item does
    not support costs its rivals nothing, however high it ranks; no ranking is the LM's order."""
    from persona_agent.pipelines.evidence import add_prior, first_fit

    item = {"romance": -0.9, "action": -0.6, "comedy": -4.0, "dystopia": -5.0}  # an action romance
    best = lambda scores: max(scores, key=scores.get)  # noqa: E731
    assert best(first_fit(item, {}, 2.0)) == "action"
    assert best(first_fit(item, {"romance": 1.0, "action": 0.5}, 2.0)) == "romance"
    assert best(first_fit(item, {"action": 1.0, "romance": 0.5}, 2.0)) == "action"
    # the user's favourite is not in this item: the next preference it does support decides
    assert best(first_fit(item, {"dystopia": 1.0, "romance": 0.5}, 2.0)) == "romance"
    # an additive prior strong enough to matter pushes the favourite onto the item anyway
    assert best(add_prior(item, {"dystopia": 1.0, "romance": 0.5}, 16.0)) == "dystopia"


def test_the_prior_reads_each_tasks_preferences():
    assert LAMP_2M.prior("Tags this user gives most, strongest first: dark comedy, sci-fi.", "") == {
        "dark comedy": 1.0, "sci-fi": 0.5}  # "comedy" inside "dark comedy" is not named
    assert LAMP_2M.prior("(nothing known yet)", "") == {}
    generous = LAMP_3.prior("This user scores more generously than the review reads.", "")
    assert generous["5"] > generous["3"] == 0 > generous["1"]
    assert LAMP_3.prior("This user scores as the review reads.", "") == {}
    query = 'which reference? [1]: "Index structures for streams" [2]: "Protein docking at scale"'
    assert LAMP_1.prior("Research topics this author works on and cites: index structures.", query) == {
        "[1]": 1.0, "[2]": 0.0}
    assert Persona(LAMP_1, "").known == Persona.neutral(LAMP_1).known == ""  # "(nothing known yet)" is no topic


def test_the_run_parameters_say_which_answer_step_ran():
    from persona_agent.runtime.llm import answer_step_in_effect, build_lm
    from persona_agent.runtime.settings import LMConfig, Settings
    from persona_agent.runtime.tracking import run_params

    scripted = build_lm(LMConfig(model="scripted"))  # gives no log-probabilities
    assert run_params(Settings(), "lamp2m", lm=scripted)["answer_step"] == \
        "prompt (the LM gives no log-probabilities)"
    assert answer_step_in_effect(Settings(answer_step="prompt"), scripted) == "prompt"
    scoring = dspy.LM("fake/scoring", engine=ScoringFakeEngine(item_scores), cache=False)
    # an engine DSPy knows nothing of gets DSPy's ChatAdapter, which has no answer prefix
    assert answer_step_in_effect(Settings(), scoring).startswith("prompt (ChatAdapter")


def test_a_label_the_lm_does_not_offer_never_wins_and_no_label_at_all_is_unparseable(memory):
    """A label none of the LM's alternatives starts is implausible for the item: the strongest
    prior does not make it the answer. A reply that offers no label is an unusable answer (a
    parse failure, counted where a caller falls back), never an LM error."""
    offered = {"action": -1.0, "comedy": -2.0}
    engine = ScoringFakeEngine(lambda prompt, prefix: dict(offered))
    lm = dspy.LM("fake/few", engine=engine, cache=False, num_retries=0)
    with dspy.context(lm=lm, adapter=JSONAdapter()):
        agent = _agent(memory, "Tags this user gives most, strongest first: romance.", prior_strength=50.0)
        assert agent(query=QUERIES[2]).answer == "action"
        offered.clear()
        offered["zebra"] = -0.1
        with pytest.raises(dspy.utils.exceptions.AdapterParseError, match="no label"):
            agent(query=QUERIES[2])
