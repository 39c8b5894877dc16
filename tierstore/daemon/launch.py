"""Start and stop a ``tierstored`` as a child process (tests, benchmarks, and the training
command's private service)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Sequence

from tierstore.errors import ConnectionLost, TierstoreError


class ServiceProcess:
    """A ``tierstored`` subprocess (``python -m tierstore.daemon``) with run and data
    directories under ``root`` (unless given); its log goes to ``root/tierstored.log``."""

    def __init__(self, root: str, ddr_bytes: int | str, policy: str = "adaptive",
                 extra: Sequence[str] = (), log_level: str = "warning",
                 run_dir: str | None = None, data_dir: str | None = None) -> None:
        self.root = os.fspath(root)
        self.run_dir = run_dir or os.path.join(self.root, "run")
        self.data_dir = data_dir or os.path.join(self.root, "data")
        self.log_path = os.path.join(self.root, "tierstored.log")
        self.ddr_bytes = ddr_bytes
        self.policy = policy
        self.extra = list(extra)
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> "ServiceProcess":
        """Start and wait until it accepts clients; TierstoreError (with its log) if it
        exits or does not come up within ``timeout`` s."""
        from tierstore.client import connect
        os.makedirs(self.root, exist_ok=True)
        cmd = [sys.executable, "-m", "tierstore.daemon", "--run-dir", self.run_dir,
               "--data-dir", self.data_dir, "--ddr-bytes", str(self.ddr_bytes),
               "--policy", self.policy, "--log-level", self.log_level, *self.extra]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TierstoreError(f"tierstored exited with {self.proc.returncode}: "
                                     f"{self.logs()}")
            try:
                connect(self.run_dir).close()
                return self
            except ConnectionLost:
                time.sleep(0.05)
        self.stop()
        raise TierstoreError(f"tierstored did not start within {timeout:g} s: {self.logs()}")

    def connect(self, mode: str = "write"):
        from tierstore.client import connect
        return connect(self.run_dir, mode=mode)

    def logs(self) -> str:
        """The last 4000 characters of its log."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-4000:].decode(errors="replace")
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """utime + stime of the service process so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int | None:
        """Send ``sig`` (SIGTERM: write back dirty rows, exit 0) and wait; SIGKILL if it
        hangs. Returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
