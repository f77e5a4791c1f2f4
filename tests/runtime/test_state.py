"""The nightly state table and the change marks planning reads."""


from persona_agent.adapters.state import StateStore, UserState


def test_a_change_marked_while_a_user_is_aligned_stays_pending(tmp_path):
    states = StateStore(tmp_path / "state.db", "lamp2m")
    first = states.mark_changed(["a", "b"])
    assert states.pending() == {"a": first, "b": first}
    later = states.mark_changed(["a"])  # ingest again while the night aligns `a` from the first change
    states.put("a", UserState("f1"), seen=first)  # the night commits what it planned
    states.put("b", UserState("f2"), seen=first)
    assert states.pending() == {"a": later}  # the newer change is not lost
    states.saw({"a": later})
    assert states.pending() == {}


def test_state_is_per_task_and_marks_are_per_store(tmp_path):
    movies, news = StateStore(tmp_path / "state.db", "lamp2m"), StateStore(tmp_path / "state.db", "lamp2n")
    mark = movies.mark_changed(["a"])
    movies.put("a", UserState("f"), seen=mark)
    assert movies.pending() == {}
    assert news.pending() == {"a": mark}  # the other task still has to see it
    assert movies.get("a").fingerprint == "f"
    assert news.get("a") is None
    assert movies.delete("a") == 2
    assert movies.pending() == {}
    assert news.pending() == {}  # forget: state and mark


def test_the_first_night_marks_every_user_in_memory_once_and_in_one_transaction(tmp_path):
    states = StateStore(tmp_path / "state.db", "lamp2m")

    def dies():
        raise KeyboardInterrupt  # killed half-way through reading memory's users

    try:
        states.ready(dies)
    except KeyboardInterrupt:
        pass
    assert states.pending() == {}  # nothing half done
    states.ready(lambda: ["a", "b"])
    assert set(states.pending()) == {"a", "b"}
    states.ready(lambda: ["c"])  # once
    assert set(states.pending()) == {"a", "b"}
