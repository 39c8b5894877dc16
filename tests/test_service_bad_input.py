"""tierstored and bad input: ids out of range, negative or float; bad offsets; unknown tables;
batches over --max-batch; malformed, oversized or truncated frames; a newer protocol version;
garbage written into the shared-memory mailbox.

Each is sent from a real client (``tierstore.client.connect``) and from a raw unix socket.
Every case must give that client a clear error, leave the service up, leave a second client
(connected the whole time) working, and change no stored row: the full table read before and
after must agree bit for bit, and at the end the rows on disk (weights and optimizer state)
must be exactly those written before the first bad request.
"""

import contextlib
import json
import os
import socket
import struct
import time

import numpy as np
import pytest
import torch

import tierstore as ts
from conftest import Service, dump
from tierstore.daemon import protocol
from tierstore.daemon.server import BODY_TIMEOUT_S
from tierstore.tiers import shm

ROWS, DIM, MAX_BATCH = 5000, 16, 1000
CHUNK = 500  # a full-table read goes in chunks that fit both max_batch and the mailbox
MAILBOX = 64 << 10  # holds max_batch ids, not max_batch ids + gradients (to test overflow)
S_ROWS = 3000  # the scratch table (valid writes go there; "t" must never change). Larger
# than its DRAM share, so it has free slots (a table that fits is loaded whole at open)
S_IDS = torch.arange(10)


def _spec(name, rows):
    return ts.TableSpec(name, num_rows=rows, dim=DIM, optimizer=ts.RowWiseAdagrad(lr=0.05))


def _bits(x):
    return x.contiguous().view(torch.int32)


def _full(conn):
    """Every row of "t" (weights), read through the service in chunks."""
    return torch.cat([conn.lookup("t", torch.arange(lo, min(lo + CHUNK, ROWS))).clone()
                      for lo in range(0, ROWS, CHUNK)])


# -- one service for the module ------------------------------------------------------------
@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    """A tierstored with 64 KiB of DRAM (table "t" mostly on SCM), --max-batch 1000 and a
    64 KiB mailbox. "t" is trained, the service stopped and the rows on disk recorded
    (``svc.stored``), then the service started again on the same store."""
    s = Service(tmp_path_factory.mktemp("bad-input"), ddr_bytes="64KiB",
                extra=["--max-batch", str(MAX_BATCH), "--mailbox-bytes", str(MAILBOX)])
    s.start()
    try:
        with s.connect() as c:
            c.create_table(_spec("t", ROWS))
            c.create_table(_spec("s", S_ROWS))
            g = np.random.default_rng(7)
            for lo in range(0, ROWS, CHUNK):
                c.apply_gradients("t", torch.arange(lo, lo + CHUNK), torch.from_numpy(
                    g.standard_normal((CHUNK, DIM)).astype(np.float32)))
        assert s.stop() == 0
        with ts.Store(s.data_dir) as store:
            s.stored = dump(store, "t")
        assert s.stored[1].any(), "the optimizer state must be non-trivial"
        s.start()
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()
    if s.proc.poll() is None:
        s.proc.kill()


@pytest.fixture(scope="module")
def watcher(svc):
    """A second client, connected for the whole module (read-only)."""
    with svc.connect(mode="read") as w:
        yield w


@pytest.fixture(scope="module")
def baseline(svc, watcher):
    full = _full(watcher)
    np.testing.assert_array_equal(full.numpy(), svc.stored[0])  # service == rows on disk
    return full


@pytest.fixture(scope="module")
def capacity(watcher):
    cap = watcher.stats()["tables"]["t"]["capacity_rows"]
    assert cap < MAX_BATCH + 1 <= ROWS, "an over-size batch must include rows not in DRAM"
    return cap


def check_intact(svc, watcher, baseline):
    """The service is up, the second client works, a fresh client works, "t" is unchanged."""
    assert svc.proc.poll() is None, f"tierstored died:\n{svc.logs()[-3000:]}"
    assert torch.equal(_bits(_full(watcher)), _bits(baseline)), "a stored row changed"
    with svc.connect(mode="read") as fresh:
        assert sorted(fresh.tables()) == ["s", "t"]
        ids = torch.arange(3, ROWS, 97)
        assert torch.equal(_bits(fresh.lookup("t", ids)), _bits(baseline[ids]))
    assert "internal error" not in svc.logs() and "failed\nTraceback" not in svc.logs()


