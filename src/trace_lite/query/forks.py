"""This server's handle on the query fork server (``trace_lite.query.forkserver``).

``ForkServer`` starts the fork server and asks it for sandboxes; each comes back as a
``ForkedProcess``: the fork server's child, not this process's, with the surface of an
``asyncio.subprocess.Process`` (``pid``, ``returncode``, ``stdin``, ``stdout``, ``stderr``,
``communicate``, ``wait``), signalled and watched through its pidfd. The protocol (one
``SOCK_SEQPACKET`` message per request and per answer, descriptors passed with ``SCM_RIGHTS``)
is described in ``trace_lite.query.forkserver``. ``runner.SandboxPool`` is the only user.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import sys
from pathlib import Path

from trace_core import errors
from trace_lite.query.forkserver import REPLY

#: Seconds a closing fork server gets to kill and reap its sandboxes before it is killed.
CLOSE_WAIT_S = 5.0


class ForkedProcess:
    """A sandbox process the fork server forked: the same surface as the
    ``asyncio.subprocess.Process`` of a started one (``pid``, ``returncode``, ``stdin``,
    ``stdout``, ``stderr``, ``communicate``, ``wait``). It is the fork server's child, not this
    process's: it is signalled and watched through its pidfd (never a reused pid), and its exit
    code comes from the fork server."""

    def __init__(
        self,
        pid: int,
        pidfd: int,
        exited: asyncio.Future[int],
        stdin: asyncio.StreamWriter,
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
    ) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._pidfd = pidfd
        self._exited = exited

    def running(self) -> bool:
        """Whether the process is still running (its pidfd turns readable when it ends)."""
        if self.returncode is not None or self._pidfd < 0:
            return False
        ready, _, _ = select.select([self._pidfd], [], [], 0)
        return not ready

    def kill(self) -> None:
        if self.returncode is None and self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def close(self) -> None:
        """Let go of a process that will not be waited for (killed first): its pidfd and its
        stdin. Its exit is still reaped and reported by the fork server."""
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        if not self.stdin.is_closing():
            self.stdin.close()

    async def wait(self) -> int:
        code = await asyncio.shield(self._exited)
        if code == -1:  # the fork server ended before reporting: make sure, then wait for it
            self.kill()
            await self._pidfd_readable()
        self.returncode = code
        self.close()
        return code

    async def _pidfd_readable(self) -> None:
        if self._pidfd < 0 or not self.running():
            return
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(self._pidfd, readable)
        try:
            await ended
        finally:
            loop.remove_reader(self._pidfd)

    async def communicate(self, data: bytes) -> tuple[bytes, bytes]:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.stdin.write(data)
            await self.stdin.drain()
        self.stdin.close()
        out, err = await asyncio.gather(self.stdout.read(), self.stderr.read())
        await self.wait()
        return out, err


class ForkServer:
    """This server's side of the fork server (``trace_lite.query.forkserver``): one process,
    started like a sandbox (``python -I``, the minimal environment, its own session, the
    sandbox's OS limits) with DuckDB imported, that forks one fresh child per sandbox. A
    sandbox costs a fork (a few ms) instead of a Python and DuckDB start (~0.2 s of CPU)."""

    def __init__(
        self, proc: asyncio.subprocess.Process, control: socket.socket, home: Path
    ) -> None:
        self._proc = proc
        self._control = control
        self._home = home
        self._forks: list[asyncio.Future[tuple[int, int]]] = []
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._loop.add_reader(control.fileno(), self._readable)

    @classmethod
    async def start(cls, home: Path, env: dict[str, str]) -> ForkServer:
        """Start the fork server in ``home`` (its working directory, removed when it is
        closed) with exactly the environment ``env``. Raises ``Unavailable``."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-m",
                "trace_lite.query.forkserver",
                stdin=theirs.fileno(),
                stdout=asyncio.subprocess.DEVNULL,
                env=env,
                cwd=home,
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            shutil.rmtree(home, ignore_errors=True)
            raise errors.Unavailable("the query fork server could not start") from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        return cls(proc, ours, home)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return not self._closed and self._proc.returncode is None

    def _readable(self) -> None:
        while True:
            fds = array.array("i")
            try:
                data, ancillary, _flags, _addr = self._control.recvmsg(
                    64, socket.CMSG_SPACE(fds.itemsize)
                )
            except BlockingIOError:
                return
            except OSError:
                data, ancillary = b"", []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            if not data:
                self._gone()
                return
            kind, pid, code = REPLY.unpack(data)
            if kind == b"F" and self._forks and len(fds) == 1:
                self._exits[pid] = self._loop.create_future()
                future = self._forks.pop(0)
                if not future.done():
                    future.set_result((pid, fds[0]))
                else:  # the caller gave up: let the child go
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fds[0], signal.SIGKILL)
                    os.close(fds[0])
            elif kind == b"X":
                exited = self._exits.pop(pid, None)
                if exited is not None and not exited.done():
                    exited.set_result(code)
            else:
                for fd in fds:
                    os.close(fd)

    def _gone(self) -> None:
        """The fork server ended or is being closed: pending forks fail; children it forked are
        reported as ended with an unknown exit code (-1) once their pidfd says so (it kills
        them as it exits)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._control.fileno())
        self._control.close()
        for future in self._forks:
            if not future.done():
                future.set_exception(errors.Unavailable("the query fork server ended"))
        self._forks.clear()
        for exited in self._exits.values():
            if not exited.done():
                exited.set_result(-1)
        self._exits.clear()

    async def fork(self, scratch: Path) -> ForkedProcess:
        """A new sandbox process in ``scratch``, waiting for its request. Raises
        ``Unavailable``."""
        if not self.alive:
            raise errors.Unavailable("the query fork server ended")
        pipes = [os.pipe() for _ in range(3)]  # stdin, stdout, stderr
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1]]
        future: asyncio.Future[tuple[int, int]] = self._loop.create_future()
        try:
            self._control.sendmsg(
                [os.fsencode(str(scratch))],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", theirs))],
            )
            self._forks.append(future)
        except OSError as exc:
            for r, w in pipes:
                os.close(r)
                os.close(w)
            raise errors.Unavailable("the query fork server is not answering") from exc
        finally:
            for fd in theirs:
                with contextlib.suppress(OSError):
                    os.close(fd)
        ours = [pipes[0][1], pipes[1][0], pipes[2][0]]
        try:
            pid, pidfd = await future
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        exited = self._exits.get(pid)
        if exited is None:  # closed meanwhile
            exited = self._loop.create_future()
            exited.set_result(-1)
        stdin = await _pipe_writer(ours[0])
        stdout, stderr = await _pipe_reader(ours[1]), await _pipe_reader(ours[2])
        return ForkedProcess(pid, pidfd, exited, stdin, stdout, stderr)

    async def close(self) -> None:
        """Stop the fork server: closing its socket makes it kill and reap the sandboxes it
        forked that are still running (a fork still on its way among them), then exit."""
        self._gone()
        try:
            await asyncio.wait_for(self._proc.wait(), CLOSE_WAIT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            await self._proc.wait()
        shutil.rmtree(self._home, ignore_errors=True)


async def _pipe_reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**16, loop=loop)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), os.fdopen(fd, "rb", buffering=0)
    )
    return reader


async def _pipe_writer(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.streams.FlowControlMixin(loop=loop), os.fdopen(fd, "wb", buffering=0)
    )
    return asyncio.StreamWriter(transport, protocol, None, loop)
