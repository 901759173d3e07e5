"""Change data capture: the collector's delta stream from Postgres logical replication.

Modules, from the wire up:
- pgoutput.py  decoder of the pgoutput protocol (v1) with typed values (values.py)
- reader.py    one slot's replication connection: decode, assemble transactions, feedback
- buffer.py    the bounded buffer between a reader and its gRPC stream (flow control)
- snapshot.py  the initial snapshot, read in the snapshot exported by the slot's creation
- slots.py     publication, slots and consumer-group rows in Postgres
- stream.py    the core: consumer groups, etcd slot leases, subscriptions (no gRPC)
- service.py   the gRPC edge and `build_delta_stream` (wired in services/collector/__main__.py)
"""