@pytest.fixture
def conn(svc):
    """A writer client for one test; gives its tables back before the next test."""
    c = svc.connect()
    yield c
    for table in ("t", "s"):
        with contextlib.suppress(ts.UnknownTable, ts.ConnectionLost):
            c.detach(table)
    c.close()


# -- from a real client --------------------------------------------------------------------
IDX = torch.tensor([1, 2, 3, 4])
OFF = torch.tensor([0, 2])
G4 = torch.ones(4, DIM)
G2 = torch.ones(2, DIM)
BIG = torch.arange(MAX_BATCH + 1)  # over --max-batch, more distinct rows than DRAM holds
NAN = torch.full((4, DIM), float("nan"))
INF = torch.ones(4, DIM).index_fill_(0, torch.tensor([2]), float("inf"))

CLIENT_CASES = {
    # lookup
    "lookup id out of range": (lambda c: c.lookup("t", torch.tensor([1, ROWS])),
                               ts.InvalidInput, f"< num_rows={ROWS}"),
    "lookup huge id": (lambda c: c.lookup("t", torch.tensor([2**40])), ts.InvalidInput,
                       "num_rows"),
    "lookup negative id": (lambda c: c.lookup("t", torch.tensor([-1, 2])), ts.InvalidInput,
                           ">= 0"),
    "lookup float ids": (lambda c: c.lookup("t", torch.tensor([1.0, 2.0])), ts.InvalidInput,
                         "integers"),
    "lookup 2-D ids": (lambda c: c.lookup("t", torch.zeros(2, 2, dtype=torch.long)),
                       ts.InvalidInput, "1-D"),
    "lookup over max_batch": (lambda c: c.lookup("t", BIG), ts.InvalidInput, "max_batch"),
    "lookup unknown table": (lambda c: c.lookup("nope", IDX), ts.UnknownTable, "nope"),
    "lookup table not a name": (lambda c: c.lookup(5, IDX), ts.UnknownTable, "name"),
    # pooled
    "pooled id out of range": (lambda c: c.pooled("t", torch.tensor([1, 2, 3, ROWS]), OFF),
                               ts.InvalidInput, "num_rows"),
    "pooled negative id": (lambda c: c.pooled("t", torch.tensor([1, -2, 3, 4]), OFF),
                           ts.InvalidInput, ">= 0"),
    "pooled float ids": (lambda c: c.pooled("t", IDX.double(), OFF), ts.InvalidInput,
                         "integers"),
    "pooled offsets not monotone": (lambda c: c.pooled("t", IDX, torch.tensor([0, 3, 2])),
                                    ts.InvalidInput, "non-decreasing"),
    "pooled offsets not from 0": (lambda c: c.pooled("t", IDX, torch.tensor([1, 2])),
                                  ts.InvalidInput, "start at 0"),
    "pooled offset past the end": (lambda c: c.pooled("t", IDX, torch.tensor([0, 5])),
                                   ts.InvalidInput, "past the end"),
    "pooled last offset != n": (lambda c: c.pooled("t", IDX, torch.tensor([0, 2, 5]),
                                                   include_last_offset=True),
                                ts.InvalidInput, "last offset"),
    "pooled float offsets": (lambda c: c.pooled("t", IDX, torch.tensor([0.0, 2.0])),
                             ts.InvalidInput, "integer"),
    "pooled psw wrong length": (lambda c: c.pooled("t", IDX, OFF,
                                                   per_sample_weights=torch.ones(3)),
                                ts.InvalidInput, "shape (4,)"),
    "pooled bad mode": (lambda c: c.pooled("t", IDX, OFF, mode="max"), ts.InvalidInput,
                        "mode"),
    "pooled over max_batch": (lambda c: c.pooled("t", BIG, torch.tensor([0, 500])),
                              ts.InvalidInput, "max_batch"),
    "pooled unknown table": (lambda c: c.pooled("nope", IDX, OFF), ts.UnknownTable, "nope"),
    # apply_gradients
    "apply id out of range": (lambda c: c.apply_gradients("t", torch.tensor([1, 2, 3, ROWS]),
                                                          G4), ts.InvalidInput, "num_rows"),
    "apply negative id": (lambda c: c.apply_gradients("t", torch.tensor([1, 2, -3, 4]), G4),
                          ts.InvalidInput, ">= 0"),
    "apply float ids": (lambda c: c.apply_gradients("t", IDX.float(), G4), ts.InvalidInput,
                        "integers"),
    "apply NaN grads": (lambda c: c.apply_gradients("t", IDX, NAN), ts.InvalidInput, "NaN"),
    "apply inf grads": (lambda c: c.apply_gradients("t", IDX, INF), ts.InvalidInput,
                        "infinity"),
    "apply grads wrong shape": (lambda c: c.apply_gradients("t", IDX, torch.ones(4, DIM + 1)),
                                ts.InvalidInput, f"shape (4, {DIM})"),
    "apply grads wrong count": (lambda c: c.apply_gradients("t", IDX, torch.ones(3, DIM)),
                                ts.InvalidInput, f"shape (4, {DIM})"),
    "apply integer grads": (lambda c: c.apply_gradients("t", IDX,
                                                        torch.ones(4, DIM, dtype=torch.long)),
                            ts.InvalidInput, "floating point"),
    # every row of "t": more rows not in DRAM than max_batch (those in DRAM must stay too)
    "apply over max_batch": (lambda c: c.apply_gradients("t", torch.arange(ROWS),
                                                         torch.ones(ROWS, DIM)),
                             ts.InvalidInput, "max_batch"),
    "apply unknown table": (lambda c: c.apply_gradients("nope", IDX, G4), ts.UnknownTable,
                            "nope"),
    # apply_pooled_gradients
    "pooled grad id out of range": (
        lambda c: c.apply_pooled_gradients("t", torch.tensor([ROWS, 1, 2, 3]), OFF, G2),
        ts.InvalidInput, "num_rows"),
    "pooled grad negative id": (
        lambda c: c.apply_pooled_gradients("t", torch.tensor([0, 1, 2, -1]), OFF, G2),
        ts.InvalidInput, ">= 0"),
    "pooled grad float ids": (lambda c: c.apply_pooled_gradients("t", IDX.half(), OFF, G2),
                              ts.InvalidInput, "integers"),
    "pooled grad offsets not monotone": (
        lambda c: c.apply_pooled_gradients("t", IDX, torch.tensor([0, 3, 1]),
                                           torch.ones(3, DIM)),
        ts.InvalidInput, "non-decreasing"),
    "pooled grad offsets not from 0": (
        lambda c: c.apply_pooled_gradients("t", IDX, torch.tensor([2, 3]), G2),
        ts.InvalidInput, "start at 0"),
    "pooled grad offset past the end": (
        lambda c: c.apply_pooled_gradients("t", IDX, torch.tensor([0, 9]), G2),
        ts.InvalidInput, "past the end"),
    "pooled grad psw wrong length": (
        lambda c: c.apply_pooled_gradients("t", IDX, OFF, G2, per_sample_weights=torch.ones(5)),
        ts.InvalidInput, "shape (4,)"),
    "pooled grad wrong shape": (
        lambda c: c.apply_pooled_gradients("t", IDX, OFF, torch.ones(3, DIM)),
        ts.InvalidInput, f"shape (2, {DIM})"),
    "pooled grad NaN": (
        lambda c: c.apply_pooled_gradients("t", IDX, OFF, torch.full((2, DIM), float("nan"))),
        ts.InvalidInput, "NaN"),
    "pooled grad over max_batch": (
        lambda c: c.apply_pooled_gradients("t", torch.arange(ROWS), torch.arange(0, ROWS, 10),
                                           torch.ones(ROWS // 10, DIM)),
        ts.InvalidInput, "max_batch"),
    "pooled grad unknown table": (
        lambda c: c.apply_pooled_gradients("nope", IDX, OFF, G2), ts.UnknownTable, "nope"),
    # tables
    "create existing table": (lambda c: c.create_table(_spec("t", 10)), ts.TableExists, "'t'"),
    "create not a spec": (lambda c: c.create_table({"name": "x"}), ts.InvalidSpec,
                          "TableSpec"),
    "drop unknown table": (lambda c: c.drop_table("nope"), ts.UnknownTable, "nope"),
    "attach unknown table": (lambda c: c.attach("nope"), ts.UnknownTable, "nope"),
    "attach bad mode": (lambda c: c.attach("t", "rw"), ts.InvalidInput, "'rw'"),
    "detach not attached": (lambda c: c.detach("s"), ts.UnknownTable, "not attached"),
}


@pytest.mark.parametrize("case", list(CLIENT_CASES))
def test_client_bad_input(svc, watcher, baseline, capacity, conn, case):
    call, exc, words = CLIENT_CASES[case]
    conn.lookup("t", IDX)  # attached (and "t"'s writer) before the bad call
    with pytest.raises(exc) as info:
        call(conn)
    assert words in str(info.value), str(info.value)
    # the same client goes on: reads "t", writes its scratch table
    assert conn.lookup("t", IDX).shape == (4, DIM)
    before = conn.lookup("s", S_IDS).clone()
    conn.apply_gradients("s", S_IDS, torch.ones(len(S_IDS), DIM))
    assert (conn.lookup("s", S_IDS) < before).all()
    check_intact(svc, watcher, baseline)


# -- from a raw socket -----------------------------------------------------------------------
class Raw:
    """A client speaking the frame protocol by hand."""

    def __init__(self, svc, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.path.join(svc.run_dir, "tierstored.sock"))
        self.segments = []
        self.mailbox = None
        self.layouts = {}

    def send_bytes(self, data):
        self.sock.sendall(data)

    def send(self, msg):
        body = json.dumps(msg).encode()
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def _recv(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                assert not buf, "the service closed the connection in the middle of a frame"
                return None
            buf += chunk
        return bytes(buf)

    def recv(self):
        """The next reply, or None if the service closed the connection."""
        header = self._recv(4)
        if header is None:
            return None
        body = self._recv(struct.unpack(">I", header)[0])
        assert body is not None
        return json.loads(body)

    def call(self, msg):
        self.send(msg)
        reply = self.recv()
        assert reply is not None, f"the service hung up on {msg}"
        return reply

    def ok(self, msg):
        reply = self.call(msg)
        assert reply["ok"], reply
        return reply

    def hello(self):
        reply = self.ok({"op": "hello", "version": protocol.VERSION, "pid": os.getpid()})
        name, size = reply["mailbox"]
        self.mailbox = self._map(name, (size,), np.uint8, True)
        return reply

    def _map(self, name, shape, dtype, writable):
        seg = shm.attach(name, shape, dtype, writable=writable)
        self.segments.append(seg)
        return seg.array

    def attach(self, table, mode="write"):
        reply = self.ok({"op": "attach", "table": table, "mode": mode})
        self.layouts[table] = reply["layout"]
        return reply

    def index(self, table):
        """table's id -> slab position (0: not in DRAM)."""
        name, shape, dtype = self.layouts[table]["index"]
        return self._map(name, tuple(shape), dtype, False)

    def row_of_pos(self, table):
        """slab position -> row id (-1: free slot)."""
        lay = self.layouts[table]
        name, shape, _ = lay["meta"]
        meta = self._map(name, tuple(shape), np.uint8, False).reshape(-1)
        return meta[: np.dtype(lay["id_dtype"]).itemsize * shape[0]].view(lay["id_dtype"])

    def put(self, *arrays):
        """Lay arrays in the mailbox one after another (8-aligned), like the client does."""
        off = 0
        for a in arrays:
            raw = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
            self.mailbox[off: off + len(raw)] = raw
            off = (off + len(raw) + 7) // 8 * 8

    def closed(self):
        """True if the service has closed this connection (EOF, no further reply)."""
        return self.recv() is None

    def close(self):
        for table in self.layouts:
            with contextlib.suppress(OSError, AssertionError):
                self.call({"op": "detach", "table": table})
        self.sock.close()
        self.mailbox = None
        for seg in self.segments:
            seg.close()


@pytest.fixture
def raw(svc):
    r = Raw(svc)
    yield r
    r.close()


@pytest.fixture
def raw_t(raw):
    """A raw client past hello, with "t" attached for writing."""
    raw.hello()
    raw.attach("t", "write")
    return raw


def error(reply, words, kind=None):
    assert reply is not None, "expected an error reply, the service hung up"
    assert reply["ok"] is False, reply
    assert words in reply["error"], reply
    assert "internal error" not in reply["error"], reply
    if kind is not None:
        assert reply["type"] == kind, reply


def test_raw_first_request_must_be_hello(svc, watcher, baseline, raw):
    error(raw.call({"op": "tables"}), "first request must be hello", "ProtocolError")
    assert raw.closed()
    check_intact(svc, watcher, baseline)


@pytest.mark.parametrize("version", [2, 99, 0, "1", None])
def test_raw_unsupported_protocol_version(svc, watcher, baseline, raw, version):
    reply = raw.call({"op": "hello", "version": version, "pid": os.getpid()})
    error(reply, f"protocol version {version!r} is not supported", "ProtocolError")
    assert f"speaks version {protocol.VERSION}" in reply["error"]
    assert raw.closed()
    check_intact(svc, watcher, baseline)


BAD_BODIES = {
    "not JSON": (b"{not json", "not UTF-8 JSON"),
    "not UTF-8": (b"\xff\xfe{}", "not UTF-8 JSON"),
    "empty": (b"", "not UTF-8 JSON"),
    "JSON array": (b'[{"op": "hello", "version": 1}]', "must be a JSON object, got list"),
    "JSON string": (b'"hello"', "must be a JSON object, got str"),
    "JSON null": (b"null", "must be a JSON object, got NoneType"),
}


@pytest.mark.parametrize("after_hello", [False, True], ids=["before-hello", "after-hello"])
@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_raw_malformed_frame(svc, watcher, baseline, raw, case, after_hello):
    """A well-framed body that is not a JSON object: an error, and the connection goes on."""
    body, words = BAD_BODIES[case]
    if after_hello:
        raw.hello()
    raw.send_bytes(struct.pack(">I", len(body)) + body)
    error(raw.recv(), words, "ProtocolError")
    if not after_hello:
        raw.hello()
    assert sorted(raw.ok({"op": "tables"})["tables"]) == ["s", "t"]
    check_intact(svc, watcher, baseline)


@pytest.mark.parametrize("length", [protocol.MAX_FRAME + 1, 0xFFFFFFFF])
@pytest.mark.parametrize("after_hello", [False, True], ids=["before-hello", "after-hello"])
def test_raw_frame_over_limit(svc, watcher, baseline, conn, raw, length, after_hello):
    if after_hello:
        raw.hello()
        raw.attach("t", "write")
    raw.send_bytes(struct.pack(">I", length) + b"{" * 1000)
    error(raw.recv(), f"the limit is {protocol.MAX_FRAME}", "ProtocolError")
    assert raw.closed()
    conn.attach("t", "write")  # the dropped client's ownership of "t" went with it
    check_intact(svc, watcher, baseline)


def test_raw_truncated_frame_times_out_without_blocking_others(svc, watcher, baseline, conn,
                                                              raw):
    raw.hello()
    raw.attach("t", "write")
    raw.send_bytes(struct.pack(">I", 100) + b'{"op": "ta')
    t0 = time.monotonic()
    # meanwhile the service serves everyone else
    check_intact(svc, watcher, baseline)
    with svc.connect() as other:
        assert other.lookup("s", S_IDS).shape == (len(S_IDS), DIM)
    assert time.monotonic() - t0 < BODY_TIMEOUT_S - 1, "other clients were blocked"
    reply = raw.recv()
    waited = time.monotonic() - t0
    error(reply, "truncated frame: 100 bytes announced", "ProtocolError")
    assert BODY_TIMEOUT_S - 1 < waited < BODY_TIMEOUT_S + 1.5, waited
    assert raw.closed()
    conn.attach("t", "write")  # the dropped client's ownership of "t" went with it
    # a truncated header is just a client that hangs up
    r2 = Raw(svc)
    r2.send_bytes(b"\x00\x00")
    r2.sock.close()
    check_intact(svc, watcher, baseline)


# (request, words in the error, error type); raw_t has "t" attached for writing
FIELD_CASES = {
    "unknown op": ({"op": "frobnicate"}, "unknown request 'frobnicate'", "ProtocolError"),
    "op not a string": ({"op": 5}, "unknown request 5", "ProtocolError"),
    "no op": ({"table": "t"}, "unknown request None", "ProtocolError"),
    "hello again": ({"op": "hello", "version": 1}, "already", "InvalidInput"),
    "rows a string": ({"op": "resolve", "table": "t", "rows": "x", "hits": 0, "lookups": 1},
                      "'rows' must be int, got 'x'", "InvalidInput"),
    "rows a float": ({"op": "resolve", "table": "t", "rows": 1.0, "hits": 0, "lookups": 1},
                     "'rows' must be int", "InvalidInput"),
    "rows a bool": ({"op": "resolve", "table": "t", "rows": True, "hits": 0, "lookups": 1},
                    "'rows' must be int", "InvalidInput"),
    "rows missing": ({"op": "resolve", "table": "t", "hits": 0, "lookups": 1},
                     "'rows' must be int, got None", "InvalidInput"),
    "rows negative": ({"op": "resolve", "table": "t", "rows": -1, "hits": 0, "lookups": 1},
                      "'rows' must be >= 0", "InvalidInput"),
    "hits negative": ({"op": "resolve", "table": "t", "rows": 0, "hits": -4, "lookups": 1},
                      "'hits' must be >= 0", "InvalidInput"),
    "lookups negative": ({"op": "resolve", "table": "t", "rows": 0, "hits": 0, "lookups": -1},
                         "'lookups' must be >= 0", "InvalidInput"),
    "rows > lookups": ({"op": "resolve", "table": "t", "rows": 3, "hits": 0, "lookups": 2},
                       "3 rows and 0 hit slots cannot come from a batch of 2", "InvalidInput"),
    "rows + hits > lookups": ({"op": "resolve", "table": "t", "rows": 1, "hits": 2,
                               "lookups": 2}, "cannot come from a batch", "InvalidInput"),
    "hits more than lookups": ({"op": "resolve", "table": "t", "rows": 0, "hits": 10**12,
                                "lookups": 1}, "cannot come from a batch", "InvalidInput"),
    "resolve over max_batch": ({"op": "resolve", "table": "t", "rows": 1, "hits": 0,
                                "lookups": MAX_BATCH + 1}, f"max_batch ({MAX_BATCH})",
                               "InvalidInput"),
    "resolve huge count": ({"op": "resolve", "table": "t", "rows": 10**30, "hits": 0,
                            "lookups": 10**30}, "max_batch", "InvalidInput"),
    "table not a string": ({"op": "resolve", "table": ["t"], "rows": 0, "hits": 0,
                            "lookups": 0}, "'table' must be str", "InvalidInput"),
    "resolve unknown table": ({"op": "resolve", "table": "nope", "rows": 0, "hits": 0,
                               "lookups": 0}, "'nope' is not attached", "Stale"),
    "resolve table not attached": ({"op": "resolve", "table": "s", "rows": 0, "hits": 0,
                                    "lookups": 0}, "'s' is not attached", "Stale"),
    "apply rows a string": ({"op": "apply", "table": "t", "rows": "1"}, "'rows' must be int",
                            "InvalidInput"),
    "apply rows negative": ({"op": "apply", "table": "t", "rows": -1}, "'rows' must be >= 0",
                            "InvalidInput"),
    "apply beyond the mailbox": ({"op": "apply", "table": "t", "rows": MAX_BATCH},
                                 f"mailbox_bytes is {MAILBOX}", "InvalidInput"),
    "apply over max_batch": ({"op": "apply", "table": "t", "rows": MAX_BATCH + 1},
                             f"max_batch ({MAX_BATCH})", "InvalidInput"),
    "apply unknown table": ({"op": "apply", "table": "nope", "rows": 1}, "'nope' is not attached",
                            "Stale"),
    "apply at negative": ({"op": "apply", "table": "t", "rows": 1, "at": -8},
                          "'at' must be >= 0", "InvalidInput"),
    "apply at unaligned": ({"op": "apply", "table": "t", "rows": 1, "at": 4},
                           "multiple of 8", "InvalidInput"),
    "apply at a string": ({"op": "apply", "table": "t", "rows": 1, "at": "0"},
                          "'at' must be int", "InvalidInput"),
    "apply at past the mailbox": ({"op": "apply", "table": "t", "rows": 1, "at": MAILBOX},
                                  f"mailbox_bytes is {MAILBOX}", "InvalidInput"),
    "attach unknown table": ({"op": "attach", "table": "nope"}, "unknown table 'nope'",
                             "UnknownTable"),
    "attach bad mode": ({"op": "attach", "table": "s", "mode": "rw"}, "got 'rw'",
                        "InvalidInput"),
    "attach mode a list": ({"op": "attach", "table": "s", "mode": ["write"]}, "attach mode",
                           "InvalidInput"),
    "attach table missing": ({"op": "attach"}, "'table' must be str, got None", "InvalidInput"),
    "detach not attached": ({"op": "detach", "table": "s"}, "'s' is not attached",
                            "UnknownTable"),
    "drop unknown table": ({"op": "drop_table", "table": "nope"}, "unknown table 'nope'",
                           "UnknownTable"),
    "drop table not a string": ({"op": "drop_table", "table": 7}, "'table' must be str",
                                "InvalidInput"),
    "create existing table": ({"op": "create_table", "spec": _spec("t", 10).to_json()},
                              "'t'", "TableExists"),
    "create spec not a string": ({"op": "create_table", "spec": {"name": "x"}},
                                 "'spec' must be str", "InvalidInput"),
    "create spec not JSON": ({"op": "create_table", "spec": "{"}, "not a TableSpec",
                             "InvalidSpec"),
    "create spec a list": ({"op": "create_table", "spec": "[]"}, "not a TableSpec",
                           "InvalidSpec"),
    "create spec empty": ({"op": "create_table", "spec": "{}"}, "not a TableSpec",
                          "InvalidSpec"),
    "create spec unknown field": (
        {"op": "create_table", "spec": json.dumps({**json.loads(_spec("x", 10).to_json()),
                                                   "colour": "red"})},
        "colour", "InvalidSpec"),
    "create spec bad optimizer": (
        {"op": "create_table", "spec": json.dumps({**json.loads(_spec("x", 10).to_json()),
                                                   "optimizer": "adam"})},
        "not a TableSpec", "InvalidSpec"),
    "create spec negative rows": (
        {"op": "create_table", "spec": json.dumps({**json.loads(_spec("x", 10).to_json()),
                                                   "num_rows": -10})},
        "num_rows", "InvalidSpec"),
}


@pytest.mark.parametrize("case", list(FIELD_CASES))
def test_raw_bad_request(svc, watcher, baseline, raw_t, case):
    msg, words, kind = FIELD_CASES[case]
    error(raw_t.call(msg), words, kind)
    assert sorted(raw_t.ok({"op": "tables"})["tables"]) == ["s", "t"]  # the connection goes on
    check_intact(svc, watcher, baseline)


def _free_slot(raw, table):
    free = np.flatnonzero(raw.row_of_pos(table)[1:] < 0)
    assert len(free), f"table {table!r} has no free DRAM slot"
    return int(free[0])


def _occupied_slot(raw, table):
    used = np.flatnonzero(raw.row_of_pos(table)[1:] >= 0)
    assert len(used), f"table {table!r} has no row in DRAM"
    return int(used[0])


def _absent_row(raw, table):
    absent = np.flatnonzero(raw.index(table) == 0)
    assert len(absent), f"every row of {table!r} is in DRAM"
    return int(absent[0])


def _i64(*v):
    return np.array(v, dtype=np.int64)


def _resolve(raw, table, rows, hits=(), lookups=None):
    rows, hits = _i64(*rows), _i64(*hits)
    raw.put(rows, hits)
    n = len(rows) + len(hits) if lookups is None else lookups
    return raw.call({"op": "resolve", "table": table, "rows": len(rows), "hits": len(hits),
                     "lookups": n, "seq": 1})


def _apply(raw, table, rows, grads=None):
    rows = _i64(*rows)
    grads = np.ones((len(rows), DIM), np.float32) if grads is None else grads
    raw.put(rows, grads)
    return raw.call({"op": "apply", "table": table, "rows": len(rows)})


def _nan_grads():
    g = np.ones((2, DIM), np.float32)
    g[1, 3] = np.nan
    return g


# garbage in the mailbox: (call(raw), words in the error)
MAILBOX_CASES = {
    "resolve negative id": (lambda r: _resolve(r, "t", [3, -1]), "out of range"),
    "resolve id = num_rows": (lambda r: _resolve(r, "t", [ROWS]), "out of range"),
    "resolve huge id": (lambda r: _resolve(r, "t", [2**62]), "out of range"),
    "resolve id below int64": (lambda r: _resolve(r, "t", [-2**63]), "out of range"),
    "resolve duplicate ids": (lambda r: _resolve(r, "t", [_absent_row(r, "t")] * 2),
                              "distinct"),
    "resolve negative hit slot": (lambda r: _resolve(r, "t", [], [-1], 1), "hit slots"),
    "resolve hit slot past capacity": (
        lambda r: _resolve(r, "t", [], [r.layouts["t"]["capacity"]], 1), "hit slots"),
    "resolve duplicate hit slots": (
        lambda r: _resolve(r, "t", [], [_occupied_slot(r, "t")] * 2, 2), "distinct"),
    "resolve free slot as a hit": (
        lambda r: _resolve(r, "s", [_absent_row(r, "s")], [_free_slot(r, "s")], 2),
        "occupied"),
    "apply negative id": (lambda r: _apply(r, "t", [1, -1]), "out of range"),
    "apply id = num_rows": (lambda r: _apply(r, "t", [ROWS, 1]), "out of range"),
    "apply huge id": (lambda r: _apply(r, "t", [2**62]), "out of range"),
    "apply NaN grads": (lambda r: _apply(r, "t", [1, 2], _nan_grads()), "finite"),
    "apply inf grads": (lambda r: _apply(r, "t", [1, 2], np.full((2, DIM), -np.inf,
                                                               np.float32)), "finite"),
}


@pytest.mark.parametrize("case", list(MAILBOX_CASES))
def test_raw_garbage_in_mailbox(svc, watcher, baseline, raw_t, case):
    raw_t.attach("s", "read")
    call, words = MAILBOX_CASES[case]
    error(call(raw_t), words, "InvalidInput")
    # the same connection still resolves a valid miss (rows reach DRAM or come as bypass)
    row = _absent_row(raw_t, "t")
    reply = raw_t.ok({"op": "resolve", "table": "t", "rows": 0, "hits": 0, "lookups": 0})
    assert reply["bypass"] == 0
    reply = _resolve(raw_t, "t", [row])
    assert reply["ok"], reply
    pos = raw_t.mailbox[:8].view(np.int64)[0]
    assert (pos > 0) != (reply["bypass"] == 1)
    check_intact(svc, watcher, baseline)


def test_raw_zero_row_apply_changes_nothing(svc, watcher, baseline, raw_t):
    """The harness's apply path is accepted by the service (so the errors above are the
    service's checks, not a malformed request)."""
    assert _apply(raw_t, "t", [])["ok"]
    check_intact(svc, watcher, baseline)


def test_zz_rows_on_disk_unchanged(svc, watcher, baseline):
    """Last: after every bad request above, stop the service; the rows it writes back
    (weights and optimizer state) are exactly those stored before the first one."""
    check_intact(svc, watcher, baseline)
    watcher.close()
    assert svc.stop() == 0
    with ts.Store(svc.data_dir) as store:
        w, s = dump(store, "t")
    np.testing.assert_array_equal(w.view(np.int32), svc.stored[0].view(np.int32))
    np.testing.assert_array_equal(s.view(np.int32), svc.stored[1].view(np.int32))
