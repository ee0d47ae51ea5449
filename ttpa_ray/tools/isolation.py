"""Linux namespaces for a sandbox worker: no network, a read-only filesystem except its scratch
folder, and a cap on its processes.

:func:`isolate` runs in a fresh worker, before it serves any call:

- a new network namespace (``CLONE_NEWNET``): no interface but a loopback that is down, so nothing
  the tool does (``socket``, a subprocess such as ``curl``, ctypes) reaches any address;
- a new mount namespace (``CLONE_NEWNS``) in which every mount is made read-only, recursively
  (``mount_setattr``), except the worker's scratch folder, bind-mounted onto itself and left
  writable; the worker's working directory and ``TMPDIR`` are that folder;
- a process cap: ``RLIMIT_NPROC``; the kernel does not apply it to root, so a worker running as root
  (containers) gets a ``pids`` cgroup of its own with ``pids.max`` instead, which the pool removes
  with the worker;
- a non-root worker makes its namespaces inside a user namespace of its own.

Every step that the machine refuses (no unprivileged user namespaces, an old kernel, a container
without the capability) is reported, not fatal: the pool then runs with the guard it always has (the
``socket`` patch, the memory and time caps) and says once what is not enforced (``ttpa doctor``
reports it too).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (Linux 5.12+)
CGROUP_BASES = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup")  # v1 pids, then v2


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount_setattr(path: str, *, set_: int = 0, clear: int = 0, recursive: bool = False) -> None:
    attr = _MountAttr(attr_set=set_, attr_clr=clear)
    flags = AT_RECURSIVE if recursive else 0
    result = _libc.syscall(
        SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    _check(result, f"mount_setattr {path}")


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(text)


def cap_processes(max_processes: int) -> tuple[str | None, str | None]:
    """Cap the tasks of this process and its descendants: (cgroup made or None, what is not enforced)."""
    if os.getuid() != 0:
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
        return None, None
    for base in CGROUP_BASES:
        if not os.access(os.path.join(base, "cgroup.procs"), os.W_OK):
            continue
        path = os.path.join(base, f"ttpa-tool-{os.getpid()}")
        try:
            os.mkdir(path)
            if not os.path.exists(os.path.join(path, "pids.max")):  # v2 without the pids controller
                os.rmdir(path)
                continue
            _write(os.path.join(path, "pids.max"), str(max_processes))
            _write(os.path.join(path, "cgroup.procs"), str(os.getpid()))
            return path, None
        except OSError:
            remove_cgroup(path)
    return None, "process cap: root ignores RLIMIT_NPROC and no writable pids cgroup was found"


def remove_cgroup(path: str | None) -> None:
    """Remove a cgroup :func:`cap_processes` made, once its processes are gone (best effort)."""
    if path is not None:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def isolate(scratch: str, *, network: bool) -> list[str]:
    """Put this process in its own namespaces (see the module doc); what could not be enforced.

    Call it in a single-threaded process that owns nothing outside ``scratch`` it must write to.
    """
    missing: list[str] = []
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | (0 if network else CLONE_NEWNET) | (CLONE_NEWUSER if uid != 0 else 0)
    try:
        _check(_libc.unshare(flags), "unshare")
        if uid != 0:  # map ourselves, so that the mounts below are ours to change
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"{uid} {uid} 1")
            _write("/proc/self/gid_map", f"{gid} {gid} 1")
    except OSError as err:
        return [f"namespaces ({err}): network and filesystem are guarded, not isolated"]
    try:
        _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount private /")
        _check(_libc.mount(scratch.encode(), scratch.encode(), None, MS_BIND | MS_REC, None), "bind scratch")
        _mount_setattr("/", set_=MOUNT_ATTR_RDONLY, recursive=True)
        _mount_setattr(scratch, clear=MOUNT_ATTR_RDONLY)  # the bind copied the read-only flag
    except OSError as err:
        missing.append(f"read-only filesystem ({err}): tools may write anywhere this user can")
    os.chdir(scratch)
    os.environ["TMPDIR"] = os.environ["HOME"] = scratch
    return missing
