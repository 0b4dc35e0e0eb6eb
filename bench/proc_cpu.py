"""CPU time of a process, from Linux's /proc: what a router spent over a benchmark run."""

from __future__ import annotations

import os
from pathlib import Path

_PROC = Path("/proc")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's ``st`` column


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds the process ``pid`` has used so far (its threads included)."""
    # the command name (field 2) may hold spaces and parentheses: split after its closing one
    fields = (_PROC / str(pid) / "stat").read_text().rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), counted from 1
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def listening_pid(port: int) -> int:
    """The pid of the process that listens on TCP ``port`` (any address); LookupError when none of this user's
    processes does."""
    inodes = {_listening_inode(line, port) for name in ("tcp", "tcp6") for line in _table(name)} - {None}
    if not inodes:
        raise LookupError(f"port {port}: nothing listens on it")
    sockets = {f"socket:[{inode}]" for inode in inodes}
    for process in _PROC.iterdir():
        if process.name.isdigit() and any(_link(fd) in sockets for fd in _fds(process)):
            return int(process.name)
    raise LookupError(f"port {port}: its listener is not one of this user's processes")


def _table(name: str) -> list[str]:
    try:
        return (_PROC / "net" / name).read_text().splitlines()[1:]
    except OSError:
        return []


def _listening_inode(line: str, port: int) -> str | None:
    fields = line.split()
    local, state, inode = fields[1], fields[3], fields[9]
    return inode if state == _LISTEN and int(local.rpartition(":")[2], 16) == port else None


def _fds(process: Path) -> list[Path]:
    try:
        return list((process / "fd").iterdir())
    except OSError:  # gone, or another user's
        return []


def _link(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:
        return ""
