"""What the runs record: a data fingerprint of content, the same in every process."""

import subprocess
import sys
from dataclasses import replace

from persona_agent.data.loaders import Query, load_users
from persona_agent.data.synthetic import shipped_data_dir
from persona_agent.data.tasks import LAMP_2M
from persona_agent.runtime.tracking import data_fingerprint

_IN_A_NEW_PROCESS = """
from persona_agent.data.loaders import load_users
from persona_agent.data.synthetic import shipped_data_dir
from persona_agent.data.tasks import LAMP_2M
from persona_agent.runtime.tracking import data_fingerprint
print(data_fingerprint(load_users(shipped_data_dir(LAMP_2M), LAMP_2M)))
"""


def _in_a_new_process() -> str:
    return subprocess.run([sys.executable, "-c", _IN_A_NEW_PROCESS], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_data_fingerprint_is_the_same_for_the_same_data_in_two_processes():
    here = data_fingerprint(load_users(shipped_data_dir(LAMP_2M), LAMP_2M))
    assert _in_a_new_process() == _in_a_new_process() == here


def test_the_data_fingerprint_changes_with_any_gold_query_or_history_item():
    users = load_users(shipped_data_dir(LAMP_2M), LAMP_2M)[:3]
    base = data_fingerprint(users)
    q = users[1].queries[0]
    assert data_fingerprint(list(reversed(users))) == base  # order of loading is no change
    changed = [
        [users[0], replace(users[1], queries=[Query(q.id, q.input, "comedy" if q.gold != "comedy" else "action"),
                                              *users[1].queries[1:]]), users[2]],
        [users[0], replace(users[1], queries=users[1].queries[1:]), users[2]],
        [users[0], replace(users[1], profile=users[1].profile[1:]), users[2]],
        users[:2],
    ]
    assert len({base, *(data_fingerprint(c) for c in changed)}) == 1 + len(changed)
