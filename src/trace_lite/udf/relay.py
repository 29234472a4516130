"""The first process of a UDF's network namespace (run by the runner under ``unshare --net
--pid --fork --kill-child``, with ``python -E -s -S``; standard library only).

It brings the namespace's loopback up, listens on ``127.0.0.1:<port>``, starts the runtime
(dropping to ``--uid``/``--gid`` first when given) with ``AWS_LAMBDA_RUNTIME_API`` and
``TRACE_TASK_API_URL`` pointing at that port, and relays every connection to the runner's unix
socket outside the namespace -- the only way out. It exits with the runtime's status (128 +
signal for a signal); as PID 1 of the namespace, its exit kills everything the UDF started.

    relay.py SOCKET PORT UID GID -- ARGV...
"""

import asyncio
import fcntl
import os
import socket
import struct
import sys

SIOCSIFFLAGS = 0x8914
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = IFF_UP | IFF_LOOPBACK | IFF_RUNNING
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags))


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except OSError:
            pass


async def main(sock_path: str, port: int, uid: int, gid: int, argv: list[str]) -> int:
    loopback_up()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(sock_path)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", port)
    env = dict(os.environ)
    env["AWS_LAMBDA_RUNTIME_API"] = f"127.0.0.1:{port}"
    env["TRACE_TASK_API_URL"] = f"http://127.0.0.1:{port}"

    def drop() -> None:
        if uid >= 0:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

    child = await asyncio.create_subprocess_exec(*argv, env=env, preexec_fn=drop)
    code = await child.wait()
    server.close()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sep = sys.argv.index("--")
    sock, port, uid, gid = sys.argv[1:sep]
    sys.stdout.flush()
    os._exit(asyncio.run(main(sock, int(port), int(uid), int(gid), sys.argv[sep + 1 :])))
