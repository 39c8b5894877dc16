"""Reading checkpoints: list, verify, restore.

:func:`restore` verifies the whole restore set first (every manifest's own checksum, every
chunk's size and CRC32, parents present and consistent, table specs compatible with the store)
and raises :class:`CorruptCheckpoint` before changing anything if one check fails. Then per
table: ``reset_table`` (every row back to its initial value), and the rows of the restore set
written with ``write_rows``, each row once, from the newest checkpoint of the set that holds it
(restored rows are not counted as modified). Finally the store is flushed and the dense state
loaded through ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from tierstore import quant
from tierstore.ckpt import format as fmt
from tierstore.config import TableSpec


def _progress(total: int, desc: str, enabled: bool, unit: str = "B") -> Any:
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled,
                leave=False, delay=1.0)  # long restores and verifies only


# -- listing ---------------------------------------------------------------------------------

def resolve(path: str | os.PathLike) -> tuple[str, str]:
    """(root, name) of a checkpoint directory path."""
    p = os.path.realpath(os.fspath(path))
    return os.path.dirname(p), os.path.basename(p)


def list_checkpoints(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Committed checkpoints under ``root``, oldest first: name, path, kind, parent, baseline,
    restore_set, step, created, scheme, rows, bytes, restore_bytes (what restoring it reads),
    restorable (every checkpoint of its restore set committed with a sound manifest; chunks
    are not read: :func:`verify` does that) and problem (why not)."""
    root = os.path.realpath(os.fspath(root))
    manifests: dict[str, dict[str, Any] | str] = {}
    for name in fmt.committed(root):
        try:
            manifests[name] = fmt.read_manifest(os.path.join(root, name))
        except fmt.CorruptCheckpoint as e:
            manifests[name] = str(e)
    out = []
    for name, m in manifests.items():
        if isinstance(m, str):
            out.append({"name": name, "path": os.path.join(root, name), "restorable": False,
                        "problem": m})
            continue
        problem = None
        restore_bytes = 0
        for member in m["restore_set"]:
            mm = manifests.get(member)
            if mm is None:
                problem = f"needs {member}, which is missing"
            elif isinstance(mm, str):
                problem = f"needs {member}: {mm}"
            else:
                restore_bytes += mm["bytes"]
            if problem:
                break
        sch = quant.Scheme.from_json(m["scheme"])
        out.append({
            "name": name, "path": os.path.join(root, name), "kind": m["kind"],
            "policy": m["policy"]["policy"], "parent": m["parent"], "baseline": m["baseline"],
            "restore_set": m["restore_set"], "step": m["step"], "reader": m["reader"],
            "created": m["created"], "scheme": sch.name, "state_dtype": m["state_dtype"],
            "restores": m["restores"],
            "rows": sum(t["rows"] for t in m["tables"].values()), "tables": sorted(m["tables"]),
            "bytes": m["bytes"], "restore_bytes": restore_bytes if problem is None else None,
            "dense": m.get("dense") is not None, "restorable": problem is None,
            "problem": problem})
    return out


# -- verification ----------------------------------------------------------------------------

def _problem(name: str, file: str, problem: str) -> dict[str, str]:
    return {"checkpoint": name, "file": f"{name}/{file}" if file else name, "problem": problem}


