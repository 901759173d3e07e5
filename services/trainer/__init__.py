"""DeltaRec trainer: makes the retrieval model and keeps it current by incremental updates.

Layout (plain cores, thin edges):
    model.py, data.py, training.py, evaluation.py   the torch model, data containers, full training,
                                                     warm-start updates, Recall/NDCG evaluation
    artifact.py                                      the artifact format rankers load
    pipeline.py      runs as pure functions: id tables grown for new items, held-out slice, remapping
    strategies.py    which new interactions an update learns from (window, threshold, priority)
    gate.py          publish only if not worse than the current version beyond a tolerance
    interaction_log.py  durable record of the `events` deltas (+ LSN high-water mark, one transaction)
    catalog.py       active items and their text vectors (feature store, else MiniLM here)
    versions.py      model_versions + trainer_runs: versions allocated durably, fenced by attempt
    publisher.py     artifact store write, then CAS of etcd `model/current`
    core.py          Train / Update / crash recovery, one run at a time, leader only
    leader.py        etcd lease `trainer/leader`; a standby takes over
    loop.py          the leader's background work: delta stream -> log, strategy -> updates
    server.py, __main__.py, cli.py   gRPC edge, `python -m services.trainer`, the command line
    synthetic.py     a small learnable interaction set for tests and drills
"""
