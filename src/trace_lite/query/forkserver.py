"""The fork server: one process that forks each query's sandbox, warm.

Started by ``runner.ForkServer`` as ``python -I -m trace_lite.query.forkserver`` with the same
minimal environment as a sandbox (no credentials), in its own session, with the sandbox's OS
limits already set (``sandbox.apply_limits``). It imports DuckDB once and closes DuckDB's default
database, so no DuckDB instance and no thread exists when it forks (DuckDB's import opens a
default in-memory database with a scheduler thread; a fork copies only the forking thread).
Then it waits on its standard input, a ``SOCK_SEQPACKET`` socket only the server holds:

* the server sends ``scratch path`` with three file descriptors attached (``SCM_RIGHTS``): the
  new sandbox's stdin, stdout and stderr pipes. The fork server forks; the child starts a new
  session, puts the pipes on 0, 1 and 2, closes every other descriptor (the control socket
  among them), moves into its private directory and runs ``sandbox.serve``: exactly what
  ``python -I -m trace_lite.query.sandbox`` does after its imports. The fork server answers
  ``F`` + the child's pid, with a pidfd attached (``os.pidfd_open``: the server signals and
  watches that process, never a reused pid), once the child has closed every inherited
  descriptor (a pipe's write end it closes with the rest tells the fork server so).
* when a child ends, the fork server reaps it and sends ``X`` + pid + exit code
  (``os.waitstatus_to_exitcode``: ``-9`` for SIGKILL).

It holds nothing a query could use: no request ever reaches it (requests go to the child's
stdin). When the server closes the socket (or goes away) it kills the children it has not
reaped yet, reaps them and exits: no sandbox outlives it.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import signal
import socket
import struct
from typing import NoReturn

from trace_lite.query import sandbox

#: ``F``/``X`` + pid + exit code (0 for ``F``).
REPLY = struct.Struct("!cii")
#: One fork request: the scratch path (bytes) with the child's stdin, stdout, stderr attached.
MAX_REQUEST = 4096
FDS_PER_REQUEST = 3


def _child(control: socket.socket, fds: list[int], scratch: str) -> NoReturn:
    """In the forked child: become the sandbox of one query. Never returns."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        control.detach()  # fd 0: replaced by the child's stdin below, never used or closed here
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        # the control socket (now gone from 0), the wake-up pipe, the received originals
        os.closerange(FDS_PER_REQUEST, sandbox.NOFILE_LIMIT)
        os.chdir(scratch)
        os.environ["HOME"] = scratch
        os.environ["TMPDIR"] = scratch
        sandbox.serve(sandbox.connect())
    finally:
        os._exit(70)


def _reap(control: socket.socket, children: set[int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        control.sendmsg([REPLY.pack(b"X", pid, os.waitstatus_to_exitcode(status))])


def serve(control: socket.socket, children: set[int]) -> None:
    """Fork a sandbox per request until the server closes ``control``; ``children`` holds the
    pids of the children not reaped yet."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    while True:
        readable, _, _ = select.select([control.fileno(), wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 512)
            _reap(control, children)
        if control.fileno() not in readable:
            continue
        fds = array.array("i")
        data, ancillary, _flags, _addr = control.recvmsg(
            MAX_REQUEST, socket.CMSG_SPACE(FDS_PER_REQUEST * fds.itemsize)
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data:
            return  # the server is gone
        received = list(fds)
        if len(received) != FDS_PER_REQUEST:
            for fd in received:
                os.close(fd)
            continue
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            _child(control, received, os.fsdecode(data))
        children.add(pid)
        for fd in (*received, ready_w):
            os.close(fd)
        # EOF once the child closed every descriptor but its pipes (``ready_w`` among them):
        # the server is answered only when the sandbox holds nothing of this process
        os.read(ready_r, 1)
        os.close(ready_r)
        pidfd = os.pidfd_open(pid)
        try:
            control.sendmsg(
                [REPLY.pack(b"F", pid, 0)],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))],
            )
        finally:
            os.close(pidfd)


def main() -> None:
    sandbox.apply_limits()
    import duckdb

    from trace_core import query_gate  # noqa: F401

    # DuckDB's import opened its default database (a scheduler thread): closed before any fork
    duckdb.default_connection().close()
    children: set[int] = set()
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            serve(socket.socket(fileno=0), children)
    finally:
        # the server is gone (or closed the pool): no sandbox outlives the fork server. These
        # are its own unreaped children, so no pid here can have been reused.
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        os._exit(0)


if __name__ == "__main__":
    main()
