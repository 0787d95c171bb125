"""hivemind's child process (the DHT, fork()ed, with its p2pd): starting it safely, waiting on it
without hanging when it dies, telling a crash from a stop, and making it die with its parent.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from . import hivemind_compat  # noqa: F401  (before hivemind is imported)

log = logging.getLogger(__name__)

T = TypeVar("T")
P = TypeVar("P")

READY_TIMEOUT_S = 120.0  # the DHT process starts in ~1 s; 120 s covers a heavily loaded machine
PARENT_POLL_S = 1.0      # how often a hivemind child looks whether the process that started it is gone

# Set in the parent around the fork()s of start_children; a child forked while it is set watches its parent.
_forking_children = False


def _children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (Linux /proc; [] elsewhere)."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in filter(str.isdigit, entries):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


def _watch_parent() -> None:
    """In a forked hivemind child (the DHT): when the process that forked it dies (kill -9, the OOM
    killer), take this child's own children (hivemind's p2pd daemon) and exit. Without it they outlived a
    killed worker, holding ports and GiBs. A polling thread, not PR_SET_PDEATHSIG: that signal follows the
    forking *thread*, and executors fork from threads that end while their children must live on."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        for pid in _children_of(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _after_fork_in_child() -> None:
    global _forking_children
    if _forking_children:
        _forking_children = False
        _watch_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextmanager
def fork_safely() -> Iterator[None]:
    """Around the start of hivemind's DHT, a fork()ed child process.

    A forked child runs the garbage collector on its copy of the parent's objects; freeing some of them
    there (gRPC's channels and calls, held by the worker daemon and by test processes) is not safe after
    fork and crashed a DHT child with SIGSEGV in a full test run, leaving its parent waiting. So: collect
    the parent's garbage first, then freeze every object, so the child's collector never touches them
    (the recipe of the `gc.freeze` documentation); the parent unfreezes once its children exist."""
    global _forking_children
    gc.collect()
    gc.freeze()
    _forking_children = True  # the children forked here watch this process (_watch_parent)
    try:
        yield
    finally:
        _forking_children = False
        gc.unfreeze()


# a child killed by one of these was asked to stop; any other signal is a crash
STOP_SIGNALS = {int(signal.SIGTERM), int(signal.SIGINT), int(signal.SIGKILL), int(signal.SIGHUP)}


class ChildDied(RuntimeError):
    """A hivemind process (the DHT) died; what the parent waited for from it will never come."""

    def __init__(self, what: str, exitcode: int | None):
        super().__init__(f"{what}: its hivemind process died (exit code {exitcode})")
        self.exitcode = exitcode

    @property
    def crashed(self) -> bool:
        """Killed by a fault (SIGSEGV, SIGBUS, SIGABRT, ...), not asked to stop (SIGTERM, SIGINT, SIGKILL)."""
        return self.exitcode is not None and self.exitcode < 0 and -self.exitcode not in STOP_SIGNALS


def child_result(wait: Callable[[float], T], process, what: str, timeout: float | None = None) -> T:
    """`wait(t)` (an MPFuture's result, a wait_until_ready) answered by hivemind's child `process`.

    hivemind's futures are resolved by the child through a pipe: when the child dies, they wait forever
    (its wait_until_ready and DHT calls have no deadline of their own). Poll instead, and raise ChildDied
    when the child is gone, TimeoutError after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return wait(1.0)
        except TimeoutError:
            if not process.is_alive():
                raise ChildDied(what, process.exitcode) from None
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{what}: no answer from its hivemind process within {timeout:.0f} s") from None


def start_children(makers: dict[str, Callable[[], P]], what: Callable[[str], str], attempts: int = 3) -> dict[str, P]:
    """Start hivemind processes (`makers[name]()` builds one unstarted) and wait until all are ready.

    All are fork()ed under one fork_safely (its full garbage collection is the slow part) and start in
    parallel. A child that crashes while starting (killed by a fault inherited from the parent's state,
    see fork_safely) is replaced, up to `attempts` times; one that was stopped (SIGTERM to the process
    group) or reported an error of its own is not. On failure, every child started here is stopped."""
    ready: dict[str, P] = {}
    pending = dict(makers)
    try:
        for attempt in range(1, attempts + 1):
            started = {name: make() for name, make in pending.items()}
            with fork_safely():
                for child in started.values():
                    child.start()
            ready.update(started)
            pending = {}
            for name, child in started.items():
                try:
                    child_result(child.wait_until_ready, child, what(name), READY_TIMEOUT_S)
                except ChildDied as e:
                    if not e.crashed or attempt == attempts:
                        raise
                    log.warning("%s (attempt %d of %d); starting it again", e, attempt, attempts)
                    pending[name] = makers[name]
            if not pending:
                return ready
        raise AssertionError("unreachable")
    except BaseException:
        for child in ready.values():
            if child.is_alive():
                child.shutdown()
        raise


def start_dht(**kwargs):
    """hivemind.DHT(**kwargs), started and ready; see start_children."""
    import hivemind

    return start_children({"dht": lambda: hivemind.DHT(start=False, **kwargs)}, lambda _: "the DHT")["dht"]
