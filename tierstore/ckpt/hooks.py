"""Named points of a checkpoint write where a test can stop the writer (then SIGKILL it).

``TIERSTORE_CKPT_PAUSE=POINT[:N]`` makes the N-th (default first) arrival at POINT create the
file named by ``TIERSTORE_CKPT_PAUSE_FILE`` (if set) and sleep forever. Points, in write order:

- ``snapshot``: the caller's part done (modified-row records taken; "sync": rows copied),
  nothing written;
- ``begin``: the checkpoint directory exists, no chunk yet;
- ``chunk``: after each chunk file is written (``chunk:3`` = after the third);
- ``manifest``: ``manifest.json.tmp`` written and fsynced, not yet renamed (not committed);
- ``committed``: the manifest renamed into place, retention not yet run;
- ``retention``: a checkpoint renamed to ``.del-<name>``, its files not yet removed.

Unset (always, outside tests) a pause costs one dict lookup.
"""

from __future__ import annotations

import os
import time

_counts: dict[str, int] = {}


def pause(point: str) -> None:
    spec = os.environ.get("TIERSTORE_CKPT_PAUSE")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != int(nth or 1):
        return
    marker = os.environ.get("TIERSTORE_CKPT_PAUSE_FILE")
    if marker:
        with open(marker, "w") as f:
            f.write(point)
    while True:
        time.sleep(3600)
