"""Model artifact store, selected by URI, with sha256 verification.

- `file:///abs/dir` stores `<dir>/<name>` (written to a temp file, fsynced, renamed: a reader
  never sees half an artifact);
- `postgres` stores the bytes in the `artifacts` table of the service's own database
  (URI `postgres:///artifacts/<name>`), for deployments without shared disks.

The sha256 is computed on write and returned with the URI; `read(uri, sha256)` refuses bytes whose
digest differs (ArtifactCorrupt), so a ranker never loads a damaged or swapped artifact.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import sqlalchemy as sa
from sqlalchemy.engine import Engine


class ArtifactCorrupt(Exception):
    pass


class ArtifactMissing(Exception):
    pass


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    def __init__(self, root_uri: str, engine: Engine | None = None) -> None:
        """`root_uri`: `file:///some/dir` or `postgres`; `engine` is needed for postgres."""
        self.root_uri = root_uri
        self.engine = engine
        parsed = urlparse(root_uri)
        if parsed.scheme == "file":
            self.kind, self.directory = "file", Path(parsed.path)
            self.directory.mkdir(parents=True, exist_ok=True)
        elif root_uri.startswith("postgres"):
            if engine is None:
                raise ValueError("the postgres artifact store needs a database engine")
            self.kind, self.directory = "postgres", None
        else:
            raise ValueError(f"unsupported artifact store URI {root_uri!r} (file:///dir or postgres)")

    def space_problem(self, min_free_bytes: int = 1 << 20) -> str | None:
        """Why the next artifact would not fit (a readiness check), or None. At least the size of
        the last artifact written must be free (a model does not shrink between versions)."""
        if self.kind != "file":
            return None
        need = max(min_free_bytes, getattr(self, "last_size", 0))
        free = shutil.disk_usage(self.directory).free
        return None if free >= need else f"artifact store full: {free} bytes free, {need} needed"

    def write(self, name: str, data: bytes) -> tuple[str, str]:
        """Stores `data` under `name`; returns (uri, sha256)."""
        digest = sha256_hex(data)
        if self.kind == "file":
            target = self.directory / name
            fd, temp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, target)
                self.last_size = len(data)
            except BaseException:
                # A full disk must not keep the partial file: it would hold the space it lacked.
                Path(temp).unlink(missing_ok=True)
                raise
            return target.as_uri(), digest
        with self.engine.begin() as connection:
            connection.execute(sa.text(
                "INSERT INTO artifacts (name, sha256, data) VALUES (:name, :sha, :data) "
                "ON CONFLICT (name) DO UPDATE SET sha256 = EXCLUDED.sha256, data = EXCLUDED.data"),
                {"name": name, "sha": digest, "data": data})
        return f"postgres:///artifacts/{name}", digest

    def read(self, uri: str, expected_sha256: str) -> bytes:
        return read_verified(uri, expected_sha256, self.engine)


def read_uri(uri: str, engine: Engine | None = None) -> bytes:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        try:
            return Path(parsed.path).read_bytes()
        except FileNotFoundError:
            raise ArtifactMissing(uri) from None
    if parsed.scheme.startswith("postgres"):
        if engine is None:
            raise ValueError("reading a postgres artifact needs a database engine")
        name = parsed.path.rsplit("/", 1)[-1]
        with engine.connect() as connection:
            data = connection.execute(sa.text("SELECT data FROM artifacts WHERE name = :name"),
                                      {"name": name}).scalar()
        if data is None:
            raise ArtifactMissing(uri)
        return bytes(data)
    raise ValueError(f"unsupported artifact URI {uri!r}")


def read_verified(uri: str, expected_sha256: str, engine: Engine | None = None) -> bytes:
    data = read_uri(uri, engine)
    actual = sha256_hex(data)
    if actual != expected_sha256:
        raise ArtifactCorrupt(f"{uri}: sha256 {actual[:12]}... != expected {expected_sha256[:12]}...")
    return data