def _chain_manifests(root: str, name: str) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Manifests of the restore set of ``name`` (in apply order) and the problems found in
    them (missing, damaged, inconsistent); no chunk is read."""
    problems: list[dict[str, str]] = []
    try:
        head = fmt.read_manifest(os.path.join(root, name))
    except fmt.CorruptCheckpoint as e:
        return [], e.problems
    chain = []
    rs = head["restore_set"]
    if not rs or rs[-1] != name or rs[0] != head["baseline"]:
        problems.append(_problem(name, fmt.MANIFEST, "restore set inconsistent with the "
                                 "checkpoint and its baseline"))
        return [], problems
    for member in rs[:-1]:
        if not os.path.isdir(os.path.join(root, member)):
            problems.append(_problem(member, "", f"missing: {name} needs it (parent chain "
                                     f"{' -> '.join(rs)})"))
            continue
        try:
            m = fmt.read_manifest(os.path.join(root, member))
        except fmt.CorruptCheckpoint as e:
            problems.extend(e.problems)
            continue
        if m["baseline"] != head["baseline"] or m["restore_set"] != rs[:rs.index(member) + 1] \
                or (member == rs[0]) != (m["kind"] == "full"):
            problems.append(_problem(member, fmt.MANIFEST, f"does not belong to the chain of "
                                     f"{name} (baseline {m['baseline']})"))
            continue
        if set(m["tables"]) != set(head["tables"]) or any(
                m["tables"][t]["spec"] != head["tables"][t]["spec"] for t in head["tables"]):
            problems.append(_problem(member, fmt.MANIFEST, f"tables differ from {name}'s"))
            continue
        chain.append(m)
    chain.append(head)
    return chain, problems


def verify(path: str | os.PathLike, progress: bool = False,
           _checked: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Check a checkpoint and everything restoring it needs: manifests (own checksum, format,
    parents present and consistent) and every chunk (present, size, CRC32).

    Returns ``{"checkpoint", "path", "restore_set", "ok", "problems": [{"checkpoint", "file",
    "problem"}], "files", "bytes"}``; each problem names the file at fault."""
    root, name = resolve(path)
    chain, problems = _chain_manifests(root, name)
    checked = {} if _checked is None else _checked
    entries = [(m["name"], e) for m in chain for e in fmt.chunk_entries(m)]
    total = sum(e["bytes"] for _, e in entries)
    files = 0
    with _progress(total, f"verify {name}", progress) as bar:
        for member, e in entries:
            key = f"{member}/{e['file']}"
            if key not in checked:
                checked[key] = fmt.check_file(os.path.join(root, member, e["file"]), e)
            if checked[key] is not None:
                problems.append(_problem(member, e["file"], checked[key]))
            files += 1
            bar.update(e["bytes"])
    return {"checkpoint": name, "path": os.path.join(root, name),
            "restore_set": [m["name"] for m in chain] if chain else None,
            "ok": not problems, "problems": problems, "files": files, "bytes": total}


def verify_root(root: str | os.PathLike, progress: bool = False) -> dict[str, Any]:
    """:func:`verify` of every committed checkpoint under ``root`` (each file read once);
    ``incomplete`` lists leftovers of interrupted writes (never listed, not restorable, removed
    by the next writer)."""
    root = os.path.realpath(os.fspath(root))
    checked: dict[str, str | None] = {}
    results = [verify(os.path.join(root, n), progress, checked) for n in fmt.committed(root)]
    return {"root": root, "ok": all(r["ok"] for r in results), "checkpoints": results,
            "incomplete": fmt.incomplete(root)}


# -- restore ---------------------------------------------------------------------------------

def _check_specs(store: Any, tables: dict[str, Any]) -> list[tuple[str, TableSpec, bool]]:
    """(name, spec, exists) per table; raises CheckpointError if the store has a table of that
    name with another spec."""
    have = set(store.tables())
    out = []
    for name, t in tables.items():
        spec = TableSpec.from_json(t["spec"])
        exists = name in have
        if exists:
            cur = store.open_table(name).spec
            if cur.to_json() != spec.to_json():
                raise fmt.CheckpointError(
                    f"table {name!r}: the store's spec {cur.to_json()} differs from the "
                    f"checkpoint's {spec.to_json()}; drop or rename the table to restore")
        out.append((name, spec, exists))
    return out


