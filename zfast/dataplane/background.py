"""A call in a thread of its own: for ctypes calls into the kernel (making a map,
verifying a program), which run without the GIL while the caller goes on."""

from __future__ import annotations

import threading


class Background:
    """fn(*args), started now; wait() for its outcome."""

    def __init__(self, fn, *args, name: str | None = None):
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), name=name,
                                        daemon=True)
        self._thread.start()

    def _run(self, fn, *args) -> None:
        try:
            self._value = fn(*args)
        except BaseException as err:    # handed to whoever waits
            self._error = err

    def wait(self) -> tuple:
        """(its value, None) or (None, the exception it raised), once it is done."""
        self._thread.join()
        return self._value, self._error
