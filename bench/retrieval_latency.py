"""Memory retrieval latency and insert throughput as one store's memories grow.

    python bench/retrieval_latency.py [--users 1] [--sizes 1000,10000,100000] [--queries 200]
                                      [--stores edge,client] [--url http://localhost:6333]

`--users 1` is the heavy user: every memory is theirs. With more users, memories are spread
evenly and each query searches one random user's (filtered, as every search is). Stores:
- edge: Qdrant Edge in process, the embedded default (`<store>/qdrant-edge`);
- client: qdrant-client's embedded mode through `ClientPoints`, the default before Edge, and the
  code a Qdrant server runs behind `--qdrant-url` (give `--url` to measure a real server);
  it scans every point in Python, so sizes above `--client-max` are skipped.
Prints, per store and size: search p50/p95 (ms, top-k with the payloads), and memories
inserted per second (`EpisodicMemory.add`, batches of 256, to reach that size).
"""

import argparse
import random
import statistics
import tempfile
import time

import pandas as pd
from qdrant_client import QdrantClient

from persona_agent.adapters.points import ClientPoints, open_memory
from persona_agent.data.synthetic import CUES_2M, SETTINGS
from persona_agent.pipelines.memory import EpisodicMemory, MemoryItem


def text(rng):
    tags = rng.sample(list(CUES_2M), 3)
    return f"A film {rng.choice(SETTINGS)} about " + " and ".join(rng.choice(CUES_2M[t]) for t in tags), tags[0]


def open_store(kind: str, tmp: str, url: str | None) -> EpisodicMemory:
    if kind == "edge":
        return open_memory(path=f"{tmp}/edge")
    if kind == "client":
        return EpisodicMemory(ClientPoints(QdrantClient(path=f"{tmp}/client"), owns_client=True))
    return open_memory(url=url, collection=f"bench-{random.randrange(10**9)}")


def measure(kind: str, a, rows: list) -> None:
    rng = random.Random(0)
    users = [f"user{u:05d}" for u in range(a.users)]
    with tempfile.TemporaryDirectory() as tmp:
        memory, stored = open_store(kind, tmp, a.url), 0
        for size in [int(s) for s in a.sizes.split(",")]:
            if kind == "client" and size > a.client_max:
                rows.append({"store": kind, "memories": size, "p50 ms": None, "p95 ms": None, "inserts/s": None})
                continue
            by_user = {}
            for i in range(stored, size):
                t, label = text(rng)
                by_user.setdefault(users[i % len(users)], []).append(MemoryItem(f"m{i}", t, label))
            started = time.perf_counter()
            for user, items in by_user.items():
                memory.add(user, items)
            inserted = size - stored
            rate = inserted / (time.perf_counter() - started)
            stored = size
            lat = []
            for _ in range(a.queries):
                q, _ = text(rng)
                t0 = time.perf_counter()
                memory.search(rng.choice(users), q, a.k)
                lat.append((time.perf_counter() - t0) * 1000)
            lat.sort()
            rows.append({"store": kind, "memories": size, "p50 ms": statistics.median(lat),
                         "p95 ms": lat[int(0.95 * len(lat)) - 1], "inserts/s": rate})
            print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1, float_format=lambda v: f"{v:.2f}"),
                  flush=True)
        memory.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--stores", default="edge,client", help="edge, client and/or server (needs --url)")
    ap.add_argument("--url", help="a Qdrant server to measure as well")
    ap.add_argument("--client-max", type=int, default=10000)
    a = ap.parse_args()
    rows = []
    for kind in a.stores.split(",") + (["server"] if a.url and "server" not in a.stores else []):
        measure(kind, a, rows)
    print(f"\n{a.users} user(s), top-{a.k}, {a.queries} queries per size")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="skipped"))


if __name__ == "__main__":
    main()
