"""Retention policies: the rules, HF Trainer's known retention bugs, and properties (hypothesis)."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptkit.catalog import list_checkpoints
from ckptkit.commit import CheckpointTransaction
from ckptkit.retention import Candidate, RetentionPolicy, order_candidates
from ckptkit.storage import Store, open_store


def _commit(root: Store, name: str, step: int | None, metrics: dict[str, float] | None = None) -> None:
    with CheckpointTransaction(root, name) as txn:
        txn.write("weights.bin", name.encode())
        txn.commit(step=step, layout="files", metrics=metrics)


def _expired(policy: RetentionPolicy, candidates: list[tuple]) -> list[str]:
    return policy.expired_names(candidates)


# --- HF Trainer's known retention bugs -------------------------------------------------------------


def test_limit_one_keeps_the_newest_instead_of_deleting_everything(tmp_path: Path) -> None:
    root = open_store(tmp_path)
    for step in (100, 200, 300):
        _commit(root, f"checkpoint-{step}", step)
    committed = [c for c in list_checkpoints(root) if c.committed]
    expired = RetentionPolicy(keep_last=1).select_expired(committed)
    assert [c.name for c in expired] == ["checkpoint-100", "checkpoint-200"]


def test_steps_order_numerically_not_as_strings(tmp_path: Path) -> None:
    root = open_store(tmp_path)
    for step in (8, 9, 10, 11):  # as strings: checkpoint-10 < checkpoint-11 < checkpoint-8 < checkpoint-9
        _commit(root, f"checkpoint-{step}", step=None)  # the step comes from the name
    committed = [c for c in list_checkpoints(root) if c.committed]
    expired = RetentionPolicy(keep_last=2).select_expired(committed)
    assert [c.name for c in expired] == ["checkpoint-8", "checkpoint-9"]


def test_the_best_checkpoint_survives_however_old(tmp_path: Path) -> None:
    root = open_store(tmp_path)
    losses = {10: 0.9, 20: 0.2, 30: 0.5, 40: 0.7, 50: 0.6}
    for step, loss in losses.items():
        _commit(root, f"checkpoint-{step}", step, {"eval_loss": loss})
    committed = [c for c in list_checkpoints(root) if c.committed]
    policy = RetentionPolicy(keep_last=1, keep_best="eval_loss")
    assert [c.name for c in policy.select_expired(committed)] == [
        "checkpoint-10",
        "checkpoint-30",
        "checkpoint-40",
    ]
    # max mode with two best: the highest "loss" here are steps 10 and 40.
    policy = RetentionPolicy(keep_last=1, keep_best="eval_loss", best_mode="max", keep_best_count=2)
    assert [c.name for c in policy.select_expired(committed)] == ["checkpoint-20", "checkpoint-30"]


def test_uncommitted_checkpoints_are_left_to_gc(tmp_path: Path) -> None:
    root = open_store(tmp_path)
    _commit(root, "checkpoint-1", 1)
    root.put("checkpoint-2/weights.bin", b"half written")  # no manifest: incomplete
    _commit(root, "checkpoint-3", 3)
    listing = list_checkpoints(root)
    assert [c.status for c in listing] == ["committed", "incomplete", "committed"]
    assert [c.name for c in RetentionPolicy(keep_last=1).select_expired(listing)] == ["checkpoint-1"]


# --- the rules ---------------------------------------------------------------------------------------


def test_no_rule_expires_nothing() -> None:
    assert _expired(RetentionPolicy(), [("a", 1, {}), ("b", 2, {})]) == []
    assert RetentionPolicy().describe() == "keep everything (no retention rule)"


def test_rules_are_a_union() -> None:
    candidates = [(f"step-{s}", s, {"acc": a}) for s, a in [(1, 0.1), (2, 0.9), (3, 0.3), (4, 0.4), (5, 0.2)]]
    policy = RetentionPolicy(keep_last=1, keep_every=3, keep_best="acc", best_mode="max")
    # kept: step-5 (newest, last), step-3 (every 3), step-2 (best accuracy)
    assert _expired(policy, candidates) == ["step-1", "step-4"]
    assert policy.describe() == (
        "keep_last=1, keep_every=3, keep_best=acc (max, top 1); the newest is always kept"
    )


def test_keep_every_alone_still_keeps_the_newest() -> None:
    candidates = [(f"c{s}", s, {}) for s in (1000, 1500, 2000, 2100)]
    assert _expired(RetentionPolicy(keep_every=1000), candidates) == ["c1500"]


def test_missing_and_nan_metrics_are_never_best_but_other_rules_keep_them() -> None:
    nan, inf = float("nan"), float("inf")
    candidates = [
        ("a", 1, {"loss": nan}),
        ("b", 2, {}),
        ("c", 3, {"loss": 0.5}),
        ("d", 4, {"loss": -inf}),
        ("e", 5, {"loss": 0.7}),
        ("f", 6, {"loss": nan}),
    ]
    assert _expired(RetentionPolicy(keep_best="loss"), candidates) == ["a", "b", "d", "e"]
    assert _expired(RetentionPolicy(keep_best="loss", keep_every=2), candidates) == ["a", "e"]
    # no checkpoint has the metric: only the newest is certain to stay
    assert _expired(RetentionPolicy(keep_best="accuracy"), candidates) == ["a", "b", "c", "d", "e"]


def test_best_ties_keep_the_one_that_reached_the_value_first() -> None:
    candidates = [("a", 1, {"loss": 0.5}), ("b", 2, {"loss": 0.5}), ("c", 3, {"loss": 0.9})]
    assert _expired(RetentionPolicy(keep_best="loss"), candidates) == ["b"]


def test_missing_steps_fall_back_to_creation_time() -> None:
    candidates = [
        Candidate("final", None, {}, "2024-05-01T12:00:00.000000Z"),
        Candidate("step-2", 2, {}, "2024-05-01T10:00:00Z"),
        Candidate("export", None, {}, "2024-05-01T11:00:00.5Z"),
        Candidate("step-1", 1, {}, "2024-05-01T09:00:00Z"),
        Candidate("step-3", 3, {}, "2024-05-01T11:00:00Z"),  # seconds without a fraction sort right
    ]
    assert [c.name for c in order_candidates(candidates)] == ["step-1", "step-2", "step-3", "export", "final"]
    assert _expired(RetentionPolicy(keep_last=2), candidates) == ["step-1", "step-2", "step-3"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keep_last": 0}, "keep_last must be an integer of at least 1"),
        ({"keep_last": -3}, "keep_last must be an integer of at least 1"),
        ({"keep_last": True}, "keep_last must be an integer"),
        ({"keep_every": 0}, "keep_every must be an integer of at least 1"),
        ({"keep_best": "loss", "keep_best_count": 0}, "keep_best_count must be an integer of at least 1"),
        ({"keep_best": "loss", "best_mode": "minimum"}, "best_mode must be 'min' or 'max', got 'minimum'"),
        ({"keep_best": ""}, "keep_best must be a metric name"),
    ],
)
def test_invalid_arguments_are_clear_value_errors(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(**options)


def test_from_kwargs_drops_unset_options_and_names_unknown_ones() -> None:
    policy = RetentionPolicy.from_kwargs(keep_last=2, keep_every=None, keep_best="loss")
    assert policy == RetentionPolicy(keep_last=2, keep_best="loss")
    with pytest.raises(ValueError, match=r"unknown retention option\(s\) keep_lats; known: best_mode, "):
        RetentionPolicy.from_kwargs(keep_lats=2)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate checkpoint name"):
        RetentionPolicy(keep_last=1).expired_names([("a", 1, {}), ("a", 2, {})])


# --- properties ----------------------------------------------------------------------------------------

metric_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.none())


def _created(step: int | None, jitter: int) -> str:
    """Realistic creation times: a later step was written later; a step-less one at any time."""
    seconds = jitter * 61 if step is None else step * 1000 + jitter
    return (dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=seconds)).isoformat()


checkpoint_lists = st.lists(
    st.tuples(st.integers(0, 60) | st.none(), metric_values, st.integers(0, 999)),
    max_size=25,
).map(
    lambda rows: [
        Candidate(
            f"ckpt-{i}" if step is None else f"ckpt-{i}-at-{step}",
            step,
            {} if loss is None else {"loss": loss},
            _created(step, jitter),
        )
        for i, (step, loss, jitter) in enumerate(rows)
    ]
)
policies = st.builds(
    RetentionPolicy,
    keep_last=st.none() | st.integers(1, 6),
    keep_every=st.none() | st.integers(1, 12),
    keep_best=st.none() | st.just("loss"),
    best_mode=st.sampled_from(["min", "max"]),
    keep_best_count=st.integers(1, 3),
)


def _best_value(candidates: list[Candidate], mode: str) -> float | None:
    values = [v for c in candidates if isinstance(v := c.metrics.get("loss"), float) and math.isfinite(v)]
    return (min if mode == "min" else max)(values) if values else None


@settings(max_examples=300, deadline=None)
@given(checkpoint_lists, policies, st.randoms(use_true_random=False))
def test_retention_properties(candidates: list[Candidate], policy: RetentionPolicy, rnd) -> None:
    expired = policy.expired_names(candidates)
    names = [c.name for c in candidates]
    assert len(set(expired)) == len(expired) and set(expired) <= set(names)
    ordered = order_candidates(candidates)

    if not policy.has_rules or not candidates:
        assert expired == []
        return
    newest = ordered[-1].name
    assert newest not in expired
    if policy.keep_last is not None:
        assert len(candidates) - len(expired) >= min(policy.keep_last, len(candidates))
        assert not {c.name for c in ordered[-policy.keep_last :]} & set(expired)
    best = _best_value(candidates, policy.best_mode)
    if policy.keep_best is not None and best is not None:
        assert any(c.metrics.get("loss") == best for c in candidates if c.name not in expired)
        assert all(c.metrics.get("loss") != best for c in candidates if c.name in expired) or (
            policy.keep_best_count < sum(c.metrics.get("loss") == best for c in candidates)
        )

    # Input order does not matter, and the result is a fixed point: what is kept keeps.
    shuffled = list(candidates)
    rnd.shuffle(shuffled)
    assert policy.expired_names(shuffled) == expired
    kept = [c for c in candidates if c.name not in expired]
    assert policy.expired_names(kept) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**12), min_size=1, max_size=30, unique=True))
def test_order_is_numeric_whatever_the_name(steps: list[int]) -> None:
    candidates = [Candidate(f"checkpoint-{s}", None) for s in steps]
    assert [c.name for c in order_candidates(candidates)] == [f"checkpoint-{s}" for s in sorted(steps)]
