"""Consistency check cost: bucketed digests against reading both sides whole.

For each size N (quick: 25k and 100k synthetic items and users; full: 100k, 300k and 1M) it
loads N items (with text and 384-d embeddings in item_features, as features stores them) and N
users with 3 events each (and their user_features state) straight into Postgres, then measures:

* `check_s`: a Check of the data comparisons (catalog vs feature store, events vs user state)
  through the real consistency service over gRPC, when everything agrees;
* `reference_s` (same run): what a check without digests does: read `items`, `item_features`,
  `events` and `user_features` whole into the client (every column, embeddings included),
  count each user's events, and compare row by row;
* `localise_s`: one item_features row changed by plain SQL, then a Check: time until the finding
  names exactly that item (with the rows it had to read);
* bytes moved to the checker (digests vs whole rows), and how check_s grows with N (the
  exponent of a power-law fit: 1.0 = linear).

A stand-in for an idle, caught-up features consumer moves consumer_offsets to the WAL position
every 50 ms (what features does on the collector's heartbeats), so the check's settle step sees
the consumer past a difference and calls it drift.
"""
from __future__ import annotations

import argparse
import math
import os
import threading
import time
from pathlib import Path

import _harness
from _harness import progress

EVENTS_PER_USER = 3
TYPES = ("view", "click", "add_to_cart", "purchase", "search")


def load(connection, n: int) -> None:
    """N items + features, N users with events + state, generated inside Postgres."""
    cursor = connection.cursor()
    cursor.execute("TRUNCATE items, item_features, events, user_features")
    cursor.execute("""
        INSERT INTO items (item_id, title, description, category, brand, active)
        SELECT 'item-' || i, 'Product ' || i || ' ' || md5(i::text), repeat('words ', 1 + i %% 20),
               'Beauty > Cat ' || (i %% 50), 'Brand ' || (i %% 300), i %% 17 <> 0
        FROM generate_series(1, %s) AS i""", (n,))
    cursor.execute("""
        INSERT INTO item_features (item_id, active, in_catalog, content_hash, embedding, title, category,
                                   brand, updated_lsn)
        SELECT item_id, active, true, deltarec_content_hash(title, description, category, brand),
               decode(repeat(md5(item_id), 48), 'hex'), title, category, brand, 1
        FROM items""")
    cursor.execute("""
        INSERT INTO events (event_id, event_type, user_id, item_id, query, occurred_at)
        SELECT 'e-' || u || '-' || k,
               (ARRAY['view','click','add_to_cart','purchase','search'])[1 + (u + k) %% 5],
               'user-' || u, CASE WHEN (u + k) %% 5 = 4 THEN NULL ELSE 'item-' || (1 + (u * 7 + k) %% %s) END,
               CASE WHEN (u + k) %% 5 = 4 THEN 'query ' || u ELSE NULL END,
               now() - make_interval(secs => u + k)
        FROM generate_series(1, %s) AS u, generate_series(1, %s) AS k""", (n, n, EVENTS_PER_USER))
    counters = ", ".join(f"'{t}', count(*) FILTER (WHERE event_type = '{t}')" for t in TYPES)
    cursor.execute(f"""
        INSERT INTO user_features (user_id, history, counters, updated_lsn)
        SELECT user_id,
               COALESCE(jsonb_agg(jsonb_build_object('item_id', item_id, 'type', event_type,
                                                     'ts', occurred_at, 'event', id) ORDER BY occurred_at)
                        FILTER (WHERE item_id IS NOT NULL), '[]'::jsonb),
               jsonb_strip_nulls(jsonb_build_object({counters})), 1
        FROM events GROUP BY user_id""")
    # Counters of zero are absent in what features writes; the check reads absent as 0.
    cursor.execute("UPDATE user_features SET counters = (SELECT COALESCE(jsonb_object_agg(k, v), "
                   "'{}'::jsonb) FROM jsonb_each(counters) AS c(k, v) WHERE v::text <> '0')")
    cursor.execute("INSERT INTO consumer_offsets (consumer, applied_lsn) VALUES ('features', 0) "
                   "ON CONFLICT (consumer) DO NOTHING")
    connection.commit()
    connection.autocommit = True
    for table in ("items", "item_features", "events", "user_features"):
        cursor.execute(f"VACUUM ANALYZE {table}")
    connection.autocommit = False


class CaughtUpConsumer:
    """Keeps consumer_offsets('features') at the WAL insert position, like an idle features."""

    def __init__(self, connection) -> None:
        self.connection = connection
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        cursor = self.connection.cursor()
        while not self._stop.wait(0.05):
            cursor.execute("UPDATE consumer_offsets SET applied_lsn = "
                           "pg_current_wal_insert_lsn() - '0/0'::pg_lsn WHERE consumer = 'features'")
            self.connection.commit()


