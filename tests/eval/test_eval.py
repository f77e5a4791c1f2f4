import json
import re

import dspy
import pandas as pd
import pytest

from persona_agent.adapters.fakes import FakeEngine, FaultyEngine, allowed_preference
from persona_agent.data.loaders import Query, UserData, load_users
from persona_agent.data.tasks import LAMP_2M, LAMP_3
from persona_agent.eval.harness import MethodResult, results_table, run_eval, to_markdown, write_outputs
from persona_agent.eval.methods import METHODS, UserContext, resolve
from persona_agent.overrides import engine_of
from persona_agent.pipelines.memory import history_items
from persona_agent.runtime.wiring import user_flow
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
        return {f: allowed_preference(system) if f == "preferences" else "Prefers action." if f == "new_profile"
                else f"a {f}" for f in fields}
    return policy


def _context(user, memory, settings=Settings(max_iters=1, batch_size=2, iterations=1)):
    return UserContext(user_flow(settings, LAMP_2M, user.user_id, history=history_items(LAMP_2M, user.history),
                                 memory=memory), settings)


def _prompts_of(method, memory, fake_lm, user=0):
    prompts = []
    engine_of(fake_lm).policy = _policy(prompts)
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
    assert "heist number" not in text
    assert "wedding" not in text


@pytest.mark.parametrize("method", ["rag", "pag", "persona-agent", "w/o alignment", "w/o persona"])
def test_retrieving_methods_show_only_this_users_items(memory, fake_lm, method):
    text = _prompts_of(method, memory, fake_lm)
    assert "heist number" in text
    assert "wedding" not in text
    text = _prompts_of(method, memory, fake_lm, user=1)
    assert "wedding" in text
    assert "heist number" not in text


def test_icl_shows_the_latest_k_interactions(memory, fake_lm):
    text = _prompts_of("icl", memory, fake_lm)
    assert all(f"heist number {i}" in text for i in range(4))
    assert "wedding" not in text


def test_pag_and_membank_carry_the_profile_rag_does_not(memory, fake_lm):
    for method in ("pag", "membank"):
        text = _prompts_of(method, memory, fake_lm)
        assert re.search(r"<profile>\s*Tags this user gives most, strongest first: \w+\. a profile\s*</profile>", text)
    assert "a profile" not in _prompts_of("rag", memory, fake_lm)


def test_react_reaches_memory_only_through_tools(memory, fake_lm):
    text = _prompts_of("react", memory, fake_lm)
    assert "heist number" not in text
    assert "search_memory" in text
    assert "user_profile" not in text


def _what_a_method_uses(method, memory, fake_lm, monkeypatch):
    """Spy on one method answering one query: memory searches, tools offered, the instruction."""
    from persona_agent.pipelines.memory import EpisodicMemory

    searches = []
    search = EpisodicMemory.search
    monkeypatch.setattr(EpisodicMemory, "search", lambda self, *a, **k: searches.append(a) or search(self, *a, **k))
    prompts = []
    engine_of(fake_lm).policy = _policy(prompts)
    users = _users()
    for u in users:
        _context(u, memory).flow.remember()
    ctx = _context(users[0], memory)
    program = METHODS[method](ctx)
    prompts.clear()
    searches.clear()
    program(query=users[0].queries[0].input)
    text = "\n".join(p for _, p in prompts)
    return {"searches": len(searches), "calls": len(prompts),
            "tools": {t for t in ("search_memory", "user_profile") if f"{t}" in text},
            "profile": "a profile" in text, "persona slot": "<profile>" in text,
            "aligned": any(k.startswith("alignment") for k in ctx.setup_cost)}


