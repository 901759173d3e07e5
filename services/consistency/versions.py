"""The consistency service's view of `model_versions` (owned by the trainer): reading a
version, and recording a rollback on the rows it concerns."""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

PUBLISHED, ROLLED_BACK = "published", "rolled_back"


class ModelVersions:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, version: int) -> dict | None:
        with self.engine.connect() as connection:
            row = connection.execute(sa.text(
                "SELECT version, COALESCE(parent_version, 0) AS parent_version, status, "
                "COALESCE(sha256, '') AS sha256, COALESCE(artifact_uri, '') AS artifact_uri, lsn_to, "
                "metrics, decision, COALESCE(canary_decision, '') AS canary_decision FROM model_versions "
                "WHERE version = :v"), {"v": version}).mappings().first()
        return None if row is None else dict(row)

    def published_before(self, version: int) -> list[dict]:
        """Versions below `version` that are published and were never rolled back, newest first
        (a version someone rolled back is not a candidate for an automatic rollback)."""
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text(
                "SELECT version FROM model_versions WHERE version < :v AND status = 'published' "
                "AND artifact_uri IS NOT NULL ORDER BY version DESC"), {"v": version}).scalars().all()
        return [self.get(int(v)) for v in rows]

    def record_rollback(self, from_version: int, to_version: int, reason: str) -> None:
        """`from_version` was replaced by a rollback (status rolled_back, with where to and when);
        `to_version` is published again."""
        with self.engine.begin() as connection:
            if from_version:
                connection.execute(sa.text(
                    "UPDATE model_versions SET status = 'rolled_back', rolled_back_to = :to, "
                    "rolled_back_at = now(), decision = decision || :note WHERE version = :v"),
                    {"to": to_version, "v": from_version,
                     "note": f"; rolled back to v{to_version}: {reason}"})
            connection.execute(sa.text(
                "UPDATE model_versions SET status = 'published', rolled_back_to = NULL, "
                "rolled_back_at = NULL, decision = decision || :note WHERE version = :v"),
                {"v": to_version, "note": f"; current again by a rollback from v{from_version}"})

    def last_canary_decision(self) -> dict | None:
        """The most recent promote/abort a canary decider wrote (services/feedback/decider.py)."""
        with self.engine.connect() as connection:
            row = connection.execute(sa.text(
                "SELECT version, canary_decision, canary_decided_at, canary_evidence FROM model_versions "
                "WHERE canary_decision IS NOT NULL ORDER BY canary_decided_at DESC, version DESC LIMIT 1"
            )).mappings().first()
        return None if row is None else dict(row)
