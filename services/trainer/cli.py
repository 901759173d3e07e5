"""Trainer command line.

    python -m services.trainer.cli train [--seed N] [--epochs N] [--publish]     # via the Train RPC
    python -m services.trainer.cli train --local [--publish]   # in this process (no server needed)
    python -m services.trainer.cli update [--window S] [--threshold N] [--priority P] [--top-share F]
                                          [--replay-ratio F] [--publish]
    python -m services.trainer.cli versions [--limit N]
    python -m services.trainer.cli status

Remote commands talk to TRAINER_ADDRESS (or --address) and show the run's progress (phase,
elapsed time) from Status while the call runs. `train --local` reads DATABASE_URL, ETCD_ENDPOINT
and the TRAINER_* settings like the server, trains in this process with per-epoch progress bars,
and publishes only if it can take the leader lease (i.e. no trainer server is running).
Training is deterministic for a seed: the same seed on the same recorded data gives the same
weights and metrics.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import grpc

from deltarec.v1 import trainer_pb2, trainer_pb2_grpc

from services.common import channels


def _status_name(value: int) -> str:
    return trainer_pb2.VersionStatus.Name(value).removeprefix("VERSION_STATUS_").lower()


def _print_version(version, published: bool | None = None) -> None:
    metrics = version.metrics
    print(f"version {version.version}  {version.strategy}  parent {version.parent_version or '-'}  "
          f"status {_status_name(version.status)}{'  (published now)' if published else ''}")
    print(f"  data: lsn ({version.lsn_from}, {version.lsn_to}]  {version.interactions} interactions  "
          f"{version.items} items  trained in {version.train_seconds:.1f}s")
    print(f"  metrics on {metrics.users} held-out users: recall@5 {metrics.recall_at_5:.4f}  "
          f"recall@10 {metrics.recall_at_10:.4f}  ndcg@5 {metrics.ndcg_at_5:.4f}  ndcg@10 {metrics.ndcg_at_10:.4f}")
    if version.baseline_version:
        base = version.baseline_metrics
        print(f"  current version {version.baseline_version} on the same users: recall@10 "
              f"{base.recall_at_10:.4f}  ndcg@10 {base.ndcg_at_10:.4f}")
    if version.anchor_version:
        anchor = version.anchor_metrics
        print(f"  last full retrain v{version.anchor_version} on the same users: recall@10 "
              f"{anchor.recall_at_10:.4f}  ndcg@10 {anchor.ndcg_at_10:.4f}")
    if version.full_version:
        full = version.full_metrics
        print(f"  shadow full retrain v{version.full_version} on the same data: recall@10 {full.recall_at_10:.4f}  "
              f"ndcg@10 {full.ndcg_at_10:.4f}  ({version.full_train_seconds:.1f}s)")
    if version.published_as:
        print(f"  published as model/{version.published_as}"
              + (f" (share {version.canary_share:g})" if version.published_as == "canary" else "")
              + (f"; canary decision: {version.canary_decision}" if version.canary_decision else ""))
    print(f"  decision: {version.decision}" + (f"  (gate evidence: {version.gate_evidence})"
                                             if version.gate_evidence else ""))
    if version.artifact_uri:
        print(f"  artifact: {version.artifact_uri}  sha256 {version.sha256}")


def _watch_progress(stub, done: threading.Event) -> None:
    last = ""
    started = time.monotonic()
    while not done.wait(1.0):
        try:
            status = stub.Status(trainer_pb2.TrainerServiceStatusRequest(), timeout=5)
        except grpc.RpcError:
            continue
        if status.HasField("progress"):
            p = status.progress
            line = (f"  version {p.version} ({p.kind}): {p.phase}"
                    + (f", {p.epochs} epochs" if p.epochs and p.phase == "training" else "")
                    + f"  [{p.elapsed_seconds:.0f}s]")
        else:
            line = f"  waiting  [{time.monotonic() - started:.0f}s]"
        if line != last:
            print(line, file=sys.stderr, flush=True)
            last = line


def _remote(args, call):
    address = args.address or os.environ.get("TRAINER_ADDRESS", "127.0.0.1:50053")
    channel = channels.make_channel(address, channels.TRAINER)   # TLS / token from the environment
    stub = trainer_pb2_grpc.TrainerServiceStub(channel)
    done = threading.Event()
    watcher = threading.Thread(target=_watch_progress, args=(stub, done), daemon=True)
    watcher.start()
    try:
        return call(stub)
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        done.set()
        channel.close()


def _train_local(args) -> int:
    from services.common import db, logs
    from services.common.artifacts import ArtifactStore
    from services.common.config import load
    from services.common.etcd import Etcd, Leadership
    from services.trainer.config import TrainerConfig
    from services.trainer.runs import TrainerCore, set_torch_threads
    from services.contracts.etcd_keys import TRAINER_LEADER
    from services.trainer.publisher import Publisher
    from services.trainer.server import version_message

    config = load(TrainerConfig)
    logs.setup("trainer-cli", "WARNING")
    set_torch_threads(config.torch_threads)
    db.migrate(config.database_url)
    engine = db.make_engine(config.database_url, pool_size=2, application_name="deltarec-trainer-cli")
    etcd = Etcd.from_config(config)
    holder = f"cli-{os.getpid()}"
    leadership = Leadership(etcd, TRAINER_LEADER, holder, config.leader_ttl_s)
    if not leadership.try_acquire():
        print(f"a trainer server holds the leader lease ({leadership.holder()}): use `train` without --local",
              file=sys.stderr)
        return 1
    try:
        core = TrainerCore(config, engine, Publisher(etcd, ArtifactStore(config.artifact_uri, engine)), holder,
                           is_leader=lambda: leadership.held)
        core.show_progress = True
        print(f"training on {core.log.count()} recorded interactions (seed {args.seed or config.seed})",
              file=sys.stderr)
        outcome = core.train(seed=args.seed, epochs=args.epochs, publish=args.publish)
        _print_version(version_message(outcome.version), outcome.published)
        return 0
    finally:
        leadership.resign()
        etcd.close()
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.trainer.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="", help="trainer host:port (default: $TRAINER_ADDRESS)")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="full training on every recorded interaction")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--epochs", type=int, default=0)
    train.add_argument("--publish", action="store_true", help="publish if it passes the gate")
    train.add_argument("--local", action="store_true", help="train in this process, not via the server")
    update = commands.add_parser("update", help="incremental update from the current version")
    update.add_argument("--window", type=int, default=0, help="seconds")
    update.add_argument("--threshold", type=int, default=0)
    update.add_argument("--priority", default="", choices=("", "recency", "item_novelty", "user_activity"))
    update.add_argument("--top-share", type=float, default=1.0)
    update.add_argument("--replay-ratio", type=float, default=1.0)
    update.add_argument("--seed", type=int, default=0)
    update.add_argument("--publish", action="store_true")
    versions = commands.add_parser("versions", help="list versions, newest first")
    versions.add_argument("--limit", type=int, default=20)
    commands.add_parser("status", help="leader, current version, pending interactions, progress")
    args = parser.parse_args(argv)

    if args.command == "train":
        if args.local:
            return _train_local(args)
        response = _remote(args, lambda stub: stub.Train(trainer_pb2.TrainRequest(
            seed=args.seed, epochs=args.epochs, publish=args.publish)))
        _print_version(response.version, response.published)
    elif args.command == "update":
        strategy = trainer_pb2.UpdateStrategy(window_seconds=args.window, threshold_events=args.threshold,
                                              priority=args.priority, top_share=args.top_share,
                                              replay_ratio=args.replay_ratio)
        response = _remote(args, lambda stub: stub.Update(trainer_pb2.UpdateRequest(
            strategy=strategy, publish=args.publish, seed=args.seed)))
        if response.skipped:
            print(f"skipped: {response.reason}")
        else:
            _print_version(response.version, response.published)
    elif args.command == "versions":
        response = _remote(args, lambda stub: stub.ListVersions(trainer_pb2.ListVersionsRequest(limit=args.limit)))
        print(f"current version: {response.current_version or '-'}  (* = published as the canary)")
        for version in response.versions:
            m = version.metrics
            status = _status_name(version.status) + ("*" if version.published_as == "canary" else "")
            print(f"  v{version.version:<5} {status:<11} {version.strategy:<28} "
                  f"parent {version.parent_version or '-':<5} recall@10 {m.recall_at_10:.4f} "
                  f"ndcg@10 {m.ndcg_at_10:.4f}  {version.decision[:80]}")
    elif args.command == "status":
        status = _remote(args, lambda stub: stub.Status(trainer_pb2.TrainerServiceStatusRequest()))
        print(status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
