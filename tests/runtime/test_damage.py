"""A damaged, full or read-only store: one line and a code, never a traceback, never a silent
loss; `doctor` finds the damage and a `backup` restores the store."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from persona_agent.adapters.points import EdgePoints, open_memory
from persona_agent.cli import main
from persona_agent.data.tasks import LAMP_2M
from persona_agent.pipelines.memory import EpisodicMemory
from persona_agent.runtime.store import StoreFull

QUERY = LAMP_2M.make_input("A film about a heist.", LAMP_2M.labels)


@pytest.fixture
def store(aligned_copy):
    return aligned_copy


def _segment(store: Path, name: str) -> Path:
    return next((store / "qdrant-edge" / "segments").glob(f"*/{name}"))


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


DAMAGE = {
    "empty segment.json": lambda s: _segment(s, "segment.json").write_text(""),
    "truncated lexical page": lambda s: _truncate(_segment(s, "vector_storage-lexical/store/page_0.dat"), 100),
    "truncated payload page": lambda s: _truncate(_segment(s, "payload_storage/page_0.dat"), 100),
    "invalid edge_config.json": lambda s: (s / "qdrant-edge" / "edge_config.json").write_text("{nope"),
    "garbage write-ahead log": lambda s: (s / "qdrant-edge" / "wal" / "open-1").write_bytes(b"\xff" * 4096),
    "segments folder deleted": lambda s: shutil.rmtree(s / "qdrant-edge" / "segments"),
    "a file for the shard": lambda s: (shutil.rmtree(s / "qdrant-edge"), (s / "qdrant-edge").write_text("")),
}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("persona-agent:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.slow  # each command in a process of its own, as a user runs it (see below)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_shard_stops_every_command_with_one_line_and_exit_6(damage, store):
    """Run as commands, as a user runs them, each in a process of its own: the process that met a
    damaged shard has mapped (Edge maps a shard's pages) files cut short under it, and ends."""
    DAMAGE[damage](store)
    for command in (["nightly", "--lm", "scripted", "--all-users"], ["doctor"]):  # every user's memory read
        done = subprocess.run([sys.executable, "-m", "persona_agent.cli", *command, "--store", str(store)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 6, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        if command[0] == "nightly":
            (line,) = [line for line in done.stderr.splitlines() if line.startswith("persona-agent:")]
            assert "qdrant-edge is damaged" in line
            assert f"persona-agent doctor --store {store}" in line
        else:
            assert done.stdout.startswith("damaged   memory"), done.stdout


def test_answer_refuses_a_history_that_shrank(store, capsys):
    """Nothing but `forget` deletes a memory: fewer items than the persona was aligned on is damage
    (here: the shard replaced by one that lost all but one of u0000's items)."""
    memory = EpisodicMemory(EdgePoints(store / "qdrant-edge"))
    kept = memory.items("u0000")[:1]
    others = {u: memory.items(u) for u in memory.user_ids() if u != "u0000"}
    memory.close()
    shutil.rmtree(store / "qdrant-edge")
    memory = EpisodicMemory(EdgePoints(store / "qdrant-edge"))
    memory.add("u0000", kept)
    for user, items in others.items():
        memory.add(user, items)
    memory.close()
    assert main(["answer", "u0000", QUERY, "--lm", "scripted", "--store", str(store)]) == 6
    assert "u0000's history shrank below the 4 items" in _one_line(capsys)
    assert main(["answer", "u0001", QUERY, "--lm", "scripted", "--store", str(store)]) == 0  # the others answer
    assert main(["doctor", "--store", str(store)]) == 6
    assert "history shrank for 1 users: u0000 (3 of 4 missing)" in capsys.readouterr().out


def test_a_backup_restores_a_damaged_store(store, tmp_path, capsys):
    assert main(["backup", str(tmp_path / "copy"), "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "\ndamaged " not in out
    assert "3 users' nightly state, checked against memory" in out
    restore = next(line.strip() for line in out.splitlines() if line.startswith("restore: "))
    DAMAGE["segments folder deleted"](store)  # found before any page is mapped (truncations: the slow test above)
    assert main(["doctor", "--store", str(store)]) == 6
    capsys.readouterr()
    subprocess.run(restore.removeprefix("restore: "), shell=True, check=True, cwd="/")  # as printed
    assert main(["doctor", "--store", str(store)]) == 0
    capsys.readouterr()
    assert main(["answer", "u0000", QUERY, "--lm", "scripted", "--store", str(store)]) == 0
    assert capsys.readouterr().out.strip() in LAMP_2M.labels
    assert main(["backup", str(tmp_path / "copy"), "--store", str(store)]) == 2  # never over an earlier one
    assert "already exists" in _one_line(capsys)


def test_doctor_finds_a_damaged_tracking_database_and_leftovers(store, capsys):
    (store / ".mlflow.db.123.tmp").write_text("")
    assert main(["doctor", "--store", str(store)]) == 0
    assert "leftover  leftovers  1 left by interrupted writes" in capsys.readouterr().out
    db = store / "mlflow.db"
    data = bytearray(db.read_bytes())
    data[4096 * 3: 4096 * 3 + 512] = b"\x5a" * 512  # garble a page of the database
    db.write_bytes(bytes(data))
    assert main(["doctor", "--store", str(store)]) == 6
    assert "damaged   tracking" in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["qdrant/collection/storage.sqlite", "nightly/lamp2m/0123abcd.json"])
def test_a_store_of_a_pre_release_layout_is_refused_before_anything_is_read_or_written(tmp_path, monkeypatch,
                                                                                       capsys, layout):
    """Memory in qdrant-client's files, or nightly state as a file per user: not read as an empty
    store (which would hide the memories), and not half erased by `forget` (which would leave them)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store"
    old = store / layout
    old.parent.mkdir(parents=True)
    old.write_text('{"user_id": "u0"}')
    for command in (["answer", "u0", QUERY, "--lm", "scripted"], ["nightly", "--lm", "scripted"], ["forget", "u0"],
                    ["doctor"]):
        assert main([*command, "--store", str(store)]) == 2, command
        line = _one_line(capsys)
        assert "was written by a pre-release version" in line, line
        assert "ingest the data into a new --store" in line, line
    assert not (store / "qdrant-edge").exists()  # no memory opened
    assert not (store / "mlflow.db").exists()  # no tracking store made
    assert old.read_text() == '{"user_id": "u0"}'


def test_a_read_only_tracking_database_is_one_line(store, monkeypatch, capsys):
    """SQLite's own read-only mode: what a read-only mount or file gives, for root too."""
    from persona_agent.adapters.registry import PersonaRegistry

    registry = PersonaRegistry(LAMP_2M, f"sqlite:///{store / 'mlflow.db'}")
    other = next(int(v.version) for v in registry.versions("u0000") if int(v.version) != registry.production_version("u0000"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///file:{store / 'mlflow.db'}?mode=ro&uri=true")
    for command in (["personas", "rollback", "u0000", "--to", str(other), "--force"], ["log-model"]):
        assert main([*command, "--store", str(store)]) == 2
        assert "the tracking database is read-only; nothing was changed" in _one_line(capsys)


def test_a_folder_for_the_tracking_database_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "store" / "mlflow.db").mkdir(parents=True)
    assert main(["personas", "list", "--store", str(tmp_path / "store")]) == 2
    assert "mlflow.db: a folder where MLflow's database should be" in _one_line(capsys)


def test_too_little_free_space_refuses_before_writing(store, tmp_path, capsys):
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({"user_id": "u9", "input": "a heist", "response": "action", "id": "e1"}) + "\n")
    for command in (["ingest", str(events)], ["nightly", "--lm", "scripted"]):
        assert main([*command, "--store", str(store), "--min-free-mb", "1000000000"]) == 7
        assert "under the 1000000000 MB margin a write needs" in _one_line(capsys)
    points = EdgePoints(store / "qdrant-edge")
    assert "u9" not in points.user_ids()
    points.close()


def test_a_commit_refuses_on_a_full_disk(store):
    from persona_agent.nightly.committer import _commit_in_child

    with pytest.raises(StoreFull):  # before any write: the user fails, named, and keeps their persona
        _commit_in_child(None, "lamp2m", str(store / "nightly" / "lamp2m"), "run", 1, 10**9)


def test_a_database_that_cannot_be_created_leaves_no_temporary_file(tmp_path, monkeypatch):
    from mlflow.store.tracking import sqlalchemy_store

    from persona_agent.adapters import tracking

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sqlalchemy_store, "SqlAlchemyStore", full)
    with pytest.raises(OSError):
        tracking._create_database(tmp_path / "mlflow.db", tmp_path / "artifacts")
    assert list(tmp_path.iterdir()) == [tmp_path / "mlflow.db.lock"]


def test_edge_errors_of_ours_are_not_called_damage(tmp_path):
    points = EdgePoints(tmp_path / "shard")
    with pytest.raises(TypeError):  # a bug of ours is no damaged store
        points.search("u0", None, None, 3, [])
    points.close()


@pytest.mark.parametrize("os_error, code, says", [
    ("Operation not permitted (os error 1)", 2, "not writable"),
    ("Permission denied (os error 13)", 2, "not writable"),
    ("Read-only file system (os error 30)", 2, "not writable"),
    ("No space left on device (os error 28)", 7, "the disk is full"),
])
def test_what_the_system_refuses_is_not_called_damage(store, monkeypatch, capsys, os_error, code, says):
    """Qdrant Edge says a refused open or write in the words of the OS error: that is no damage,
    and the advice is never to restore a backup (which would throw away everything since)."""
    import qdrant_edge

    def refused(*args, **kwargs):
        raise Exception(f"Service runtime error: Failed to open mmap payload storage: {os_error}")

    monkeypatch.setattr(qdrant_edge.EdgeShard, "load", refused)
    for argv in (["answer", "u0000", QUERY, "--lm", "scripted"], ["forget", "u0000"], ["doctor"]):
        assert main([*argv, "--store", str(store)]) == code, argv
        line = _one_line(capsys)
        assert says in line and "damaged" not in line.replace("nothing in it is damaged", "").replace(
            "nothing in the memory store is damaged", "") and "backup" not in line


def test_an_immutable_memory_folder_is_not_writable_not_damaged(store, capsys):
    if subprocess.run(["chattr", "-R", "+i", str(store / "qdrant-edge")], capture_output=True).returncode:
        pytest.skip("chattr is not available here")
    try:
        assert main(["forget", "u0000", "--store", str(store)]) == 2
        assert "not writable" in _one_line(capsys)
    finally:
        subprocess.run(["chattr", "-R", "-i", str(store / "qdrant-edge")])
    assert main(["forget", "u0000", "--store", str(store)]) == 0  # writable again: it runs, nothing was lost


def test_a_backup_of_a_damaged_store_leaves_nothing_and_prints_no_restore_line(store, tmp_path, capsys):
    DAMAGE["segments folder deleted"](store)
    dest = tmp_path / "copy"
    assert main(["backup", str(dest), "--store", str(store)]) == 6
    captured = capsys.readouterr()
    assert "restore:" not in captured.out + captured.err
    assert "nothing was left at" in captured.err
    assert not dest.exists()
    assert not (tmp_path / "copy.partial").exists()


def test_a_backup_keeps_sparse_files_sparse(store, tmp_path):
    hole = store / "artifacts" / "sparse.bin"
    hole.parent.mkdir(exist_ok=True)
    with open(hole, "wb") as f:  # 64 MB long, 4 KB of it written
        f.seek(64 * 2**20)
        f.write(b"x" * 4096)
    if hole.stat().st_blocks * 512 > 2**20:
        pytest.skip("this filesystem has no sparse files")
    assert main(["backup", str(tmp_path / "copy"), "--store", str(store)]) == 0
    copy = tmp_path / "copy" / "artifacts" / "sparse.bin"
    assert copy.read_bytes()[-4096:] == b"x" * 4096
    assert copy.stat().st_size == hole.stat().st_size
    assert copy.stat().st_blocks * 512 < 2**20  # not 64 MB of zeros
    allocated = lambda root: sum(p.stat().st_blocks for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert allocated(tmp_path / "copy") <= 2 * allocated(store)


def test_a_backup_onto_a_full_disk_is_one_line_and_exit_7(store, tmp_path, monkeypatch, capsys):
    import shutil as sh
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert main(["backup", str(tmp_path / "copy"), "--store", str(store)]) == 7
    assert "nothing was backed up" in _one_line(capsys)
    assert not (tmp_path / "copy").exists()
    # the disk filling up during the copy (the check passed): the same, not copytree's list of errors
    monkeypatch.undo()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real = sh.copy2

    def full(src, dst, **kwargs):
        raise OSError(28, "No space left on device", dst)

    from persona_agent.operations import doctor
    monkeypatch.setattr(doctor, "_sparse_copy", full)
    assert main(["backup", str(tmp_path / "copy"), "--store", str(store)]) == 7
    line = _one_line(capsys)
    assert "the disk is full" in line
    assert len(line) < 300
    assert not (tmp_path / "copy.partial").exists()
    assert real is sh.copy2


def test_a_flipped_byte_inside_a_stored_memory_is_damage_found_by_doctor_and_answer(store, capsys):
    """Edge reads such a page without complaint: the checksum written with each memory finds it."""

    memory = open_memory(path=str(store / "qdrant-edge"))
    text = memory.items("u0000")[0].text
    memory.close()
    pages = [p for p in (store / "qdrant-edge" / "segments").glob("*/payload_storage/page_*.dat")
             if text.encode() in p.read_bytes()]
    assert pages
    data = bytearray(pages[0].read_bytes())
    at = data.find(text.encode()) + len(text) // 2
    data[at] = ord("#") if data[at] != ord("#") else ord("%")
    pages[0].write_bytes(bytes(data))
    assert main(["doctor", "--store", str(store)]) == 6
    assert "changed on disk" in capsys.readouterr().out
    assert main(["answer", "u0000", QUERY, "--lm", "scripted", "--store", str(store)]) == 6
    assert "changed on disk" in _one_line(capsys)


def test_forget_checks_the_free_space_first(store, capsys):
    """It rewrites the memory shard: a write like any other."""
    assert main(["forget", "u0000", "--store", str(store), "--min-free-mb", str(10**9)]) == 7
    assert "nothing was written" in _one_line(capsys)
    assert main(["answer", "u0000", QUERY, "--lm", "scripted", "--store", str(store)]) == 0  # nothing was erased
