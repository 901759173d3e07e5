"""Decoded transactions -> protobuf DeltaBatch messages."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from google.protobuf import struct_pb2

from deltarec.v1 import collector_pb2

from services.collector.cdc.buffer import Transaction
from services.collector.cdc.pgoutput import PG_EPOCH_UNIX_S

OPERATIONS = {
    "insert": collector_pb2.OPERATION_INSERT,
    "update": collector_pb2.OPERATION_UPDATE,
    "delete": collector_pb2.OPERATION_DELETE,
    "truncate": collector_pb2.OPERATION_TRUNCATE,
}


def to_struct(target: struct_pb2.Struct, mapping: Mapping[str, Any]) -> None:
    target.update(mapping)


def batch_of(transactions: Sequence[Transaction]) -> collector_pb2.DeltaBatch:
    """One DeltaBatch of whole transactions; commit_lsn is the last commit's end LSN."""
    batch = collector_pb2.DeltaBatch(commit_lsn=transactions[-1].commit_lsn)
    add = batch.deltas.add
    for transaction in transactions:
        seconds, micros = divmod(transaction.commit_time_us, 1_000_000)
        seconds += PG_EPOCH_UNIX_S
        nanos = micros * 1000
        for change in transaction.changes:
            delta = add(lsn=change.lsn, xid=transaction.xid, table=change.table, op=OPERATIONS[change.op])
            delta.commit_time.seconds = seconds
            delta.commit_time.nanos = nanos
            if change.key is not None:
                delta.key.update(change.key)
            if change.new_row is not None:
                delta.new_row.update(change.new_row)
            if change.old_key is not None:
                delta.old_key.update(change.old_key)
            if change.unchanged_toast_columns:
                delta.unchanged_toast_columns.extend(change.unchanged_toast_columns)
    return batch
