"""The Store contract: every implementation (memory, Redis, metered, any future one) passes it.

``test_every_store_implementation_is_covered`` fails when a module under ``mmagg.stores``
defines a store class this suite does not run against.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import mmagg.stores
from mmagg.predictions import to_batch
from mmagg.stores import MemoryStore, Store
from mmagg.stores.metered import MeteredStore
from mmagg.window import Window, naive_best

StoreFactory = Callable[..., Store]

#: Every implementation the suite runs against: (fixture param, class under test).
IMPLEMENTATIONS = {
    "memory": "MemoryStore",
    "redis": "RedisStore",
    "metered-memory": "MeteredStore",
    "metered-redis": "MeteredStore",
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def make_store(request: pytest.FixtureRequest, clock: Any) -> Iterator[StoreFactory]:
    """Builds stores of one kind on the test's fake clock; several share one state."""
    made: list[Store] = []
    kind = request.param
    if kind.endswith("memory"):
        shared = MemoryStore(clock=clock)

        def inner(**kwargs: Any) -> Store:
            # Several "instances" of the memory store are one process-wide store.
            return MemoryStore(clock=clock, **kwargs) if kwargs else shared

    else:
        from mmagg.stores.redis import RedisStore

        url = request.getfixturevalue("redis_url")

        def inner(**kwargs: Any) -> Store:
            store = RedisStore(url, clock=clock, **kwargs)
            made.append(store)
            return store

    def factory(**kwargs: Any) -> Store:
        store = inner(**kwargs)
        return MeteredStore(store) if kind.startswith("metered") else store

    yield factory
    for store in made:
        store.close()


def publish(*stores: Store) -> None:
    """Make every store's local collection visible to the others (a Redis push)."""
    for store in stores:
        push = getattr(getattr(store, "inner", store), "push", None)
        if push is not None:
            assert push()


def test_every_store_implementation_is_covered() -> None:
    found = set()
    for module_info in pkgutil.iter_modules(mmagg.stores.__path__):
        module = importlib.import_module(f"mmagg.stores.{module_info.name}")
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and value.__module__ == module.__name__
                and not getattr(value, "_is_protocol", False)
                and all(hasattr(value, m) for m in ("window", "claim", "take", "give_back"))
            ):
                found.add(name)
    assert found == set(IMPLEMENTATIONS.values()), "add the new store to IMPLEMENTATIONS"


def test_implements_the_protocol(make_store: StoreFactory) -> None:
    store = make_store()
    assert isinstance(store, Store)
    for method in ("window", "due", "claim", "take", "give_back", "close"):
        assert callable(getattr(store, method)), method
    assert isinstance(store.shared, bool)


def test_due_and_claim_take_the_callers_now(make_store: StoreFactory, clock: Any) -> None:
    """A process-local clock uses ``now``; a shared one keeps its own (here the same fake
    clock), so passing the current time gives the same answers everywhere."""
    store = make_store()
    store.window("k").add(frame(("cat", 0.5)), model_id="m")
    assert store.due("k", 2, now=clock())
    assert store.claim("k", 2, now=clock()) is None
    clock.advance(1.5)
    assert not store.due("k", 2, now=clock())
    assert store.claim("k", 2, now=clock()) is None
    clock.advance(0.5)
    assert store.due("k", 2, now=clock())
    won = store.claim("k", 2, now=clock())
    assert won is not None and best_of(won) == {"cat": 0.5}


def frame(*items: tuple[str, float], inference_id: str = "") -> Any:
    return to_batch(
        {
            "inference_id": inference_id,
            "prediction_type": "object-detection",
            "predictions": [{"class": name, "confidence": conf} for name, conf in items],
        }
    )


def best_of(window: Window) -> dict[str, float]:
    return {r["class_name"]: r["confidence"] for r in window.to_results()}


def test_window_is_shared_per_key(make_store: StoreFactory) -> None:
    store = make_store()
    assert store.window("a") is store.window("a")
    assert store.window("a") is not store.window("b")
    store.window("a").add(frame(("cat", 0.5)), model_id="m")
    assert best_of(store.take("a")) == {"cat": 0.5}
    assert store.take("b").is_empty()


def test_first_claim_starts_the_interval_then_whole_seconds_decide(
    make_store: StoreFactory, clock: Any
) -> None:
    store = make_store()
    store.window("k").add(frame(("cat", 0.5)), model_id="m")
    assert store.claim("k", 2) is None
    clock.advance(1.9)
    assert store.claim("k", 2) is None  # 1 whole second < 2
    clock.advance(0.2)
    won = store.claim("k", 2)
    assert won is not None and best_of(won) == {"cat": 0.5}
    assert store.claim("k", 2) is None  # the interval restarted
    clock.advance(2.0)
    again = store.claim("k", 2)
    assert again is not None and again.is_empty()


