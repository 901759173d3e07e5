"""Trainer settings (environment variables).

Model hyper-parameters default to the model engineer's `ModelConfig` defaults (chosen on the
Beauty validation target); the TRAINER_MODEL_* variables override them, e.g. to keep models tiny
in tests. The strategy variables are what the background loop applies by itself.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from services.common.config import GRPC_TARGET, CommonConfig, ConfigError, env
from services.model.network import ModelConfig
from services.trainer.training import DEVICE_SETTINGS, REPLAY_SOURCES, IncrementalPolicy

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ARTIFACT_URI = (REPO_ROOT / ".run" / "artifacts").as_uri()
_MODEL = ModelConfig()
PRIORITIES = ("", "recency", "item_novelty", "user_activity")
GATE_METRICS = ("ndcg_at_10", "recall_at_10", "ndcg_at_5", "recall_at_5")
PUBLISH_TARGETS = ("current", "canary")


@dataclasses.dataclass(frozen=True)
class TrainerConfig(CommonConfig):
    trainer_id: str = env("TRAINER_ID", "", help="id of this trainer (default: host-pid)")
    collector_address: str = env("COLLECTOR_ADDRESS", "", pattern=f"({GRPC_TARGET})?",
                                 help="gRPC target (host:port, dns:///name:port) of the collector's delta "
                                      "stream; empty = do not consume")
    artifact_uri: str = env("TRAINER_ARTIFACT_URI", DEFAULT_ARTIFACT_URI,
                            help="artifact store: file:///dir or postgres")
    seed: int = env("TRAINER_SEED", 0, minimum=0, maximum=2 ** 32 - 1, help="default seed of trainings and updates")
    max_epochs: int = env("TRAINER_MAX_EPOCHS", 200, minimum=1, maximum=100_000,
                          help="most epochs one Train request may ask for (more: INVALID_ARGUMENT)")
    torch_threads: int = env("TRAINER_TORCH_THREADS", 2, minimum=1, maximum=64)
    device: str = env("TRAINER_DEVICE", "auto", choices=DEVICE_SETTINGS,
                      help="where training and its validation run: auto = CUDA when present, else CPU; "
                           "cuda without a CUDA device is refused at start")
    leader_ttl_s: int = env("TRAINER_LEADER_TTL_S", 10, minimum=1, maximum=300,
                            help="TTL of the etcd lease trainer/leader; a standby takes over after it")

    # --- model (defaults: ModelConfig) ---------------------------------------------------------
    epochs: int = env("TRAINER_MODEL_EPOCHS", _MODEL.epochs, minimum=1, help="epochs of a full training")
    incremental_epochs: int = env("TRAINER_MODEL_INCREMENTAL_EPOCHS", _MODEL.incremental_epochs, minimum=1)
    dim: int = env("TRAINER_MODEL_DIM", _MODEL.dim, minimum=2)
    num_layers: int = env("TRAINER_MODEL_LAYERS", _MODEL.num_layers, minimum=1)
    num_heads: int = env("TRAINER_MODEL_HEADS", _MODEL.num_heads, minimum=1)
    max_len: int = env("TRAINER_MODEL_MAX_LEN", _MODEL.max_len, minimum=2)
    num_negatives: int = env("TRAINER_MODEL_NEGATIVES", _MODEL.num_negatives, minimum=-1,
                             help="uniform negatives per batch; -1 = full softmax")
    batch_size: int = env("TRAINER_MODEL_BATCH_SIZE", _MODEL.batch_size, minimum=1)
    learning_rate: float = env("TRAINER_MODEL_LR", _MODEL.learning_rate, minimum=0.0)
    incremental_learning_rate: float = env("TRAINER_MODEL_INCREMENTAL_LR", _MODEL.incremental_learning_rate,
                                           minimum=0.0)
    id_less_popularity_weight: float = env(
        "TRAINER_MODEL_ID_LESS_POPULARITY_WEIGHT", _MODEL.id_less_popularity_weight, minimum=0.0,
        help="published with the model: the ranker adds weight * log(1 + popularity) to items without a "
             "learned id (new since training); 0 = their text score alone")
    id_less_popularity_scale: float = env(
        "TRAINER_MODEL_ID_LESS_POPULARITY_SCALE", _MODEL.id_less_popularity_scale, minimum=1e-6,
        help="the popularity in that prior is divided by this: log(1 + popularity / scale)")
    new_item_popularity_weight: float = env(
        "TRAINER_MODEL_NEW_ITEM_POPULARITY_WEIGHT", _MODEL.new_item_popularity_weight, minimum=0.0,
        help="published with the model: new items (no learned id) in the ranker's reserved slots are ordered "
             "by text score + weight * log(1 + popularity / scale)")
    new_item_popularity_scale: float = env(
        "TRAINER_MODEL_NEW_ITEM_POPULARITY_SCALE", _MODEL.new_item_popularity_scale, minimum=1e-6,
        help="the scale in that order")
    # drift limits of a warm-start update (training.IncrementalPolicy; README "Incremental vs full")
    incremental_anchor: float = env("TRAINER_INCREMENTAL_ANCHOR", 0.0, minimum=0.0, maximum=0.999,
                                    help="after each optimizer step of an update, every weight moves this fraction "
                                         "of its distance back toward the parent version's (0 = no pull)")
    incremental_parent_weight: float = env("TRAINER_INCREMENTAL_PARENT_WEIGHT", 0.0, minimum=0.0, maximum=0.999,
                                           help="an update's weights end as this share of the parent's plus the "
                                                "rest of the fine-tuned ones (0 = fine-tuned only)")
    incremental_freeze_items: bool = env("TRAINER_INCREMENTAL_FREEZE_ITEMS", False,
                                         help="an update moves only the id rows of the items in its new "
                                              "interactions (the others stay as the parent left them)")
    incremental_replay_from: str = env("TRAINER_INCREMENTAL_REPLAY_FROM", "own_history", choices=REPLAY_SOURCES,
                                       help="replayed old examples of an update: own_history = the earlier "
                                            "interactions of the users with new ones first (they share the new "
                                            "ones' encoder windows: no extra pass), uniform = from all users")

    # --- data ---------------------------------------------------------------------------------
    text_fallback: str = env("TRAINER_TEXT_FALLBACK", "minilm", choices=("minilm", "hash"),
                             help="text vector of items without an item_features embedding: embed "
                                  "the catalog text with MiniLM, or a hashed vector (tests)")
    eval_users: int = env("TRAINER_EVAL_USERS", 2000, minimum=1,
                          help="held-out slice: the last interaction of the N most recently active users")
    min_interactions: int = env("TRAINER_MIN_INTERACTIONS", 2000, minimum=1,
                                help="the loop's first full training waits for this many interactions")
    min_text_coverage: float = env("TRAINER_MIN_TEXT_COVERAGE", 0.9, minimum=0.0, maximum=1.0,
                                   help="the loop's first full training waits until the feature store has text "
                                        "vectors for this share of the active catalog (instead of embedding "
                                        "the rest itself)")
    full_retrain_growth: float = env("TRAINER_FULL_RETRAIN_GROWTH", 0.0, minimum=0.0,
                                     help="the loop retrains from scratch once the recorded interactions are "
                                          "this many times those of the newest full training (0 = never)")

    # --- gate ---------------------------------------------------------------------------------
    gate_metric: str = env("TRAINER_GATE_METRIC", "ndcg_at_10", choices=GATE_METRICS)
    gate_tolerance: float = env("TRAINER_GATE_TOLERANCE", 0.05, minimum=0.0, maximum=1.0,
                                help="relative shortfall on the gate metric accepted by design")
    gate_z: float = env("TRAINER_GATE_Z", 1.64, minimum=0.0, maximum=10.0,
                        help="refuse only a shortfall beyond tolerance + z standard errors of the paired "
                             "per-user differences (0 = plain mean comparison)")

    gate_cumulative_tolerance: float = env(
        "TRAINER_GATE_CUMULATIVE_TOLERANCE", 0.05, minimum=0.0, maximum=1.0,
        help="relative shortfall against the last full retrain (on the same slice) accepted over any chain of "
             "updates; a candidate beyond it is refused and a full retrain is scheduled")
    gate_min_users: int = env("TRAINER_GATE_MIN_USERS", 100, minimum=0,
                              help="fewer held-out users than this: publish without gating, recorded as "
                                   "insufficient evidence")

    # --- drift bound and first model of the background loop -------------------------------------
    shadow_full_every: int = env("TRAINER_SHADOW_FULL_EVERY", 4, minimum=0,
                                 help="after every N published updates since the last full training, a shadow full "
                                      "retrain on the same data measures the chain's drift (0 = never)")
    drift_bound: float = env("TRAINER_DRIFT_BOUND", 0.01, minimum=0.0, maximum=1.0,
                             help="an update more than this (relative, gate metric) below its shadow full retrain "
                                  "is replaced by it: the shadow is published")
    first_epochs: int = env("TRAINER_FIRST_EPOCHS", 2, minimum=0,
                            help="the loop's first model: a quick full training of this many epochs, then the full "
                                 "one (TRAINER_MODEL_EPOCHS) as the next version (0 = the full one at once)")

    # --- where a gated candidate goes (issue 14) -------------------------------------------------
    publish_as: str = env("TRAINER_PUBLISH_AS", "current", choices=PUBLISH_TARGETS,
                          help="publish a gated candidate to model/current, or to model/canary for a share of "
                               "users (the canary decider then promotes or aborts it); the first version, "
                               "with no model/current yet, always goes to model/current")
    canary_share: float = env("TRAINER_CANARY_SHARE", 0.1, minimum=0.0, maximum=1.0,
                              help="with TRAINER_PUBLISH_AS=canary: the share of users routed to the canary, "
                                   "0 < share < 1")

    # --- strategy of the background loop (and the default of Update) --------------------------
    loop_enabled: bool = env("TRAINER_LOOP", True, help="run the strategy by itself in the background")
    loop_interval_s: float = env("TRAINER_LOOP_INTERVAL_S", 5.0, minimum=0.1,
                                 help="how often the loop checks whether to train")
    window_seconds: int = env("TRAINER_STRATEGY_WINDOW_S", 0, minimum=0,
                              help="time window: only interactions of the last W seconds (0 = all new)")
    threshold_events: int = env("TRAINER_STRATEGY_THRESHOLD", 5000, minimum=0,
                                help="update once this many new interactions arrived")
    priority: str = env("TRAINER_STRATEGY_PRIORITY", "", choices=PRIORITIES,
                        help="rank new interactions by recency, item_novelty or user_activity")
    top_share: float = env("TRAINER_STRATEGY_TOP_SHARE", 1.0, minimum=0.0001, maximum=1.0)
    replay_ratio: float = env("TRAINER_STRATEGY_REPLAY_RATIO", 1.0, minimum=0.0, maximum=100.0,
                              help="older interactions replayed per new one, against forgetting")

    def incremental_policy(self) -> IncrementalPolicy:
        return IncrementalPolicy(anchor=self.incremental_anchor, parent_weight=self.incremental_parent_weight,
                                 freeze_items=self.incremental_freeze_items,
                                 replay_from=self.incremental_replay_from).validate()

    def model_config(self) -> ModelConfig:
        return dataclasses.replace(
            ModelConfig(), epochs=self.epochs, incremental_epochs=self.incremental_epochs, dim=self.dim,
            num_layers=self.num_layers, num_heads=self.num_heads, max_len=self.max_len,
            num_negatives=self.num_negatives, batch_size=self.batch_size, learning_rate=self.learning_rate,
            incremental_learning_rate=self.incremental_learning_rate,
            id_less_popularity_weight=self.id_less_popularity_weight,
            id_less_popularity_scale=self.id_less_popularity_scale,
            new_item_popularity_weight=self.new_item_popularity_weight,
            new_item_popularity_scale=self.new_item_popularity_scale)


def check_settings(config: TrainerConfig) -> None:
    """What `env()` cannot express; a failure stops the start like a bad variable (exit 2)."""
    if config.publish_as == "canary" and not 0.0 < config.canary_share < 1.0:
        # share 0 routes nobody (model/canary with share 0 means "no canary"); share 1 routes
        # everybody, leaving no current traffic to compare the canary with.
        raise ConfigError(f"TRAINER_CANARY_SHARE={config.canary_share!r}: must be > 0 and < 1 "
                          "with TRAINER_PUBLISH_AS=canary")
