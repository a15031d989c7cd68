"""Processes a test starts, tagged in their environment so that all of them (and the detached
children Flower starts from them: SuperExec, ServerApp, ClientApp and local SuperLink processes,
which inherit the environment) are stopped at the end, whatever happened."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent
TAG = "FEDLORA_TEST_PROCESS"
START_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Processes started with a tag in their environment, stopped all at once at the end."""

    def __init__(self, folder: Path, flwr_home: Path) -> None:
        self.folder, self.tag = folder, uuid.uuid4().hex
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        """Start ``command`` in its own session, its output in ``FOLDER/name.log``."""
        with (self.folder / f"{name}.log").open("w") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, TAG: f"{self.tag}:{name}"},
                cwd=self.folder,
                start_new_session=True,
            )
        self.started.append(process)
        return process

    def run(self, command: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            command,
            check=False,
            capture_output=True,
            text=True,
            env={**self.env, TAG: f"{self.tag}:cli"},
            cwd=self.folder,
            timeout=timeout,
        )

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def kill(self, name: str = "") -> None:
        """SIGKILL every live process tagged with ``name`` (all of them for ""), children too."""
        prefix = f"{self.tag}:{name}".encode()
        for pid in tagged_pids(prefix):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
        for process in self.started:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        for process in self.started:
            process.wait(timeout=10)


def tagged_pids(prefix: bytes) -> list[int]:
    """This user's processes whose environment has the tag starting with ``prefix``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if any(v.startswith(TAG.encode() + b"=" + prefix) for v in environ.split(b"\0")):
            pids.append(int(entry.name))
    return pids


def wait_for(
    condition, what: str, timeout: float = START_TIMEOUT, every: float = 0.5, first_after: float = 0
) -> None:
    """Poll ``condition`` every ``every`` seconds, the first time after ``first_after`` seconds
    (where it cannot hold sooner), until it holds; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    time.sleep(first_after)
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(every)
