"""Signal handling for a worker run with ``capture_signals=True`` (the CLI): installed on the event loop
when ``run()`` starts, the previous handlers restored when it returns."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable

__all__ = ["install"]

log = logging.getLogger(__name__)


def install(
    *,
    shutdown: Callable[[], None],
    cancel_handlers: Callable[[], None],
    status: Callable[[], str],
) -> Callable[[], None]:
    """SIGTERM and a first SIGINT call ``shutdown``, a second SIGINT ``cancel_handlers``; SIGUSR1 logs
    ``status()``. Returns the function that restores the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("capture_signals=True needs run() on the main thread")
    loop = asyncio.get_running_loop()
    sigints = 0

    def on_sigint() -> None:
        nonlocal sigints
        sigints += 1
        if sigints == 1:
            log.info("SIGINT: shutting down gracefully (again to stop at once)")
            shutdown()
        else:
            log.warning("second SIGINT: cancelling running handlers")
            cancel_handlers()

    def on_sigterm() -> None:
        log.info("SIGTERM: shutting down gracefully")
        shutdown()

    def on_sigusr1() -> None:
        log.warning("status: %s", status())

    handlers = {signal.SIGINT: on_sigint, signal.SIGTERM: on_sigterm, signal.SIGUSR1: on_sigusr1}
    previous = {sig: signal.getsignal(sig) for sig in handlers}
    for sig, fn in handlers.items():
        loop.add_signal_handler(sig, fn)

    def restore() -> None:
        for sig, old in previous.items():
            loop.remove_signal_handler(sig)
            if old is not None:
                signal.signal(sig, old)

    return restore