def test_each_ablation_removes_exactly_its_module(memory, fake_lm, monkeypatch):
    use = {m: _what_a_method_uses(m, memory, fake_lm, monkeypatch)
           for m in ("persona-agent", "w/o alignment", "w/o persona", "w/o memory", "w/o action")}
    full = use["persona-agent"]
    assert full == {"searches": 1, "calls": 2, "tools": {"search_memory", "user_profile"}, "profile": True,
                    "persona slot": True, "aligned": True}
    # w/o alignment: the persona as the profile wrote it, never aligned; everything else as is
    assert use["w/o alignment"] == {**full, "aligned": False}
    # w/o persona: the shared instruction alone; memory and tools kept (the profile only through its tool)
    assert use["w/o persona"] == {**full, "persona slot": False, "profile": False, "aligned": False}
    # w/o memory: no recall by prefetch or tool, no profile (the persona starts empty), still aligned
    assert use["w/o memory"] == {**full, "searches": 0, "tools": set(), "profile": False}
    # w/o action: one call from the aligned persona alone, no tool and no retrieval step
    assert use["w/o action"] == {**full, "searches": 0, "calls": 1, "tools": set()}


def test_resolve_methods():
    assert resolve("all") == list(METHODS)
    assert resolve("pag,rag") == ["rag", "pag"]
    with pytest.raises(ValueError, match="unknown methods"):
        resolve("rag,magic")


def test_harness_scores_pooled_answers_and_counts_cost(memory, fake_lm, tmp_path):
    engine_of(fake_lm).policy = _policy([])
    results = run_eval(Settings(store=tmp_path, max_iters=1, batch_size=2, iterations=1, workers=2), LAMP_2M, _users(),
                       methods=["non-personalized", "rag",
                                "persona-agent"], lm=fake_lm, adapter=dspy.JSONAdapter(), memory=memory).results
    by = {r.method: r for r in results}
    assert by["rag"].metrics["accuracy"] == 1.0
    assert by["rag"].lm_calls == 2
    assert by["rag"].setup_lm_calls == 0
    assert by["non-personalized"].predictions == {"qa": "comedy", "qb": "comedy"}  # it sees no history
    assert by["non-personalized"].metrics["accuracy"] == 0.5
    assert by["persona-agent"].setup_lm_calls > 0
    assert by["persona-agent"].samples == 2


def test_table_layout_and_markdown():
    results = [MethodResult("rag", {"mae": 0.5, "rmse": 0.75}, 4, lm_calls=8, seconds=2.0),
               MethodResult("icl", {"mae": 1.0, "rmse": 1.25}, 4, lm_calls=4, setup_lm_calls=3, seconds=1.0)]
    table = results_table(LAMP_3, results)
    assert list(table.index) == ["rag", "icl"]
    assert list(table.columns[:2]) == ["LaMP-3 MAE", "LaMP-3 RMSE"]
    assert table.loc["rag", "LM calls/sample"] == 2
    assert table.loc["icl", "s/sample"] == 0.25
    md = to_markdown(table).splitlines()
    assert md[0].startswith("| method | LaMP-3 MAE | LaMP-3 RMSE |")
    assert md[2].startswith("| rag | 0.500 | 0.750 |")


