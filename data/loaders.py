"""Load LaMP and OPPU files into per-user histories.

Both formats come out the same: a `UserData` per history, in time order (by `date` where the
release has one, file order otherwise), with the queries asked on it and their golds.

Time is respected: every question keeps its own history (two questions of one user are never
merged: the earlier one would see the later one's items, its own labelled item among them), and
a question with a `date` sees only the items dated before it. Questions of a user whose histories
are the same share one `UserData` (its `unit` names it; `user_id` is the person). Dates are
parsed, never compared as text: ISO 8601, unix seconds or M/D/Y, one format per file; a file
that mixes them, or holds a date none of them reads, is refused naming the record.

- LaMP: `{split}_questions.json` (a list of `{id, input, profile, date?}`) with, for labelled
  splits, `{split}_outputs.json` (`{"task", "golds": [{id, output}]}`). LaMP has one question
  per user; questions that carry a `user_id` (as the generated data does) belong to that user.
- OPPU: a list of users `{user_id, profile, query: [{id, input, gold}]}`.
- A Hugging Face dataset saved with `save_to_disk` (LaMP rows with their `output`), e.g. a
  LaMP copy prepared with `datasets` on a machine with hub access.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from persona_agent.data.tasks import Task, TaskDataError


@dataclass(frozen=True)
class Query:
    id: str
    input: str
    gold: str | None = None


@dataclass
class UserData:
    """One history of a user and the queries asked on it. `unit` tells apart two histories of one
    user (different question dates): memory, profile and alignment are per unit; a user's units
    are resampled together (they are not independent)."""

    user_id: str
    task: Task
    history: list[dict] = field(default_factory=list)  # LaMP calls these the "profile"; the loader renames it
    queries: list[Query] = field(default_factory=list)
    unit: str = ""
    rule: dict | None = None  # a synthetic user's planted preference rule (rules.json), if known

    def __post_init__(self):
        self.unit = self.unit or self.user_id


# -- dates ----------------------------------------------------------------------------------------

_FORMATS = {
    "ISO 8601": re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?"),
    "unix seconds": re.compile(r"\d{1,11}(\.\d+)?"),
    "M/D/Y": re.compile(r"\d{1,2}/\d{1,2}/\d{4}"),
}


def parse_date(value) -> tuple[str, datetime]:
    """(format, the moment as naive UTC) of a date in one of the three formats; ValueError else."""
    text = str(value).strip() if not isinstance(value, bool) else ""
    kind = next((k for k, pattern in _FORMATS.items() if pattern.fullmatch(text)), None)
    if kind == "ISO 8601":
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    elif kind == "unix seconds":
        moment = datetime.fromtimestamp(float(text), tz=timezone.utc)
    elif kind == "M/D/Y":
        moment = datetime.strptime(text, "%m/%d/%Y")
    else:
        raise ValueError(f"{value!r} is not a date in ISO 8601, unix seconds or M/D/Y")
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return kind, moment


class Dates:
    """Reads the dates of one file: each as a moment and as ISO text that sorts as time does
    (plain ISO text is kept as written, so stored items keep their ids and content), and refuses
    a second format."""

    def __init__(self):
        self.kind: str | None = None
        self.first: str = ""

    def read(self, value, where: str) -> tuple[str, datetime]:
        try:
            kind, moment = parse_date(value)
        except ValueError as err:
            raise TaskDataError(f"{where}: unreadable date: {err}") from None
        if self.kind is None:
            self.kind, self.first = kind, where
        elif kind != self.kind:
            raise TaskDataError(f"{where}: date {value!r} is {kind}, but {self.first} is {self.kind}: "
                                "one file, one date format")
        text = str(value).strip()
        plain = kind == "ISO 8601" and (len(text) == 10 or (len(text) == 19 and text[10] == "T"))
        return (text if plain else moment.isoformat(timespec="seconds")), moment


MAX_FIELD_CHARS = 100_000  # a longer text field is corrupt or not what the task means (LaMP's longest: ~30k)

OnBad = Callable[[TaskDataError], None]


def load_users(path: str | Path, task: Task, split: str | None = None, *,
               on_bad: OnBad | None = None) -> list[UserData]:
    """Read a directory (LaMP `{split}_questions.json` + `{split}_outputs.json`), one file (LaMP
    questions or OPPU users), or a Hugging Face dataset saved with `save_to_disk` (LaMP columns:
    `id`, `input`, `profile`, and `output` when labelled) into `UserData`, validating every record.

    A bad record raises `TaskDataError` naming the file and record; with `on_bad`, it is passed
    there instead and skipped whole (with its question and gold), so the rest still loads.
    Errors of the whole file (unreadable, not JSON, not a list) always raise."""
    path = Path(path)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _from_saved_dataset(path, task, split, on_bad=on_bad)
    if path.is_dir():
        questions = _find(path, split, "questions")
        outputs = questions.with_name(questions.name.replace("questions", "outputs"))
        users = _from_lamp(questions, outputs if outputs.exists() else None, task, on_bad=on_bad)
        if (path / "rules.json").exists():  # a generated set: each user's planted rule (the oracle's)
            rules = _read_json(path / "rules.json")
            for user in users:
                user.rule = rules.get(user.user_id) if isinstance(rules, dict) else None
        return users
    records = _read_records(path)
    if records and isinstance(records[0], dict) and "query" in records[0]:
        return _from_oppu(path, records, task, on_bad=on_bad)
    return _from_lamp(path, None, task, records=records, on_bad=on_bad)


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
    except UnicodeDecodeError as err:
        raise not_utf8(str(path), err) from None
    except (OSError, json.JSONDecodeError) as err:
        raise TaskDataError(f"{path}: cannot read JSON: {err}") from err
    except RecursionError:
        raise TaskDataError(f"{path}: cannot read JSON: nested too deeply") from None


def not_utf8(where: str, err: UnicodeDecodeError) -> TaskDataError:
    return TaskDataError(f"{where}: not UTF-8 text (byte {err.start}); re-encode the file as UTF-8")


def _read_records(path: Path) -> list:
    """The file's records (validated one by one later, so a bad one can be named or skipped)."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise TaskDataError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    return data


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def per_record(records, load_one: Callable[[int, object], None], on_bad: OnBad | None) -> None:
    """`load_one(i, record)` for each record; it validates everything before it stores anything,
    so a bad record (raising `TaskDataError`) either stops the load or, with `on_bad`, is skipped whole."""
    for i, record in enumerate(records):
        try:
            load_one(i, record)
        except TaskDataError as err:
            if on_bad is None:
                raise
            on_bad(err)


