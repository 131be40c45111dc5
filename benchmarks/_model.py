"""A ~100M-parameter fp32 transformer-ish model plus AdamW state after one step (≈1.2 GB).

Built from a config, never downloaded. The state is what a training loop would hand a
checkpointer: ``{"model": state_dict, "optimizer": state_dict, "step": 1}``.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Config:
    vocab: int = 32_000
    width: int = 768
    layers: int = 8
    heads: int = 12
    ffn: int = 3072


class TinyLM(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.width, cfg.heads, cfg.ffn, dropout=0.0, batch_first=True)
            for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def training_state(cfg: Config | None = None, seed: int = 0) -> dict[str, Any]:
    """Model and AdamW state after one optimizer step, gradients freed."""
    cfg = cfg or Config()
    torch.manual_seed(seed)
    model = TinyLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg.vocab, (2, 32))
    logits = model(tokens)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del logits, loss
    gc.collect()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}


def parameter_count(state: dict[str, Any]) -> int:
    return sum(t.numel() for t in state["model"].values())


def tensor_bytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in flat_tensors(state).values())


def flat_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Model tensors plus optimizer tensors under flattened names, as safetensors needs them."""
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    for pid, slots in state["optimizer"]["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                flat[f"optimizer.state.{pid}.{slot}"] = value
    return flat


def touch_all(tree: Any) -> float:
    """Sum every tensor in a loaded tree, so lazily mapped bytes are really read."""
    if isinstance(tree, torch.Tensor):
        return float(tree.sum())
    if isinstance(tree, dict):
        return sum(touch_all(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(touch_all(v) for v in tree)
    return 0.0
