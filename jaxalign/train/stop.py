"""Stopping on SIGTERM / SIGINT (Ctrl-C): save what can be saved, then exit non-zero.

A training command calls `install()` as its first statement (and again once `jax.distributed` is initialised,
which sets a SIGTERM handler of its own). From then on a signal is never turned into an exception in the middle of
library code (where it can be swallowed, `Exception ignored in: <function _xla_gc_callback ...>`, or end in a
segmentation fault): the C-level signal handler wakes a watcher thread, which

- while the loop can save (inside `deferred()`, after its first step) records the request: the loop finishes the
  step, saves, and raises `TrainingStopped`;
- at any other moment (imports, loading, compiling, exporting) or on a second signal, exits the process at once
  with status 128 + the signal number: 130 for SIGINT, 143 for SIGTERM. Checkpoints are written to a temporary
  folder and renamed when complete, so an exit never leaves a damaged one.

Without `install()` (the library used from Python), `deferred()` installs handlers only while the loop runs and
hands a signal the loop cannot defer to the handler that was there before (Ctrl-C raises KeyboardInterrupt).
"""

import contextlib
import os
import select
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(SystemExit):
    """Training stopped by a signal after saving what it could. `code` is the exit status (128 + the signal number:
    130 for SIGINT, 143 for SIGTERM), so a script that does not catch it exits with that status and no traceback."""

    def __init__(self, signal_number: int, message: str):
        super().__init__(128 + signal_number)
        self.signal_number = signal_number
        self.message = message

    def __str__(self) -> str:
        return self.message


class StopRequest:
    """The first signal received while the loop can save: `signal_number` (None until one arrives)."""

    def __init__(self):
        self.signal_number: int | None = None
        self.armed = False

    def arm(self) -> None:
        """From now on a signal is recorded instead of ending the process (call once there is progress to save)."""
        self.armed = True

    @property
    def signal_name(self) -> str | None:
        return None if self.signal_number is None else signal.Signals(self.signal_number).name

    def receive(self, signal_number: int) -> bool:
        """Records the signal; False when it cannot be deferred (not armed yet, or a second signal)."""
        if not self.armed or self.signal_number is not None:
            return False
        self.signal_number = signal_number
        return True


_current: StopRequest | None = None
_installed = False
_claimed: list[signal.Signals] = []


def install() -> None:
    """Routes SIGTERM and SIGINT of this process through the watcher thread for the rest of its life. Call from the
    main thread before importing JAX, and again after `jax.distributed.initialize`, which puts a SIGTERM handler of
    its own in place (calling again takes the signals back)."""
    global _installed
    if not _installed:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        # a signal ignored from the start (SIGINT of a background job) stays ignored
        _claimed.extend(sig for sig in SIGNALS if signal.getsignal(sig) != signal.SIG_IGN)
        threading.Thread(target=_watch, args=(read_fd,), name="jaxalign-signals", daemon=True).start()
        _installed = True
    for sig in _claimed:
        signal.signal(sig, _ignore_in_main_thread)


@contextlib.contextmanager
def deferred():
    """Context manager of the training loop: yields the `StopRequest` that signals fill once it is armed."""
    global _current
    request = StopRequest()
    previous = {}

    def handle_in_main_thread(signum, frame):
        if request.receive(signum):
            return
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler != signal.SIG_IGN:
            _exit(signum)

    if threading.current_thread() is threading.main_thread():
        if _installed:
            install()
        else:
            for sig in SIGNALS:
                previous[sig] = signal.signal(sig, handle_in_main_thread)
    outer, _current = _current, request
    try:
        yield request
    finally:
        _current = outer
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_in_main_thread(signum, frame):
    """Installed so that the C-level handler runs and wakes the watcher; the watcher acts."""


def _watch(read_fd: int) -> None:
    while True:
        select.select([read_fd], [], [])
        for signum in os.read(read_fd, 64):
            if signum not in SIGNALS:
                continue
            request = _current
            if request is None or not request.receive(signum):
                _exit(signum)


def _exit(signum: int) -> None:
    name = signal.Signals(signum).name
    print(f"\njaxalign: {name}: exiting now (status {128 + signum}); the last complete checkpoint, if any, is kept; "
          "run the same command again to resume", file=sys.stderr, flush=True)
    os._exit(128 + signum)