def _from_saved_dataset(path: Path, task: Task, split: str | None, *, on_bad: OnBad | None) -> list[UserData]:
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split is None and len(data) != 1:
            raise TaskDataError(f"{path}: a dataset with splits {sorted(data)}; pass --split")
        if (split or next(iter(data))) not in data:
            raise TaskDataError(f"{path}: no split {split!r}; it has {sorted(data)}")
        data = data[split or next(iter(data))]
    rows = [_drop_none(row) for row in data.to_list()]  # Arrow fills absent fields with None
    golds = [{"id": row["id"], "output": row.pop("output")} for row in rows if "id" in row and "output" in row]
    return _from_lamp(path, path if golds else None, task, records=rows, on_bad=on_bad, outputs_data={"golds": golds})


def _golds(outputs: Path | None, task: Task, on_bad: OnBad | None, *, data: dict | None = None) -> dict[str, str]:
    if outputs is None:
        return {}
    data = _read_json(outputs) if data is None else data
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise TaskDataError(f"{outputs}: expected {{'task': ..., 'golds': [{{'id', 'output'}}]}}")
    golds = {}

    def one(i, g):
        if not isinstance(g, dict) or "id" not in g or "output" not in g:
            raise TaskDataError(f"{outputs}: golds[{i}] needs 'id' and 'output'")
        if str(g["id"]) in golds:
            raise TaskDataError(f"{outputs}: golds[{i}]: duplicate id {g['id']!r}")
        golds[str(g["id"])] = task.check_gold(g["output"], f"{outputs}: golds[{i}] (id {g['id']})")

    per_record(data["golds"], one, on_bad)
    return golds


