"""On-disk format of checkpoints: directories, manifests, chunks, checksums, the root lock.

A chain root holds one directory per checkpoint::

    <root>/.lock                      flock'ed by the one process writing checkpoints here
    <root>/ckpt-000007/               a checkpoint (committed iff manifest.json exists)
        manifest.json                 JSON, with a CRC32 of its own body (and written in the
                                      one canonical layout, so any changed byte shows)
        <table>.<part>.ids.zst        row ids of one part (delta-encoded, zstd)
        <table>.<part>.w.zst          the part's weights (tierstore.quant.EncodedRows, zstd)
        <table>.<part>.s.zst          its optimizer state at fp32/fp16 (absent for SGD)
        dense/                        extra state via torch.distributed.checkpoint (optional)
    <root>/.del-ckpt-000002/          being deleted by retention (ignored; removed next time)

Commit protocol: the directory is created and fsynced into the root, every chunk is written
and fsynced, then the manifest is written to ``manifest.json.tmp``, fsynced, and renamed to
``manifest.json`` (the commit point), and the directory is fsynced. A directory without
``manifest.json`` is an interrupted write: never listed, deleted by the next writer.
Deleting renames the directory to ``.del-<name>`` first (atomic), so a checkpoint is always
either whole or absent from :func:`committed`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import time
import zlib
from typing import Any, Iterator

import numpy as np
import zstandard

from tierstore.errors import TierstoreError

FORMAT = "tierstore-ckpt"
VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
DEL_PREFIX = ".del-"
NAME_RE = re.compile(r"^ckpt-(\d{6,})$")
PART_ROWS = 1 << 18  # rows per chunk part: bounds the writer's working memory per step
READ_BLOCK = 1 << 22


class CheckpointError(TierstoreError):
    """A checkpoint could not be written or restored (the message says why)."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint or its chain fails verification; ``problems`` lists each culprit as
    ``{"checkpoint": name, "file": path relative to the root, "problem": text}``."""

    def __init__(self, message: str, problems: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


# -- names -----------------------------------------------------------------------------------

def ckpt_name(seq: int) -> str:
    return f"ckpt-{seq:06d}"


def seq_of(name: str) -> int | None:
    m = NAME_RE.match(name)
    return int(m.group(1)) if m else None


def next_seq(root: str) -> int:
    """1 + the highest sequence number under ``root``, interrupted and deleted ones included."""
    top = 0
    for entry in _listdir(root):
        s = seq_of(entry[len(DEL_PREFIX):] if entry.startswith(DEL_PREFIX) else entry)
        if s is not None:
            top = max(top, s)
    return top + 1


def _listdir(root: str) -> list[str]:
    try:
        return os.listdir(root)
    except FileNotFoundError:
        return []


def committed(root: str) -> list[str]:
    """Names of committed checkpoints under ``root`` (a ``manifest.json`` exists), oldest
    first. Does not read the manifests."""
    names = [n for n in _listdir(root) if seq_of(n) is not None
             and os.path.exists(os.path.join(root, n, MANIFEST))]
    return sorted(names, key=lambda n: seq_of(n))


def incomplete(root: str) -> list[str]:
    """Directories left by interrupted writes or deletes (no manifest, or ``.del-``)."""
    out = []
    for n in _listdir(root):
        if n.startswith(DEL_PREFIX):
            out.append(n)
        elif seq_of(n) is not None and not os.path.exists(os.path.join(root, n, MANIFEST)):
            out.append(n)
    return sorted(out)


# -- durability helpers ----------------------------------------------------------------------

def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str, data: bytes | memoryview) -> None:
    """Write ``data`` to a new file and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_checkpoint_dir(root: str, name: str) -> None:
    """Delete a checkpoint directory crash-safely: rename it to ``.del-<name>`` (after which
    it is no longer listed), fsync the root, then remove the files."""
    src = os.path.join(root, name)
    dst = src if name.startswith(DEL_PREFIX) else os.path.join(root, DEL_PREFIX + name)
    if dst != src:
        if os.path.exists(dst):
            shutil.rmtree(dst, ignore_errors=True)
        os.rename(src, dst)
        fsync_dir(root)
    from tierstore.ckpt.hooks import pause
    pause("retention")
    shutil.rmtree(dst, ignore_errors=True)


