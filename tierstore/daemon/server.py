"""``tierstored``: one service per host that owns the tables and shares their DRAM tier.

The service hosts an embedded :class:`tierstore.Store` whose shared-memory segments it keeps
named, so clients can map them. It is the manager of the data, not a hop on every lookup:
clients read resident rows straight from the shared slab (:mod:`tierstore.client`) and come here
for misses (admission, eviction, write-back), for updates of rows not in DRAM, and for the
control operations (create/drop/attach tables, stats, flush, shutdown).

One asyncio event loop (uvloop) serves every client on a unix socket; requests are handled one
at a time, which serializes every change of residency. The SCM writes a request causes run on
the same thread right after its reply is sent, while the client works on that reply
(:mod:`tierstore.tiers.write_behind`). Safety: the run directory is 0700, the
socket and every segment 0600, and a peer of another uid is refused (SO_PEERCRED).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import logging
import os
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tierstore.config import TableSpec
from tierstore.daemon import protocol
from tierstore.daemon.config import ServiceConfig
from tierstore.errors import InvalidInput, InvalidSpec, TierstoreError, UnknownTable
from tierstore.store import Store
from tierstore.tiers import pins, shm, write_behind
from tierstore.tiers.ddr import DDRCache

log = logging.getLogger("tierstored")

BODY_TIMEOUT_S = 5.0  # a frame's body must follow its header within this time
REPLAN_TIMEOUT_S = 10.0
RECENT_MAX = 1 << 20  # slots of earlier all-hit batches a client may report with one request  # how long create/drop wait for clients to leave a slab being replaced


class Stale(Exception):
    """The client's mapping of a table is out of date (its slab was replaced)."""


@dataclass
class Attachment:
    """One client's mapping of one table: its pins (header + uint32 per slab row)."""

    table: str
    cache: DDRCache
    writable: bool
    segment: shm.Segment
    rows: tuple[int, int] = (0, 2**63 - 1)  # the rows a writer may update
    header: np.ndarray = field(init=False)
    pins: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        raw = self.segment.array
        self.header = raw[: pins.HEADER_BYTES].view(np.int64)
        self.pins = raw[pins.HEADER_BYTES:].view(np.uint32)

    def close(self) -> None:
        self.header = self.pins = None
        self.segment.close()
        shm.unlink(self.segment.name)


@dataclass
class Client:
    id: int
    pid: int
    mailbox: shm.Segment
    attached: dict[str, Attachment] = field(default_factory=dict)