def check_text(where: str, value, name: str) -> str:
    """`value` as text: a string or an integer, within MAX_FIELD_CHARS; else a TaskDataError."""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise TaskDataError(f"{where}: '{name}' must be text, not {type(value).__name__}")
    value = str(value)
    if len(value) > MAX_FIELD_CHARS:
        raise TaskDataError(f"{where}: '{name}' is {len(value):,} characters (limit {MAX_FIELD_CHARS:,})")
    try:  # JSON's \ud800 escapes decode to text no store, prompt or file can hold
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise TaskDataError(f"{where}: '{name}' is not valid Unicode (an unpaired surrogate escape at "
                            f"character {err.start})") from None
    return value


def unprintable(char: str) -> bool:
    """A control, format (zero-width, bidi override), surrogate, private or unassigned
    character, or a line or paragraph separator: what makes an id unnameable or look like
    another."""
    category = unicodedata.category(char)
    return category[0] == "C" or category in ("Zl", "Zp")


def shown(text: str) -> str:
    """`text` with every unprintable character written as its escape (`\\u202e`): safe to print."""
    return "".join(f"\\u{ord(c):04x}" if unprintable(c) else c for c in str(text))


def check_user_id(where: str, value, *, strings_only: bool = False) -> str:
    """A user id as printable text: one a person can name to `forget` and read in a listing.
    `strings_only`: an integer is refused too (an event log's id is a string; LaMP's question
    ids, used as user ids, may be numbers)."""
    if strings_only and not isinstance(value, str):
        raise TaskDataError(f"{where}: 'user_id' must be a string, not {type(value).__name__}")
    uid = check_text(where, value, "user_id")
    bad = next((c for c in uid if unprintable(c)), None)
    if bad is not None:
        raise TaskDataError(f"{where}: 'user_id' '{shown(uid)}' holds U+{ord(bad):04X} "
                            f"({unicodedata.name(bad, 'a control character').lower()}): a user id must be printable text")
    return uid


def check_labels(where: str, task: Task, query: str) -> None:
    """The label list the query spells must be the task's (an unknown label is an error)."""
    try:
        task.parse_labels(query)
    except TaskDataError as err:
        raise TaskDataError(f"{where}: {err}") from None


def _history(where: str, items, task: Task, *, dates: Dates, before: datetime | None = None,
             known: dict[str, dict] | None = None) -> list[dict]:
    """Validated profile items in time order, those dated at or after `before` left out (a
    question sees only its past). `known`: the user's items seen in other questions, by id (read,
    not changed): the same id with other content is an error."""
    if not isinstance(items, list):
        raise TaskDataError(f"{where}: 'profile' must be a list, not {type(items).__name__}")
    known = known or {}
    out, moments = {}, {}
    for j, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item:
            raise TaskDataError(f"{where}: profile[{j}] must be an object with an 'id'")
        at = f"{where}: profile[{j}] (id {item['id']})"
        item = {**item, "id": check_text(at, item["id"], "id")}
        try:
            for name, value in item.items():
                if isinstance(value, (str, int)) and not isinstance(value, bool):
                    check_text(at, value, name)
            text = task.item_text(item)
            response = task.item_response(item)
        except KeyError as err:
            raise TaskDataError(f"{at} lacks field {err}") from None
        except (TypeError, AttributeError) as err:
            raise TaskDataError(f"{at}: a field has the wrong type ({err})") from None
        if not check_text(at, text, "item text").strip():
            raise TaskDataError(f"{at}: the item text is empty")
        if response is not None:
            task.check_gold(response, at)
        if item.get("date") is not None:
            item["date"], moments[item["id"]] = dates.read(item["date"], at)
        if known.get(item["id"], item) != item or out.setdefault(item["id"], item) != item:
            raise TaskDataError(f"{at}: duplicate id with different content")
    items = list(out.values())
    if before is not None:
        items = [it for it in items if it["id"] not in moments or moments[it["id"]] < before]
    # Stable sort: items without a date keep file order, which LaMP releases keep chronological.
    if items and all(it["id"] in moments for it in items):
        items.sort(key=lambda it: moments[it["id"]])
    return items


