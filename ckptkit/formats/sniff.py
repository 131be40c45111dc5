"""What a file is, judged by its content and never by its name.

Extension-based dispatch has let malicious files past scanners (CVE-2025-1889, CVE-2025-10155),
so the reader is chosen from the first and last few KB: zip records, the legacy torch magic
pickle, a pickle PROTO opcode, the safetensors length prefix, JSON, numpy's magic. The usual
impostors of a failed download (empty file, Git LFS pointer, HTML or JSON error page,
truncation) get a kind of their own and a message that says what to do.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Literal

from ckptkit.formats import zipfile_reader as zr
from ckptkit.formats.safetensors import MAX_HEADER_SIZE
from ckptkit.storage.base import Store

Kind = Literal[
    "torch-zip",  # torch.save zip archive (<prefix>/data.pkl)
    "torchscript",  # torch.jit.save archive (constants.pkl, code/)
    "zip",  # any other zip (numpy .npz, ...)
    "torch-legacy",  # torch.save stacked pickles (_use_new_zipfile_serialization=False)
    "pickle",
    "dcp-metadata",  # torch.distributed.checkpoint .metadata (a pickle)
    "safetensors",
    "json",
    "npy",
    "tar",
    # impostors and damage
    "empty",
    "lfs-pointer",
    "html",
    "error-json",
    "truncated",
    "unknown",
]
BAD_KINDS = frozenset({"empty", "lfs-pointer", "html", "error-json", "truncated", "unknown"})

HEAD_SIZE = 4096
TAIL_SIZE = 4096
MAX_SNIFFED_DIRECTORY = 64 << 10  # read a zip's central directory to name its kind when this small

# pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2): PROTO 2, LONG1 of 10 bytes, STOP.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAGIC_LE = LEGACY_MAGIC.to_bytes(10, "little")
_LEGACY_MAGIC_PICKLE = re.compile(
    rb"\x80[\x02-\x05](?:\x95.{8})?\x8a\x0a" + re.escape(_MAGIC_LE) + rb"\.", re.DOTALL
)
_LEGACY_MAGIC_TEXT = re.compile(rb"(?:\x80[\x02-\x05])?L" + str(LEGACY_MAGIC).encode() + rb"L?\n\.")
_LFS = b"version https://git-lfs.github.com/spec/v1"
_DCP_MODULE = b"torch.distributed.checkpoint.metadata"
_PROTOCOL0_START = re.compile(rb"(?:c[\w.]+\n[\w.]+\n|\((?:d|l|[cIFLSVNt(])|[}\]]|\)\.|[IFL]-?\d|S'|V|N\.)")


@dataclass(frozen=True)
class Detected:
    kind: Kind
    detail: str
    prefix_offset: int = 0  # bytes before a zip archive (torch.load refuses such files)

    @property
    def bad(self) -> bool:
        """True for the impostors and damaged files, whose ``detail`` says what went wrong."""
        return self.kind in BAD_KINDS


def detect(store: Store, key: str, size: int | None = None) -> Detected:
    """Classify ``key`` from its first and last few KB. ``size``, when the caller already has it
    from a listing or a HEAD, saves a metadata request (on S3 a round trip per file)."""
    if size is None:
        size = store.head(key).size
    if size == 0:
        return Detected("empty", f"{key} is empty (0 bytes): the download or save did not complete")
    head = store.get(key, 0, min(size, HEAD_SIZE))
    tail_start = max(0, size - TAIL_SIZE)
    tail = head[tail_start:] if size <= HEAD_SIZE else store.get(key, tail_start, size)
    return _classify(store, key, size, head, tail, tail_start)


def _classify(store: Store, key: str, size: int, head: bytes, tail: bytes, tail_start: int) -> Detected:
    if head.startswith(_LFS):
        return Detected(
            "lfs-pointer",
            f"{key}: this is a Git LFS pointer, not the file: run git lfs pull" + _lfs_detail(head),
        )
    stripped = head.lstrip()
    if stripped[:1] == b"<":
        return Detected(
            "html",
            f"{key}: looks like an HTML error page, not a checkpoint: "
            f"the download probably failed ({_first_line(stripped)})",
        )
    if head.startswith(zr.LOCAL_SIG):
        return _zip(store, key, size, head, tail, tail_start)
    if _LEGACY_MAGIC_PICKLE.match(head) or _LEGACY_MAGIC_TEXT.match(head):
        return Detected(
            "torch-legacy",
            f"{key}: torch legacy stacked-pickle file (before torch 1.6, or "
            "_use_new_zipfile_serialization=False)",
        )
    safetensors = _safetensors(key, size, head)
    if safetensors is not None:
        return safetensors
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return _pickle(key, head, tail, f"protocol {head[1]}")
    if head.startswith(b"\x93NUMPY"):
        return Detected("npy", f"{key}: numpy .npy array (format {head[6] if len(head) > 6 else '?'})")
    if stripped[:1] in (b"{", b"["):
        return _json(key, size, head, stripped)
    if _PROTOCOL0_START.match(head) and tail.endswith(b"."):
        return _pickle(key, head, tail, "protocol 0/1 (no PROTO opcode)")
    zip_found = _zip_from_tail(store, key, size, tail, tail_start)
    if zip_found is not None:
        return zip_found
    if len(head) >= 262 and head[257:262] == b"ustar":
        return Detected("tar", f"{key}: tar archive (the pre-0.1.10 torch TAR format, or another tar)")
    return Detected("unknown", f"{key}: unknown content ({size} bytes, starts with {head[:16]!r})")


# --- zip ------------------------------------------------------------------------------------


def _zip(store: Store, key: str, size: int, head: bytes, tail: bytes, tail_start: int) -> Detected:
    found = _zip_from_tail(store, key, size, tail, tail_start)
    if found is not None:
        return found
    return Detected(
        "truncated",
        f"{key}: a zip archive without its end-of-central-directory record: the file is truncated "
        f"(an interrupted download or save)",
    )


def _zip_from_tail(store: Store, key: str, size: int, tail: bytes, tail_start: int) -> Detected | None:
    """A zip whose end records lie in ``tail``, validated against the file (prefix included)."""
    pos = tail.rfind(zr.EOCD_SIG)
    while pos >= 0:
        found = _zip_at(store, key, size, tail, tail_start, pos)
        if found is not None:
            return found
        pos = tail.rfind(zr.EOCD_SIG, 0, pos)
    return None


def _zip_at(store: Store, key: str, size: int, tail: bytes, tail_start: int, pos: int) -> Detected | None:
    if pos + zr.EOCD_SIZE > len(tail):
        return None
    _, _, _, _, cd_size, cd_offset, comment = struct.unpack_from("<4H2LH", tail, pos + 4)
    eocd_pos = tail_start + pos
    if eocd_pos + zr.EOCD_SIZE + comment > size:
        return None
    cd_end = eocd_pos
    locator = tail[pos - zr.ZIP64_LOCATOR_SIZE : pos] if pos >= zr.ZIP64_LOCATOR_SIZE else b""
    if locator[:4] == zr.ZIP64_LOCATOR_SIG and pos >= zr.ZIP64_LOCATOR_SIZE + zr.ZIP64_EOCD_SIZE:
        record = tail[pos - zr.ZIP64_LOCATOR_SIZE - zr.ZIP64_EOCD_SIZE : pos - zr.ZIP64_LOCATOR_SIZE]
        if record[:4] == zr.ZIP64_EOCD_SIG:
            cd_size, cd_offset = struct.unpack_from("<2Q", record, 40)
            cd_end = eocd_pos - zr.ZIP64_LOCATOR_SIZE - zr.ZIP64_EOCD_SIZE
    prefix = cd_end - cd_size - cd_offset
    if prefix < 0:
        return None
    # A stray "PK\5\6" inside tensor data is not a zip: demand the signatures it implies.
    if store.get(key, prefix, prefix + 4) != zr.LOCAL_SIG:
        return None
    names: list[str] | None = None
    if cd_size <= MAX_SNIFFED_DIRECTORY:
        directory = store.get(key, cd_end - cd_size, cd_end)
        if directory[:4] != zr.CENTRAL_SIG and cd_size:
            return None
        names = _central_names(directory)
    else:
        first = store.get(key, prefix, prefix + zr.LOCAL_SIZE + 1024)
        name_len = struct.unpack_from("<H", first, 26)[0] if len(first) >= zr.LOCAL_SIZE else 0
        names = [first[zr.LOCAL_SIZE : zr.LOCAL_SIZE + name_len].decode("utf-8", "replace")]
    prefix_note = f"; {prefix} bytes precede the archive (torch.load refuses it)" if prefix else ""
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return Detected("torchscript", f"{key}: TorchScript archive (torch.jit.save){prefix_note}", prefix)
    if any(n.endswith("/data.pkl") for n in names):
        return Detected("torch-zip", f"{key}: torch.save zip archive{prefix_note}", prefix)
    what = "numpy .npz archive" if names and all(n.endswith(".npy") for n in names) else "zip archive"
    return Detected("zip", f"{key}: {what}, not a torch.save file{prefix_note}", prefix)


def _central_names(directory: bytes) -> list[str]:
    names, pos = [], 0
    while pos + zr.CENTRAL_SIZE <= len(directory) and directory[pos : pos + 4] == zr.CENTRAL_SIG:
        name_len, extra_len, comment_len = struct.unpack_from("<3H", directory, pos + 28)
        names.append(directory[pos + 46 : pos + 46 + name_len].decode("utf-8", "replace"))
        pos += zr.CENTRAL_SIZE + name_len + extra_len + comment_len
    return names


# --- the others -----------------------------------------------------------------------------


def _safetensors(key: str, size: int, head: bytes) -> Detected | None:
    if len(head) < 9:
        return None
    length = int.from_bytes(head[:8], "little")
    body = head[8:].lstrip(b" \t\r\n")
    if not body.startswith(b"{") or length > MAX_HEADER_SIZE or length < 2:
        return None
    if 8 + length > size:
        return Detected(
            "truncated",
            f"{key}: safetensors header says {length} bytes but the file has only {size - 8} after "
            "the length prefix: the file is truncated",
        )
    end = _safetensors_data_end(head[8 : 8 + length]) if 8 + length <= len(head) else None
    if end is not None and 8 + length + end > size:
        return Detected(
            "truncated",
            f"{key}: safetensors header describes {8 + length + end} bytes, the file has {size}: "
            "the file is truncated",
        )
    return Detected("safetensors", f"{key}: safetensors file (header of {length} bytes)")


def _safetensors_data_end(raw: bytes) -> int | None:
    """The largest data offset the header states, or None if it does not parse."""
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    ends = [
        spec["data_offsets"][1]
        for name, spec in document.items()
        if name != "__metadata__"
        and isinstance(spec, dict)
        and isinstance(spec.get("data_offsets"), list)
        and len(spec["data_offsets"]) == 2
        and type(spec["data_offsets"][1]) is int
    ]
    return max(ends, default=0)


def _pickle(key: str, head: bytes, tail: bytes, protocol: str) -> Detected:
    window = head[:256]
    if _DCP_MODULE + b"\n" in window or b"\x8c" + bytes([len(_DCP_MODULE)]) + _DCP_MODULE in window:
        return Detected("dcp-metadata", f"{key}: torch.distributed.checkpoint .metadata (pickle, {protocol})")
    note = "" if tail.endswith(b".") else "; it does not end with STOP: truncated, or followed by other data"
    return Detected("pickle", f"{key}: pickle ({protocol}){note}")


def _json(key: str, size: int, head: bytes, stripped: bytes) -> Detected:
    if re.match(rb'\{\s*"(error|errors|message)"\s*:', stripped):
        return Detected(
            "error-json",
            f"{key}: looks like a JSON error response, not a checkpoint: the download probably failed "
            f"({_first_line(stripped)})",
        )
    return Detected("json", f"{key}: JSON document ({size} bytes)")


def _lfs_detail(head: bytes) -> str:
    fields = dict(line.split(b" ", 1) for line in head.splitlines() if b" " in line)
    oid, size = (
        fields.get(b"oid", b"").decode(errors="replace"),
        fields.get(b"size", b"").decode(errors="replace"),
    )
    return f" (object {oid}, {size} bytes)" if oid or size else ""


def _first_line(text: bytes, limit: int = 60) -> str:
    line = text.split(b"\n", 1)[0].strip().decode("utf-8", "replace")
    return repr(line if len(line) <= limit else line[:limit] + "...")
