import json

import dspy
import pytest

from persona_agent.eval.data import Query, UserData, load_users
from persona_agent.eval.tasks import LAMP_2M, LAMP_3
from persona_agent.harness import MethodResult, results_table, run_eval, to_markdown, write_outputs
from persona_agent.methods import METHODS, UserContext, resolve, user_flow
from persona_agent.pipelines.flow import history_items
from persona_agent.settings import Settings

ALICE = [{"id": f"a{i}", "description": f"A film about a heist number {i}.", "tag": "action", "date": f"2024-01-0{i + 1}"}
         for i in range(4)]
BOB = [{"id": f"b{i}", "description": f"A film about a heist and a wedding {i}.", "tag": "comedy",
        "date": f"2024-01-0{i + 1}"} for i in range(4)]


def _users(gold=True):
    q = LAMP_2M.make_input("A film about a heist.", LAMP_2M.labels)
    return [UserData("alice", LAMP_2M, list(ALICE), [Query("qa", q, "action" if gold else None)]),
            UserData("bob", LAMP_2M, list(BOB), [Query("qb", q, "comedy" if gold else None)])]


def _policy(prompts):
    def policy(fields, system, user):
        prompts.append((fields, system + "\n" + user))
        if "next_tool_name" in fields:
            return {"next_thought": "t", "next_tool_name": "finish", "next_tool_args": {}}
        if fields == ["answer"]:
            return {"answer": "action" if "-> action" in user or "heist number" in user else "comedy"}
        return {f: "Prefers action." if f == "new_profile" else f"a {f}" for f in fields}
    return policy


def _context(user, memory, settings=Settings(max_iters=1, batch_size=2, iterations=1)):
    return UserContext(user_flow(settings, LAMP_2M, user.user_id, history_items(LAMP_2M, user.profile), memory), settings)


def _prompts_of(method, memory, fake_lm, user=0):
    prompts = []
    fake_lm._engine_spec.policy = _policy(prompts)
    users = _users()
    for u in users:
        _context(u, memory).flow.remember()
    ctx = _context(users[user], memory)
    program = METHODS[method](ctx)
    prompts.clear()  # only what answering the query shows the LM
    program(query=users[user].queries[0].input)
    return "\n".join(p for _, p in prompts)


def test_non_personalized_prompt_holds_no_history(memory, fake_lm):
    text = _prompts_of("non-personalized", memory, fake_lm)
    assert "heist number" not in text and "wedding" not in text


@pytest.mark.parametrize("method", ["rag", "pag", "membank", "persona-agent", "w/o alignment", "w/o persona", "w/o action"])
def test_retrieving_methods_show_only_this_users_items(memory, fake_lm, method):
    text = _prompts_of(method, memory, fake_lm)
    assert "heist number" in text and "wedding" not in text
    text = _prompts_of(method, memory, fake_lm, user=1)
    assert "wedding" in text and "heist number" not in text


def test_icl_shows_the_latest_k_interactions(memory, fake_lm):
    text = _prompts_of("icl", memory, fake_lm)
    assert all(f"heist number {i}" in text for i in range(4)) and "wedding" not in text


def test_pag_and_membank_carry_the_profile_rag_does_not(memory, fake_lm):
    for method in ("pag", "membank"):
        text = _prompts_of(method, memory, fake_lm)
        assert "User summary:" in text and "a profile" in text
    assert "a profile" not in _prompts_of("rag", memory, fake_lm)


def test_react_reaches_memory_only_through_tools_and_ablations_remove_their_part(memory, fake_lm):
    assert "heist number" not in _prompts_of("react", memory, fake_lm) and "search_memory" in _prompts_of("react", memory, fake_lm)
    assert "heist number" not in _prompts_of("w/o memory", memory, fake_lm)
    assert "User profile:" in _prompts_of("w/o memory", memory, fake_lm)  # the (aligned) persona stays
    assert "next_tool_name" not in _prompts_of("w/o action", memory, fake_lm)


