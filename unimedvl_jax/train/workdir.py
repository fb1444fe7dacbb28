"""One run per workdir: an exclusive lock on `WORKDIR/.lock` while a run uses it.

    with WorkdirLock(workdir):        # raises WorkdirBusyError naming the holder
      ...

The lock is a `flock` on the lock file (one file per process index of a multi-process run:
`.lock`, `.lock.process_1`, ...). The holder writes its pid, host, start time and command line
into the file so a second run can name it. The kernel releases the lock when the holder exits,
however it exits (kill -9 included), so a lock file left by a dead process never blocks: the
next run simply takes it. On a filesystem without flock support the run goes on unlocked, with a
warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir."""


def lock_path(workdir: str, process_index: int = 0) -> str:
  name = '.lock' if process_index == 0 else f'.lock.process_{process_index}'
  return os.path.join(os.path.abspath(workdir), name)


def _describe(info: str) -> str:
  try:
    d = json.loads(info)
    return (f"pid {d.get('pid')} on host {d.get('host')!r} (started {d.get('started')}: "
            f"{d.get('command', '')[:200]})")
  except (ValueError, AttributeError):
    return 'a process that left no description' if not info.strip() else info.strip()[:200]


class WorkdirLock:
  """An exclusive, non-blocking lock on a workdir; a context manager (or acquire / release)."""

  def __init__(self, workdir: str, process_index: int = 0):
    self.workdir = os.path.abspath(workdir)
    self.path = lock_path(workdir, process_index)
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> 'WorkdirLock':
    if self._fd is not None:
      return self
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, 'O_CLOEXEC', 0), 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        try:
          holder = os.pread(fd, 4096, 0).decode('utf-8', errors='replace')
        finally:
          os.close(fd)
        raise WorkdirBusyError(
            f'workdir {self.workdir} is in use by another run: {_describe(holder)}. Wait for it '
            f'to finish (or stop it), or use another workdir. The lock ({self.path}) is '
            'released when that process exits.') from None
      os.close(fd)   # ENOLCK / EOPNOTSUPP: a filesystem without flock
      print(f'WARNING: cannot lock {self.path} ({e.strerror}); nothing stops a second run on '
            'this workdir', file=sys.stderr, flush=True)
      return self
    info = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                       'started': time.strftime('%Y-%m-%d %H:%M:%S %z'),
                       'command': ' '.join(sys.argv)})
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode() + b'\n', 0)
    self._fd = fd
    return self

  def release(self) -> None:
    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
      pass
    finally:
      os.close(fd)

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  def __del__(self):
    try:
      self.release()
    except Exception:  # noqa: BLE001  (interpreter shutdown)
      pass
