"""Change data capture: the collector's delta stream from Postgres logical replication.

Modules, from the wire up:
- pgoutput.py  decoder of the pgoutput protocol (v1) with typed values (values.py)
- reader.py    one slot's replication connection: decode, assemble transactions, feedback
- buffer.py    the bounded buffer between a reader and its gRPC stream (flow control)
- snapshot.py  the initial snapshot, read in the snapshot exported by the slot's creation
- slots.py     publication, slots and consumer-group rows in Postgres
- hub.py       the core (no gRPC): a process's consumer groups; opens, lists and drops them
- subscription.py  one group's stream: etcd slot lease, snapshot, batches, acks
- group_stats.py   the figures a group's metrics are computed from (lag, buffered, unacked)
- service.py   the gRPC edge and `build_delta_stream` (wired in services/collector/__main__.py)

Design decisions
----------------
- Publication `deltarec_cdc` over items and events (migration 0002; COLLECTOR_PUBLICATION and
  COLLECTOR_CDC_TABLES at start). REPLICA IDENTITY DEFAULT (the primary key): deletes and
  key-changing updates carry the old key; a table without a primary key gets FULL.
- One logical slot per consumer group, named `<COLLECTOR_SLOT_PREFIX><group>`; the prefix
  defaults to `deltarec_<database>_` because slot names are cluster-wide and one cluster may host
  several DeltaRec databases (one per test module, for instance).
- A group's first subscription creates its slot with an exported snapshot, sends the tables as
  read in that snapshot, then streams from the slot's consistent point: each transaction is in
  exactly one of the two. Snapshot batches carry increasing positions ending at the consistent
  point, so one LSN high-water mark covers both. The group's row in `cdc_consumer_groups`
  records when the consumer acked the snapshot's last batch; a slot whose snapshot was never
  acked to its end (crash or disconnect during the snapshot) is dropped and created again and
  the snapshot starts over, flagged `snapshot_begin`, so consumers discard the partial one.
- At-least-once: a slot is confirmed (send_feedback(flush_lsn=..., force=True)) only at a
  transaction boundary the consumer acked; a new subscription resumes at the slot's confirmed
  position. After a reconnect a batch never mixes transactions the consumer may already have
  applied with new ones (see SubscribeStart.resume_after_lsn), so a batch-level high-water mark
  on the consumer side is exact.
- Keepalives: when the consumer acked everything enqueued and the reader sits between
  transactions, the server's stream position is confirmed although nobody acked it (reader.py
  explains why that is safe); slots of idle groups thus release WAL.
- One stream per group at a time: a per-process lock plus the etcd key `collector/slots/<group>`
  held under a lease (Leadership). A second subscription waits as a standby (heartbeats with
  `standby` and the holder's id) and takes over when the holder's stream ends or its lease
  expires; a walsender still attached then is terminated (fencing). Chosen over answering
  UNAVAILABLE because a standby consumer then resumes within a lease TTL without polling.
- Values: pgoutput's text formats typed by the Relation's type OIDs (values.py); bigint as a JSON
  number up to 2**53-1 and as a decimal string beyond (exact in a double and in JavaScript).
"""
