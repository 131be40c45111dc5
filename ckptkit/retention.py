"""Retention: which committed checkpoints to delete after a new one committed.

A checkpoint is kept if ANY configured rule keeps it (``keep_last``, ``keep_every``,
``keep_best``); the newest checkpoint and the best ones are never expired, and a policy with no
rules expires nothing. The rules avoid the known failures of hand-rolled retention (HF Trainer's
``save_total_limit`` among them): a limit of one never deletes everything, steps order
numerically (``checkpoint-10`` after ``checkpoint-9``, never string order), and the best
checkpoint survives however old it is.

:meth:`RetentionPolicy.select_expired` takes :class:`~ckptkit.catalog.CheckpointInfo` from a
listing; :meth:`RetentionPolicy.expired_names` takes plain ``(name, step, metrics)`` tuples, for
callers that do not hold manifests (an HF Trainer callback looking at ``checkpoint-N``
directories). :meth:`RetentionPolicy.select_thinned` names the kept ones to thin to weights only
(``keep_optimizer_last``). Nothing here deletes or thins: callers do, and only after their new
checkpoint committed.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, NamedTuple

from ckptkit.catalog import CheckpointInfo, step_from_name

BEST_MODES = ("min", "max")


class Candidate(NamedTuple):
    """One committed checkpoint as retention sees it.

    ``step`` None falls back to the step in ``name`` (``checkpoint-2500``), then to ``created``
    (ISO 8601 UTC) for ordering. ``metrics`` maps names to numbers; others are ignored.
    """

    name: str
    step: int | None
    metrics: Mapping[str, Any] = {}
    created: str | None = None


@dataclass(frozen=True)
class RetentionPolicy:
    """Which committed checkpoints to keep; everything else expires.

    ``keep_last``: the N newest. ``keep_every``: those whose step is a multiple of K.
    ``keep_best``: the ``keep_best_count`` checkpoints with the lowest (``best_mode="min"``) or
    highest (``"max"``) value of that metric; checkpoints without the metric, or with a NaN or
    infinite value, are never "best" but other rules may keep them.

    ``keep_optimizer_last``: of the checkpoints kept, the K newest stay resumable and the older
    ones are thinned to ``thin_keep`` (top-level keys of a native state; ``"model"`` keeps an HF
    or DeepSpeed checkpoint's weights), once each (:meth:`select_thinned`; the caller thins,
    with :func:`ckptkit.ops.thin.thin_checkpoint`).
    """

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: str | None = None
    best_mode: Literal["min", "max"] = "min"
    keep_best_count: int = 1
    keep_optimizer_last: int | None = None
    thin_keep: tuple[str, ...] = ("model",)

    def __post_init__(self) -> None:
        _check_count("keep_last", self.keep_last, "the newest checkpoint is always kept")
        _check_count("keep_every", self.keep_every, "a step interval")
        _check_count("keep_best_count", self.keep_best_count, "keep_best=None keeps no best", optional=False)
        _check_count("keep_optimizer_last", self.keep_optimizer_last, "the newest stays resumable")
        keep = self.thin_keep
        if isinstance(keep, str) or not keep or not all(isinstance(k, str) and k for k in keep):
            raise ValueError(f"thin_keep must name one or more top-level keys, got {keep!r}")
        object.__setattr__(self, "thin_keep", tuple(keep))  # a list from configuration, frozen
        if self.keep_best is not None and (not isinstance(self.keep_best, str) or not self.keep_best):
            raise ValueError(f"keep_best must be a metric name (a non-empty string), got {self.keep_best!r}")
        if self.best_mode not in BEST_MODES:
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")

    @classmethod
    def from_kwargs(cls, **options: Any) -> RetentionPolicy:
        """A policy from configuration (a dict or CLI options): ``None`` values mean "not set";
        an unknown option is a ``ValueError`` that names the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown retention option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**{k: v for k, v in options.items() if v is not None})

    @property
    def has_rules(self) -> bool:
        """Whether any rule deletes checkpoints (thinning is :attr:`thins`)."""
        return self.keep_last is not None or self.keep_every is not None or self.keep_best is not None

    @property
    def thins(self) -> bool:
        """Whether older checkpoints are thinned to ``thin_keep`` (``keep_optimizer_last``)."""
        return self.keep_optimizer_last is not None

    def describe(self) -> str:
        """One line for logs: ``keep_last=3, keep_every=1000, keep_best=eval_loss (min, top 1)``."""
        thinning = (
            f"; older than the {self.keep_optimizer_last} newest thinned to {', '.join(self.thin_keep)}"
            if self.thins else ""
        )
        if not self.has_rules:
            return "keep everything (no retention rule)" + thinning
        rules = []
        if self.keep_last is not None:
            rules.append(f"keep_last={self.keep_last}")
        if self.keep_every is not None:
            rules.append(f"keep_every={self.keep_every}")
        if self.keep_best is not None:
            rules.append(f"keep_best={self.keep_best} ({self.best_mode}, top {self.keep_best_count})")
        return ", ".join(rules) + "; the newest is always kept" + thinning

    def select_expired(self, committed: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
        """The committed checkpoints this policy deletes, oldest first. Uncommitted entries are
        neither kept nor expired here: they are ``gc``'s business, not retention's."""
        infos = {c.name: c for c in committed if c.committed}
        return [infos[name] for name in self.expired_names([candidate(c) for c in infos.values()])]

    def select_thinned(
        self, committed: Sequence[CheckpointInfo], expired: Iterable[CheckpointInfo] = ()
    ) -> list[CheckpointInfo]:
        """The committed checkpoints to thin, oldest first: of those not ``expired``, all but
        the ``keep_optimizer_last`` newest, except those already thinned (never thinned twice)."""
        if self.keep_optimizer_last is None:
            return []
        gone = {c.name for c in expired}
        infos = {c.name: c for c in committed if c.committed and c.name not in gone}
        ordered = order_candidates([candidate(c) for c in infos.values()])
        older = ordered[: max(0, len(ordered) - self.keep_optimizer_last)]
        return [infos[c.name] for c in older if infos[c.name].resumable is not False]

    def expired_names(self, candidates: Iterable[Candidate | tuple[Any, ...]]) -> list[str]:
        """Names of the checkpoints this policy deletes, oldest first.

        ``candidates`` are :class:`Candidate` or plain ``(name, step, metrics[, created])`` tuples,
        in any order. Duplicate names are a ``ValueError``.
        """
        ordered = order_candidates([Candidate(*c) for c in candidates])
        if not self.has_rules:
            return []
        kept = self.kept_names(ordered)
        return [c.name for c in ordered if c.name not in kept]

    def kept_names(self, ordered: Sequence[Candidate]) -> set[str]:
        """Names kept by any rule, given candidates oldest first (see :func:`order_candidates`)."""
        if not ordered:
            return set()
        kept = {ordered[-1].name}  # the newest, whatever the rules say
        if self.keep_last is not None:
            kept.update(c.name for c in ordered[-self.keep_last :])
        if self.keep_every is not None:
            kept.update(c.name for c in ordered if (s := _step(c)) is not None and s % self.keep_every == 0)
        if self.keep_best is not None:
            kept.update(self.best_names(ordered))
        return kept

    def best_names(self, ordered: Sequence[Candidate]) -> list[str]:
        """The ``keep_best_count`` best checkpoints by ``keep_best``; on a tie the older one wins
        (it reached the value first, as a trainer's "best so far" tracking records it)."""
        if self.keep_best is None:
            return []
        sign = 1.0 if self.best_mode == "min" else -1.0
        scored = [
            (sign * value, position, c.name)
            for position, c in enumerate(ordered)
            if (value := _metric(c, self.keep_best)) is not None
        ]
        return [name for _score, _position, name in sorted(scored)[: self.keep_best_count]]


def candidate(info: CheckpointInfo) -> Candidate:
    """A listed checkpoint as retention sees it (metrics from its manifest, if it was read)."""
    return Candidate(info.name, info.step, info.manifest.metrics if info.manifest else {}, info.created)


def order_candidates(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Oldest first: by step (numeric), and a checkpoint without a step by its creation time.

    Stepped checkpoints are ordered by step (ties by creation time, then name); step-less ones by
    creation time; the two sequences are merged by creation time, so a step-less checkpoint lands
    among the stepped ones written around the same time. Raises ``ValueError`` on duplicate names.
    """
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate checkpoint name(s) {', '.join(duplicates)}")
    stepped = sorted(
        (c for c in candidates if _step(c) is not None), key=lambda c: (_step(c), _time(c), c.name)
    )
    stepless = sorted((c for c in candidates if _step(c) is None), key=lambda c: (_time(c), c.name))
    merged: list[Candidate] = []
    i = 0
    for candidate in stepless:
        while i < len(stepped) and _time(stepped[i]) <= _time(candidate):
            merged.append(stepped[i])
            i += 1
        merged.append(candidate)
    merged.extend(stepped[i:])
    return merged


def _check_count(name: str, value: object, why: str, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer of at least 1 ({why}), got {value!r}")


def _step(candidate: Candidate) -> int | None:
    if candidate.step is not None:
        return candidate.step
    return step_from_name(candidate.name.rstrip("/").rsplit("/", 1)[-1])


_EPOCH = dt.datetime.min.replace(tzinfo=dt.timezone.utc)


def _time(candidate: Candidate) -> dt.datetime:
    """The creation time; a missing or unparsable one counts as the oldest possible."""
    if not candidate.created:
        return _EPOCH
    try:
        parsed = dt.datetime.fromisoformat(candidate.created)
    except ValueError:
        return _EPOCH
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _metric(candidate: Candidate, name: str) -> float | None:
    """The metric as a finite float, or None: a missing, non-numeric, NaN or infinite value
    (a diverged evaluation) never makes a checkpoint "best"."""
    value = candidate.metrics.get(name) if isinstance(candidate.metrics, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
