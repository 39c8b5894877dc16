"""Checkpoint policies: which kind the next checkpoint of a chain is.

Kinds of checkpoint:

- ``full`` (a *baseline*): every row that may differ from its initial value
  (``Store.written_rows``); restoring needs it alone.
- ``cumulative``: the rows modified since the chain's baseline; restoring needs the baseline
  and this checkpoint (one-shot).
- ``delta``: the rows modified since the previous checkpoint; restoring replays the baseline
  and every delta after it, in order.

Policies (``policy=``):

- ``full``: every checkpoint is a baseline.
- ``incremental``: cumulative increments on one baseline (Check-N-Run's one-shot incremental).
- ``consecutive``: deltas on one baseline.
- ``intermittent`` (default): increments (``increments="cumulative"``, the default, or
  ``"consecutive"``) with a new baseline when the cost model below says so, or, with
  ``rebaseline_at=F``, when the rows the increment chain holds reach ``F`` x the rows a new
  baseline would hold.

A new baseline is taken whatever the policy when the chain cannot be continued safely: no
previous checkpoint of this store under the root, a checkpoint written or restored by another
process or Store object (the modified-row record lives in memory), a failed previous write,
tables added/dropped/changed, or a different quantization scheme (after a restore raises the
bit-width).

Cost model of ``intermittent`` (sizes in rows; a cycle shares one scheme, so bytes are
proportional). A *cycle* is a baseline and the increments after it. The cost of an interval is
the bytes written at its end. With ``n`` checkpoints in the cycle so far (the baseline and
``n - 1`` increments of ``c_1 .. c_{n-1}`` rows) and ``W`` rows a new baseline would hold now,
starting a new cycle that repeats the current one costs per interval on average::

    A = (W + c_1 + ... + c_{n-1}) / n

and continuing costs ``c`` now (the increment that would be written). Since cumulative
increments only grow, the long-run average per interval is lowest when a cycle ends as soon
as the next interval costs more than a cycle's average (renewal-reward argument): take a new
baseline iff ``c > A``. The first increment after a baseline is always taken (``c <= W``).

Consecutive increments (deltas) do not grow, so what they cost is capacity and restore time:
the chain's restore set holds the baseline plus every delta. There a new baseline is taken
when the deltas would hold more rows than a new baseline (``sum(d) + d_now > W``): the newest
state never needs more than about twice a baseline on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

POLICIES = ("full", "incremental", "consecutive", "intermittent")
INCREMENTS = ("cumulative", "consecutive")


@dataclass(frozen=True)
class PolicyOptions:
    policy: str = "intermittent"
    increments: str = "cumulative"
    rebaseline_at: float | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown checkpoint policy {self.policy!r}; valid: "
                             f"{', '.join(POLICIES)}")
        if self.increments not in INCREMENTS:
            raise ValueError(f"increments must be one of {INCREMENTS}, got {self.increments!r}")
        if self.rebaseline_at is not None:
            if self.policy != "intermittent":
                raise ValueError("rebaseline_at applies to the intermittent policy only")
            if not isinstance(self.rebaseline_at, (int, float)) or not 0 < self.rebaseline_at:
                raise ValueError(f"rebaseline_at must be a fraction > 0, got "
                                 f"{self.rebaseline_at!r}")

    @property
    def increment_kind(self) -> str:
        """The kind of increment this policy takes: cumulative or delta."""
        if self.policy == "incremental":
            return "cumulative"
        if self.policy == "consecutive":
            return "delta"
        return "cumulative" if self.increments == "cumulative" else "delta"

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "increments": self.increments,
                "rebaseline_at": self.rebaseline_at}


@dataclass(frozen=True)
class Decision:
    kind: str      # full | cumulative | delta
    reason: str


def decide(opts: PolicyOptions, forced_reason: str | None, cycle: dict[str, Any] | None,
           union_rows: int, delta_rows: int, written_rows: Any) -> Decision:
    """The kind of the next checkpoint.

    forced_reason: why the chain cannot be continued (a baseline is taken), or None.
    cycle: the head checkpoint's cycle record (``{"baseline_rows", "increment_rows": [...]}``).
    union_rows / delta_rows: rows a cumulative / delta increment would hold now.
    written_rows: a callable giving the rows a new baseline would hold now (only called by
        ``intermittent``, which needs it).
    """
    if forced_reason is not None:
        return Decision("full", forced_reason)
    if opts.policy == "full":
        return Decision("full", "policy full")
    kind = opts.increment_kind
    if opts.policy in ("incremental", "consecutive"):
        return Decision(kind, f"policy {opts.policy}")
    assert cycle is not None
    w = int(written_rows())
    incs = [int(r) for r in cycle["increment_rows"]]
    if kind == "cumulative":
        c = union_rows
        if opts.rebaseline_at is not None:
            if c >= opts.rebaseline_at * w:
                return Decision("full", f"increment {c} rows >= {opts.rebaseline_at} x {w}")
            return Decision(kind, f"increment {c} rows < {opts.rebaseline_at} x {w}")
        avg = (w + sum(incs)) / (len(incs) + 1)
        if c > avg:
            return Decision("full", f"increment {c} rows > cycle average {avg:.0f}")
        return Decision(kind, f"increment {c} rows <= cycle average {avg:.0f}")
    chain = sum(incs) + delta_rows
    if opts.rebaseline_at is not None:
        if chain >= opts.rebaseline_at * w:
            return Decision("full", f"deltas {chain} rows >= {opts.rebaseline_at} x {w}")
        return Decision(kind, f"deltas {chain} rows < {opts.rebaseline_at} x {w}")
    if chain > w:
        return Decision("full", f"deltas {chain} rows > new baseline {w}")
    return Decision(kind, f"deltas {chain} rows <= new baseline {w}")
