"""A seccomp filter that leaves a sandbox unable to write, create, rename or remove any file.

Installed by the sandbox (``sandbox.serve``) once its database is open and before it reads its
request, so it covers everything the user SQL can make DuckDB do. Kernel-enforced, whatever
DuckDB's own settings allow: ``open``/``openat`` with a write, create, truncate or append flag
and every call that changes a file system entry (``rename``, ``unlink``, ``mkdir``, ``link``,
``chmod``, ``truncate``, ``utimensat``, ...) fail with ``EACCES``; ``openat2`` (whose flags a
filter cannot read) and ``io_uring_setup`` too. Writes to descriptors the process already holds
(its stdout, its stderr) are untouched. A system call of another ABI (32-bit, x32) kills the
process. x86_64 Linux only (``AVAILABLE``); elsewhere the sandbox's inputs are copied instead of
linked (``runner._stage``).

With this filter the sandbox's views can read the store's files through symbolic links in its
private directory: DuckDB may write a file it may read (``allowed_paths``), but this process
cannot open any file for writing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

#: Whether this machine can install the filter (the syscall numbers below are x86_64's).
AVAILABLE = platform.system() == "Linux" and platform.machine() == "x86_64"

_AUDIT_ARCH_X86_64 = 0xC000003E
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_DENY = 0x00050000 | errno.EACCES  # SECCOMP_RET_ERRNO
_LD_W_ABS, _JEQ_K, _JGE_K, _AND_K, _RET_K = 0x20, 0x15, 0x35, 0x54, 0x06
_X32_SYSCALL_BIT = 0x40000000
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_OPEN, _OPENAT = 2, 257
#: x86_64 system calls that create, change or remove a file system entry, or open files in ways
#: a filter cannot inspect.
_DENIED = (
    76,  # truncate
    82,  # rename
    83,  # mkdir
    84,  # rmdir
    85,  # creat
    86,  # link
    87,  # unlink
    88,  # symlink
    90,  # chmod
    92,  # chown
    94,  # lchown
    132,  # utime
    133,  # mknod
    235,  # utimes
    258,  # mkdirat
    259,  # mknodat
    260,  # fchownat
    261,  # futimesat
    263,  # unlinkat
    264,  # renameat
    265,  # linkat
    266,  # symlinkat
    268,  # fchmodat
    280,  # utimensat
    304,  # open_by_handle_at
    316,  # renameat2
    425,  # io_uring_setup
    437,  # openat2
    452,  # fchmodat2
)
_PR_SET_NO_NEW_PRIVS = 38
_SYS_SECCOMP = 317
_SECCOMP_SET_MODE_FILTER = 1
_TSYNC = 1  # SECCOMP_FILTER_FLAG_TSYNC


def program() -> list[tuple[int, int, int, int]]:
    """The classic BPF program: ``(code, jt, jf, k)`` per instruction."""
    code: list[tuple[int, str | int, str | int, int]] = []
    labels: dict[str, int] = {}

    def op(c: int, k: int, jt: str | int = 0, jf: str | int = 0) -> None:
        code.append((c, jt, jf, k))

    def label(name: str) -> None:
        labels[name] = len(code)

    op(_LD_W_ABS, 4)  # seccomp_data.arch
    op(_JEQ_K, _AUDIT_ARCH_X86_64, 0, "kill")
    op(_LD_W_ABS, 0)  # seccomp_data.nr
    op(_JGE_K, _X32_SYSCALL_BIT, "kill", 0)
    for nr in _DENIED:
        op(_JEQ_K, nr, "deny", 0)
    op(_JEQ_K, _OPEN, "open", 0)
    op(_JEQ_K, _OPENAT, "openat", 0)
    op(_RET_K, _RET_ALLOW)
    for name, arg in (("open", 1), ("openat", 2)):
        label(name)
        op(_LD_W_ABS, 16 + 8 * arg)  # seccomp_data.args[arg], low 32 bits (little-endian)
        op(_AND_K, _WRITE_FLAGS)
        op(_JEQ_K, 0, "allow", "deny")
    label("allow")
    op(_RET_K, _RET_ALLOW)
    label("deny")
    op(_RET_K, _RET_DENY)
    label("kill")
    op(_RET_K, _RET_KILL_PROCESS)

    def target(at: int, jump: str | int) -> int:
        if isinstance(jump, int):
            return jump
        offset = labels[jump] - at - 1
        assert 0 <= offset < 256
        return offset

    return [(c, target(i, jt), target(i, jf), k) for i, (c, jt, jf, k) in enumerate(code)]


class FilterError(OSError):
    """The filter could not be installed."""


def install() -> None:
    """Install the filter on every thread of this process (and those it starts later).
    Raises ``FilterError``."""
    if not AVAILABLE:
        raise FilterError("the no-write filter needs x86_64 Linux")
    libc = ctypes.CDLL(None, use_errno=True)
    instructions = program()
    raw = b"".join(struct.pack("=HBBI", c, jt, jf, k) for c, jt, jf, k in instructions)
    buffer = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(instructions), ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise FilterError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    # every thread of the process at once (DuckDB's workers already run): TSYNC
    if libc.syscall(_SYS_SECCOMP, _SECCOMP_SET_MODE_FILTER, _TSYNC, ctypes.byref(fprog)) != 0:
        raise FilterError(ctypes.get_errno(), "seccomp(SECCOMP_SET_MODE_FILTER, TSYNC)")
