"""Load LaMP and OPPU files into per-user histories.

Both formats come out the same: a `UserData` per user with the profile in time order (by `date`
where the release has one, file order otherwise) and that user's queries with their golds.

- LaMP: `{split}_questions.json` (a list of `{id, input, profile}`) with, for labelled splits,
  `{split}_outputs.json` (`{"task", "golds": [{id, output}]}`). LaMP has one question per user;
  questions that carry a `user_id` (as the generated data does) are grouped by it.
- OPPU: a list of users `{user_id, profile, query: [{id, input, gold}]}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .tasks import Task, TaskDataError


@dataclass(frozen=True)
class Query:
    id: str
    input: str
    gold: str | None = None


@dataclass(frozen=True)
class Interaction:
    """One past interaction: what the task would have asked about a history item, and the
    user's real response to it."""

    item_id: str
    input: str
    response: str
    date: str | None = None


@dataclass
class UserData:
    user_id: str
    task: Task
    profile: list[dict] = field(default_factory=list)
    queries: list[Query] = field(default_factory=list)

    def interactions(self) -> list[Interaction]:
        """The labelled history in time order (empty for tasks whose items carry no response)."""
        out = []
        for item in self.profile:
            response = self.task.item_response(item)
            if response is not None:
                out.append(Interaction(str(item["id"]), self.task.history_input(item),
                                       str(response).strip().lower(), item.get("date")))
        return out


def load_users(path: str | Path, task: Task, split: str | None = None) -> list[UserData]:
    """Read a directory (LaMP `{split}_questions.json` + `{split}_outputs.json`) or one file
    (LaMP questions or OPPU users) into `UserData`, validating every record."""
    path = Path(path)
    if path.is_dir():
        questions = _find(path, split, "questions")
        outputs = questions.with_name(questions.name.replace("questions", "outputs"))
        return _from_lamp(questions, outputs if outputs.exists() else None, task)
    records = _read_records(path)
    if records and "query" in records[0]:
        return _from_oppu(path, records, task)
    return _from_lamp(path, None, task, records)


def _find(directory: Path, split: str | None, kind: str) -> Path:
    pattern = f"{split}_{kind}.json" if split else f"*_{kind}.json"
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        names = sorted(p.name for p in directory.glob(f"*_{kind}.json"))
        raise TaskDataError(f"{directory}: expected one {pattern}, found {names or 'none'}; pass --split")
    return found[0]


def _read_json(path: Path):
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TaskDataError(f"{path}: cannot read JSON: {err}") from err


def _read_records(path: Path) -> list[dict]:
    """A file of records through `datasets` (Arrow-typed: a field whose type changes between
    records fails here, naming the file). Arrow fills absent fields with None; drop them again
    so a missing field reads as missing."""
    import datasets

    data = _read_json(path)  # a clear error for bad JSON before Arrow sees it
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise TaskDataError(f"{path}: expected a JSON list of records")
    try:
        rows = datasets.Dataset.from_list(data).to_list() if data else []
    except Exception as err:  # Arrow raises several types for inconsistent records
        raise TaskDataError(f"{path}: records do not share one schema: {err}") from err
    return [_drop_none(r) for r in rows]


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _golds(outputs: Path | None, task: Task) -> dict[str, str]:
    if outputs is None:
        return {}
    data = _read_json(outputs)
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise TaskDataError(f"{outputs}: expected {{'task': ..., 'golds': [{{'id', 'output'}}]}}")
    golds = {}
    for i, g in enumerate(data["golds"]):
        if not isinstance(g, dict) or "id" not in g or "output" not in g:
            raise TaskDataError(f"{outputs}: golds[{i}] needs 'id' and 'output'")
        golds[str(g["id"])] = task.check_gold(g["output"], f"{outputs}: golds[{i}] (id {g['id']})")
    return golds


def _profile(where: str, items, task: Task) -> list[dict]:
    if not isinstance(items, list):
        raise TaskDataError(f"{where}: 'profile' must be a list")
    seen, out = set(), []
    for j, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item:
            raise TaskDataError(f"{where}: profile[{j}] must be an object with an 'id'")
        try:
            task.item_text(item)
            response = task.item_response(item)
        except KeyError as err:
            raise TaskDataError(f"{where}: profile[{j}] (id {item['id']}) lacks field {err}") from None
        if response is not None:
            task.check_gold(response, f"{where}: profile[{j}] (id {item['id']})")
        if str(item["id"]) not in seen:  # grouped LaMP questions repeat their user's profile
            seen.add(str(item["id"]))
            out.append(item)
    # Stable sort: items without a date keep file order, which LaMP releases keep chronological.
    if all(item.get("date") is not None for item in out):
        out.sort(key=lambda it: str(it["date"]))
    return out


def _from_lamp(questions: Path, outputs: Path | None, task: Task, records: list | None = None) -> list[UserData]:
    records = _read_records(questions) if records is None else records
    golds = _golds(outputs, task)
    users: dict[str, UserData] = {}
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not {"id", "input", "profile"} <= r.keys():
            raise TaskDataError(f"{questions}: record {i} needs 'id', 'input' and 'profile'")
        where = f"{questions}: record {i} (id {r['id']})"
        task.parse_labels(str(r["input"]))
        uid = str(r.get("user_id", r["id"]))
        user = users.setdefault(uid, UserData(uid, task))
        user.profile = _profile(where, user.profile + list(r["profile"]), task)
        user.queries.append(Query(str(r["id"]), str(r["input"]), golds.get(str(r["id"]))))
    if golds:
        missing = [q.id for u in users.values() for q in u.queries if q.gold is None]
        if missing:
            raise TaskDataError(f"{outputs}: no gold for question ids {missing[:5]}")
        stray = set(golds) - {q.id for u in users.values() for q in u.queries}
        if stray:
            raise TaskDataError(f"{outputs}: golds for unknown question ids {sorted(stray)[:5]}")
    return list(users.values())


def _from_oppu(path: Path, records: list, task: Task) -> list[UserData]:
    users = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not {"user_id", "profile", "query"} <= r.keys():
            raise TaskDataError(f"{path}: user {i} needs 'user_id', 'profile' and 'query'")
        where = f"{path}: user {i} ({r['user_id']})"
        user = UserData(str(r["user_id"]), task, _profile(where, r["profile"], task))
        for j, q in enumerate(r["query"]):
            if not isinstance(q, dict) or not {"id", "input"} <= q.keys():
                raise TaskDataError(f"{where}: query[{j}] needs 'id' and 'input'")
            task.parse_labels(str(q["input"]))
            gold = q.get("gold", q.get("output"))
            gold = None if gold is None else task.check_gold(gold, f"{where}: query[{j}]")
            user.queries.append(Query(str(q["id"]), str(q["input"]), gold))
        users.append(user)
    return users
