import mlflow

from persona_agent import tracking


def test_every_revision_is_a_new_version_of_the_users_prompt(mlflow_store):
    for i in range(3):
        v = tracking.register_persona("lamp2m", "u1", f"persona text {i}", f"rev {i}", {"stage": "aligned", "iteration": i})
        assert v == i + 1
    tracking.register_persona("lamp2m", "u2", "other", "rev", {})
    table = tracking.persona_versions("lamp2m")
    assert sorted(table[table.user_id == "u1"].version) == [1, 2, 3] and len(table) == 4
    prompt = mlflow.genai.load_prompt("prompts:/persona.lamp2m.u1/2")
    assert prompt.template == "persona text 1" and prompt.tags["iteration"] == "1"


def test_store_lives_under_the_configured_directory(mlflow_store):
    assert (mlflow_store.store / "mlflow.db").exists()
    exp = mlflow.get_experiment_by_name("persona-agent")
    assert exp.artifact_location.startswith((mlflow_store.store.resolve()).as_uri())


def test_prompt_names_are_valid_and_unique_for_odd_user_ids():
    names = {tracking.prompt_name("lamp3", u) for u in ["a/b", "a_b", "a b", "ä", "../x", "a:b"]}
    assert len(names) == 6
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") for n in names)