def reference_check(connection, history_length: int = 50) -> tuple[float, int, int]:
    """Both sides read whole (every column, as a comparison without digests must) and compared
    row by row in the client; (seconds, differences, bytes read)."""
    started = time.perf_counter()
    moved = 0
    cursor = connection.cursor()
    cursor.execute("SELECT * FROM items")
    names = [d[0] for d in cursor.description]
    key, hash_at, active_at = names.index("item_id"), names.index("content_hash"), names.index("active")
    catalog = {}
    for row in cursor:
        moved += sum(len(str(v)) for v in row if v is not None)
        if row[active_at]:
            catalog[row[key]] = row[hash_at]
    cursor.execute("SELECT * FROM item_features")
    names = [d[0] for d in cursor.description]
    at = {name: names.index(name)
          for name in ("item_id", "content_hash", "active", "in_catalog", "embedding")}
    store = {}
    for row in cursor:
        moved += sum(len(v) if isinstance(v, (bytes, memoryview, str)) else 8 for v in row if v is not None)
        if row[at["active"]] and row[at["in_catalog"]] and row[at["embedding"]] is not None:
            store[row[at["item_id"]]] = row[at["content_hash"]]
    differences = sum(1 for k in catalog.keys() | store.keys() if catalog.get(k) != store.get(k))
    cursor.execute("SELECT * FROM events")
    names = [d[0] for d in cursor.description]
    user_at, type_at, item_at = names.index("user_id"), names.index("event_type"), names.index("item_id")
    expected: dict[str, list[int]] = {}
    for row in cursor:
        moved += sum(len(str(v)) for v in row if v is not None)
        counts = expected.setdefault(row[user_at], [0] * (len(TYPES) + 1))
        counts[TYPES.index(row[type_at])] += 1
        if row[item_at] and row[type_at] != "search":
            counts[-1] += 1
    cursor.execute("SELECT * FROM user_features")
    names = [d[0] for d in cursor.description]
    user_at, counters_at, history_at = names.index("user_id"), names.index("counters"), names.index("history")
    stored = {}
    for row in cursor:
        moved += sum(len(str(v)) for v in row if v is not None)
        stored[row[user_at]] = [int(row[counters_at].get(t, 0)) for t in TYPES] + [len(row[history_at])]
    for counts in expected.values():
        counts[-1] = min(counts[-1], history_length)
    differences += sum(1 for k in expected.keys() | stored.keys() if expected.get(k) != stored.get(k))
    connection.commit()
    return time.perf_counter() - started, differences, moved


def run_size(suite, stub, connection, n: int) -> dict:
    from deltarec.v1 import consistency_pb2
    progress(f"loading {n} items and {n} users ({n * EVENTS_PER_USER} events)")
    started = time.perf_counter()
    load(connection, n)
    progress(f"loaded in {time.perf_counter() - started:.1f} s")
    request = consistency_pb2.CheckRequest(checks=["catalog_features", "user_events"])
    stub.Check(request, timeout=600)                      # warm the caches, as the reference gets below
    started = time.perf_counter()
    report = stub.Check(request, timeout=600)
    check_s = time.perf_counter() - started
    bad = [f for f in report.findings if f.severity >= 2]
    if bad:
        raise SystemExit(f"the generated data should be consistent: {bad[0].detail}")
    reference_check(connection)                            # warm
    reference_s, differences, moved = reference_check(connection)
    assert differences == 0, differences
    digest_bytes = sum(d.buckets for d in report.digests) * 20     # (bucket, count, xor) per bucket
    cursor = connection.cursor()
    cursor.execute("UPDATE item_features SET content_hash = 'edited-by-hand' WHERE item_id = %s",
                   (f"item-{n // 2 + 1}",))
    connection.commit()
    started = time.perf_counter()
    located = stub.Check(consistency_pb2.CheckRequest(checks=["catalog_features"]), timeout=600)
    localise_s = time.perf_counter() - started
    found = [list(f.keys) for f in located.findings if f.severity == 3]
    rows_read = sum(d.rows_read for d in located.digests)
    if found != [[f"item-{n // 2 + 1}"]]:
        raise SystemExit(f"the drifted item was not localised exactly: {found}")
    cursor.execute("UPDATE item_features f SET content_hash = deltarec_content_hash(i.title, i.description, "
                   "i.category, i.brand) FROM items i WHERE i.item_id = f.item_id AND f.item_id = %s",
                   (f"item-{n // 2 + 1}",))
    connection.commit()
    result = {"n": n, "check_s": round(check_s, 3), "reference_s": round(reference_s, 3),
              "ratio": _harness.ratio(check_s, reference_s), "localise_s": round(localise_s, 3),
              "localise_rows_read": rows_read, "digest_bytes": digest_bytes, "reference_bytes": moved}
    progress(str(result))
    return result


def growth_exponent(results: list[dict], key: str) -> float | None:
    points = [(math.log(r["n"]), math.log(r[key])) for r in results if r[key] > 0]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in points)
             / sum((x - mean_x) ** 2 for x, _ in points))
    return round(slope, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="25k and 100k (default: 100k, 300k, 1M)")
    args = parser.parse_args()
    sizes = [25_000, 100_000] if args.quick else [100_000, 300_000, 1_000_000]
    import grpc
    from deltarec.v1 import consistency_pb2_grpc
    # DELTAREC_BENCH_INFRA_DIR: a Postgres/etcd of one's own on a machine shared with other runs.
    infra_dir = Path(os.environ.get("DELTAREC_BENCH_INFRA_DIR", _harness.INFRA_DIR))
    with _harness.Suite("consistency", infra_dir=infra_dir) as suite:
        connection = suite.connect()
        service = suite.start("services.consistency", suite.service_env(
            CONSISTENCY_CHECK_INTERVAL_S="0", CONSISTENCY_SETTLE_S="10"), name="consistency")
        stub = consistency_pb2_grpc.ConsistencyServiceStub(grpc.insecure_channel(service.address))
        with CaughtUpConsumer(suite.connect()):
            results = [run_size(suite, stub, connection, n) for n in sizes]
    largest = results[-1]
    summary = {"benchmark": "consistency", "quick": args.quick, "sizes": results,
               "check_s": largest["check_s"],
               "reference": "read items, item_features, events, user_features whole and compare row by row "
               "(same run)", "reference_s": largest["reference_s"],
               "ratio": largest["ratio"], "localise_one_item_s": largest["localise_s"],
               "check_growth_exponent": growth_exponent(results, "check_s"),
               "reference_growth_exponent": growth_exponent(results, "reference_s"),
               "bytes_ratio": _harness.ratio(largest["digest_bytes"], largest["reference_bytes"], 5)}
    _harness.print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
