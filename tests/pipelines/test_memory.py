import pytest

from persona_agent.adapters.points import EdgePoints, open_memory
from persona_agent.pipelines.memory import MemoryItem, UserMemory, sparse_vector
from persona_agent.pipelines.points import StoreLocked

from ..helpers import throwaway_memory


def _fill(memory):
    memory.add("alice", [MemoryItem("1", "a starship crew and a love story", "sci-fi"),
                         MemoryItem("2", "a wedding gone absurdly wrong", "comedy")])
    memory.add("bob", [MemoryItem("1", "a starship crew fights aliens", "action"),
                       MemoryItem("9", "starship starship starship", "sci-fi")])


def test_search_ranks_by_shared_rare_words(memory):
    _fill(memory)
    hits = memory.search("alice", "the wedding", k=2)
    assert hits[0].item.item_id == "2"


def test_search_never_returns_another_users_items(memory):
    _fill(memory)
    for user, own in (("alice", {"1", "2"}), ("bob", {"1", "9"})):
        hits = memory.search(user, "starship crew wedding aliens love", k=10)
        assert {h.item.item_id for h in hits} <= own
        assert all(h.item.response != ("action" if user == "alice" else "comedy") for h in hits)
    assert memory.search("carol", "starship", k=10) == []


def test_add_is_idempotent(memory):
    _fill(memory)
    _fill(memory)
    assert memory.count() == 4
    assert memory.count("alice") == 2


def test_exclusion_hides_items_only_inside_the_context(memory):
    _fill(memory)
    view = UserMemory(memory, "alice", k=5)
    with UserMemory.excluding(["1"]):
        assert "1" not in {h.item.item_id for h in view.search("starship love")}
    assert "1" in {h.item.item_id for h in view.search("starship love")}


def test_items_oldest_first(memory):
    memory.add("u", [MemoryItem("b", "second", date="2024-02-01"), MemoryItem("a", "first", date="2024-01-01")])
    assert [it.item_id for it in memory.items("u")] == ["a", "b"]


@pytest.mark.parametrize("kind", ["edge", "client"])
def test_dense_embedder_is_fused_with_lexical(kind):
    def embed(texts):  # 2-d toy embedding: is it about weddings?
        return [[1.0, 0.0] if "wedding" in t or "marriage" in t else [0.0, 1.0] for t in texts]

    m = throwaway_memory(kind, embedder=embed)
    _fill(m)
    m.add("alice", [MemoryItem("3", "a marriage of convenience", "romance")])
    ids = [h.item.item_id for h in m.search("alice", "wedding", k=2)]
    assert set(ids) == {"2", "3"}  # "3" shares no word with the query: found through the embedding
    m.close()


def test_sparse_vector_drops_stopwords_and_saturates_counts():
    indices, values = sparse_vector("the the starship starship starship")
    assert len(indices) == 1
    assert 1 < values[0] < 2.2


def test_undated_items_keep_the_order_they_were_added_in_not_the_order_of_their_ids(memory):
    memory.add("alice", [MemoryItem("999", "first"), MemoryItem("1000", "second")])
    memory.add("alice", [MemoryItem("10", "third")])
    assert [it.text for it in memory.items("alice")] == ["first", "second", "third"]


def test_dated_items_are_in_date_order_ties_in_the_order_they_were_added(memory):
    memory.add("alice", [MemoryItem("b", "later", date="2024-02-01"), MemoryItem("z", "early", date="2024-01-01"),
                         MemoryItem("a", "early too", date="2024-01-01")])
    assert [it.text for it in memory.items("alice")] == ["early", "early too", "later"]


def test_the_embedded_store_keeps_its_memories_when_reopened_and_serves_one_process(tmp_path):
    m = open_memory(path=str(tmp_path / "edge"))
    _fill(m)
    with pytest.raises(StoreLocked):  # Edge locks its write-ahead log while a shard is open
        EdgePoints(tmp_path / "edge")
    m.close()
    m = open_memory(path=str(tmp_path / "edge"))
    assert m.count() == 4
    assert m.user_ids() == ["alice", "bob"]
    assert m.search("alice", "the wedding", k=1)[0].item.item_id == "2"
    m.close()

