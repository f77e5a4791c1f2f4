"""The answer step in which the persona is evidence (`pipelines.evidence`), on a scripted LM that
gives log-probabilities: labels the request's item names are likely, the rest are not."""

import logging
import re

import dspy
import pytest

from persona_agent.adapters.fakes import FakeEngine, ScoringFakeEngine
from persona_agent.adapters.llm import JSONAdapter
from persona_agent.data.tasks import LAMP_1, LAMP_2M, LAMP_3
from persona_agent.overrides import engine_of
from persona_agent.pipelines import evidence
from persona_agent.pipelines.agent import PersonaAgent
from persona_agent.pipelines.evidence import label_logprobs
from persona_agent.pipelines.memory import MemoryItem, UserMemory
from persona_agent.pipelines.persona import Persona

ITEM = re.compile(r"description: (.*?)(?:\n|$)")


def item_scores(prompt: str, prefix: str) -> dict[str, float]:
    """Whole labels as tokens. Reading the item (`Task.reading`: the prefix ends "tag:", each
    label after a space): a label the item names at -1, every other at -9. Answering the request:
    position-biased, as a small model is: the label named first at -0.2, others named at -2.5,
    "comedy", this LM's favourite, at -0.5 whatever the item, the rest at -9; with the item
    blanked ("N/A"), every label at -3 and comedy at -1."""
    item = ITEM.findall(prompt)[-1].strip().lower()
    if prefix.endswith("tag:"):
        return {" " + label: -1.0 if _named(label, item) else -9.0 for label in LAMP_2M.labels}
    if item == "n/a":
        return {label: -1.0 if label == "comedy" else -3.0 for label in LAMP_2M.labels}
    named = sorted((m.start(), label) for label in LAMP_2M.labels if (m := _named(label, item)))
    first = named[0][1] if named else None
    return {label: -0.2 if label == first else -2.5 if any(label == n for _, n in named) else
            -0.5 if label == "comedy" else -9.0 for label in LAMP_2M.labels}


def _named(label: str, item: str):
    return re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", item)


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
    engine = engine_of(scoring_lm)
    empty = [_agent(memory, "")(query=q).answer for q in QUERIES]
    prompts_empty = list(engine.calls), list(engine.scored)
    engine.calls.clear(), engine.scored.clear()
    neutral = [PersonaAgent(Persona.neutral(LAMP_2M), UserMemory(memory, "alice", k=5), max_iters=1)(query=q).answer
               for q in QUERIES]
    # among the labels the item supports, the LM's best: the one it names first; where the
    # item supports nothing in particular, the LM's favourite
    assert empty == neutral == ["action", "dystopia", "comedy"]
    assert (list(engine.calls), list(engine.scored)) == prompts_empty  # the very same LM requests


def test_a_named_label_wins_where_the_item_supports_it(memory, scoring_lm):
    agent = _agent(memory, "Tags this user gives most, strongest first: romance, dark comedy.")
    answers = [agent(query=q).answer for q in QUERIES]
    # romance where the item has it, though the LM names action first; dark comedy where that
    # is what it has; where the item supports no label over another, the user's first is the guess
    assert answers == ["romance", "dark comedy", "romance"]
    engine = engine_of(scoring_lm)
    assert all("romance" not in system for _, system, _ in engine.calls)  # the persona is no prompt text


def test_rewriting_the_persona_changes_only_the_prior(memory, scoring_lm):
    engine = engine_of(scoring_lm)
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
    assert "prompting as the paper's agent does" in caplog.text
    assert "no log-probabilities" in caplog.text
    assert engine.calls
    assert all("strongest first: romance" in system for _, system, _ in engine.calls)


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
    logp = label_logprobs(lm, [{"role": "user", "content": "which?"}], '{"answer": "', labels=("[1]", "[2]", "x"))
    assert logp == pytest.approx({"[1]": -2.1, "[2]": -0.3, "x": -3.0})
    assert [prefix for _, prefix in engine.scored] == ['{"answer": "', '{"answer": "[']
    assert max(logp, key=logp.get) == "[2]"


def test_what_every_label_starts_with_is_part_of_the_prefix():
    """LaMP-1's "[1]" and "[2]": one call, after the "[" every answer starts with."""
    engine = ScoringFakeEngine(lambda prompt, prefix: {"[": -0.1} if prefix.endswith('"') else {"1]": -2.0, "2]": -0.2})
    lm = dspy.LM("fake/tokens", engine=engine, cache=False, num_retries=0)
    logp = label_logprobs(lm, [{"role": "user", "content": "which?"}], '{"answer": "', labels=("[1]", "[2]"))
    assert logp == pytest.approx({"[1]": -2.0, "[2]": -0.2})
    assert [prefix for _, prefix in engine.scored] == ['{"answer": "[']


