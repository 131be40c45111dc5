"""``ckptkit log ROOT``: the history of a root as a tree, from its manifests alone.

Each checkpoint's tree parent is the one before it in the same run (same ``run_id`` and same
recorded resume parent, by step): an ``edge`` of kind ``run``. The first checkpoint a run saves
after resuming hangs under the checkpoint it resumed from (``metadata.lineage.parent``, matched
by checkpoint id): kind ``resume``. A resume from an older checkpoint therefore branches. A
checkpoint whose resume parent is not under this root (deleted, or in another root) is shown as
a root with a note saying where it came from. No tensor is read: one listing and one small GET
per committed checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ckptkit.catalog import THINNED, CheckpointInfo, is_resumable, list_checkpoints
from ckptkit.lineage import Lineage
from ckptkit.storage import Store

EdgeKind = Literal["run", "resume"]


@dataclass
class LogNode:
    """One checkpoint of the root as ``log`` shows it."""

    name: str
    url: str
    status: str  # committed / incomplete / invalid
    step: int | None
    created: str | None
    checkpoint_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    parent: dict[str, Any] | None = None  # the recorded resume parent
    resumable: bool = False
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "url": self.url, "status": self.status, "step": self.step,
            "created": self.created, "checkpoint_id": self.checkpoint_id, "metrics": self.metrics,
            "run_id": self.run_id, "parent": self.parent, "resumable": self.resumable, "note": self.note,
        }


@dataclass(frozen=True)
class LogEdge:
    parent: str  # node names
    child: str
    kind: EdgeKind


@dataclass
class LogReport:
    root: str
    nodes: list[LogNode]  # oldest first
    edges: list[LogEdge]
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def children(self) -> dict[str, list[str]]:
        """Node name -> its children's names, in node order."""
        order = {n.name: i for i, n in enumerate(self.nodes)}
        kids: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for edge in sorted(self.edges, key=lambda e: order[e.child]):
            kids[edge.parent].append(edge.child)
        return kids

    def roots(self) -> list[str]:
        children = {e.child for e in self.edges}
        return [n.name for n in self.nodes if n.name not in children]

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "nodes": [n.to_json() for n in self.nodes],
            "edges": [{"parent": e.parent, "child": e.child, "kind": e.kind} for e in self.edges],
            "roots": self.roots(),
            "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
        }


def checkpoint_log(root: Store) -> LogReport:
    """The history of the checkpoints under ``root`` (see the module doc)."""
    unreadable: list[tuple[str, str]] = []
    infos = list_checkpoints(root, unreadable=unreadable)
    nodes = [_node(info) for info in infos]
    by_id = {n.checkpoint_id: n for n in nodes if n.checkpoint_id}
    # Thinning replaces a checkpoint's manifest and id; its children recorded the id before.
    for info, node in zip(infos, nodes, strict=True):
        thinned = info.manifest.metadata.get(THINNED) if info.manifest is not None else None
        earlier = thinned.get("from_checkpoint_id") if isinstance(thinned, dict) else None
        if isinstance(earlier, str):
            by_id.setdefault(earlier, node)
    edges: list[LogEdge] = []
    last_of_run: dict[tuple[str, str | None], LogNode] = {}
    for node in nodes:  # oldest first: a run's previous checkpoint is met before its next
        if node.run_id is None:
            continue
        resumed = (node.parent or {}).get("checkpoint_id")
        key = (node.run_id, resumed)
        previous = last_of_run.get(key)
        last_of_run[key] = node
        if previous is not None:
            edges.append(LogEdge(previous.name, node.name, "run"))
        elif resumed is not None and resumed in by_id and by_id[resumed] is not node:
            edges.append(LogEdge(by_id[resumed].name, node.name, "resume"))
        elif node.parent is not None:
            where = node.parent.get("url") or "an unknown checkpoint"
            step = node.parent.get("step")
            node.note = f"resumed from {where}" + (f" (step {step})" if step is not None else "") + (
                ", not under this root (deleted or elsewhere)"
            )
    return LogReport(root.url, nodes, edges, unreadable)


def _node(info: CheckpointInfo) -> LogNode:
    node = LogNode(info.name, info.url, info.status, info.step, info.created)
    manifest = info.manifest
    if manifest is None:
        node.note = f"{info.status}: not resumable"
        return node
    node.checkpoint_id = manifest.checkpoint_id
    node.metrics = dict(manifest.metrics)
    # A checkpoint thinned to weights only keeps the model but not what a resume needs.
    node.resumable = info.committed and is_resumable(manifest)
    if not is_resumable(manifest):
        node.note = "thinned (weights only): not resumable"
    lineage = Lineage.of(manifest)
    if lineage is not None:
        node.run_id = lineage.run_id
        node.parent = lineage.parent
    return node
