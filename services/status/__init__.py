"""`python -m services.status` — one table of the whole suite, for an operator.

It asks the services themselves (gRPC health of every pod behind each target, ranker / features
/ trainer Status, the collector's consumer groups, the trainer's last versions, the consistency
service's last check) and etcd (model/current, model/canary, data/watermark, rankers/*), so the
table shows what each part says it serves, side by side. `collect.py` gathers a `Snapshot`;
`table.py` turns it into text; `__main__.py` is the command line (once, `--watch`, `--json`,
`--probe` for container health checks).
"""
