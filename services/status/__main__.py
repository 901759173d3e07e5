"""python -m services.status — the suite at a glance (see the package docstring).

    python -m services.status                      # once; addresses from the environment
    python -m services.status --watch 2            # a live table, redrawn every 2 s
    python -m services.status --json               # the snapshot as JSON
    python -m services.status --probe HOST:PORT    # exit 0 iff that server's health is SERVING

Targets default to the variables the services themselves read (COLLECTOR_ADDRESS,
FEATURES_ADDRESS, ETCD_ENDPOINT, ETCD_PREFIX) plus TRAINER_ADDRESS, RANKER_ADDRESS and
CONSISTENCY_ADDRESS; rankers are found in etcd (rankers/<replica>) when no RANKER_ADDRESS is given.
In a cluster: kubectl -n deltarec exec deploy/consistency -- python -m services.status
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from services.common.config import ConfigError, EtcdConfig, load
from services.common.etcd import Etcd
from services.status.collect import Collector, check_health
from services.status.table import render

IN_CLUSTER = {"collector": "dns:///collector:8080", "features": "dns:///features:8080",
              "trainer": "dns:///trainer:8080", "consistency": "dns:///consistency:8080"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m services.status", description=__doc__.split("\n")[0])
    parser.add_argument("--collector", default=env.get("COLLECTOR_ADDRESS", ""))
    parser.add_argument("--features", default=env.get("FEATURES_ADDRESS", ""))
    parser.add_argument("--trainer", default=env.get("TRAINER_ADDRESS", ""))
    parser.add_argument("--ranker", default=env.get("RANKER_ADDRESS", ""),
                        help="ranker target(s); default: every replica registered in etcd")
    parser.add_argument("--consistency", default=env.get("CONSISTENCY_ADDRESS", ""))
    parser.add_argument("--in-cluster", action="store_true",
                        help="default targets: the headless Services of deploy/k8s")
    parser.add_argument("--etcd", default=env.get("ETCD_ENDPOINT", "127.0.0.1:2379"))
    parser.add_argument("--etcd-prefix", default=env.get("ETCD_PREFIX", "/deltarec/"))
    parser.add_argument("--no-etcd", action="store_true")
    parser.add_argument("--timeout", type=float, default=2.0, help="deadline of each call, seconds")
    parser.add_argument("--versions", type=int, default=5, help="trainer versions shown")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="redraw every SECONDS until Ctrl-C")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--probe", metavar="HOST:PORT", help="only check that server's gRPC health")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        status = check_health(args.probe, args.timeout)
        print(status)
        return 0 if status == "SERVING" else 1
    targets = {name: getattr(args, name) or (IN_CLUSTER.get(name, "") if args.in_cluster else "")
               for name in ("collector", "features", "trainer", "ranker", "consistency")}
    etcd = None
    if not args.no_etcd:
        # The services' own etcd settings (TLS, auth) from the environment; the flags name the member.
        try:
            etcd_config = load(EtcdConfig, {**os.environ, "ETCD_ENDPOINT": args.etcd, "ETCD_PREFIX": args.etcd_prefix})
        except ConfigError as error:
            print(f"status: configuration error: {error}", file=sys.stderr)
            return 2
        etcd = Etcd.from_config(etcd_config, timeout_s=args.timeout)
    collector = Collector(targets, etcd, timeout_s=args.timeout, versions=args.versions)
    try:
        while True:
            snapshot = collector.snapshot()
            if args.json:
                print(json.dumps(snapshot.to_dict(), default=str), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\033[H\033[2J", end="")
                print(time.strftime("%Y-%m-%d %H:%M:%S"), flush=False)
                print(render(snapshot), flush=True)
            if not args.watch:
                return 1 if any(h.status != "SERVING" for h in snapshot.health) else 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    finally:
        if etcd is not None:
            etcd.close()


if __name__ == "__main__":
    sys.exit(main())