class Service:
    """The running service. ``run()`` blocks until SIGTERM/SIGINT or a shutdown request."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.store: Store | None = None
        self.clients: dict[int, Client] = {}
        #: table -> {client id: [lo, hi) rows it writes}; ranges of one table never overlap
        self.writers: dict[str, dict[int, tuple[int, int]]] = {}
        self.departed: dict[str, dict[str, int]] = {}  # counters of clients that have left
        self._ids = itertools.count(1)
        self._replan = asyncio.Lock()
        self._stop: asyncio.Event | None = None
        self._started = time.time()
        self._prefix = ""
        self._tasks: set[asyncio.Task] = set()

    # -- start and stop ---------------------------------------------------------------------------
    def run(self) -> None:
        import uvloop
        uvloop.run(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._prepare_run_dir()
        os.makedirs(self.cfg.data_dir, mode=0o700, exist_ok=True)
        write_behind.defer()  # SCM writes after each reply (run_deferred in _serve)
        self.store = Store(self.cfg.data_dir, self.cfg.ddr_bytes, self.cfg.policy,
                           shm_unlink=False)
        self._prefix = f"tierstore.{self.store.catalog.store_id[:12]}."
        self._clean_stale_segments()
        try:
            for spec in self.cfg.tables:
                if spec.name not in self.store.tables():
                    self.store.create_table(spec)
                    log.info("created table %s (%d x %d %s)", spec.name, spec.num_rows,
                             spec.dim, spec.dtype)
            for name in self.store.tables():
                self.store.open_table(name)
            server = await asyncio.start_unix_server(self._serve, path=self.cfg.socket_path)
            os.chmod(self.cfg.socket_path, 0o600)
            self._write_pid()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            log.info("tierstored %d listening on %s (data %s, DRAM %d bytes, policy %s, "
                     "%d tables)", os.getpid(), self.cfg.socket_path, self.cfg.data_dir,
                     self.cfg.ddr_bytes, self.cfg.policy, len(self.store.tables()))
            await self._stop.wait()
            log.info("stopping: no new requests; writing back dirty rows")
            server.close()
            for task in list(self._tasks):  # hang up on every client
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self._shutdown()

    def _prepare_run_dir(self) -> None:
        run_dir = self.cfg.run_dir
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        if os.stat(run_dir).st_uid != os.getuid():
            raise TierstoreError(f"run directory {run_dir} belongs to another user")
        os.chmod(run_dir, 0o700)
        path = self.cfg.socket_path
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise TierstoreError(f"another tierstored is already serving {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # left by a service that died
            finally:
                probe.close()

    def _write_pid(self) -> None:
        fd = os.open(self.cfg.pid_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")

    def _clean_stale_segments(self) -> None:
        """Remove shared memory left by a previous service of this store that died (we hold
        the store's lock, so no live process owns any of it)."""
        stale = glob.glob(os.path.join(shm.SHM_DIR, glob.escape(self._prefix) + "*"))
        for path in stale:
            shm.unlink(os.path.basename(path))
        if stale:
            log.info("removed %d stale shared-memory segments", len(stale))

    def _shutdown(self) -> None:
        for c in list(self.clients.values()):
            self._drop_client(c)
        if self.store is not None:
            self.store.close()  # writes back every dirty row, fsyncs, unlinks the segments
            log.info("dirty rows written back; store closed")
        for path in (self.cfg.socket_path, self.cfg.pid_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # -- connections --------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client: Client | None = None
        self._tasks.add(asyncio.current_task())
        try:
            refusal = self._check_peer(writer)
            if refusal:
                try:  # answer its first request, so the client reads the refusal as the reply
                    await asyncio.wait_for(self._read(reader), BODY_TIMEOUT_S)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError,
                        protocol.ProtocolError):
                    pass
                await self._send(writer, {"ok": False, "error": refusal, "type": "AccessDenied"})
                return
            while not self._stop.is_set():
                try:
                    msg = await self._read(reader)
                except asyncio.IncompleteReadError:
                    return  # the client hung up (or died)
                except protocol.ProtocolError as e:
                    await self._send(writer, protocol.error_reply(e))
                    if getattr(e, "fatal", True):
                        return
                    continue
                if client is None:
                    client, reply = self._hello(msg)
                    await self._send(writer, reply)
                    if client is None:
                        return
                    continue
                reply = await self._dispatch(client, msg)
                await self._send(writer, reply)
                write_behind.run_deferred()  # while the client works on the reply
        except (ConnectionError, BrokenPipeError):
            pass
        except asyncio.CancelledError:
            pass  # the service is stopping
        finally:
            write_behind.run_deferred()
            self._tasks.discard(asyncio.current_task())
            if client is not None:
                self._drop_client(client)
            writer.close()

    @staticmethod
    def _check_peer(writer: asyncio.StreamWriter) -> str | None:
        sock = writer.get_extra_info("socket")
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", raw)
        if uid != os.getuid():
            log.warning("refused pid %d: uid %d is not the service's uid %d", pid, uid,
                        os.getuid())
            return (f"uid {uid} may not use this tierstored (it serves uid {os.getuid()} "
                    f"only)")
        return None

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> dict[str, Any]:
        n = protocol.frame_length(await reader.readexactly(4))
        try:
            body = await asyncio.wait_for(reader.readexactly(n), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise protocol.ProtocolError(
                f"truncated frame: {n} bytes announced, not received within "
                f"{BODY_TIMEOUT_S:g} s") from None
        try:
            return protocol.decode(body)
        except protocol.ProtocolError as e:
            e.fatal = False  # the framing is intact: the connection can go on
            raise

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(protocol.encode(reply))
        await writer.drain()

    def _hello(self, msg: dict[str, Any]) -> tuple[Client | None, dict[str, Any]]:
        if msg.get("op") != "hello":
            return None, {"ok": False, "type": "ProtocolError",
                          "error": "the first request must be hello"}
        version = msg.get("version")
        if not isinstance(version, int) or version < 1 or version > protocol.VERSION:
            return None, {"ok": False, "type": "ProtocolError",
                          "error": f"protocol version {version!r} is not supported: this "
                                   f"tierstored speaks version {protocol.VERSION}"}
        cid = next(self._ids)
        pid = msg.get("pid") if isinstance(msg.get("pid"), int) else -1
        name = f"{self._prefix}{os.getpid()}.c{cid}.mailbox"
        mailbox = shm.create(name, (self.cfg.mailbox_bytes,), np.uint8, unlink=False)
        client = Client(cid, pid, mailbox)
        self.clients[cid] = client
        log.info("client %d (pid %d) connected", cid, pid)
        return client, {"ok": True, "version": protocol.VERSION, "client_id": cid,
                        "max_batch": self.cfg.max_batch,
                        "mailbox": [name, self.cfg.mailbox_bytes]}

    def _drop_client(self, c: Client) -> None:
        """A client left (or died): its pins and ownerships go with it."""
        if self.clients.pop(c.id, None) is None:
            return  # already dropped
        for name in list(c.attached):
            self._detach(c, name)
        for name in list(self.writers):  # owned tables whose slab was re-planned meanwhile
            self._release_rows(name, c.id)
        c.mailbox.close()
        shm.unlink(c.mailbox.name)
        log.info("client %d (pid %d) disconnected", c.id, c.pid)

    # -- requests -------------------------------------------------------------------------------
    async def _dispatch(self, c: Client, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        handler = self._OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "type": "ProtocolError",
                    "error": f"unknown request {op!r}; requests: {sorted(self._OPS)}"}
        try:
            result = handler(self, c, msg)
            if asyncio.iscoroutine(result):
                result = await result
            return {"ok": True, **(result or {})}
        except Stale as e:
            return {"ok": False, "type": "Stale", "error": str(e)}
        except (TierstoreError, ValueError, KeyError, TypeError) as e:
            return protocol.error_reply(e)
        except Exception as e:  # a bug must not take the service down for everyone
            log.exception("request %r failed", op)
            return {"ok": False, "type": "TierstoreError", "error": f"internal error: {e!r}"}

    @staticmethod
    def _arg(msg: dict[str, Any], key: str, kind: type, minimum: int | None = None) -> Any:
        v = msg.get(key)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise InvalidInput(f"request field {key!r} must be {kind.__name__}, got {v!r}")
        if minimum is not None and v < minimum:
            raise InvalidInput(f"request field {key!r} must be >= {minimum}, got {v}")
        return v

    @staticmethod
    def _spec(text: str) -> TableSpec:
        try:
            return TableSpec.from_json(text)
        except InvalidSpec:
            raise
        except Exception as e:  # not JSON, not an object, fields missing or unknown
            raise InvalidSpec(f"request field 'spec' is not a TableSpec in JSON "
                              f"({type(e).__name__}: {e})") from None

    def _op_tables(self, c: Client, msg: dict[str, Any]) -> dict[str, Any]:
        return {"tables": self.store.tables()}

    async def _op_create_table(self, c: Client, msg: dict[str, Any]) -> dict[str, Any]:
        spec = self._spec(self._arg(msg, "spec", str))
        async with self._replan:
            after = {n: o.spec for n, o in self.store._open.items()}
            after[spec.name] = spec
            if spec.name in self.store.tables():
                self.store.create_table(spec)  # raises TableExists
            self.store._check_fits(after)  # InvalidSpec before anything is retired
            retired = await self._retire_changed(after)
            with self._unretire_on_error(retired):
                self.store.create_table(spec)
        log.info("client %d created table %s", c.id, spec.name)
        return {}

    async def _op_drop_table(self, c: Client, msg: dict[str, Any]) -> dict[str, Any]:
        name = self._arg(msg, "table", str)
        async with self._replan:
            self.store.catalog.get(name)  # UnknownTable
            others = [cid for cid in self.writers.get(name, {}) if cid != c.id]
            if others:
                raise InvalidInput(f"table {name!r} is attached for writing by client "
                                   f"{others[0]}; it must detach first")
            for other in self.clients.values():
                if name in other.attached:
                    self._detach(other, name)
            after = {n: o.spec for n, o in self.store._open.items() if n != name}
            retired = await self._retire_changed(after)
            with self._unretire_on_error(retired):
                self.store.drop_table(name)
        log.info("client %d dropped table %s", c.id, name)
        return {}

    @contextlib.contextmanager
    def _unretire_on_error(self, retired: list[DDRCache]):
        """If the store operation fails, the retired slabs stay in service."""
        try:
            yield
        except BaseException:
            for cache in retired:
                cache.ctrl[pins.RETIRED] = 0
            raise

    async def _retire_changed(self, after: dict[str, TableSpec]) -> list[DDRCache]:
        """Before the store re-plans DRAM: retire every slab whose capacity changes."""
        shares = self.store._shares(after)
        return await self._retire([n for n, o in self.store._open.items()
                                   if n in after and o.cache is not None
                                   and o.cache.capacity != shares[n]])

    async def _retire(self, names: list[str]) -> list[DDRCache]:
        """Retire the slabs of ``names`` and wait until no client holds a pin in them; their
        attachments are dropped (clients get Stale and attach again to the new slab)."""
        for name in names:
            self.store._open[name].cache.retire()
        deadline = time.monotonic() + REPLAN_TIMEOUT_S
        while any(self._pinned(name).any() for name in names):
            if time.monotonic() > deadline:
                for name in names:  # nothing changed: un-retire
                    self.store._open[name].cache.ctrl[pins.RETIRED] = 0
                raise TierstoreError("a client kept rows of a table pinned for "
                                     f"{REPLAN_TIMEOUT_S:g} s; try again")
            await asyncio.sleep(0.002)
        for other in self.clients.values():
            for name in names:
                if name in other.attached:
                    self._fold(name, other.attached[name])
                    other.attached.pop(name).close()
        return [self.store._open[name].cache for name in names]

    def _pinned(self, table: str) -> np.ndarray:
        cache = self.store._open[table].cache
        atts = [c.attached[table] for c in self.clients.values()
                if table in c.attached and c.attached[table].cache is cache]
        return pins.pinned_mask([(a.header, a.pins) for a in atts], cache.capacity)

    async def _op_attach(self, c: Client, msg: dict[str, Any]) -> dict[str, Any]:
        name = self._arg(msg, "table", str)
        mode = msg.get("mode", "write")
        if mode not in ("write", "read"):
            raise InvalidInput(f"attach mode must be 'write' or 'read', got {mode!r}")
        async with self._replan:  # wait for a re-plan in progress
            spec = self.store.open_table(name).spec  # UnknownTable
            rows = self._row_range(spec, msg.get("rows"))
            if mode == "write":
                self._check_writer(spec, c, rows)
            if name in c.attached:
                self._detach(c, name)
            cache = self.store._open[name].cache
            seg_name = f"{self._prefix}{os.getpid()}.c{c.id}.{name}.pins"
            shm.unlink(seg_name)
            size = pins.HEADER_BYTES + 4 * (cache.capacity + 1)
            seg = shm.create(seg_name, (size,), np.uint8, unlink=False)
            att = Attachment(name, cache, mode == "write", seg, rows)
            att.header[pins.SEQ] = 1
            c.attached[name] = att
            if mode == "write":
                self.writers.setdefault(name, {})[c.id] = rows
        return {"spec": spec.to_json(), "layout": cache.shared_layout(),
                "pins": [seg_name, size], "rows": list(rows)}

    @staticmethod
    def _row_range(spec: TableSpec, rows: Any) -> tuple[int, int]:
        """[lo, hi) of an attach request (default: the whole id space)."""
        end = spec.num_rows if spec.id_space == "dense" else 2**63 - 1
        if rows is None:
            return 0, end
        if (not isinstance(rows, list) or len(rows) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in rows)
                or not 0 <= rows[0] < rows[1] <= end):
            raise InvalidInput(f"table {spec.name!r}: rows must be [lo, hi) with "
                               f"0 <= lo < hi <= {end}, got {rows!r}")
        return rows[0], rows[1]

    def _check_writer(self, spec: TableSpec, c: Client, rows: tuple[int, int]) -> None:
        """Refuse a write attach whose rows overlap another client's."""
        for cid, (lo, hi) in self.writers.get(spec.name, {}).items():
            if cid != c.id and lo < rows[1] and rows[0] < hi:
                pid = self.clients[cid].pid if cid in self.clients else -1
                raise InvalidInput(
                    f"table {spec.name!r} already has a writer of rows [{lo}, {hi}) (client "
                    f"{cid}, pid {pid}); attach it read-only, choose rows that do not "
                    f"overlap, or detach the writer")

    def _release_rows(self, name: str, cid: int) -> None:
        owners = self.writers.get(name)
        if owners is not None:
            owners.pop(cid, None)
            if not owners:
                del self.writers[name]

    def _op_detach(self, c: Client, msg: dict[str, Any]) -> dict[str, Any]:
        name = self._arg(msg, "table", str)
        if name not in c.attached:
            raise UnknownTable(f"table {name!r} is not attached by this client")
        self._detach(c, name)
        return {}

    def _detach(self, c: Client, name: str) -> None:
        att = c.attached.pop(name)
        self._fold(name, att)
        att.close()
        self._release_rows(name, c.id)

    def _fold(self, name: str, att: Attachment) -> None:
        """Keep the lookups/hits a departing attachment counted on its own."""
        d = self.departed.setdefault(name, {"lookups": 0, "hits": 0})
        d["lookups"] += int(att.header[pins.LOOKUPS])
        d["hits"] += int(att.header[pins.HITS])

    def _current(self, c: Client, msg: dict[str, Any]) -> Attachment:
        name = self._arg(msg, "table", str)
        att = c.attached.get(name)
        if att is None:
            raise Stale(f"table {name!r} is not attached (or was re-planned); attach it")
        entry = self.store._open.get(name)
        if entry is None or entry.cache is not att.cache or att.cache.ctrl[pins.RETIRED]:
            raise Stale(f"table {name!r} is being re-planned; attach it again")
        return att

    def _mailbox(self, c: Client, offset: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if offset + nbytes > c.mailbox.nbytes:
            raise InvalidInput(f"request needs {offset + nbytes} bytes of mailbox; the "
                               f"service's mailbox_bytes is {c.mailbox.nbytes}")
        return c.mailbox.array[offset: offset + nbytes].view(dtype).reshape(shape)

    def _op_resolve(self, c: Client, msg: dict[str, Any]) -> dict[str, Any]:
        att = self._current(c, msg)
        cache, spec = att.cache, att.cache.spec
        k = self._arg(msg, "rows", int, 0)
        h = self._arg(msg, "hits", int, 0)
        n = self._arg(msg, "lookups", int, 0)
        if n > self.cfg.max_batch:
            raise InvalidInput(f"table {spec.name!r}: batch of {n} ids is over the "
                               f"service's max_batch ({self.cfg.max_batch})")
        if k + h > n:
            raise InvalidInput(f"table {spec.name!r}: {k} rows and {h} hit slots cannot come "
                               f"from a batch of {n} lookups")
        rows = self._mailbox(c, 0, np.int64, (k,)).copy()
        off = 8 * k
        hits = self._mailbox(c, off, np.int64, (h,)).copy()
        self._check_rows(spec, rows)
        if cache.count_distinct_rows(rows) != k:  # a row admitted twice would own two slots
            raise InvalidInput(f"table {spec.name!r}: rows to resolve must be distinct")
        if h and (hits.min() < 0 or hits.max() >= cache.capacity):
            raise InvalidInput(f"table {spec.name!r}: hit slots out of range")
        if h and (cache.count_distinct_slots(hits) != h
                  or (cache.row_of_pos[hits + 1] < 0).any()):
            # the policy would count a free slot as occupied and could hand it out twice
            raise InvalidInput(f"table {spec.name!r}: hit slots must be distinct occupied slots")
        hits = self._with_recent(c, msg, cache, hits, off + 8 * h)
        others = [(a.header, a.pins) for o in self.clients.values()
                  for name, a in o.attached.items() if name == spec.name and a.cache is cache]
        pos, bypass = cache.resolve_for_client(
            rows, hits, n, lambda: pins.pinned_mask(others, cache.capacity))
        pins.pin_given(pos, att.pins, np.uint32(int(att.header[pins.SEQ]) & 0xFFFFFFFF))
        b = 0 if bypass is None else len(bypass.rows)
        self._mailbox(c, 0, np.int64, (k,))[:] = pos
        if b:
            self._mailbox(c, off, np.int64, (b,))[:] = bypass.rows
            off += 8 * b
            w = self._mailbox(c, off, spec.layout.np_dtype, (b, spec.dim))
            w[:] = bypass.w
            off = (off + w.nbytes + 7) // 8 * 8
            self._mailbox(c, off, np.float32, (b, spec.layout.state_dim))[:] = bypass.s
        return {"bypass": b}

    def _with_recent(self, c: Client, msg: dict[str, Any], cache: DDRCache, hits: np.ndarray,
                     offset: int) -> np.ndarray:
        """Add the slots of the client's earlier all-hit batches (``recent``, logged since its
        last request; only a hint for the policy) to ``hits``: slots that are no longer
        occupied are dropped, not refused (another client's misses may have evicted them)."""
        r = self._arg(msg, "recent", int, 0) if "recent" in msg else 0
        if r > RECENT_MAX:
            raise InvalidInput(f"request field 'recent' must be <= {RECENT_MAX}, got {r}")
        if not r:
            return hits
        recent = self._mailbox(c, offset, np.int64, (r,))
        recent = recent[(recent >= 0) & (recent < cache.capacity)]
        recent = recent[cache.row_of_pos[recent + 1] >= 0]
        return np.union1d(hits, recent) if len(recent) else hits

    def _op_apply(self, c: Client, msg: dict[str, Any]) -> dict[str, Any]:
        att = self._current(c, msg)
        spec = att.cache.spec
        if not att.writable:
            raise InvalidInput(f"table {spec.name!r} is attached read-only by this client")
        k = self._arg(msg, "rows", int, 0)
        if k > self.cfg.max_batch:
            raise InvalidInput(f"table {spec.name!r}: {k} rows is over the service's "
                               f"max_batch ({self.cfg.max_batch})")
        at = self._arg(msg, "at", int, 0) if "at" in msg else 0
        if at % 8:
            raise InvalidInput(f"request field 'at' must be a multiple of 8, got {at}")
        rows = self._mailbox(c, at, np.int64, (k,)).copy()
        grads = self._mailbox(c, at + 8 * k, np.float32, (k, spec.dim)).copy()
        self._check_rows(spec, rows)
        lo, hi = att.rows
        if k and (rows.min() < lo or rows.max() >= hi):
            raise InvalidInput(f"table {spec.name!r}: this client writes rows [{lo}, {hi}) "
                               f"only")
        if not np.isfinite(grads).all():
            raise InvalidInput(f"table {spec.name!r}: gradients must be finite")
        if k:
            att.cache.apply(rows, np.arange(k, dtype=np.int64), None, torch.from_numpy(grads))
        return {}

    @staticmethod
    def _check_rows(spec: TableSpec, rows: np.ndarray) -> None:
        if len(rows) and (rows.min() < 0 or (spec.id_space == "dense"
                                             and rows.max() >= spec.num_rows)):
            raise InvalidInput(f"table {spec.name!r}: ids out of range [0, {spec.num_rows})")

    def _op_stats(self, c: Client, msg: dict[str, Any]) -> dict[str, Any]:
        return {"stats": self.stats()}

    def stats(self) -> dict[str, Any]:
        """The store's figures plus what clients counted on their own (hits served from the
        shared slab never reach the service) and the service's own."""
        st = self.store.stats()
        for name, t in st["tables"].items():
            extra = dict(self.departed.get(name, {"lookups": 0, "hits": 0}))
            readers = 0
            for c in self.clients.values():
                a = c.attached.get(name)
                if a is not None:
                    extra["lookups"] += int(a.header[pins.LOOKUPS])
                    extra["hits"] += int(a.header[pins.HITS])
                    readers += not a.writable
            t["lookups"] += extra["lookups"]
            t["hits"] += extra["hits"]
            t["hit_rate"] = t["hits"] / t["lookups"] if t["lookups"] else None
            t["writers"] = [{"pid": self.clients[cid].pid, "rows": list(r)}
                            for cid, r in self.writers.get(name, {}).items()
                            if cid in self.clients]
            t["readers"] = readers
        st["service"] = {"pid": os.getpid(), "version": protocol.VERSION,
                         "uptime_s": round(time.time() - self._started, 1),
                         "clients": len(self.clients), "run_dir": self.cfg.run_dir,
                         "max_batch": self.cfg.max_batch}
        return st

    def _op_checkpoint(self, c: Client, msg: dict[str, Any]) -> dict[str, Any]:
        """Write the next checkpoint of the chain under ``root`` (tierstore/ckpt). The rows are
        snapshot synchronously (clients write the shared slab directly, so copy-on-write
        cannot see their updates); quantize/compress/write run in a background thread.
        ``extra_state_file``: a torch.save'd dict (dense state) written by the client, loaded
        with weights_only and deleted."""
        from tierstore import ckpt
        root = self._arg(msg, "root", str)
        opts = {k: msg[k] for k in ("step", "reader", "keep", "rebaseline_at",
                                    "expected_restores", "state_dtype") if k in msg}
        extra = msg.get("extra_state_file")
        if extra is not None:
            if not isinstance(extra, str) or not os.path.isfile(extra):
                raise InvalidInput(f"extra_state_file {extra!r} is not a file")
            opts["extra_state"] = torch.load(extra, weights_only=True)
            os.unlink(extra)
        handle = ckpt.checkpoint(self.store, root, msg.get("policy", "intermittent"),
                                 msg.get("bits", 4), msg.get("quant", "adaptive"),
                                 snapshot="sync", **opts)
        if msg.get("wait"):
            handle.wait()
        log.info("client %d: checkpoint %s (%s)", c.id, handle.path, handle.kind)
        return {"path": handle.path, "kind": handle.kind}

    def _op_wait_checkpoint(self, c: Client, msg: dict[str, Any]) -> dict[str, Any]:
        from tierstore import ckpt
        info = ckpt.wait(self.store)
        return {"result": _jsonable(info)}

    async def _op_restore(self, c: Client, msg: dict[str, Any]) -> dict[str, Any]:
        """Restore a checkpoint (its whole chain): every attached table moves to a new slab
        (clients attach again); the dense state stays in the checkpoint directory for the
        client to load (tierstore.ckpt.dense.load)."""
        from tierstore import ckpt
        path = self._arg(msg, "path", str)
        async with self._replan:
            attached = sorted({n for o in self.clients.values() for n in o.attached})
            retired = await self._retire(attached)
            with self._unretire_on_error(retired):
                info = ckpt.restore(self.store, path)
        info.pop("extra_state", None)
        log.info("client %d restored %s", c.id, path)
        return {"result": _jsonable(info)}

    def _op_flush(self, c: Client, msg: dict[str, Any]) -> dict[str, Any]:
        self.store.flush()
        return {}

    def _op_shutdown(self, c: Client, msg: dict[str, Any]) -> dict[str, Any]:
        log.info("client %d asked for shutdown", c.id)
        self._stop.set()
        return {}

    def _op_hello(self, c: Client, msg: dict[str, Any]) -> dict[str, Any]:
        raise InvalidInput("hello was already exchanged on this connection")

    _OPS = {
        "hello": _op_hello, "tables": _op_tables, "create_table": _op_create_table,
        "drop_table": _op_drop_table, "attach": _op_attach, "detach": _op_detach,
        "resolve": _op_resolve, "apply": _op_apply, "stats": _op_stats, "flush": _op_flush,
        "shutdown": _op_shutdown, "checkpoint": _op_checkpoint,
        "wait_checkpoint": _op_wait_checkpoint, "restore": _op_restore,
    }


def _jsonable(x: Any) -> Any:
    """Numbers, strings, lists and dicts of a result, numpy scalars/arrays made plain."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if not isinstance(v, torch.Tensor)}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def serve(cfg: ServiceConfig) -> None:
    """Run a service in this process until it is stopped (logs to stderr)."""
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s tierstored[%(process)d] %(levelname)s %(message)s")
    Service(cfg).run()
