"""What every object store beside S3 is shown to do, on its emulator: the create-only race, backend
errors as exit codes, and a checkpoint's life end to end through the CLI. The per-store test files
(tests/test_store_gcs.py, tests/test_store_azure.py) call these with their own URLs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from ckptkit.errors import AlreadyExistsError
from ckptkit.storage import open_store
from tests.helpers import commit_files

CLI = [sys.executable, "-c", "from ckptkit.cli.main import main; main()"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=180)


def cli_json(*args: str) -> Any:
    out = cli(*args, "--json")
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return json.loads(out.stdout)


def race_create(url: str, writers: int = 8) -> None:
    """``writers`` stores, each with its own client, put one key create-only at the same moment:
    exactly one wins, every other gets AlreadyExistsError, and the object is the winner's."""
    stores = [open_store(url) for _ in range(writers)]
    start = threading.Barrier(writers)
    outcomes: dict[int, str] = {}

    def write(i: int) -> None:
        start.wait()
        try:
            stores[i].put("ckptkit-manifest.json", b"writer %d" % i, mode="create")
            outcomes[i] = "won"
        except AlreadyExistsError:
            outcomes[i] = "exists"

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, outcome in outcomes.items() if outcome == "won"]
    assert len(outcomes) == writers and len(winners) == 1, outcomes
    assert open_store(url).get("ckptkit-manifest.json") == b"writer %d" % winners[0]


def end_to_end(root: str, other_root: str, tmp_path: Path) -> None:
    """save → commit → ls/verify → sync down to local and back up → gc, every command with --json."""
    import torch

    import ckptkit

    state = {"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(3, 5), "step": 7}
    manifest = ckptkit.save(state, f"{root}/step-00000007", step=7)
    assert manifest.step == 7
    loaded = ckptkit.load(f"{root}/step-00000007")
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7

    listing = cli_json("ls", root)
    assert [(c["name"], c["status"]) for c in listing] == [("step-00000007", "committed")]
    verified = cli_json("verify", root)
    assert verified["ok"] and [c["status"] for c in verified["checkpoints"]] == ["ok"], verified
    assert verified["checkpoints"][0]["bytes_checked"] == sum(f.size for f in manifest.files)

    local = tmp_path / "local"
    down = cli_json("sync", root, str(local))
    assert [c["status"] for c in down["checkpoints"]] == ["committed"], down
    assert cli("verify", str(local / "step-00000007")).returncode == 0
    up = cli_json("sync", str(local), other_root)
    assert [c["status"] for c in up["checkpoints"]] == ["committed"], up
    assert up["bytes_sent"] == down["bytes_sent"] > 0
    again = cli_json("sync", str(local), other_root)
    assert [c["status"] for c in again["checkpoints"]] == ["up-to-date"] and again["bytes_sent"] == 0
    assert torch.equal(ckptkit.load(f"{other_root}/step-00000007")["b"], state["b"])

    # An interrupted save leaves an attempt prefix without a manifest; gc removes it, and only it.
    store = open_store(root)
    store.put("step-00000009/ckptkit-0123456789ab/shard.bin", b"debris")
    gc = cli_json("gc", root, "--grace", "0")
    assert gc["bytes_removed"] == len(b"debris") and "step-00000009" in json.dumps(gc["removed"]), gc
    assert not list(store.list("step-00000009"))
    assert [c["name"] for c in cli_json("ls", root)] == ["step-00000007"]
    assert cli("verify", root).returncode == 0


def corrupt_then_verify(root: str) -> None:
    """A flipped byte in a committed object is a finding (exit 1) naming the file."""
    store = open_store(root)
    commit_files(store, "step-00000001", {"a.bin": b"a" * 5000}, step=1)
    (info,) = [i for i in store.list("step-00000001") if i.key.endswith("a.bin")]
    data = bytearray(store.get(info.key))
    data[100] ^= 1
    store.put(info.key, bytes(data))
    out = cli("verify", root)
    assert out.returncode == 1 and "a.bin" in out.stdout, out.stdout + out.stderr


def assert_clean_failure(out: subprocess.CompletedProcess[str], code: int, *phrases: str) -> None:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    for phrase in phrases:
        assert phrase in out.stderr, (phrase, out.stderr)

