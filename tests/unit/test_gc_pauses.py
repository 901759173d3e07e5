import gc

from prometheus_client import REGISTRY

from services.common import gc_pauses


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"generation": "2"}) or 0.0


def test_every_collection_is_timed_and_what_it_frees_counted_once_installed_twice():
    gc_pauses.install()
    gc_pauses.install()
    assert gc.callbacks.count(gc_pauses._on_collection) == 1
    pauses, freed = _sample("deltarec_gc_pause_seconds_count"), _sample("deltarec_gc_collected_objects_total")

    class Node:
        pass
    for _ in range(100):                  # cyclic garbage only the collector can free
        a, b = Node(), Node()
        a.other, b.other = b, a
    del a, b
    gc.collect(2)
    assert _sample("deltarec_gc_pause_seconds_count") == pauses + 1
    assert _sample("deltarec_gc_pause_seconds_sum") > 0
    assert _sample("deltarec_gc_collected_objects_total") >= freed + 200