def test_resolve_methods():
    assert resolve("all") == list(METHODS) and resolve("pag,rag") == ["rag", "pag"]
    with pytest.raises(ValueError, match="unknown methods"):
        resolve("rag,magic")


def test_harness_scores_pooled_answers_and_counts_cost(memory, fake_lm, tmp_path):
    fake_lm._engine_spec.policy = _policy([])
    results = run_eval(Settings(store=tmp_path, max_iters=1, batch_size=2, iterations=1, workers=2), LAMP_2M, _users(),
                       ["non-personalized", "rag", "persona-agent"], fake_lm, dspy.JSONAdapter(), memory)
    by = {r.method: r for r in results}
    assert by["rag"].metrics["accuracy"] == 1.0 and by["rag"].lm_calls == 2 and by["rag"].setup_lm_calls == 0
    assert by["non-personalized"].predictions == {"qa": "comedy", "qb": "comedy"}  # it sees no history
    assert by["non-personalized"].metrics["accuracy"] == 0.5
    assert by["persona-agent"].setup_lm_calls > 0 and by["persona-agent"].samples == 2


def test_table_layout_and_markdown():
    results = [MethodResult("rag", {"mae": 0.5, "rmse": 0.75}, 4, lm_calls=8, seconds=2.0),
               MethodResult("icl", {"mae": 1.0, "rmse": 1.25}, 4, lm_calls=4, setup_lm_calls=3, seconds=1.0)]
    table = results_table(LAMP_3, results)
    assert list(table.index) == ["rag", "icl"]
    assert list(table.columns[:2]) == ["LaMP-3 MAE", "LaMP-3 RMSE"]
    assert table.loc["rag", "LM calls/sample"] == 2 and table.loc["icl", "s/sample"] == 0.25
    md = to_markdown(table).splitlines()
    assert md[0].startswith("| method | LaMP-3 MAE | LaMP-3 RMSE |") and md[2].startswith("| rag | 0.500 | 0.750 |")


def test_a_test_split_without_outputs_yields_a_valid_predictions_file(memory, fake_lm, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    users = _users(gold=False)
    (data / "test_questions.json").write_text(json.dumps(
        [{"id": u.queries[0].id, "user_id": u.user_id, "input": u.queries[0].input, "profile": u.profile} for u in users]))
    loaded = load_users(data, LAMP_2M, "test")
    assert all(q.gold is None for u in loaded for q in u.queries)
    fake_lm._engine_spec.policy = _policy([])
    results = run_eval(Settings(store=tmp_path), LAMP_2M, loaded, ["rag"], fake_lm, dspy.JSONAdapter(), memory)
    assert results[0].metrics == {}
    write_outputs(tmp_path / "out", LAMP_2M, results_table(LAMP_2M, results), results)
    preds = json.loads((tmp_path / "out" / "predictions" / "rag.json").read_text())
    assert preds["task"] == "LaMP_2M"
    assert sorted(g["id"] for g in preds["golds"]) == ["qa", "qb"] and all(g["output"] in LAMP_2M.labels for g in preds["golds"])


def test_gepa_optimizes_the_same_agent_on_the_same_batch(memory, fake_lm):
    prompts = []
    fake_lm._engine_spec.policy = _policy(prompts)
    users = _users()
    ctx = _context(users[0], memory)
    ctx.flow.remember()
    program = METHODS["gepa"](ctx)
    assert ctx.setup_cost["gepa"].lm_calls > 0
    assert program(query=users[0].queries[0].input).answer == "action"
    replays = 0
    for _, text in prompts:
        if "[[ ## memories ## ]]" not in text:
            continue
        query = text.split("[[ ## query ## ]]")[-1].split("[[ ##")[0]
        memories = text.split("[[ ## memories ## ]]")[-1].split("[[ ##")[0]
        for item in ALICE[-2:]:  # the batch: each replay must not recall its own item
            if item["description"] in query:
                replays += 1
                assert item["description"] + " -> action" not in memories
    assert replays > 0
    # after compile the batch items are visible again at test time
    assert "heist number 3. -> action" in "\n".join(t for _, t in prompts[-2:])