def test_due_says_when_a_claim_may_win_without_taking_anything(
    make_store: StoreFactory, clock: Any
) -> None:
    store = make_store()
    store.window("k").add(frame(("cat", 0.5)), model_id="m")
    assert store.due("k", 1)  # unknown: the first claim starts the interval
    assert store.claim("k", 1) is None
    assert not store.due("k", 1)
    clock.advance(1.0)
    assert store.due("k", 1) and store.due("k", 1)
    won = store.claim("k", 1)
    assert won is not None and best_of(won) == {"cat": 0.5}
    assert not store.due("k", 1)


def test_exactly_one_instance_wins_a_due_interval(make_store: StoreFactory, clock: Any) -> None:
    stores = [make_store() for _ in range(3)]
    for i, store in enumerate(stores):
        store.window("k").add(frame(("cat", 0.1 * (i + 1))), model_id="m")
    assert all(store.claim("k", 1) is None for store in stores)
    clock.advance(1.0)
    publish(*stores)
    won = [w for w in (store.claim("k", 1) for store in stores) if w is not None]
    assert len(won) == 1
    assert best_of(won[0]) == {"cat": pytest.approx(0.3)}


def test_take_empties_and_give_back_returns(make_store: StoreFactory) -> None:
    store = make_store()
    store.window("k").add(frame(("cat", 0.5), ("dog", 0.2)), model_id="m")
    taken = store.take("k")
    assert best_of(taken) == {"cat": 0.5, "dog": 0.2}
    assert store.take("k").is_empty()
    store.window("k").add(frame(("cat", 0.3)), model_id="m")
    store.give_back("k", taken)
    again = store.take("k")
    assert best_of(again) == {"cat": 0.5, "dog": 0.2}
    assert again.stats()[("m", "cat", "")].count == 2


def test_merge_equals_the_original_store_everything_then_sort(make_store: StoreFactory) -> None:
    rng = random.Random(7)
    stores = [make_store() for _ in range(3)]
    stream: list[tuple[str, str, float, str, str]] = []
    for t in range(300):
        model = rng.choice(["m/1", "m/2"])
        items = [
            (rng.choice("abcdefg"), round(rng.random(), 1))  # ties on purpose
            for _ in range(rng.randint(1, 5))
        ]
        inference_id = f"inf-{t}"
        store = stores[t % len(stores)]
        store.window("k").add(
            frame(*items, inference_id=inference_id), model_id=model, seen_at=float(t)
        )
        stream.extend((model, name, conf, inference_id, "object-detection") for name, conf in items)
    publish(*stores)
    taken = stores[0].take("k")
    expected = naive_best(stream)
    got = {
        (s.model_id, s.class_name): (s.confidence, s.inference_id, s.model_type)
        for s in taken.samples()
    }
    assert got == expected
    counts = {(k[0], k[1]): v.count for k, v in taken.stats().items()}
    assert counts == {key: sum(1 for m, n, *_ in stream if (m, n) == key) for key in expected}


def test_statistics_are_summed(make_store: StoreFactory) -> None:
    one, two = make_store(), make_store()
    one.window("k").add(frame(("cat", 0.25), ("cat", 0.95)), model_id="m")
    two.window("k").add(frame(("cat", 0.05)), model_id="m")
    publish(two)
    stats = one.take("k").stats()[("m", "cat", "")]
    assert stats.count == 3
    assert stats.total == pytest.approx(1.25)
    assert (stats.minimum, stats.maximum) == (0.05, 0.95)
    assert stats.histogram == [1, 0, 1, 0, 0, 0, 0, 0, 0, 1]


def test_max_classes_guard(make_store: StoreFactory) -> None:
    store = make_store(max_classes=2)
    store.window("k").add(frame(("a", 0.5), ("b", 0.5)), model_id="m")
    store.give_back("k", store.take("k"))
    extra = Window()
    extra.add(frame(("c", 0.9), ("c", 0.8), ("a", 0.7)), model_id="m")
    store.give_back("k", extra)
    taken = store.take("k")
    assert sorted(best_of(taken)) == ["a", "b"]
    assert best_of(taken)["a"] == 0.7
    assert taken.dropped_max_classes == 2  # both "c" predictions
