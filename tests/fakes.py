"""Stand-ins for what a test or a benchmark does not want to run for real, shared by both (the
benchmarks import this module too): model artifacts of the production shape with untrained
weights, published through the trainer's own publisher, and a features service answering from
memory. Nothing here is used when serving."""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch

from services.common.artifacts import ArtifactStore
from services.common.etcd import Etcd
from services.common.text_encoder import hashed_unit_vector
from services.contracts.model_pointer import ModelPointer
from services.contracts.ready_line import ready_line
from services.model.artifact import ModelArtifact
from services.model.network import DeltaRecModel, ModelConfig
from services.trainer.publisher import Publisher

# ---------------------------------------------------------------------------- model artifacts


def text_vectors(keys: list[str], dim: int = 384) -> np.ndarray:
    """Deterministic unit vectors standing in for MiniLM embeddings."""
    if not keys:
        return np.zeros((0, dim), np.float32)
    return np.stack([hashed_unit_vector(key, dim) for key in keys])


def random_text_vectors(n: int, seed: int = 1, dim: int = 384) -> np.ndarray:
    """Unit vectors standing in for MiniLM embeddings of a large catalog (serving latency does
    not depend on their values)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def make_artifact(version: int, item_ids: list[str], item_text: np.ndarray, *, dim: int = 32,
                  max_len: int = 20, num_layers: int = 1, seed: int | None = None,
                  popular: list[str] | None = None, data_lsn: int = 0, parent_version: int = 0,
                  extra_ids: int = 0, perturb: float = 0.0) -> ModelArtifact:
    """An untrained (randomly initialised, seeded) model over `item_ids`, with their item vectors.
    `extra_ids` more rows in the id table (items no longer in the catalog: a bigger model).
    `perturb`: every weight moved by that share of its tensor's standard deviation (seeded by
    `version`): with the `seed` of an earlier version, a stand-in for an incremental update."""
    torch.manual_seed(version if seed is None else seed)
    config = ModelConfig(dim=dim, num_layers=num_layers, num_heads=2, max_len=max_len, dropout=0.0)
    model = DeltaRecModel(config, num_items=len(item_ids) + extra_ids).eval()
    if perturb:
        generator = torch.Generator().manual_seed(version)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.numel() > 1:
                    parameter += perturb * parameter.std() * torch.randn(parameter.shape, generator=generator)
    vectors = np.zeros((0, dim), np.float32)
    if item_ids:
        with torch.inference_mode():
            vectors = model.item_vectors(torch.arange(1, len(item_ids) + 1),
                                         torch.from_numpy(np.asarray(item_text, np.float32)),
                                         apply_id_dropout=False).numpy()
    return ModelArtifact(version=version, config=config,
                         state_dict={k: v.clone() for k, v in model.state_dict().items()},
                         item_ids=list(item_ids) + [f"retired-{n}" for n in range(extra_ids)],
                         item_vector_ids=list(item_ids),
                         item_vectors=np.asarray(vectors, np.float32), data_lsn=data_lsn,
                         parent_version=parent_version,
                         popular_item_ids=list(popular if popular is not None else item_ids[:50]),
                         created_at=time.time())


def store_artifact(store: ArtifactStore, artifact: ModelArtifact) -> dict:
    """Writes the artifact as the trainer does (its publisher: serialized, content-addressed
    name, sha256 from the store); returns the `model/current` value naming it, as a dict
    (ModelPointer.to_dict: {version, uri, sha256, data_lsn, metrics})."""
    # Writing an artifact only uses the store; the publisher's etcd side is not needed here.
    uri, sha256 = Publisher(etcd=None, store=store).store_artifact(artifact)
    pointer = ModelPointer(version=artifact.version, uri=uri, sha256=sha256, data_lsn=artifact.data_lsn)
    return pointer.to_dict()


def publish(etcd: Etcd, spec: dict) -> None:
    """Makes `spec` (a `store_artifact` result) `model/current` through the trainer's publisher:
    its compare-and-swap from the value read just before. Unlike a trainer, which reports a lost
    race, this tries again: a test or benchmark wants its version served whatever was there."""
    pointer = ModelPointer.from_json(spec)
    publisher = Publisher(etcd=etcd, store=None)    # the artifact is already in the store
    while True:
        result = publisher.publish(version=pointer.version, uri=pointer.uri, sha256=pointer.sha256,
                                   data_lsn=pointer.data_lsn, metrics=pointer.metrics,
                                   expected=publisher.current().raw)
        if result.published:
            return


# ---------------------------------------------------------------------------- features stand-in


class FeaturesStandIn:
    """A features service stand-in: WatchItems (the whole catalog with vectors, then an open
    stream), GetUserFeatures / BatchGetUserFeatures (fixed histories, one hour apart, ending a
    minute ago; their items as the seen set), WatchUsers (no user ever changes), EmbedText
    (hashed vectors) and Status, from memory. Lets a benchmark run a ranker on a 100k catalog
    without the collector -> Postgres -> features pipeline (which bench/new_item.py measures end
    to end)."""

    def __init__(self, dataset, vectors: np.ndarray, watermark: int = 1000) -> None:
        from deltarec.v1 import features_pb2
        self.pb = features_pb2
        self.dataset, self.vectors, self.watermark = dataset, vectors, watermark
        self._responses: dict[str, object] = {}

    def servicer(self):
        from deltarec.v1 import features_pb2_grpc
        stand_in = self

        class Servicer(features_pb2_grpc.FeaturesServiceServicer):
            def WatchItems(self, request, context):
                yield from stand_in.watch_items(request, context)

            def GetUserFeatures(self, request, context):
                return stand_in.user_features(request.user_id, request.max_history)

            def BatchGetUserFeatures(self, request, context):
                return stand_in.pb.BatchGetUserFeaturesResponse(
                    users=[stand_in.user_features(u, request.max_history).features for u in request.user_ids
                           if u in stand_in.dataset.sequences], data_lsn=stand_in.watermark)

            def WatchUsers(self, request, context):
                # Nobody changes: the position, then the same position now and then.
                while context.is_active():
                    yield stand_in.pb.WatchUsersResponse(watermark=stand_in.watermark)
                    time.sleep(1.0)

            def EmbedText(self, request, context):
                return stand_in.pb.EmbedTextResponse(vectors=[
                    stand_in.pb.Vector(dim=384, values=text_vectors([t])[0].astype("<f4").tobytes())
                    for t in request.texts], model_name="hashed")

            def Status(self, request, context):
                return stand_in.pb.FeaturesServiceStatusResponse(applied_lsn=stand_in.watermark,
                                                                 server_lsn=stand_in.watermark)
        return Servicer()

    def watch_items(self, request, context):
        pb = self.pb
        if request.after_lsn < self.watermark:
            batch = request.max_batch_size or 256
            items = self.dataset.items
            for start in range(0, len(items), batch):
                response = pb.WatchItemsResponse()
                for offset, item in enumerate(items[start:start + batch], start=start):
                    features = pb.ItemFeatures(item_id=item.item_id, active=True, title=item.title,
                                               category=item.category, brand=item.brand,
                                               updated_lsn=1 + offset)
                    features.embedding.dim = 384
                    features.embedding.values = self.vectors[offset].astype("<f4").tobytes()
                    response.changes.add(kind=pb.ITEM_CHANGE_KIND_UPSERT, item=features, lsn=1 + offset)
                last = start + batch >= len(items)
                response.watermark = self.watermark if last else 0
                yield response
            if not items:
                yield pb.WatchItemsResponse(watermark=self.watermark)
        while context.is_active():
            time.sleep(0.2)

    def user_features(self, user_id: str, max_history: int):
        cached = self._responses.get(user_id)
        if cached is not None:
            return cached
        pb = self.pb
        history = self.dataset.sequences.get(user_id, [])
        if max_history:
            history = history[-max_history:]
        response = pb.GetUserFeaturesResponse(data_lsn=self.watermark)
        response.features.user_id = user_id
        now = int(time.time()) - 60
        for position, item_id in enumerate(history):
            entry = response.features.history.add(item_id=item_id, type=4)
            entry.timestamp.seconds = now - 3600 * (len(history) - 1 - position)
        response.features.updated_lsn = self.watermark
        response.features.seen_item_ids.extend(dict.fromkeys(self.dataset.sequences.get(user_id, [])))
        self._responses[user_id] = response
        return response


def serve_features_stand_in(dataset, vectors: np.ndarray) -> None:
    """Runs the stand-in in this process until it is stopped (prints the DELTAREC_READY line
    scripts/launch.py reads)."""
    from concurrent import futures

    import grpc
    from deltarec.v1 import features_pb2_grpc

    from services.common.server import MAX_MESSAGE_BYTES
    stand_in = FeaturesStandIn(dataset, vectors)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    features_pb2_grpc.add_FeaturesServiceServicer_to_server(stand_in.servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(ready_line("features-stand-in", port, None), flush=True)
    server.wait_for_termination()


def stand_in_catalog(spec: str):
    """`beauty` (Amazon Beauty: 12k items, 22k users) or `synthetic:N` -> (Dataset, text vectors):
    random unit vectors stand in for MiniLM (serving latency does not depend on their values)."""
    from scripts import datasets
    if spec == "beauty":
        dataset = datasets.load_beauty()
    else:
        # synthetic:N[:users][:long] — `long`: titles padded to Beauty's length (67 characters
        # on average; the synthetic ones have 35), for benchmarks that measure memory.
        parts = spec.split(":")
        n_items = int(parts[1])
        n_users = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else max(300, n_items // 5)
        dataset = datasets.synthetic(n_items=n_items, n_users=n_users, seed=7)
        if "long" in parts[2:]:
            tails = (", for Dry and Sensitive Skin", ", Paraben Free, 1.7 Fl Oz", " with Vitamin E and Aloe Vera",
                     ", Travel Size Gift Set", " - Long Lasting, Cruelty Free")
            for n, item in enumerate(dataset.items):
                dataset.items[n] = dataclasses.replace(item, title=item.title + tails[n % len(tails)])
    return dataset, random_text_vectors(len(dataset.items))


if __name__ == "__main__":
    # The stand-in as a process of its own (bench/_harness.Suite.start_features_stand_in).
    serve_features_stand_in(*stand_in_catalog(os.environ["STAND_IN_CATALOG"]))
