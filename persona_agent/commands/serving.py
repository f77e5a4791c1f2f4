"""`personas`, `answer` and `log-model`: the personas in the registry and the agent that serves them."""

from __future__ import annotations

from persona_agent.commands import Command
from persona_agent.commands.options import agent_options, count, lm_options, store_options, task_option, trace_if_asked
from persona_agent.data.loaders import MAX_FIELD_CHARS, shown
from persona_agent.settings import Settings


def personas_options(p, s):
    actions = p.add_subparsers(dest="action", required=True)
    for name, help_ in (("list", "users with personas: versions and the production version"),
                        ("show", "a persona's text (production, or --version V)"),
                        ("history", "every version of a user's persona with scores, acceptance and cost"),
                        ("diff", "unified diff between two versions"),
                        ("rollback", "make an earlier version the production one")):
        a = actions.add_parser(name, help=help_, description=help_)
        if name != "list":
            a.add_argument("user", help="user id")
        if name == "show":
            a.add_argument("--version", type=count(1), help="version number (default: production)")
        if name == "diff":
            a.add_argument("v1", type=count(1))
            a.add_argument("v2", type=count(1))
        if name == "rollback":
            a.add_argument("--to", type=count(1), required=True, help="version to serve")
            a.add_argument("--force", action="store_true",
                           help="serve it even if its profile fails today's profile check (tagged `forced`, logged)")
        if name == "history":
            a.add_argument("--wide", action="store_true",
                           help="every column, the whole reason and message (default: what fits the terminal)")
        a.add_argument("--task", default="lamp2m", help="task of the personas (default lamp2m)")
        store_options(a, s)


def personas_command(settings: Settings, args) -> int:
    from persona_agent.data.tasks import get_task
    from persona_agent.runtime.store import Store

    task = get_task(args.task)
    with Store.open(settings, memory=None) as store:
        registry = store.registry(task)
        if args.action == "list":
            table = registry.users()
            table["user_id"] = table["user_id"].map(shown)  # an id from before ingest refused them never prints raw
            print(table.to_string(index=False) if len(table) else "no personas registered yet")
        elif args.action == "show":
            print(registry.get(args.user, args.version).persona.render())
        elif args.action == "history":
            table = registry.history(args.user)
            if table.empty:
                raise LookupError(f"{task.key} user {args.user!r} has no persona in the registry")
            print(table.to_string(index=False) if args.wide else _fit(table.drop(columns=["iteration", "lm_calls",
                                                                                        "tokens", "message"])))
        elif args.action == "diff":
            print(registry.diff(args.user, args.v1, args.v2) or "identical")
        elif args.action == "rollback":
            registry.rollback(args.user, args.to, force=args.force)
            print(f"{args.user}: production is now version {args.to}")
    return 0


PERSONAS = Command(personas_command, personas_options, "inspect, compare and roll back personas in the MLflow prompt registry")


def answer_options(p, s):
    p.add_argument("user", help="user id")
    p.add_argument("query", help="the request, in the task's input format")
    task_option(p)
    agent_options(p.add_argument_group("agent"), s)
    lm_options(p, s)


def answer_command(settings: Settings, args) -> int:
    from persona_agent.data.tasks import get_task
    from persona_agent.runtime.store import Store
    from persona_agent.serving.answer import answer

    try:  # the shell hands undecodable bytes over as surrogates: refused here, not deep in the LM client
        args.query.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(err.object[err.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character U+{char:04X}"
        raise ValueError(f"the query is not UTF-8 text ({what} at position {err.start})") from None
    if not args.query.strip():
        raise ValueError("the query is empty")
    if len(args.query) > MAX_FIELD_CHARS:  # the limit every stored text has (ingest refuses a longer one)
        raise ValueError(f"the query is {len(args.query):,} characters (limit {MAX_FIELD_CHARS:,})")
    with Store.open(settings, memory="persistent") as store:
        trace_if_asked(args)
        print(answer(store, get_task(args.task), args.user, query=args.query))
    return 0


ANSWER = Command(answer_command, answer_options, "answer a query as USER's agent, with their production persona", "Serve one query: the production persona, the user's memory, the agent.")


def log_model_options(p, s):
    task_option(p)
    p.add_argument("--register", metavar="NAME", help="also register it in MLflow's model registry under NAME")
    agent_options(p.add_argument_group("agent"), s)
    lm_options(p, s)


def log_model_command(settings: Settings, args) -> int:
    from persona_agent.data.tasks import get_task
    from persona_agent.runtime.store import Store
    from persona_agent.serving.model import log_model, serve_instructions

    task = get_task(args.task)
    with Store.open(settings, memory=None) as store:
        uri = log_model(settings, task.key, args.register)
        served = store.registry(task).first_served()  # the printed request asks for a user it serves
    print(f"logged {uri}\n" + serve_instructions(settings, uri, task, user_id=served))
    return 0


LOG_MODEL = Command(log_model_command, log_model_options, "log every user's persona agent as one MLflow model (pyfunc)", "A model that answers user_id + query with that user's production persona, read at " "predict time: serve it with `mlflow models serve`.")


def _fit(table, last: str = "reason") -> str:
    """`table` as text in the terminal's width (80 when not a terminal): the `last` column, free
    text, is cut with an ellipsis where the line would run over."""
    import shutil

    width = shutil.get_terminal_size((80, 24)).columns
    head = table.drop(columns=[last]).to_string(index=False).splitlines()
    room = max(10, width - max(len(line) for line in head) - 2)
    cut = [text if len(text) <= room else text[:room - 1] + "…" for text in table[last].fillna("").astype(str)]
    return "\n".join(f"{h}  {c}" for h, c in zip(head, [last, *cut]))
