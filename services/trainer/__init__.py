"""DeltaRec trainer: makes the retrieval model and keeps it current by incremental updates.

The model and its artifact format are not the trainer's: they live in services/model (the
ranker imports them too); the contracts it writes (etcd keys, the model/current value) in
services/contracts.

Layout (plain cores, thin edges):
    id_map.py, interaction_data.py   ids as indexes; each user's history, id maps, text vectors
    leave_one_out.py                 the leave-one-out split (train / validation / test)
    windows.py, batching.py          next-item examples packed into windows; padded model batches
    training.py      the torch training loop: full training and warm-start updates (sampled softmax)
    evaluation.py    Recall/NDCG against all items
    run_steps.py     the steps of a run as pure functions: id tables grown for new items, held-out
                     slice, training, evaluation, remapping, the item vectors to export
    strategies.py    which new interactions an update learns from (window, threshold, priority)
    gate.py          publish only if not worse than the current version beyond a tolerance
    interaction_log.py  durable record of the `events` deltas (+ LSN high-water mark, one transaction)
    stream_recorder.py  the delta-stream consumer that writes the interaction log while leading
    catalog.py       active items and their text vectors (feature store, else MiniLM here)
    versions.py      model_versions + trainer_runs: versions allocated durably, fenced by attempt
    publisher.py     artifact store write, then CAS of etcd `model/current`
    runs.py          TrainerCore: Train / Update / crash recovery, one run at a time, leader only
    leader.py        etcd lease `trainer/leader`; a standby takes over
    scheduler.py     when the leader trains by itself (first model, full retrains, updates)
    server.py, __main__.py, cli.py   gRPC edge, `python -m services.trainer`, the command line
"""