class RootLock:
    """Exclusive flock on ``<root>/.lock``: one checkpoint writer per root at a time, across
    processes. The kernel drops it when the holder dies (SIGKILL included)."""

    def __init__(self, root: str) -> None:
        os.makedirs(root, mode=0o700, exist_ok=True)
        self.root = root
        self.fd = os.open(os.path.join(root, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            self.fd = -1
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(f"checkpoint root {root!r} is being written by another "
                                      f"process (or Store); one writer per root") from None
            raise

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- chunks ----------------------------------------------------------------------------------

def encode_ids(ids: np.ndarray) -> bytes:
    """Sorted distinct int64 ids -> one width byte (4 or 8) + little-endian deltas (the first
    is the id itself): small numbers that zstd packs into 1-2 bytes per id."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    d = np.empty(len(ids), np.uint64)
    if len(ids):
        d[0] = ids[0]
        np.subtract(ids[1:], ids[:-1], out=d[1:].view(np.int64))
    if len(d) == 0 or int(d.max()) < (1 << 32):
        return b"\x04" + d.astype("<u4").tobytes()
    return b"\x08" + d.astype("<u8").tobytes()


def decode_ids(raw: bytes) -> np.ndarray:
    if len(raw) < 1 or raw[0] not in (4, 8) or (len(raw) - 1) % raw[0]:
        raise ValueError("malformed ids chunk")
    d = np.frombuffer(raw, dtype="<u4" if raw[0] == 4 else "<u8", offset=1)
    return np.cumsum(d, dtype=np.uint64).astype(np.int64)


def compress(raw: bytes, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_checksum=True,
                                    write_content_size=True).compress(raw)


def decompress(buf: bytes, raw_bytes: int) -> bytes:
    out = zstandard.ZstdDecompressor().decompress(buf, max_output_size=raw_bytes)
    if len(out) != raw_bytes:
        raise ValueError(f"decompressed to {len(out)} bytes, manifest says {raw_bytes}")
    return out


def write_chunk(dirpath: str, file: str, raw: bytes, level: int, **info: Any) -> dict[str, Any]:
    """Compress ``raw`` into ``dirpath/file`` (fsynced) and return its manifest entry."""
    data = compress(raw, level)
    write_file(os.path.join(dirpath, file), data)
    return {"file": file, **info, "bytes": len(data), "raw_bytes": len(raw),
            "crc32": zlib.crc32(data)}


def file_crc(path: str) -> tuple[int, int]:
    """(crc32, size) of a file, read in blocks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            b = f.read(READ_BLOCK)
            if not b:
                return crc, size
            crc = zlib.crc32(b, crc)
            size += len(b)


def check_file(path: str, entry: dict[str, Any]) -> str | None:
    """None if the file matches its manifest entry, else what is wrong with it."""
    try:
        crc, size = file_crc(path)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if size != entry["bytes"]:
        return (f"truncated: {size} of {entry['bytes']} bytes" if size < entry["bytes"]
                else f"wrong size: {size} bytes, manifest says {entry['bytes']}")
    if crc != entry["crc32"]:
        return f"checksum mismatch: crc32 {crc:08x}, manifest says {entry['crc32']:08x}"
    return None


def read_chunk(dirpath: str, entry: dict[str, Any]) -> bytes:
    """The chunk's raw bytes, checked against its size and checksum. Raises CorruptCheckpoint."""
    path = os.path.join(dirpath, entry["file"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        data = None
    name = os.path.basename(dirpath)
    problem = ("missing" if data is None else
               f"truncated: {len(data)} of {entry['bytes']} bytes" if len(data) < entry["bytes"]
               else f"wrong size: {len(data)} bytes" if len(data) != entry["bytes"]
               else "checksum mismatch" if zlib.crc32(data) != entry["crc32"] else None)
    if problem is None:
        try:
            return decompress(data, entry["raw_bytes"])
        except Exception as e:  # zstd's own frame checksum, or a size mismatch
            problem = f"does not decompress: {e}"
    rel = f"{name}/{entry['file']}"
    raise CorruptCheckpoint(f"{rel}: {problem}", [{"checkpoint": name, "file": rel,
                                                    "problem": problem}])


# -- manifests -------------------------------------------------------------------------------

def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _text(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def write_manifest(dirpath: str, body: dict[str, Any]) -> None:
    """Write the manifest (with its own CRC32) to a temporary name, fsync, rename into place
    (the commit) and fsync the directory."""
    from tierstore.ckpt.hooks import pause
    doc = dict(body)
    doc["manifest_crc32"] = zlib.crc32(_canonical(body))
    tmp = os.path.join(dirpath, MANIFEST + ".tmp")
    write_file(tmp, _text(doc))
    pause("manifest")
    os.rename(tmp, os.path.join(dirpath, MANIFEST))
    fsync_dir(dirpath)


def read_manifest(dirpath: str) -> dict[str, Any]:
    """The manifest of a checkpoint directory, checked against its own CRC32.
    Raises CorruptCheckpoint naming the file."""
    name = os.path.basename(os.path.normpath(dirpath))
    rel = f"{name}/{MANIFEST}"

    def bad(problem: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"{rel}: {problem}", [{"checkpoint": name, "file": rel,
                                                        "problem": problem}])
    try:
        with open(os.path.join(dirpath, MANIFEST), "rb") as f:
            text = f.read()
    except FileNotFoundError:
        raise bad("missing (not a committed checkpoint)") from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise bad(f"not valid JSON ({e})") from None
    if not isinstance(doc, dict) or "manifest_crc32" not in doc:
        raise bad("not a checkpoint manifest")
    if _text(doc) != text:  # the file is the one serialization of its content: any byte
        raise bad("damaged (its bytes are not what was written)")  # changed shows
    crc = doc.pop("manifest_crc32")
    if zlib.crc32(_canonical(doc)) != crc:
        raise bad("checksum mismatch (the manifest was changed or damaged)")
    if doc.get("format") != FORMAT:
        raise bad(f"format {doc.get('format')!r}, expected {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise bad(f"version {doc.get('version')!r}; this reader knows {VERSION}")
    if doc.get("name") != name:
        raise bad(f"names checkpoint {doc.get('name')!r} but lives in {name!r}")
    return doc


def chunk_entries(manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every file a checkpoint lists (row chunks, then dense-state files)."""
    yield from manifest["chunks"]
    yield from (manifest.get("dense") or {}).get("files", [])


def now() -> tuple[str, float]:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)), t
