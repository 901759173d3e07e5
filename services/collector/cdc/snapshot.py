"""The initial snapshot of a new consumer group, read in the snapshot its slot exported.

`CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT` returns the slot's consistent point and the name
of a snapshot that sees exactly the transactions committed before it. Reading the tables in that
snapshot (`SET TRANSACTION SNAPSHOT`) and then streaming the slot from its consistent point
gives every committed change exactly once: each transaction is either in the snapshot or in the
stream, never both, never neither — whatever writers do meanwhile.

Batch positions: the consumer's idempotency is an LSN high-water mark (skip a batch whose
commit_lsn is not above the mark). Snapshot rows have no LSN of their own, so the N snapshot
batches get the strictly increasing positions consistent_lsn - (N-1), ..., consistent_lsn - 1,
consistent_lsn (N is known up front: the rows are counted in the same snapshot). They are all
at or below the consistent point, and every streamed transaction ends after it, so one
monotonic mark covers snapshot and stream alike, and an ack of the consistent point means the
snapshot is complete. Each snapshot Delta carries the consistent point as its `lsn`.
"""
from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from typing import Iterator, Sequence

import psycopg2
import psycopg2.extensions
from google.protobuf import timestamp_pb2

from deltarec.v1 import collector_pb2

from services.collector.cdc import values
from services.collector.cdc.convert import to_struct
from services.collector.cdc.slots import TableShape, qualified_table, quote_ident, table_shape

log = logging.getLogger(__name__)


def _raw_text(value, _cursor):
    return value


class Snapshot:
    def __init__(self, dsn: str, snapshot_name: str, tables: Sequence[str], consistent_lsn: int,
                 batch_size: int) -> None:
        self.tables = list(tables)
        self.consistent_lsn = consistent_lsn
        self.batch_size = max(1, batch_size)
        self.connection = psycopg2.connect(dsn)
        self.connection.set_session(isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ,
                                    readonly=True)
        self.taken_at = datetime.now(timezone.utc)
        with self.connection.cursor() as cursor:
            # Must be the transaction's first statement; psycopg2 opened it with the settings above.
            cursor.execute("SET TRANSACTION SNAPSHOT %s", (snapshot_name,))
            self.shapes: list[TableShape] = [table_shape(cursor, table) for table in self.tables]
            # Columns come back as their type's output text, exactly what pgoutput sends (a
            # `::text` cast is not the same: bool gives 'true', char(n) loses its padding).
            oids = sorted({oid for shape in self.shapes for _, oid in shape.columns})
            psycopg2.extensions.register_type(
                psycopg2.extensions.new_type(tuple(oids), "DELTAREC_RAW_TEXT", _raw_text), self.connection)
            self.counts: list[int] = []
            for table in self.tables:
                cursor.execute(f"SELECT count(*) FROM {qualified_table(table)}")
                self.counts.append(int(cursor.fetchone()[0]))
        self.rows = sum(self.counts)
        self.batches = max(1, sum(math.ceil(count / self.batch_size) for count in self.counts))

    def position(self, index: int) -> int:
        return self.consistent_lsn - (self.batches - 1 - index)

    def read(self) -> Iterator[collector_pb2.DeltaBatch]:
        """The snapshot as DeltaBatches: per table, in chunks of at most batch_size rows."""
        index = 0
        commit_time = timestamp_pb2.Timestamp()
        commit_time.FromDatetime(self.taken_at)
        convert = values.convert
        for shape, count in zip(self.shapes, self.counts):
            if count == 0:
                continue
            names = [name for name, _ in shape.columns]
            oids = [oid for _, oid in shape.columns]
            keys = [names.index(column) for column in shape.key_columns]
            select = ", ".join(quote_ident(name) for name in names)
            with self.connection.cursor(name=f"snapshot_{index}") as cursor:
                cursor.itersize = self.batch_size
                cursor.execute(f"SELECT {select} FROM {qualified_table(shape.name)}")
                while True:
                    rows = cursor.fetchmany(self.batch_size)
                    if not rows:
                        break
                    batch = collector_pb2.DeltaBatch(snapshot=True, snapshot_begin=index == 0,
                                                     snapshot_end=index == self.batches - 1,
                                                     commit_lsn=self.position(index))
                    for raw in rows:
                        row = {name: convert(oid, text) for name, oid, text in zip(names, oids, raw)}
                        delta = batch.deltas.add(lsn=self.consistent_lsn, table=shape.name,
                                                 op=collector_pb2.OPERATION_SNAPSHOT)
                        delta.commit_time.CopyFrom(commit_time)
                        to_struct(delta.key, {names[i]: row[names[i]] for i in keys})
                        to_struct(delta.new_row, row)
                    yield batch
                    index += 1
        if index == 0:
            yield collector_pb2.DeltaBatch(snapshot=True, snapshot_begin=True, snapshot_end=True,
                                           commit_lsn=self.consistent_lsn)
            index = 1
        if index != self.batches:
            # Cannot happen in a repeatable-read snapshot; if it did, positions would be wrong.
            raise RuntimeError(f"snapshot produced {index} batches, expected {self.batches}")

    def close(self) -> None:
        try:
            self.connection.rollback()
            self.connection.close()
        except Exception:  # noqa: BLE001
            pass