def restore(store: Any, path: str | os.PathLike, *, extra_state: dict[str, Any] | None = None,
            progress: bool = False, verify_first: bool = True) -> dict[str, Any]:
    """Bring ``store`` back to checkpoint ``path`` (its whole chain), then flush.

    Raises CorruptCheckpoint (with ``.problems``) or CheckpointError before changing anything
    when the chain does not verify or a table's spec conflicts. Tables of the store that the
    checkpoint does not hold are left as they are; tables it holds that the store lacks are
    created. ``extra_state``: a template to load the dense state into in place (DCP's way);
    without one the dense state is returned as saved.

    Returns ``{"path", "checkpoint", "step", "reader", "restore_set", "tables": {name: rows
    in the checkpoint}, "extra_state", "restores"}`` (restores: in the chain's history, this
    one included; later checkpoints of the chain raise their bit-width accordingly)."""
    from tierstore.ckpt import writer
    root, name = resolve(path)
    sess = writer.session(store)
    with sess.lock:
        if sess.job is not None:
            sess.job.handle._done.wait()    # no write of this store in flight
        if verify_first:
            rep = verify(os.path.join(root, name), progress=progress)
            if not rep["ok"]:
                p = rep["problems"]
                raise fmt.CorruptCheckpoint(
                    f"cannot restore {name}: {len(p)} problem(s): "
                    + "; ".join(f"{x['file']}: {x['problem']}" for x in p[:5]), p)
        chain, problems = _chain_manifests(root, name)
        if problems:
            raise fmt.CorruptCheckpoint(f"cannot restore {name}: {problems[0]['file']}: "
                                        f"{problems[0]['problem']}", problems)
        head = chain[-1]
        tables = _check_specs(store, head["tables"])
        # -- from here on the store changes --
        sess.head = None
        sess.untrusted_reason = f"restore of {name} did not finish"
        ids = {t: [_read_ids(root, m, t) for m in chain] for t, _, _ in tables}
        total = sum(sum(len(p) for p in parts) for per in ids.values() for parts in per)
        since, written = {}, {}
        with _progress(total, f"restore {name}", progress, unit="rows") as bar:
            for tname, spec, exists in tables:
                if not exists:
                    store.create_table(spec)
                store.reset_table(tname)
                _restore_table(store, root, chain, tname, spec, ids[tname], bar.update)
                since[tname], written[tname] = writer.RowSet(spec), writer.RowSet(spec)
                for m, parts in zip(chain, ids[tname]):
                    for p in parts:
                        written[tname].add(p)
                        if m["kind"] != "full":
                            since[tname].add(p)
        store.flush()
        dense = None
        if head.get("dense"):
            from tierstore.ckpt import dense as dense_mod
            dense = dense_mod.load(os.path.join(root, name), extra_state)
        # the store's modified-row record is now relative to this checkpoint
        sess.root = root
        sess.head = head
        sess.untrusted_reason = None
        sess.since_base = since
        sess.written = written
        sess.restores = head["restores"] + 1
    return {"path": os.path.join(root, name), "checkpoint": name, "step": head["step"],
            "reader": head["reader"], "restore_set": head["restore_set"],
            "tables": {t: int(sum(len(p) for p in ids[t][-1])) for t, _, _ in tables},
            "extra_state": dense, "restores": sess.restores}


def _entries(m: dict[str, Any], table: str, what: str) -> list[dict[str, Any]]:
    es = [e for e in m["chunks"] if e["table"] == table and e["what"] == what]
    return sorted(es, key=lambda e: e["part"])


def _read_ids(root: str, m: dict[str, Any], table: str) -> list[np.ndarray]:
    d = os.path.join(root, m["name"])
    out = []
    for e in _entries(m, table, "ids"):
        ids = fmt.decode_ids(fmt.read_chunk(d, e))
        if len(ids) != e["rows"]:
            raise fmt.CorruptCheckpoint(f"{m['name']}/{e['file']}: {len(ids)} ids, manifest "
                                        f"says {e['rows']}")
        out.append(ids)
    return out


def _restore_table(store: Any, root: str, chain: list[dict[str, Any]], table: str,
                   spec: TableSpec, ids: list[list[np.ndarray]],
                   advance: Callable[[int], Any]) -> None:
    """Write each row once, from the newest checkpoint of the chain that holds it."""
    later = None  # rows held by checkpoints after the one being applied
    if spec.id_space == "dense":
        later = np.zeros(spec.num_rows, bool)
    newer: list[np.ndarray] = []
    for m, parts in reversed(list(zip(chain, ids))):
        d = os.path.join(root, m["name"])
        wents = _entries(m, table, "weights")
        sents = _entries(m, table, "state")
        for i, rows in enumerate(parts):
            if later is not None:
                keep = ~later[rows]
            elif newer:
                keep = ~np.isin(rows, np.concatenate(newer), assume_unique=True)
            else:
                keep = np.ones(len(rows), bool)
            w = quant.decode(quant.EncodedRows.from_bytes(fmt.read_chunk(d, wents[i])))
            if spec.layout.state_dim:
                s = quant.decode_state(quant.EncodedRows.from_bytes(fmt.read_chunk(d, sents[i])))
            else:
                s = np.zeros((len(rows), 0), np.float32)
            if w.shape != (len(rows), spec.dim) or s.shape != (len(rows), spec.layout.state_dim):
                raise fmt.CorruptCheckpoint(f"{m['name']}: table {table!r} part {i}: shapes "
                                            f"{w.shape}/{s.shape} do not match {len(rows)} rows")
            if keep.any():
                store.write_rows(table, rows[keep], w[keep], s[keep])
            advance(len(rows))
        for rows in parts:
            if later is not None:
                later[rows] = True
            else:
                newer.append(rows)
