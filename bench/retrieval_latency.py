"""Memory retrieval latency as stored memories grow (embedded Qdrant, lexical retrieval).

    python bench/retrieval_latency.py [--users 1000] [--sizes 1000,10000,100000] [--queries 200]

Memories are spread evenly over the users; each query searches one random user's memories
(filtered, as every search is). Prints p50/p95 per size.
"""

import argparse
import random
import statistics
import tempfile
import time

from persona_agent.eval.synthetic import CUES_2M, SETTINGS
from persona_agent.pipelines.memory import EpisodicMemory, MemoryItem


def text(rng):
    tags = rng.sample(list(CUES_2M), 3)
    return f"A film {rng.choice(SETTINGS)} about " + " and ".join(rng.choice(CUES_2M[t]) for t in tags), tags[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--layout", default="per_user", choices=["per_user", "shared"])
    a = ap.parse_args()
    rng = random.Random(0)
    users = [f"user{u:05d}" for u in range(a.users)]
    with tempfile.TemporaryDirectory() as tmp:
        memory = EpisodicMemory.open(path=tmp, layout=a.layout)
        stored = 0
        print(f"{'memories':>9} {'p50 ms':>8} {'p95 ms':>8} {'insert s':>9}")
        for size in [int(s) for s in a.sizes.split(",")]:
            started = time.perf_counter()
            while stored < size:
                batch = min(size - stored, 2000)
                by_user = {}
                for i in range(stored, stored + batch):
                    t, label = text(rng)
                    by_user.setdefault(users[i % len(users)], []).append(MemoryItem(f"m{i}", t, label))
                for user, items in by_user.items():
                    memory.add(user, items)
                stored += batch
            inserted = time.perf_counter() - started
            lat = []
            for _ in range(a.queries):
                q, _ = text(rng)
                t0 = time.perf_counter()
                memory.search(rng.choice(users), q, a.k)
                lat.append((time.perf_counter() - t0) * 1000)
            lat.sort()
            print(f"{size:>9} {statistics.median(lat):>8.2f} {lat[int(0.95 * len(lat)) - 1]:>8.2f} {inserted:>9.1f}")
        memory.close()


if __name__ == "__main__":
    main()
