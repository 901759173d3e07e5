"""A decoder for the `pgoutput` logical replication protocol, version 1.

Postgres' built-in output plugin (present on every server, managed ones included) sends one
message per XLogData frame. `decode_message(payload)` turns one payload into a typed message;
`Decoder` additionally keeps the relation and type cache that Insert/Update/Delete need to
name their table and type their columns (a Relation message precedes the first change of a
table in each session, and again after the table's schema changed).

Message layout (all integers big-endian; String = NUL-terminated UTF-8):

    B  Begin     Int64 final_lsn, Int64 commit_time (us since 2000-01-01), Int32 xid
    C  Commit    Int8 flags, Int64 commit_lsn, Int64 end_lsn, Int64 commit_time
    O  Origin    Int64 origin commit_lsn, String name
    R  Relation  Int32 oid, String namespace ("" = pg_catalog), String name, Int8 replica identity,
                 Int16 ncols, ncols x (Int8 flags [1 = key], String name, Int32 type oid, Int32 typmod)
    Y  Type      Int32 oid, String namespace, String name
    I  Insert    Int32 relation oid, 'N', TupleData
    U  Update    Int32 relation oid, ['K' TupleData | 'O' TupleData], 'N', TupleData
    D  Delete    Int32 relation oid, 'K' | 'O', TupleData
    T  Truncate  Int32 nrels, Int8 options (1 = CASCADE, 2 = RESTART IDENTITY), nrels x Int32 oid
    M  Message   Int8 flags (1 = transactional), Int64 lsn, String prefix, Int32 length, bytes

    TupleData: Int16 ncols, per column 'n' (NULL) | 'u' (unchanged TOASTed value, not sent) |
               't' Int32 length + text bytes | 'b' Int32 length + binary bytes (protocol >= 2 only)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Union

from services.collector.cdc import values

# Postgres counts protocol timestamps in microseconds since 2000-01-01 UTC.
PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
PG_EPOCH_UNIX_S = int(PG_EPOCH.timestamp())   # 946_684_800
UNCHANGED_TOAST = object()   # marker for a 'u' column in TupleData


class ProtocolError(ValueError):
    pass


def pg_time(microseconds: int) -> datetime:
    return PG_EPOCH + timedelta(microseconds=microseconds)


@dataclass(frozen=True)
class Begin:
    final_lsn: int           # LSN of the commit record
    commit_time_us: int      # microseconds since 2000-01-01 UTC
    xid: int

    @property
    def commit_time(self) -> datetime:
        return pg_time(self.commit_time_us)


@dataclass(frozen=True)
class Commit:
    flags: int
    commit_lsn: int          # LSN of the commit record
    end_lsn: int             # end of the commit record: the position to ack/confirm
    commit_time_us: int

    @property
    def commit_time(self) -> datetime:
        return pg_time(self.commit_time_us)


@dataclass(frozen=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    key: bool


@dataclass(frozen=True)
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str    # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]

    @property
    def qualified_name(self) -> str:
        """'items' for tables in public (and pg_catalog), 'schema.table' otherwise."""
        return self.name if self.namespace in ("", "public") else f"{self.namespace}.{self.name}"


@dataclass(frozen=True)
class Type:
    oid: int
    namespace: str
    name: str


# A tuple as sent: one entry per column, each None (NULL), UNCHANGED_TOAST, str (text) or
# bytes (binary format).
RawTuple = tuple


@dataclass(frozen=True)
class Insert:
    relation_oid: int
    new: RawTuple


@dataclass(frozen=True)
class Update:
    relation_oid: int
    old_kind: str | None     # 'K' (old key: the key changed), 'O' (old row: REPLICA IDENTITY FULL), None
    old: RawTuple | None
    new: RawTuple


@dataclass(frozen=True)
class Delete:
    relation_oid: int
    old_kind: str            # 'K' or 'O'
    old: RawTuple


@dataclass(frozen=True)
class Truncate:
    options: int
    relation_oids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        return bool(self.options & 1)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & 2)


@dataclass(frozen=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = Union[Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate, LogicalMessage]

_INT8 = struct.Struct(">b")
_UINT8 = struct.Struct(">B")
_INT16 = struct.Struct(">h")
_INT32 = struct.Struct(">i")
_UINT32 = struct.Struct(">I")
_INT64 = struct.Struct(">q")
_UINT64 = struct.Struct(">Q")
_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">BQQq")


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def need(self, size: int) -> None:
        if self.pos + size > len(self.data):
            raise ProtocolError(f"message truncated at byte {self.pos} (needs {size} more)")

    def unpack(self, fmt: struct.Struct) -> tuple:
        self.need(fmt.size)
        result = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return result

    def byte(self) -> str:
        self.need(1)
        value = self.data[self.pos]
        self.pos += 1
        return chr(value)

    def string(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise ProtocolError(f"unterminated string at byte {self.pos}")
        value = self.data[self.pos:end].decode("utf-8")
        self.pos = end + 1
        return value

    def raw(self, size: int) -> bytes:
        self.need(size)
        value = self.data[self.pos:self.pos + size]
        self.pos += size
        return value

    def tuple_data(self) -> RawTuple:
        (count,) = self.unpack(_INT16)
        data, pos = self.data, self.pos
        columns: list[Any] = []
        append = columns.append
        size = len(data)
        for _ in range(count):
            if pos >= size:
                raise ProtocolError(f"tuple truncated at byte {pos}")
            kind = data[pos]
            pos += 1
            if kind == 0x74:     # 't'
                if pos + 4 > size:
                    raise ProtocolError(f"tuple truncated at byte {pos}")
                (length,) = _INT32.unpack_from(data, pos)
                pos += 4
                if pos + length > size:
                    raise ProtocolError(f"column value truncated at byte {pos}")
                append(data[pos:pos + length].decode("utf-8"))
                pos += length
            elif kind == 0x6E:   # 'n'
                append(None)
            elif kind == 0x75:   # 'u'
                append(UNCHANGED_TOAST)
            elif kind == 0x62:   # 'b'
                (length,) = _INT32.unpack_from(data, pos)
                pos += 4
                append(bytes(data[pos:pos + length]))
                pos += length
            else:
                raise ProtocolError(f"unknown tuple column kind {chr(kind)!r} at byte {pos - 1}")
        self.pos = pos
        return tuple(columns)


def decode_message(payload: bytes) -> Message:
    """Decodes one pgoutput message (the payload of one XLogData frame)."""
    if not payload:
        raise ProtocolError("empty message")
    reader = _Reader(payload, 1)
    kind = chr(payload[0])
    if kind == "B":
        final_lsn, commit_time, xid = reader.unpack(_BEGIN)
        return Begin(final_lsn, commit_time, xid)
    if kind == "C":
        flags, commit_lsn, end_lsn, commit_time = reader.unpack(_COMMIT)
        return Commit(flags, commit_lsn, end_lsn, commit_time)
    if kind == "I":
        (oid,) = reader.unpack(_UINT32)
        marker = reader.byte()
        if marker != "N":
            raise ProtocolError(f"Insert: expected 'N', got {marker!r}")
        return Insert(oid, reader.tuple_data())
    if kind == "U":
        (oid,) = reader.unpack(_UINT32)
        marker = reader.byte()
        old_kind = old = None
        if marker in ("K", "O"):
            old_kind, old = marker, reader.tuple_data()
            marker = reader.byte()
        if marker != "N":
            raise ProtocolError(f"Update: expected 'N', got {marker!r}")
        return Update(oid, old_kind, old, reader.tuple_data())
    if kind == "D":
        (oid,) = reader.unpack(_UINT32)
        marker = reader.byte()
        if marker not in ("K", "O"):
            raise ProtocolError(f"Delete: expected 'K' or 'O', got {marker!r}")
        return Delete(oid, marker, reader.tuple_data())
    if kind == "R":
        (oid,) = reader.unpack(_UINT32)
        namespace, name = reader.string(), reader.string()
        identity = reader.byte()
        (count,) = reader.unpack(_INT16)
        columns = []
        for _ in range(count):
            (flags,) = reader.unpack(_UINT8)
            column_name = reader.string()
            type_oid, typmod = reader.unpack(_UINT32)[0], reader.unpack(_INT32)[0]
            columns.append(Column(column_name, type_oid, typmod, bool(flags & 1)))
        return Relation(oid, namespace, name, identity, tuple(columns))
    if kind == "Y":
        (oid,) = reader.unpack(_UINT32)
        return Type(oid, reader.string(), reader.string())
    if kind == "O":
        (lsn,) = reader.unpack(_UINT64)
        return Origin(lsn, reader.string())
    if kind == "T":
        (count,) = reader.unpack(_INT32)
        (options,) = reader.unpack(_INT8)
        oids = tuple(reader.unpack(_UINT32)[0] for _ in range(count))
        return Truncate(options, oids)
    if kind == "M":
        (flags,) = reader.unpack(_INT8)
        (lsn,) = reader.unpack(_UINT64)
        prefix = reader.string()
        (length,) = reader.unpack(_INT32)
        return LogicalMessage(bool(flags & 1), lsn, prefix, reader.raw(length))
    raise ProtocolError(f"unknown pgoutput message type {kind!r}")


@dataclass
class RowChange:
    """One decoded row change with typed values, ready to become a Delta."""
    lsn: int
    table: str
    op: str                              # 'insert' | 'update' | 'delete' | 'truncate'
    key: dict[str, Any] | None = None
    new_row: dict[str, Any] | None = None
    old_key: dict[str, Any] | None = None
    unchanged_toast_columns: list[str] = field(default_factory=list)


_ROW_KINDS = frozenset(b"IUD")


class Decoder:
    """Stateful pgoutput decoder: keeps the Relation and Type messages of the session and
    turns Insert/Update/Delete/Truncate into `RowChange`s with typed values."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        self.types: dict[int, Type] = {}

    def relation(self, oid: int) -> Relation:
        try:
            return self.relations[oid]
        except KeyError:
            raise ProtocolError(f"change for relation {oid} before its Relation message") from None

    def row_table(self, payload: bytes) -> str | None:
        """The table of an Insert, Update or Delete message from its relation oid alone (None for
        other messages or a relation not announced yet): lets a reader skip decoding the rows of
        tables its stream does not carry (every published table reaches every slot; decoding an
        `impressions` row costs ~100 us of Python for nothing in the slots that skip it)."""
        if len(payload) < 5 or payload[0] not in _ROW_KINDS:
            return None
        relation = self.relations.get(int.from_bytes(payload[1:5], "big"))
        return relation.qualified_name if relation is not None else None

    def feed(self, payload: bytes, lsn: int = 0) -> tuple[Message, list[RowChange]]:
        """Decodes one message; returns it and the row changes it carries (none for
        Begin/Commit/Relation/...)."""
        message = decode_message(payload)
        return message, self.changes(message, lsn)

    def changes(self, message: Message, lsn: int = 0) -> list[RowChange]:
        if isinstance(message, Insert):
            relation = self.relation(message.relation_oid)
            row, unchanged = typed_row(relation, message.new)
            return [RowChange(lsn, relation.qualified_name, "insert", key_of(relation, row), row,
                              None, unchanged)]
        if isinstance(message, Update):
            relation = self.relation(message.relation_oid)
            row, unchanged = typed_row(relation, message.new)
            key = key_of(relation, row)
            old_key = None
            if message.old is not None:
                old_row, _ = typed_row(relation, message.old)
                old_key = key_of(relation, old_row)
                if message.old_kind == "O" and old_key == key:
                    old_key = None     # REPLICA IDENTITY FULL sends the old row on every update
            return [RowChange(lsn, relation.qualified_name, "update", key, row, old_key, unchanged)]
        if isinstance(message, Delete):
            relation = self.relation(message.relation_oid)
            old_row, _ = typed_row(relation, message.old)
            old_key = key_of(relation, old_row)
            return [RowChange(lsn, relation.qualified_name, "delete", old_key, None, old_key)]
        if isinstance(message, Truncate):
            return [RowChange(lsn, self.relation(oid).qualified_name, "truncate")
                    for oid in message.relation_oids]
        if isinstance(message, Relation):
            self.relations[message.oid] = message
        elif isinstance(message, Type):
            self.types[message.oid] = message
        return []


def typed_row(relation: Relation, raw: RawTuple) -> tuple[dict[str, Any], list[str]]:
    """Column name -> typed value; unchanged TOASTed columns are left out and listed."""
    if len(raw) != len(relation.columns):
        raise ProtocolError(f"{relation.qualified_name}: tuple has {len(raw)} columns, "
                            f"relation has {len(relation.columns)}")
    row: dict[str, Any] = {}
    unchanged: list[str] = []
    convert = values.convert
    for column, value in zip(relation.columns, raw):
        if value is UNCHANGED_TOAST:
            unchanged.append(column.name)
        elif value is None:
            row[column.name] = None
        elif isinstance(value, bytes):
            row[column.name] = value.hex()
        else:
            row[column.name] = convert(column.type_oid, value)
    return row, unchanged


def key_of(relation: Relation, row: dict[str, Any]) -> dict[str, Any]:
    return {column.name: row[column.name] for column in relation.columns
            if column.key and column.name in row}