def _from_lamp(questions: Path, outputs: Path | None, task: Task, *, records: list | None = None,
               on_bad: OnBad | None = None, outputs_data: dict | None = None) -> list[UserData]:
    records = _read_records(questions) if records is None else records
    golds = _golds(outputs, task, on_bad, data=outputs_data)
    units: dict[tuple[str, tuple[str, ...]], UserData] = {}  # (user, history ids) -> its unit
    known: dict[str, dict[str, dict]] = {}  # user -> every item of theirs seen, by id
    seen: set[str] = set()
    dates = Dates()

    def one(i, r):
        if not isinstance(r, dict) or not {"id", "input", "profile"} <= r.keys():
            raise TaskDataError(f"{questions}: record {i} needs 'id', 'input' and 'profile'")
        where = f"{questions}: record {i} (id {shown(r['id'])})"
        qid, text = check_text(where, r["id"], "id"), check_text(where, r["input"], "input")
        uid = check_user_id(where, r.get("user_id", qid))
        if qid in seen:
            raise TaskDataError(f"{where}: duplicate question id")
        check_labels(where, task, text)
        if golds and qid not in golds:
            raise TaskDataError(f"{where}: {outputs} has no gold for it")
        asked = None if r.get("date") is None else dates.read(r["date"], where)[1]
        profile = _history(where, r["profile"], task, dates=dates, before=asked, known=known.get(uid))
        if not profile:
            raise TaskDataError(f"{where}: empty history (no profile items before the question): "
                                "nothing to personalize from")
        seen.add(qid)
        known.setdefault(uid, {}).update((it["id"], it) for it in profile)
        key = (uid, tuple(it["id"] for it in profile))
        if key not in units:
            n = sum(u == uid for u, _ in units)
            units[key] = UserData(uid, task, profile, unit=uid if n == 0 else f"{uid}@{n + 1}")
        units[key].queries.append(Query(qid, text, golds.get(qid)))

    per_record(records, one, on_bad)
    stray = set(golds) - seen
    if stray and on_bad is None:
        raise TaskDataError(f"{outputs}: golds for question ids not in {questions.name}: {sorted(stray)[:5]}")
    for qid in sorted(stray):
        on_bad(TaskDataError(f"{outputs}: gold for id {qid} has no question"))
    return list(units.values())


def _from_oppu(path: Path, records: list, task: Task, *, on_bad: OnBad | None = None) -> list[UserData]:
    users: dict[str, UserData] = {}
    query_ids: set[str] = set()
    dates = Dates()

    def one(i, r):
        if not isinstance(r, dict) or not {"user_id", "profile", "query"} <= r.keys():
            raise TaskDataError(f"{path}: user {i} needs 'user_id', 'profile' and 'query'")
        where = f"{path}: user {i} ({shown(r['user_id'])})"
        uid = check_user_id(where, r["user_id"])
        if uid in users:
            raise TaskDataError(f"{where}: duplicate user id")
        user = UserData(uid, task, _history(where, r["profile"], task, dates=dates))
        if not user.history:
            raise TaskDataError(f"{where}: empty history (no profile items): nothing to personalize from")
        if not isinstance(r["query"], list):
            raise TaskDataError(f"{where}: 'query' must be a list")
        for j, q in enumerate(r["query"]):
            if not isinstance(q, dict) or not {"id", "input"} <= q.keys():
                raise TaskDataError(f"{where}: query[{j}] needs 'id' and 'input'")
            at = f"{where}: query[{j}] (id {q['id']})"
            qid, text = check_text(at, q["id"], "id"), check_text(at, q["input"], "input")
            if qid in query_ids or any(x.id == qid for x in user.queries):
                raise TaskDataError(f"{at}: duplicate query id")
            check_labels(at, task, text)
            gold = q.get("gold", q.get("output"))
            gold = None if gold is None else task.check_gold(gold, at)
            user.queries.append(Query(qid, text, gold))
        query_ids.update(q.id for q in user.queries)
        users[uid] = user

    per_record(records, one, on_bad)
    return list(users.values())
