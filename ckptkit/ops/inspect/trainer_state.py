"""``--trainer-state``: Hugging Face ``trainer_state.json``: progress, best checkpoint, last logs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckptkit.ops.inspect.context import Context

LAST_LOGS = 3
_FIELDS = (
    "global_step",
    "epoch",
    "max_steps",
    "num_train_epochs",
    "logging_steps",
    "save_steps",
    "eval_steps",
    "train_batch_size",
    "best_metric",
    "best_model_checkpoint",
    "best_global_step",
)


@dataclass
class TrainerState:
    file: str
    fields: dict[str, Any]
    log_entries: int
    last_logs: list[dict[str, Any]]
    last_logged_lr: float | None
    last_logged_lr_step: int | None
    callbacks: list[str] = field(default_factory=list)

    @property
    def global_step(self) -> int | None:
        step = self.fields.get("global_step")
        return step if type(step) is int else None


def describe_trainer_state(ctx: Context) -> TrainerState | None:
    document = ctx.trainer_state
    if not isinstance(document, dict):
        return None
    history = document.get("log_history")
    history = [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []
    logged = [h for h in history if isinstance(h.get("learning_rate"), (int, float))]
    callbacks = document.get("stateful_callbacks")
    return TrainerState(
        file=str(ctx.target.trainer_state),
        fields={k: document.get(k) for k in _FIELDS if k in document},
        log_entries=len(history),
        last_logs=history[-LAST_LOGS:],
        last_logged_lr=logged[-1]["learning_rate"] if logged else None,
        last_logged_lr_step=logged[-1].get("step") if logged else None,
        callbacks=sorted(callbacks) if isinstance(callbacks, dict) else [],
    )
