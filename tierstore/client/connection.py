"""``tierstore.client.connect(run_dir)``: a connection to the host's ``tierstored``.

The connection speaks the framed protocol of :mod:`tierstore.daemon.protocol` on the service's
unix socket, maps each table it uses (:class:`~tierstore.client.attached.AttachedTable`) and
moves bulk data through a shared-memory mailbox. Lookups of rows resident in DRAM never touch
the socket.

Errors raised by the service arrive as the same exception classes with the service's message.
If the service dies, the next call raises :class:`tierstore.ConnectionLost` (at once: the
kernel closes the socket) and the connection is unusable; ``connect()`` again after a restart.

The update of rows not in DRAM (a backward's ``apply`` request) is *pipelined*: the client sends
it and goes on (updating the resident rows, preparing the next table's batch) while the service
works on it; its reply is read before the next request, before the next operation on the same
table, and on ``close()``. The client checks everything it sends, so the service refuses such an
update only when the table was re-planned meanwhile (the update is then sent again to the new
slab, transparently) or for a fault of its own, which is raised by the connection's next call.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import socket
import tempfile
from dataclasses import dataclass
from typing import Any, NoReturn, Sequence

import numpy as np
import torch

from tierstore import checks, errors, ops
from tierstore.client.attached import AttachedTable, Retry, Stale
from tierstore.config import TableSpec
from tierstore.daemon import protocol
from tierstore.errors import ConnectionLost, InvalidInput, TierstoreError
from tierstore.tiers import shm
from tierstore.tiers.ddr import Bypass

SOCKET_NAME = "tierstored.sock"
REPLY_TIMEOUT_S = 120.0  # a reply slower than this means a wedged service
_RETRIES = 8  # re-attachments in a row before giving up on a table that keeps moving
#: requests after which the service may re-plan DRAM (or drop this client's attachment)
_REPLANS = frozenset({"create_table", "drop_table", "restore", "detach", "shutdown"})


@dataclass
class _InFlight:
    """A resolve sent by :meth:`Connection.pooled_many` and not answered yet."""

    i: int
    table: AttachedTable
    pending: ops.PendingPool


@dataclass
class _Prefetch:
    """A table's next batch resolved ahead (:meth:`Connection.prefetch`): its ids, the
    positions and misses its pin found, and the service's answer once read (positions and
    bypass rows, or the refusal as an exception object). Its pins last until the batch's
    forward, or until the prefetch is given up."""
    table: AttachedTable
    ids: np.ndarray
    pos: np.ndarray
    misses: Any
    answer: Any = None
    answered: bool = False


@dataclass
class _PendingApply:
    """An ``apply`` request sent without waiting for its reply: what to send again if the
    table was re-planned, and where its payload starts (it runs to the mailbox's end; the
    service may still be reading it)."""

    table: str
    rows: np.ndarray
    summed: np.ndarray
    lo: int

def _error_classes() -> dict[str, type[Exception]]:
    from tierstore.ckpt.format import CheckpointError, CorruptCheckpoint
    found = {name: cls for name, cls in vars(errors).items()
             if isinstance(cls, type) and issubclass(cls, Exception)}
    return {**found, "CheckpointError": CheckpointError, "CorruptCheckpoint": CorruptCheckpoint}


_ERRORS = _error_classes()


def _raise_reply(reply: dict[str, Any]) -> None:
    kind, msg = reply.get("type", "TierstoreError"), reply.get("error", "unknown error")
    if kind == "Stale":
        raise Stale(msg)
    cls = _ERRORS.get(kind, TierstoreError)
    raise cls(f"tierstored: {msg}")


class Connection:
    """A client of ``tierstored``; not thread-safe (use one per thread or process).

    mode: how tables are attached on first use: "write" (this process updates them; the
    service refuses a second writer) or "read" (read-only mapping). ``attach()`` chooses per
    table.
    """

    def __init__(self, run_dir: str | os.PathLike, mode: str = "write",
                 timeout: float = REPLY_TIMEOUT_S) -> None:
        if mode not in ("write", "read"):
            raise ValueError(f"mode must be 'write' or 'read', got {mode!r}")
        self.run_dir = os.fspath(run_dir)
        self.mode = mode
        self._lost: str | None = None
        self._tables: dict[str, AttachedTable] = {}
        #: requests whose replies are unread, in the order sent: the pipelined apply
        #: (:attr:`_pending`) and at most one prefetch (a resolve whose reply is read later)
        self._inflight: collections.deque[_PendingApply | _Prefetch] = collections.deque()
        path = os.path.join(self.run_dir, SOCKET_NAME)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            raise ConnectionLost(f"no tierstored at {path}: {e.strerror or e}") from None
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        hello = self._call({"op": "hello", "version": protocol.VERSION, "pid": os.getpid()})
        self.server_version = hello["version"]
        self.client_id = hello["client_id"]
        self.max_batch = hello["max_batch"]
        name, size = hello["mailbox"]
        self._mailbox_seg = shm.attach(name, (size,), np.uint8, writable=True)
        self._mailbox = self._mailbox_seg.array

    # -- the socket -------------------------------------------------------------------------
    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its reply; raise the service's error if not ok.
        Replies in flight are read first. Before a request that may re-plan DRAM (the
        service then waits for every pin in the re-planned slabs), prefetched batches are
        given up: their pins would hold it up."""
        self._read_all()
        if msg.get("op") in _REPLANS:
            self._drop_prefetches()
        self._send(msg)
        reply = self._reply()
        if not reply.get("ok"):
            _raise_reply(reply)
        return reply

    def _send(self, msg: dict[str, Any]) -> None:
        if self._lost:
            raise ConnectionLost(self._lost)
        try:
            self._sock.sendall(protocol.encode(msg))
        except (OSError, protocol.ProtocolError) as e:
            self._lost_now(e)

    def _reply(self) -> dict[str, Any]:
        try:
            n = protocol.frame_length(self._recv(4))
            return protocol.decode(self._recv(n))
        except (OSError, EOFError, protocol.ProtocolError) as e:
            self._lost_now(e)

    def _reserve(self, nbytes: int) -> None:
        """This request writes the mailbox's first ``nbytes``: first read the pipelined
        apply's reply if the service may still be reading there."""
        while self._pending is not None and nbytes > self._pending.lo:
            self._drain()  # (sending a re-planned table's update again may pipeline it anew)

    def _lost_now(self, e: BaseException) -> NoReturn:
        self._mark_lost(f"connection to tierstored at {self.run_dir} lost: {e}")
        raise ConnectionLost(self._lost) from None

    def _drain(self, table: str | None = None) -> None:
        """Read the reply of the pipelined ``apply`` in flight (if any; with ``table``, only
        if it updates that table), and those sent before it (a prefetch's). A re-planned
        table gets the update again; any other refusal is raised here."""
        p = self._pending
        if p is None or (table is not None and p.table != table):
            return
        if self._lost:
            self._inflight.clear()
            raise ConnectionLost(self._lost)
        while self._pending is p:
            self._read_one()

    @property
    def _pending(self) -> _PendingApply | None:
        """The pipelined ``apply`` in flight, if any."""
        for x in self._inflight:
            if isinstance(x, _PendingApply):
                return x
        return None

    def _read_all(self) -> None:
        """Read every reply in flight: the next reply read is the next request's, and the
        whole mailbox is free."""
        self._drain()
        self._land_prefetches()

    def _read_one(self) -> None:
        """Read the reply of the oldest request in flight and hand it to that request."""
        head = self._inflight.popleft()
        if isinstance(head, _Prefetch):
            head.answer = self._prefetch_answer(head)
            head.answered = True
            return
        reply = self._reply()
        if reply.get("ok"):
            return
        if reply.get("type") != "Stale":
            _raise_reply(reply)
        # refused before anything changed: the rows it names were not resident when this
        # client pinned its batch; whatever the new slab holds now, the update goes where they live
        self._with_table(head.table, lambda t: ops.apply_gradients(t, t.spec, head.rows,
                                                                   head.summed))

    def _prefetch_answer(self, f: _Prefetch) -> Any:
        """The reply to a prefetch's resolve: (positions, bypass) or the refusal as an
        exception object. Raises only ConnectionLost."""
        try:
            return self._resolve_parse(f.table, len(f.misses.rows), self._reply())
        except ConnectionLost:
            raise
        except Exception as e:  # noqa: BLE001 - raised by the batch's forward, if it comes
            return e

    def _land(self, f: _Prefetch) -> None:
        """Read replies until ``f``'s is in."""
        while not f.answered:
            if self._lost:
                raise ConnectionLost(self._lost)
            self._read_one()

    def _land_prefetches(self) -> None:
        """Read every prefetch's reply (and any sent before one): the mailbox's lower half is
        then free, and the next reply read is the next request's."""
        while any(isinstance(x, _Prefetch) for x in self._inflight):
            self._read_one()

    def _drop_prefetches(self) -> None:
        """Give up every prefetched batch: replies read, pins released."""
        for t in self._tables.values():
            self._give_up(t)

    def _give_up(self, t: AttachedTable) -> None:
        """Give up ``t``'s prefetched batch, if any: its reply read, its pins released (its
        lookups stay counted: the batch, when it runs, is resolved and counted again)."""
        f = t.prefetched
        if f is None:
            return
        t.prefetched = None
        self._land(f)
        self._end(t)

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("the service closed the connection")
            buf += chunk
        return bytes(buf)

    def _check_alive(self) -> None:
        """Raise ConnectionLost if the service has gone (costs one poll syscall)."""
        if self._lost:
            raise ConnectionLost(self._lost)
        while self._poll.poll(0):
            if self._inflight:  # a reply to a request in flight (or the hang-up)
                self._read_one()
                continue
            # the service never speaks unasked: readable means closed
            self._mark_lost(f"tierstored at {self.run_dir} has gone away")
            raise ConnectionLost(self._lost)

    def _mark_lost(self, why: str) -> None:
        self._lost = why
        self._inflight.clear()
        for t in self._tables.values():
            t.close()
        self._tables.clear()

    # -- tables -----------------------------------------------------------------------------
    def create_table(self, spec: TableSpec) -> str:
        """Create a table in the service's store; returns its name. Raises TableExists,
        InvalidSpec."""
        if not isinstance(spec, TableSpec):
            raise errors.InvalidSpec(f"create_table needs a TableSpec, got {type(spec).__name__}")
        self._call({"op": "create_table", "spec": spec.to_json()})
        return spec.name

    def drop_table(self, name: str) -> None:
        self._detach_local(name)
        self._call({"op": "drop_table", "table": name})

    def tables(self) -> list[str]:
        return self._call({"op": "tables"})["tables"]

    def attach(self, table: str, mode: str | None = None,
               rows: tuple[int, int] | None = None) -> AttachedTable:
        """Map ``table`` for writing or reading (default: the connection's mode).

        rows: for a writer, the ids [lo, hi) it updates (model-parallel ranks own disjoint row
        ranges of one table); default the whole table. A writer whose rows overlap another
        client's is refused with InvalidInput naming that writer's pid; updating an id outside
        the range raises InvalidInput."""
        mode = mode or self.mode
        if mode not in ("write", "read"):
            raise InvalidInput(f"attach mode must be 'write' or 'read', got {mode!r}")
        self._detach_local(table)
        msg: dict[str, Any] = {"op": "attach", "table": table, "mode": mode}
        if rows is not None:
            msg["rows"] = [int(rows[0]), int(rows[1])]
        reply = self._call(msg)
        t = AttachedTable(self, reply, writable=mode == "write")
        self._tables[table] = t
        return t

    def detach(self, table: str) -> None:
        """Unmap a table and give up its ownership."""
        self._detach_local(table)
        self._call({"op": "detach", "table": table})

    def _detach_local(self, table: str) -> None:
        t = self._tables.pop(table, None)
        if t is not None:
            t.close()

    def _table(self, table: str, check_alive: bool = True) -> AttachedTable:
        if not isinstance(table, str):
            table = getattr(table, "name", table)
            if not isinstance(table, str):
                raise errors.UnknownTable(f"table must be a name, got {type(table).__name__}")
        if check_alive:  # (not while a request is in flight: its reply makes the socket readable)
            self._check_alive()
        self._drain(table)  # this table's pipelined update lands before anything reads it
        t = self._tables.get(table)
        return t if t is not None else self.attach(table)

    def _with_table(self, table: str, fn) -> Any:
        """Run fn(attached table); on Stale (the service re-planned DRAM) attach again and
        retry: nothing was changed by the failed attempt."""
        for _ in range(_RETRIES):
            t = self._table(table)
            try:
                return fn(t)
            except Retry:
                continue  # an unpinned read raced an eviction: again, pinned this time
            except Stale:
                mode = "write" if t.writable else "read"
                self._detach_local(table)
                self.attach(table, mode, t.write_range if t.writable else None)
        raise TierstoreError(f"table {table!r} kept moving while attaching ({_RETRIES} tries)")

    # -- the engine's operations --------------------------------------------------------------
    def lookup(self, table: str, ids: Any) -> torch.Tensor:
        """Rows of ``ids`` (see :meth:`tierstore.Store.lookup`)."""
        return self._with_table(table, lambda t: ops.lookup(t, t.spec, ids))

    def pooled(self, table: str, indices: Any, offsets: Any, mode: str = "sum",
               per_sample_weights: Any = None, include_last_offset: bool = False) -> torch.Tensor:
        """Pooled rows per bag (see :meth:`tierstore.Store.pooled`)."""
        return self._with_table(table, lambda t: ops.pooled(
            t, t.spec, indices, offsets, mode, per_sample_weights, include_last_offset))

    def pooled_many(self, tables: Sequence[str], indices: Sequence[Any],
                    offsets: Sequence[Any], mode: str = "sum",
                    per_sample_weights: Sequence[Any] | None = None,
                    include_last_offset: bool = False) -> list[torch.Tensor]:
        """:meth:`pooled` of several tables (one batch each: ``indices[i]``, ``offsets[i]``,
        ``per_sample_weights[i]`` for ``tables[i]``), pipelined: while the service resolves
        one table's misses, this process pins and splits the next table's batch and pools the
        one before. The same outputs as one pooled() per table, in order, and the same errors
        (raised once the request in flight, if any, is answered)."""
        n = len(tables)
        psws = ops.weights_per_table(tables, indices, offsets, per_sample_weights)
        out: list[Any] = [None] * n
        self._read_all()  # nothing in flight meanwhile: replies come in request order
        for table in tables:  # attach first: an attach is a request of its own
            self._table(table)
        flight: _InFlight | None = None

        def land() -> None:  # finish the request in flight, if any
            nonlocal flight
            f, flight = flight, None
            if f is not None:
                self._finish(f, self._answer(f), out)
        try:
            for i in range(n):
                args = (tables[i], indices[i], offsets[i], mode, psws[i], include_last_offset)
                name = getattr(tables[i], "name", tables[i])
                if flight is not None and (name not in self._tables  # re-attached meanwhile
                                           or self._tables[name] is flight.table):  # one op
                    land()                                        # per table holds pins
                t = self._table(tables[i], check_alive=flight is None)
                try:
                    begun = ops.pooled_begin(t, t.spec, *args[1:])
                except (Retry, Stale):
                    begun = None
                if isinstance(begun, torch.Tensor):
                    out[i] = begun
                    continue
                if begun is None or not self._one_request(t, begun):
                    if begun is not None:
                        self._end(t)
                    land()
                    out[i] = self.pooled(*args)  # retries, re-attaches, chunks, refuses
                    continue
                prev, flight = flight, None
                answer = self._answer(prev) if prev is not None else None
                try:
                    m = begun.misses
                    self._resolve_send(t, m.rows, m.hit_slots[: self._max_hits()],
                                       len(begun.rows), t.take_recent())
                    flight = _InFlight(i, t, begun)
                except BaseException:
                    self._end(t)
                    raise
                finally:
                    if prev is not None and self._lost is None:  # pooled while the service
                        self._finish(prev, answer, out)          # resolves table i
            land()
        finally:
            if flight is not None:  # an error on the way: read the answer in flight first
                if self._lost is None:
                    self._answer(flight)
                self._end(flight.table)
        for i in range(n):  # refused as re-planned: again, attached to the new slab
            if out[i] is None:
                out[i] = self.pooled(tables[i], indices[i], offsets[i], mode, psws[i],
                                     include_last_offset)
        return out

    def prefetch(self, table: str, indices: Any) -> None:
        """Send the resolve of a coming batch of ``table`` now and go on without its reply
        (see :meth:`tierstore.Store.prefetch`): the service admits its misses while this
        process works on other tables, and the table's next ``pooled``/``lookup`` of the same
        ids (or ``pooled_many``) uses the answer. Call it after the table's backward of the
        batch before: its rows stay pinned until the prefetched batch's forward (another
        operation on the table, or a request that may re-plan DRAM like ``create_table``,
        gives the prefetch up; that batch is then resolved and counted again when it runs). Best
        effort: a batch too large for half the mailbox, or a table being re-planned, is not
        prefetched. Tables held whole: a no-op. Raises UnknownTable, InvalidInput, ConnectionLost.
        """
        t = self._table(table)
        if t.full_table:
            return
        rows = checks.ids(indices, t.spec).numpy()
        self._give_up(t)
        if not len(rows) or len(rows) > self.max_batch:
            return
        self._land_prefetches()  # one prefetch in flight: the mailbox's lower half is its own
        try:
            pos, m = t.pin_batch(rows)
        except (Retry, Stale):
            self._end(t)
            return
        f = _Prefetch(t, rows.copy(), pos, m, answered=m is None)
        if m is not None:
            hits = m.hit_slots[: self._max_hits()]
            lay = t.spec.layout
            reply = len(m.rows) * (16 + lay.np_dtype.itemsize * t.spec.dim + 4 * lay.state_dim)
            if 8 * (len(m.rows) + len(hits)) + reply + 64 > len(self._mailbox) // 2:
                self._end(t)  # (the pipelined apply may use the upper half meanwhile)
                return
            recent = t.take_recent()
            recent = recent[: max(0, (len(self._mailbox) // 2 - reply) // 8
                                  - len(m.rows) - len(hits) - 8)]
            off = self._put(0, m.rows.astype(np.int64, copy=False))
            off = self._put(off, hits.astype(np.int64, copy=False))
            self._put(off, recent)
            self._send({"op": "resolve", "table": t.name, "rows": len(m.rows),
                        "hits": len(hits), "recent": len(recent), "lookups": len(rows),
                        "seq": t.seq})
            self._inflight.append(f)
        t.prefetched = f

    def _one_request(self, t: AttachedTable, p: ops.PendingPool) -> bool:
        """Whether ``p``'s misses go in one resolve (else, or over max_batch, the plain path
        takes the batch: in chunks, or refused)."""
        hits = min(len(p.misses.hit_slots), self._max_hits())
        return (len(p.rows) <= self.max_batch
                and len(p.misses.rows) <= self._rows_per_resolve(t, hits))

    def _max_hits(self) -> int:
        """Hit slots sent with a resolve, at most (they may fill half the mailbox)."""
        return len(self._mailbox) // 16

    def _rows_per_resolve(self, t: AttachedTable, hits: int) -> int:
        """Missing rows one resolve may carry beside ``hits`` hit slots: the mailbox holds
        the request and the reply (positions, and the rows not admitted with their state)."""
        lay = t.spec.layout
        per_row = 16 + lay.np_dtype.itemsize * t.spec.dim + 4 * lay.state_dim + 16
        return max(1, (len(self._mailbox) - 8 * hits - 64) // per_row)

    def _answer(self, f: "_InFlight") -> Any:
        """The reply to ``f``'s resolve: (positions, bypass), or the service's refusal as an
        exception object. Raises only ConnectionLost."""
        try:
            return self._resolve_recv(f.table, len(f.pending.misses.rows))
        except ConnectionLost:
            raise
        except Exception as e:  # noqa: BLE001 - handed to _finish, which raises it
            return e

    def _finish(self, f: "_InFlight", answer: Any, out: list) -> None:
        """Pool ``f``'s batch with the service's answer. A table re-planned meanwhile is left
        None in ``out`` (pooled_many takes it again at the end); any other refusal is raised."""
        if isinstance(answer, BaseException):
            self._end(f.table)
            if not isinstance(answer, Stale):
                raise answer
            return
        out[f.i] = ops.pooled_end(f.table, f.pending, *answer)

    def _end(self, t: AttachedTable) -> None:
        """End ``t``'s operation (release its pins) unless the connection is gone."""
        if self._lost is None:
            with contextlib.suppress(Retry, Stale):
                t.end_op()

    def apply_gradients(self, table: str, ids: Any, grads: Any) -> None:
        """Per-id gradients through the table's optimizer (see Store.apply_gradients)."""
        self._with_table(table, lambda t: ops.apply_gradients(t, t.spec, ids, grads))

    def apply_pooled_gradients(self, table: str, indices: Any, offsets: Any, grad_output: Any,
                               mode: str = "sum", per_sample_weights: Any = None,
                               include_last_offset: bool = False) -> None:
        """Backward of :meth:`pooled` fused with the optimizer (see Store)."""
        self._with_table(table, lambda t: ops.apply_pooled_gradients(
            t, t.spec, indices, offsets, grad_output, mode, per_sample_weights,
            include_last_offset))

    def spec(self, table: str) -> TableSpec:
        return self._table(table).spec

    # -- data plane requests (called by AttachedTable) ----------------------------------------
    def _put(self, offset: int, arr: np.ndarray) -> int:
        """Copy arr into the mailbox at offset (8-aligned); returns the next free offset."""
        raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        end = offset + len(raw)
        if end > len(self._mailbox):
            raise InvalidInput(f"a batch of {len(raw)} bytes does not fit the service's "
                               f"mailbox ({len(self._mailbox)} bytes); raise mailbox_bytes "
                               f"or send smaller batches")
        p = self._pending
        assert p is None or end <= p.lo, "mailbox bytes still in use"
        self._mailbox[offset:end] = raw
        return (end + 7) // 8 * 8

    def _get(self, offset: int, dtype: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        arr = self._mailbox[offset: offset + nbytes].view(dtype).reshape(shape).copy()
        return arr, (offset + nbytes + 7) // 8 * 8

    def _resolve(self, t: AttachedTable, rows: np.ndarray, hits: np.ndarray,
                 lookups: int) -> tuple[np.ndarray, Bypass | None]:
        """Ask the service for distinct missing ``rows``; in chunks that fit the mailbox with
        the rows it may send back. ``hits`` (for the policy) go with the first chunk."""
        if lookups > self.max_batch:
            raise InvalidInput(f"table {t.name!r}: batch of {lookups} ids is over the "
                               f"service's max_batch ({self.max_batch})")
        hits = hits[: self._max_hits()]  # a policy hint only: never crowd out the rows
        step = self._rows_per_resolve(t, len(hits))
        parts, bypasses = [], []
        for start in range(0, max(len(rows), 1), step):
            chunk = rows[start: start + step]
            h = hits if start == 0 else hits[:0]
            n = lookups - (len(rows) - len(chunk)) if start == 0 else len(chunk)
            recent = t.take_recent() if start == 0 else hits[:0]
            pos, bp = self._resolve_chunk(t, chunk, h, n, recent)
            parts.append(pos)
            if bp is not None:
                bypasses.append(bp)
        pos = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if not bypasses:
            return pos, None
        return pos, Bypass(np.concatenate([b.rows for b in bypasses]),
                           np.concatenate([b.w for b in bypasses]),
                           np.concatenate([b.s for b in bypasses]))

    def _resolve_chunk(self, t: AttachedTable, rows: np.ndarray, hits: np.ndarray,
                       lookups: int, recent: np.ndarray) -> tuple[np.ndarray, Bypass | None]:
        self._resolve_send(t, rows, hits, lookups, recent)
        return self._resolve_recv(t, len(rows))

    def _resolve_send(self, t: AttachedTable, rows: np.ndarray, hits: np.ndarray,
                      lookups: int, recent: np.ndarray) -> None:
        """Send one ``resolve`` (its reply is read by :meth:`_resolve_recv`)."""
        self._land_prefetches()
        self._reserve(8 * (len(rows) + len(hits) + len(recent)) + 16)
        off = self._put(0, rows.astype(np.int64, copy=False))
        off = self._put(off, hits.astype(np.int64, copy=False))
        recent = recent[: max(0, (len(self._mailbox) - off) // 16)]  # leave room for replies
        self._put(off, recent)
        self._drain()
        self._send({"op": "resolve", "table": t.name, "rows": len(rows), "hits": len(hits),
                    "recent": len(recent), "lookups": lookups, "seq": t.seq})

    def _resolve_recv(self, t: AttachedTable, k: int) -> tuple[np.ndarray, Bypass | None]:
        """The reply of the ``resolve`` of ``k`` rows in flight: their positions and the rows
        not admitted, copied out of the mailbox; raises the service's refusal."""
        return self._resolve_parse(t, k, self._reply())

    def _resolve_parse(self, t: AttachedTable, k: int,
                       reply: dict[str, Any]) -> tuple[np.ndarray, Bypass | None]:
        """A resolve's reply: positions of its ``k`` rows and the bypass rows, copied out of
        the mailbox; raises the service's refusal."""
        if not reply.get("ok"):
            _raise_reply(reply)
        pos, off = self._get(0, np.int64, (k,))
        b = reply["bypass"]
        if not b:
            return pos, None
        brows, off = self._get(off, np.int64, (b,))
        w, off = self._get(off, t.spec.layout.np_dtype, (b, t.spec.dim))
        s, _ = self._get(off, np.float32, (b, t.spec.layout.state_dim))
        return pos, Bypass(brows, w, s)

    def _apply(self, t: AttachedTable, rows: np.ndarray, summed: np.ndarray) -> None:
        """The service applies the optimizer to ``rows`` with their summed gradients (in
        chunks that fit the mailbox)."""
        if len(rows) > self.max_batch:
            raise InvalidInput(f"table {t.name!r}: {len(rows)} rows is over the service's "
                               f"max_batch ({self.max_batch})")
        per_row = 8 + 4 * t.spec.dim
        if len(rows) * per_row <= len(self._mailbox) // 2:
            self._apply_pipelined(t, rows, summed)
            return
        self._read_all()
        step = max(1, (len(self._mailbox) - 64) // per_row)
        for start in range(0, len(rows), step):
            r = rows[start: start + step]
            off = self._put(0, r.astype(np.int64, copy=False))
            self._put(off, summed[start: start + step].astype(np.float32, copy=False))
            self._call({"op": "apply", "table": t.name, "rows": len(r)})

    def _apply_pipelined(self, t: AttachedTable, rows: np.ndarray, summed: np.ndarray) -> None:
        """Send one ``apply`` from the top half of the mailbox (requests start at its bottom)
        and return without its reply (:meth:`_drain` reads it)."""
        self._drain()
        rows = rows.astype(np.int64, copy=False)
        summed = summed.astype(np.float32, copy=False)
        lo = (len(self._mailbox) - rows.nbytes - summed.nbytes) // 8 * 8
        self._put(self._put(lo, rows), summed)
        self._send({"op": "apply", "table": t.name, "rows": len(rows), "at": lo})
        self._inflight.append(_PendingApply(t.name, rows, summed, lo))

    # -- service-wide ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The service's figures (like ``tierstore stats --run-dir``)."""
        return self._call({"op": "stats"})["stats"]

    def flush(self) -> None:
        """Write back every dirty row and make the store durable."""
        self._call({"op": "flush"})

    def checkpoint(self, root: str | os.PathLike, policy: str = "intermittent", bits: int = 4,
                   quant: str = "adaptive", *, extra_state: dict[str, Any] | None = None,
                   wait: bool = False, **kw: Any) -> str:
        """The service writes the next checkpoint of the chain under ``root`` (a path on this
        host) and returns its path; the same arguments as :meth:`tierstore.Store.checkpoint`
        (``step``, ``reader``, ``keep``, ...). Rows are snapshot before the reply; the write
        goes on in the service's background (``wait=True`` or :meth:`wait_checkpoint`).
        ``extra_state`` (dense parameters, optimizer state: tensors and plain values) is saved
        alongside. Call it between steps: rows are captured as they are when read."""
        root = os.path.abspath(os.fspath(root))
        msg: dict[str, Any] = {"op": "checkpoint", "root": root, "policy": policy,
                               "bits": bits, "quant": quant, "wait": wait, **kw}
        if extra_state is not None:
            os.makedirs(root, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix=".extra-state-", suffix=".pt", dir=root)
            os.close(fd)
            torch.save(extra_state, path)
            msg["extra_state_file"] = path
        return self._call(msg)["path"]

    def wait_checkpoint(self) -> dict[str, Any] | None:
        """Wait for the service's checkpoint write in flight; its result (or None)."""
        return self._call({"op": "wait_checkpoint"})["result"]

    def restore(self, path: str | os.PathLike,
                extra_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """The service restores checkpoint ``path`` (its whole chain) and this process loads
        the dense state saved with it (into ``extra_state`` in place when given, as
        torch.distributed.checkpoint does). Attached tables move to new slabs transparently.
        Returns the restore's summary with ``extra_state``."""
        path = os.path.abspath(os.fspath(path))
        info = self._call({"op": "restore", "path": path})["result"]
        for name in list(self._tables):  # their slabs were replaced
            self._detach_local(name)
        from tierstore.ckpt import dense
        where = info.get("path") or path
        info["extra_state"] = (dense.load(where, extra_state)
                               if os.path.isdir(os.path.join(where, dense.DENSE_DIR)) else None)
        return info

    def shutdown(self) -> None:
        """Ask the service to stop (it writes back every dirty row first)."""
        try:
            self._call({"op": "shutdown"})
        finally:
            self.close()

    def close(self) -> None:
        """Unmap everything and hang up (the service drops this client's pins and ownership).
        The reply of a pipelined update still in flight is read first: a refusal is raised
        after the connection is closed."""
        failure = None
        if self._lost is None:
            try:
                with contextlib.suppress(ConnectionLost):  # a dead service has no reply
                    self._read_all()
            except Exception as e:  # noqa: BLE001 - raised below, once everything is released
                failure = e
        self._inflight.clear()
        self._release()
        if failure is not None:
            raise failure

    def _release(self) -> None:
        for name in list(self._tables):
            self._detach_local(name)
        if getattr(self, "_mailbox_seg", None) is not None:
            self._mailbox = None
            self._mailbox_seg.close()
            self._mailbox_seg = None
        if self._lost is None:
            self._lost = "connection closed"
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(run_dir: str | os.PathLike, mode: str = "write", **kw: Any) -> Connection:
    """Connect to the ``tierstored`` whose run directory is ``run_dir``.
    Raises ConnectionLost if none is listening there."""
    return Connection(run_dir, mode, **kw)
