"""Contracts that are not protos (etcd keys, JSON values, enums, row shapes), each defined once."""
