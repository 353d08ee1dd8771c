"""The ``aiomq`` commands that operate queues (DESIGN §7.6)::

    aiomq pause QUEUE | resume QUEUE
    aiomq queues
    aiomq prune --older-than 7d [--state S ...] [--queue Q] [--batch-size N] [--dry-run]

Each is an ``async def (source, args) -> str`` on an engine source; :mod:`aiomq.cli` connects, runs it and
prints what it returns.
"""

from __future__ import annotations

import argparse
import datetime
import re
from collections.abc import Awaitable, Callable
from typing import Any

from .output import format_queue_stats
from .pruning import DEFAULT_STATES, MAX_BATCH
from .records import to_naive_utc
from .source import AsyncMQSource

__all__ = ["Command", "add_commands", "older_than"]

#: A command: what it prints, given an engine source and the parsed arguments.
Command = Callable[[AsyncMQSource, argparse.Namespace], Awaitable[str]]

_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)([wdhms]))+")
_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")


def older_than(value: str) -> datetime.timedelta | datetime.datetime:
    """``--older-than``: a duration before now (``7d``, ``12h``, ``1d12h``, ``90m``, ``30s``, ``2w``) or a
    moment (``2026-11-30`` or ``2026-11-30T12:00``, UTC unless it carries an offset)."""
    text = value.strip().lower()
    if _DURATION.fullmatch(text):
        return datetime.timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in _PART.findall(text)))
    try:
        return to_naive_utc(datetime.datetime.fromisoformat(value.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 7d, 12h, 1d12h, 30m or 90s, or a UTC time such as "
            f"2026-11-30T12:00, got {value!r}"
        ) from None


def _batch_size(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {MAX_BATCH:,}, got {value!r}")
    return number


async def _pause(source: AsyncMQSource, args: argparse.Namespace) -> str:
    if await source.pause_queue(args.queue):
        return (
            f"paused queue {args.queue}: aiomq workers claim none of its jobs until `aiomq resume "
            f"{args.queue}` (running jobs finish; psycopg2_mq workers ignore pauses)"
        )
    return f"queue {args.queue} was already paused"


async def _resume(source: AsyncMQSource, args: argparse.Namespace) -> str:
    if await source.resume_queue(args.queue):
        return f"resumed queue {args.queue}"
    return f"queue {args.queue} was not paused"


async def _queues(source: AsyncMQSource, args: argparse.Namespace) -> str:
    return format_queue_stats(await source.queue_stats())


async def _prune(source: AsyncMQSource, args: argparse.Namespace) -> str:
    states = args.state or list(DEFAULT_STATES)
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    count = await source.prune_jobs(
        older_than=args.older_than,
        states=states,
        queue=args.queue,
        batch_size=args.batch_size,
        dry_run=args.dry_run,
        now=now,
    )
    cutoff = args.older_than if isinstance(args.older_than, datetime.datetime) else now - args.older_than
    what = f"{', '.join(sorted(set(states)))} job{'s' if count != 1 else ''}"
    where = f" of queue {args.queue}" if args.queue else ""
    verb = "would prune" if args.dry_run else "pruned"
    return f"{verb} {count:,} {what}{where} that ended before {cutoff:%Y-%m-%d %H:%M:%S} UTC"


def add_commands(
    commands: Any,
    options: Callable[[argparse.ArgumentParser], None],
    run: Callable[[Command], Callable[[argparse.Namespace], int]],
) -> None:
    """Add the commands to ``commands`` (argparse subparsers); ``options`` adds the shared options (URL,
    model, log level) to a command's parser, and ``run`` turns a :data:`Command` into its ``func``."""
    for name, command, text in (
        ("pause", _pause, "stop aiomq workers claiming QUEUE's jobs (it lasts until `aiomq resume`)"),
        ("resume", _resume, "let workers claim QUEUE's jobs again"),
    ):
        parser = commands.add_parser(name, help=text, description=text)
        parser.add_argument("queue", metavar="QUEUE")
        options(parser)
        parser.set_defaults(func=run(command))

    queues = commands.add_parser(
        "queues",
        help="every queue's pending (due, later), running and lost jobs, pause, oldest due job's wait",
    )
    options(queues)
    queues.set_defaults(func=run(_queues))

    prune = commands.add_parser(
        "prune",
        help="delete finished jobs that ended before a cutoff, in batches",
        description="Delete finished jobs that ended before a cutoff, in batches of their own transactions. "
        "Pending, running and lost jobs, cursors, schedules and the job that last updated each cursor stay.",
    )
    prune.add_argument(
        "--older-than",
        type=older_than,
        required=True,
        metavar="AGE",
        help="a duration before now (7d, 12h, 1d12h, 30m, 90s, 2w) or a UTC time (2026-11-30T12:00)",
    )
    prune.add_argument(
        "--state",
        action="append",
        metavar="STATE",
        help="completed, failed or canceled; repeat for several (default: completed and canceled)",
    )
    prune.add_argument("--queue", metavar="QUEUE", help="only this queue's jobs")
    prune.add_argument(
        "--batch-size",
        type=_batch_size,
        default=5000,
        metavar="N",
        help="jobs per transaction (default 5000)",
    )
    prune.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
    options(prune)
    prune.set_defaults(func=run(_prune))