def test_a_label_is_scored_by_the_way_the_lm_spells_it():
    """A label's longest token is its spelling unless a shorter one is more probable: then that is
    how the LM starts it ("d" then "yst" for "dystopia", where a "dyst" token exists but is
    unlikely), and it is followed one call further, the longest path kept as a floor. A shorter
    token shared by two labels ("c") is split by that call. "10" is no spelling of "1"."""
    def scores(prompt, prefix):
        if prefix.endswith('"d'):
            return {"yst": -0.01, "ark": -3.0}
        if prefix.endswith('"c'):
            return {"omedy": -0.1, "lassic": -2.5}
        return {"d": -0.07, "dyst": -10.7, "dark": -6.5, "c": -0.5, "comedy": -4.0, "class": -2.0, "10": -0.1,
                "1": -3.0, "x": -9.0, "romance": -1.0, "ro": -4.0}

    engine = ScoringFakeEngine(scores)
    lm = dspy.LM("fake/tokens", engine=engine, cache=False, num_retries=0)
    messages = [{"role": "user", "content": "which?"}]
    logp = label_logprobs(lm, messages, '{"answer": "', labels=("dystopia", "dark comedy", "x"), expand="all")
    assert logp == pytest.approx({"dystopia": -0.08, "dark comedy": -3.07, "x": -9.0})
    logp = label_logprobs(lm, messages, '{"answer": "', labels=("comedy", "classic", "x"), expand="all")
    assert logp == pytest.approx({"comedy": -0.6, "classic": -2.0, "x": -9.0})  # classic: its own word, the floor
    engine.scored.clear()
    assert label_logprobs(lm, messages, '{"answer": "', labels=("romance", "x")) == {"romance": -1.0, "x": -9.0}
    assert label_logprobs(lm, messages, '{"answer": "', labels=("1", "2")) == {"1": -3.0, "2": -10.7}  # "2": no alternative, the last one
    assert len(engine.scored) == 2  # one call each: the longest token is also the likeliest


def test_the_support_needs_no_call_for_labels_already_out_of_reach():
    """Reading an item, the LM spells "fantasy" and "romance" as tokens and the other labels from
    a bare " " (-5.6): with a margin of 3.5 from fantasy's -0.7, nothing after that " " can be
    supported, so one call gives the support every call would. Where the bare " " is within
    reach (-2.0) its labels are made exact, as they could be supported."""
    def reading(low):
        def scores(prompt, prefix):
            if prefix.endswith(": "):
                return {"violence": -0.1, "comedy": -3.0}
            return {" fantasy": -0.7, " romance": -2.0, " ": low}
        return scores

    labels = ("fantasy", "romance", "violence", "comedy")
    messages = [{"role": "user", "content": "description: ...\ntag:"}]
    for low, calls in ((-5.6, 1), (-2.0, 2)):
        engine = ScoringFakeEngine(reading(low))
        lm = dspy.LM("fake/reading", engine=engine, cache=False, num_retries=0)
        pruned = label_logprobs(lm, messages, "tag:", labels=labels, expand="all", missing=float("-inf"), lead=" ",
                                within=3.5)
        assert len(engine.scored) == calls
        every = label_logprobs(lm, messages, "tag:", labels=labels, expand="all", missing=float("-inf"), lead=" ")
        assert evidence.supported(pruned, 3.5) == evidence.supported(every, 3.5)
        assert set(evidence.supported(every, 3.5)) == ({"fantasy", "romance"} if low < -5 else
                                                       {"fantasy", "romance", "violence"})


def test_a_supported_and_preferred_label_beats_the_one_the_lm_names_first(memory, scoring_lm):
    """The item supports fantasy, romance and violence; answering, the LM puts fantasy, named
    first, at -0.2 and the others at -2.5. The user who prefers romance gets romance; a user
    whose preferences the item does not support gets the LM's choice, never their favourite;
    an empty profile the LM's choice too."""
    query = LAMP_2M.make_input("A movie that is fantasy, romance, violence.", LAMP_2M.labels)
    answer = lambda profile: _agent(memory, profile)(query=query)  # noqa: E731
    prefers = "Tags this user gives most, strongest first: "
    assert answer(prefers + "romance, action.").answer == "romance"
    assert answer(prefers + "dystopia, violence.").answer == "violence"  # first of theirs the item supports
    assert answer(prefers + "dystopia, classic.").answer == "fantasy"
    pred = answer("")
    assert pred.answer == "fantasy"
    assert set(evidence.supported(pred.support, 3.0)) == {"fantasy", "romance", "violence"}
    # the support is read with no user in the prompt: the same for every persona
    reads = [p for p, prefix in engine_of(scoring_lm).scored if prefix.endswith("tag:")]
    assert reads
    assert all("romance, action" not in p and "heist" not in p for p in reads)


def test_the_support_is_the_labels_within_the_margin():
    from persona_agent.pipelines.evidence import first_supported, supported

    reading = {"fantasy": -0.3, "romance": -2.0, "violence": -3.4, "comedy": float("-inf")}
    assert supported(reading, 3.0) == ("fantasy", "romance")
    assert supported(reading, 3.0) != supported(reading, 3.5)
    item = {"fantasy": -0.1, "romance": -4.0, "violence": -1.0, "comedy": -0.05}
    best = lambda scores: max(scores, key=scores.get)  # noqa: E731
    # the LM's own favourite (comedy) is not supported: it cannot win, even with no persona
    assert best(first_supported(item, {}, ("fantasy", "romance"))) == "fantasy"
    assert best(first_supported(item, {"romance": 1.0, "fantasy": 0.5}, ("fantasy", "romance"))) == "romance"
    assert best(first_supported(item, {"comedy": 1.0}, ("fantasy", "romance"))) == "fantasy"


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
    from persona_agent.adapters.llm import answer_step_in_effect, build_lm
    from persona_agent.adapters.tracking import run_params
    from persona_agent.settings import LMConfig, Settings

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
    engine = ScoringFakeEngine(lambda prompt, prefix: {(" " if prefix.endswith("tag:") else "") + k: v
                                                       for k, v in offered.items()})
    lm = dspy.LM("fake/few", engine=engine, cache=False, num_retries=0)
    with dspy.context(lm=lm, adapter=JSONAdapter()):
        agent = _agent(memory, "Tags this user gives most, strongest first: romance.", prior_strength=50.0)
        assert agent(query=QUERIES[2]).answer == "action"
        offered.clear()
        offered["zebra"] = -0.1
        with pytest.raises(dspy.utils.exceptions.AdapterParseError, match="no label"):
            agent(query=QUERIES[2])
