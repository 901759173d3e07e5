"""The consistency service: proves that every part agrees with the source, localises drift,
repairs it and rolls models back. Plain-Python core (checks, repairs, rollback, history) under
a thin gRPC edge (server.py); `__main__` only composes."""