def test_a_test_split_without_outputs_yields_a_valid_predictions_file(memory, fake_lm, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    users = _users(gold=False)
    (data / "test_questions.json").write_text(json.dumps(
        [{"id": u.queries[0].id, "user_id": u.user_id, "input": u.queries[0].input, "profile": u.history} for u in users]))
    loaded = load_users(data, LAMP_2M, "test")
    assert all(q.gold is None for u in loaded for q in u.queries)
    engine_of(fake_lm).policy = _policy([])
    results = run_eval(Settings(store=tmp_path), LAMP_2M, loaded, methods=["rag"], lm=fake_lm,
                       adapter=dspy.JSONAdapter(), memory=memory).results
    assert results[0].metrics == {}
    write_outputs(tmp_path / "out", LAMP_2M, results_table(LAMP_2M, results), results=results)
    preds = json.loads((tmp_path / "out" / "predictions" / "rag.json").read_text())
    assert preds["task"] == "LaMP_2M"
    assert sorted(g["id"] for g in preds["golds"]) == ["qa", "qb"]
    assert all(g["output"] in LAMP_2M.labels for g in preds["golds"])


def test_gepa_optimizes_the_same_agent_on_the_same_batch(memory, fake_lm):
    prompts = []
    engine_of(fake_lm).policy = _policy(prompts)
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


# -- outages stop or exclude, never score --------------------------------------------------------


def _lamp_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    users = _users()
    (data / "dev_questions.json").write_text(json.dumps(
        [{"id": u.queries[0].id, "user_id": u.user_id, "input": u.queries[0].input, "profile": u.history} for u in users]))
    (data / "dev_outputs.json").write_text(json.dumps(
        {"task": "LaMP_2M", "golds": [{"id": u.queries[0].id, "output": u.queries[0].gold} for u in users]}))
    return data


def _eval_with(monkeypatch, tmp_path, engine, *extra):
    import persona_agent.eval.harness as harness
    from persona_agent.cli import main

    lm = dspy.LM("fake/outage", engine=engine, cache=False, num_retries=1)
    monkeypatch.setattr(harness, "build_lm", lambda cfg: lm)
    monkeypatch.setattr(harness, "adapter_for", lambda lm: dspy.JSONAdapter())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    code = main(["eval", "--data", str(_lamp_dir(tmp_path)), "--methods", "non-personalized,pag", "-T", "1",
                 "--workers", "1", "--out", str(out), "--store", str(tmp_path / "mlruns"), *extra])
    return code, pd.read_csv(out / "results.csv", index_col="method")


def _bobs_profile_calls_fail(prompts=None):
    """Every profile (setup) call for bob fails with a 500, however often it is retried."""

    return FaultyEngine(FakeEngine(_policy([] if prompts is None else prompts)), rate=0,
                        poison=lambda text: "Write this user's profile" in text and "wedding" in text)


def test_an_outage_in_a_methods_setup_stops_eval_with_the_finished_users_table(tmp_path, monkeypatch, capsys):
    engine = _bobs_profile_calls_fail()
    code, table = _eval_with(monkeypatch, tmp_path, engine)
    assert code == 4
    assert "the LLM failed" in capsys.readouterr().err
    assert engine.injected["server_error"] >= 2
    # alice finished before bob failed: her query is scored, bob's is not scored as wrong
    assert list(table["n"]) == [1, 1]
    assert table.loc["pag", "LaMP-2M Acc"] == 1.0
    import mlflow  # the run says whose error stopped it, in a tag of its own (`forget bob` finds it there)

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.partial = 'true'")
    assert [r.data.tags["stopped_user"] for r in parent] == ["bob"], parent


def test_keep_going_drops_the_failing_user_from_every_method(tmp_path, monkeypatch, capsys):
    code, table = _eval_with(monkeypatch, tmp_path, _bobs_profile_calls_fail(), "--keep-going")
    out = capsys.readouterr().out
    assert code == 0
    assert "dropped: user bob from every method" in out
    assert "1 of 2 users scored" in out
    assert list(table["n"]) == [1, 1]  # non-personalized never needed bob's profile: dropped there too


def test_an_outage_while_answering_stops_eval_too(tmp_path, monkeypatch):

    engine = FaultyEngine(FakeEngine(_policy([])), rate=0, poison=lambda text: "wedding" in text and "<profile>" in text)
    code, _ = _eval_with(monkeypatch, tmp_path, engine)
    assert code == 4


# -- honest cost, intervals ----------------------------------------------------------------------


def test_a_rerun_reports_its_cache_hits_instead_of_zero_calls(memory, tmp_path):
    from persona_agent.adapters import lm_cache

    lm_cache.install()  # as build_lm does: the cache counts its own hits
    lm = dspy.LM(f"fake/cache-hits-{memory.kind}", engine=FakeEngine(_policy([])), cache=True, num_retries=0)
    settings = Settings(store=tmp_path, max_iters=1, batch_size=2, iterations=1)
    first, second = (run_eval(settings, LAMP_2M, _users(), methods=["rag", "pag"], lm=lm, adapter=dspy.JSONAdapter(),
                              memory=memory).results
                     for _ in range(2))
    for a, b in zip(first, second):
        assert a.lm_calls == b.lm_calls > 0
        assert a.cache_hits == 0
        assert b.cache_hits == b.lm_calls
    assert second[1].setup_lm_calls == second[1].setup_cache_hits > 0  # pag's profile: cached too
    table = results_table(LAMP_2M, second)
    assert table.loc["rag", "cached/sample"] == table.loc["rag", "LM calls/sample"] == 1


def test_differences_to_the_baselines_come_with_a_paired_bootstrap_interval():
    from persona_agent.eval.harness import compare_to_baselines

    base = MethodResult("non-personalized", {}, 4, errors={"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0})
    better = MethodResult("rag", {}, 4, errors={"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0})
    same = MethodResult("icl", {}, 4, errors=dict(base.errors))
    compare_to_baselines([base, better, same])
    assert not base.deltas
    assert set(better.deltas) == {"non-personalized"}  # w/o alignment was not run
    d = better.deltas["non-personalized"]
    assert d.n == 4
    assert d.value == 0.75
    assert 0 <= d.low <= 0.75 <= d.high <= 1
    assert same.deltas["non-personalized"].low == same.deltas["non-personalized"].high == 0
    md = to_markdown(results_table(LAMP_3, [base, better]))
    assert "+0.750 [" in md
    assert "(n=4, 4 users)" in md
    assert "| n/a |" in md


def test_with_several_queries_per_user_the_interval_resamples_users_not_queries():
    import numpy as np

    from persona_agent.eval.harness import cluster_bootstrap

    # 3 users x 3 queries: one user gains on every query, two on none
    diff = {f"{u}{i}": float(u == "a") for u in "abc" for i in range(3)}
    by_user = cluster_bootstrap(diff, {q: q[0] for q in diff}, np.random.default_rng(0))
    by_query = cluster_bootstrap(diff, {}, np.random.default_rng(0))
    assert by_user[0] == by_query[0] == 1 / 3
    assert (by_user[1], by_user[2], by_user[3]) == (0.0, 1.0, 3)  # three independent units: anything goes
    assert 0.05 < by_query[1]
    assert by_query[2] < 0.75
    assert by_query[3] == 9  # nine "independent" queries: too sure


def test_each_pairs_interval_is_its_own_whatever_else_ran():
    from persona_agent.eval.harness import compare_to_baselines

    def results(*extra):
        base = MethodResult("non-personalized", {}, 6, errors={f"q{i}": float(i % 2) for i in range(6)})
        ours = MethodResult("rag", {}, 6, errors={f"q{i}": float(i % 3 == 0) for i in range(6)})
        return [base, *extra, ours]

    clusters = {f"q{i}": f"u{i // 2}" for i in range(6)}
    alone, crowded = results(), results(MethodResult("icl", {}, 6, errors={f"q{i}": 1.0 for i in range(6)}))
    compare_to_baselines(alone, clusters)
    compare_to_baselines(crowded, clusters)
    assert alone[-1].deltas == crowded[-1].deltas
    assert alone[-1].deltas["non-personalized"].users == 3


def test_headroom_says_what_share_of_the_oracle_gap_alignment_closes_and_when_there_is_none():
    from persona_agent.eval.harness import headroom

    clusters = {f"q{i}": f"u{i // 2}" for i in range(8)}
    base = MethodResult("w/o alignment", {}, 8, errors={f"q{i}": 1.0 for i in range(8)})
    top = MethodResult("oracle", {}, 8, errors={f"q{i}": float(i >= 4) for i in range(8)})  # right on 4 more
    ours = MethodResult("persona-agent", {}, 8, errors={f"q{i}": float(i >= 2) for i in range(8)})  # on 2 of them
    room = headroom([base, top, ours], clusters)
    assert room.gap == 0.5
    assert room.closed == 0.5
    assert room.users == 4
    assert room.n == 8
    assert "alignment closes +0.50 [" in room.says()
    assert "not clearly above zero" in room.says()  # 4 users
    flat = headroom([base, MethodResult("oracle", {}, 8, errors=dict(base.errors)), ours], clusters)
    assert flat.closed is None
    assert "does not beat w/o alignment" in flat.says()
    assert "answer model" in flat.says()


def test_gepa_gets_the_alignments_textual_loss_and_about_its_budget_in_lm_calls(memory, fake_lm):
    prompts = []
    engine_of(fake_lm).policy = _policy(prompts)
    ctx = _context(_users()[0], memory, Settings(max_iters=1, batch_size=2, iterations=3))
    ctx.flow.remember()
    METHODS["gepa"](ctx)
    gepa_prompts = prompts[len(prompts) - ctx.setup_cost["gepa"].lm_calls:]
    critiques = [p for fields, p in gepa_prompts if fields == ["critique"]]
    assert critiques
    assert all("simulated_response" in p for p in critiques)  # the alignment's CritiqueResponse
    alignment, gepa = ctx.setup_cost["alignment"].lm_calls, ctx.setup_cost["gepa"].lm_calls
    assert 0.5 * alignment <= gepa <= 1.5 * alignment, (alignment, gepa)


def test_eval_reads_a_real_lamp3_directory(tmp_path, monkeypatch, capsys):
    """The layout of a LaMP release, written by hand: one question per user, no user ids, profile
    items without dates, golds as strings."""
    from persona_agent.cli import main

    reviews = ["Broke in a day.", "Works, barely.", "It is fine.", "Good value.", "Perfect!"]
    questions = [{"id": f"{u}00", "input": LAMP_3.make_input(f"Review {u}: {reviews[u % 5]}", LAMP_3.labels),
                  "profile": [{"id": f"{u}0{i}", "text": reviews[i], "score": str(min(5, i + 1 + u % 2))}
                              for i in range(5)]} for u in (1, 2, 3)]
    golds = {"task": "LaMP_3", "golds": [{"id": q["id"], "output": str(3 + i % 2)} for i, q in enumerate(questions)]}
    data = tmp_path / "LaMP_3"
    data.mkdir()
    (data / "dev_questions.json").write_text(json.dumps(questions))
    (data / "dev_outputs.json").write_text(json.dumps(golds))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    assert main(["eval", "--task", "lamp3", "--data", str(data), "--lm", "scripted", "--methods",
                 "non-personalized,pag,persona-agent", "-T", "1", "-n", "2", "--out", str(out),
                 "--store", str(tmp_path / "mlruns")]) == 0
    table = pd.read_csv(out / "results.csv", index_col="method")
    assert list(table.columns[:2]) == ["LaMP-3 MAE", "LaMP-3 RMSE"]
    assert list(table["n"]) == [3, 3, 3]
    # the scripted LM answers a word, never a number: every answer is invalid, scored as LaMP does
    assert list(table["invalid"]) == [3, 3, 3]
    assert table.loc["pag", "LaMP-3 MAE"] == pytest.approx((2 + 3 + 2) / 3)  # golds 3, 4, 3
    preds = json.loads((out / "predictions" / "persona-agent.json").read_text())
    assert preds["task"] == "LaMP_3"
    assert sorted(g["id"] for g in preds["golds"]) == ["100", "200", "300"]


def test_a_method_with_nothing_to_learn_from_answers_unaligned_so_every_row_has_the_same_n(memory, fake_lm, tmp_path):
    from persona_agent.data.tasks import LAMP_1

    engine_of(fake_lm).policy = _policy([])
    q = LAMP_1.make_input("A paper", LAMP_1.labels) + ' [1]: "a" [2]: "b"'
    users = [UserData(f"u{i}", LAMP_1, [{"id": f"p{i}", "title": "The only paper", "abstract": "x"}], [Query(f"q{i}", q, "[1]")])
             for i in range(2)]  # one paper each: no interaction can be built from it
    methods = ["non-personalized", "w/o alignment", "persona-agent", "icl", "gepa", "oracle"]
    run = run_eval(Settings(store=tmp_path, batch_size=2, iterations=1), LAMP_1, users, methods=methods, lm=fake_lm,
                   adapter=dspy.JSONAdapter(), memory=memory)
    table = results_table(LAMP_1, run.results)
    by = {r.method: r for r in run.results}
    for method, form in (("persona-agent", "w/o alignment"), ("icl", "non-personalized"), ("gepa", "w/o alignment")):
        assert table.loc[method, "n"] == 2
        assert table.loc[method, "unaligned users"] == 2
        assert by[method].predictions == by[form].predictions  # the unaligned form's answers, not a copied number
    assert table.loc["w/o alignment", "unaligned users"] == 0
    # the oracle has no unaligned form: without a planted rule it applies to nobody, and says so
    assert table.loc["oracle", "n"] == 0
    assert pd.isna(table.loc["oracle", "LaMP-1 Acc"])
    assert "| oracle | n/a | n/a |" in to_markdown(table)


def test_an_eval_keeps_every_alignment_candidate_with_its_outcome(monkeypatch, tmp_path):
    import mlflow

    code, _ = _eval_with(monkeypatch, tmp_path, FakeEngine(_policy([])), "--methods", "persona-agent")
    assert code == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    parent = runs[runs["tags.command"] == "eval"].iloc[0]
    steps = mlflow.load_table("alignment_steps.json", run_ids=[parent.run_id])
    assert sorted(set(steps.user_id)) == ["alice", "bob"]
    assert set(steps.iteration) == {0}  # -T 1: one each
    assert set(steps.alignment) == {"alignment"}
    assert steps.outcome.str.len().gt(0).all()
    assert steps.profile_before.str.len().gt(0).all()
    outcomes = mlflow.artifacts.load_dict(f"runs:/{parent.run_id}/alignment_outcomes.json")
    assert sorted(outcomes.items()) == sorted(steps.outcome.value_counts().items())  # the same candidates, counted


def test_eval_runs_carry_every_parameter_and_their_predictions(monkeypatch, tmp_path):
    import mlflow

    code, table = _eval_with(monkeypatch, tmp_path, FakeEngine(_policy([])))
    assert code == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    parent = runs[runs["tags.command"] == "eval"].iloc[0]
    assert parent["tags.mlflow.runName"].startswith("eval-lamp2m-prompt-T1-n3-k5-2u-")  # what differs, readable
    children = runs[runs["tags.mlflow.parentRunId"] == parent.run_id]
    assert sorted(children["params.method"]) == ["non-personalized", "pag"]
    # quality per method on the parent run: two evals compare side by side without pairing children
    for method, key in (("non-personalized", "non_personalized"), ("pag", "pag")):
        assert parent[f"metrics.accuracy/{key}"] == pytest.approx(table.loc[method, "LaMP-2M Acc"])
    assert parent["metrics.delta_vs_non_personalized/pag"] == pytest.approx(table.loc["pag", "Δ non-personalized"])
    assert parent["params.queries"] == "1"
    assert parent["params.queries_total"] == "2"  # per user, like --queries
    assert "None" not in {v for c, v in parent.items() if c.startswith("params.")}  # unset is "", as everywhere
    assert children["tags.persona_agent.pid"].notna().all()  # a killed eval's method runs are closed later too
    # the profile each persona method answered with, per user (what an alignment wrote is kept)
    pag = children[children["params.method"] == "pag"].iloc[0]
    personas = mlflow.load_table("personas.json", run_ids=[pag.run_id])
    assert sorted(personas.user_id) == ["alice", "bob"]
    assert personas.profile.str.len().gt(0).all()
    assert "personas.json" not in {a.path for a in mlflow.MlflowClient().list_artifacts(
        children[children["params.method"] == "non-personalized"].iloc[0].run_id)}
    for name in ("task", "lm", "top_k", "batch_size", "iterations", "max_iters", "loss", "guard", "data",
                 "data_fingerprint"):
        assert set(children[f"params.{name}"]) == {parent[f"params.{name}"]}, name  # children carry them too
    assert parent["params.iterations"] == "1"
    assert parent["params.data"] == str(tmp_path / "data")
    for _, child in children.iterrows():
        predictions = mlflow.load_table("predictions.json", run_ids=[child.run_id])
        assert len(predictions) == table.loc[child["params.method"], "n"]
        assert set(predictions.columns) == {"user_id", "query_id", "gold", "answer", "score"}
        assert predictions.score.between(0, 1).all()


# -- an LM error is never an answer -----------------------------------------------------------


@pytest.mark.parametrize("status, says", [(401, "Incorrect API key"), (402, "exceeded your current quota"),
                                          (404, "does not exist"), (400, "Invalid request")])
def test_eval_against_a_provider_that_refuses_exits_4_quoting_it_and_scores_nothing(
        status, says, tmp_path, monkeypatch, capsys, fake_llm_server):
    from persona_agent.cli import main

    server, url = fake_llm_server.serve_in_background(latency=0.0)
    server.handler.status = status
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake")
    monkeypatch.setenv("DSPY_CACHEDIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    try:
        code = main(["eval", "--data", str(_lamp_dir(tmp_path)), "--methods", "non-personalized,pag", "--workers", "1",
                     "--lm", "openai/gpt-4o-mini", "--api-base", url, "--no-cache", "--out", str(out),
                     "--store", str(tmp_path / "mlruns")])
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("persona-agent:")]
    assert code == 4 and len(ours) == 1 and says in ours[0] and f"HTTP {status}" in ours[0], err
    assert "Traceback" not in err
    table = pd.read_csv(out / "results.csv", index_col="method")
    assert (table["n"] == 0).all()
    assert table["LaMP-2M Acc"].isna().all()  # no wrong answers were scored
    assert server.handler.calls == 0


def test_an_outage_inside_gepa_is_raised_after_compile_not_searched_over(memory, fake_lm):
    from dspy.utils.exceptions import LMServerError

    outage = []
    engine = FaultyEngine(FakeEngine(_policy([])), rate=0, poison=lambda text: bool(outage))
    fake_lm._engine_spec = engine  # the fixture's LM, now failing whenever `outage` is set (no public setter)
    lm = dspy.LM("fake/gepa-outage", engine=engine, cache=False, num_retries=0)
    users = _users()
    with dspy.context(lm=lm):
        for u in users:
            _context(u, memory).flow.remember()
        ctx = _context(users[0], memory)
        ctx.aligned()  # the budget GEPA gets: measured while the LM is healthy
        outage.append(True)
        with pytest.raises(LMServerError):
            ctx.gepa()
    assert engine.injected["server_error"] >= 1


def test_a_provider_that_reports_no_usage_is_not_counted_as_cached(memory, tmp_path):
    from dspy.lm15 import Usage

    from persona_agent.adapters import lm_cache

    lm_cache.install()

    class Unmetered(FakeEngine):  # a server that sends no usage block
        def complete(self, request):
            import dataclasses

            return dataclasses.replace(super().complete(request), usage=Usage())

    lm = dspy.LM(f"fake/no-usage-{memory.kind}", engine=Unmetered(_policy([])), cache=False, num_retries=0)
    settings = Settings(store=tmp_path, max_iters=1, batch_size=2, iterations=1)
    run = run_eval(settings, LAMP_2M, _users(), methods=["rag"], lm=lm, adapter=dspy.JSONAdapter(), memory=memory)
    (rag,) = run.results
    assert not run.stopped
    assert rag.lm_calls > 0
    assert rag.cache_hits == 0  # inferred from the missing usage, all would read as cached


def test_seconds_per_answer_are_shown_only_when_no_answer_came_from_the_cache():
    from persona_agent.eval.harness import compact, cost_note

    def results(cached: int):
        first = MethodResult("persona-agent", {"accuracy": 0.5, "f1": 0.5}, 4, lm_calls=8, seconds=40.0)
        second = MethodResult("oracle", {"accuracy": 0.5, "f1": 0.5}, 4, lm_calls=8, seconds=0.1, cache_hits=cached)
        return results_table(LAMP_2M, [first, second])

    shared = compact(LAMP_2M, results(cached=8))  # the oracle's calls were the persona agent's: it paid for both
    assert "s" not in shared and list(shared["calls"]) == [2.0, 2.0]
    assert "--no-cache" in cost_note(shared)
    fresh = compact(LAMP_2M, results(cached=0))
    assert list(fresh["s"]) == [10.0, 0.025]
    assert cost_note(fresh) == "LM calls and seconds per answer"
