"""Domain and infrastructure errors become precise statuses, the same for every service."""
from __future__ import annotations

import grpc
import sqlalchemy.exc

from services.common.errors import InvalidArgument, NotFound, status_for
from services.common.etcd import EtcdUnavailable


def test_domain_errors_keep_their_code_and_message():
    assert status_for(InvalidArgument("user_id: required")) == (grpc.StatusCode.INVALID_ARGUMENT, "user_id: required")
    assert status_for(NotFound("version 9"))[0] == grpc.StatusCode.NOT_FOUND


def test_etcd_and_postgres_outages_are_unavailable_not_internal():
    code, message = status_for(EtcdUnavailable("connection refused"))
    assert code == grpc.StatusCode.UNAVAILABLE and message == "etcd unavailable: connection refused"
    assert status_for(sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("down")))[0] == \
        grpc.StatusCode.UNAVAILABLE


def test_anything_else_is_internal_without_details():
    assert status_for(KeyError("secret")) == (grpc.StatusCode.INTERNAL, "internal error (KeyError)")
