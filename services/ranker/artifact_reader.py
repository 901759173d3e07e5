"""How the ranker reads the artifacts etcd names: sha256-verified (services/common/artifacts.py),
from a file or from the `artifacts` table. A replica needs no database otherwise, so the engine is
made only when the first postgres:// artifact shows up."""
from __future__ import annotations

import threading
from urllib.parse import urlparse

from services.common import artifacts, db


class ArtifactReader:
    """read_verified with a database engine made only if a postgres:// artifact shows up."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._engine = None
        self._lock = threading.Lock()

    def __call__(self, uri: str, sha256: str) -> bytes:
        engine = None
        if urlparse(uri).scheme.startswith("postgres"):
            with self._lock:
                if self._engine is None:
                    self._engine = db.make_engine(self.database_url, pool_size=1,
                                                  application_name="deltarec-ranker")
                engine = self._engine
        return artifacts.read_verified(uri, sha256, engine)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
