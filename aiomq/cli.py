"""The ``aiomq`` command: run a worker, print or create the schema, inspect and manage jobs, run the demo.

    aiomq worker --database-url URL myapp.jobs:QUEUES
    aiomq schema [--create | --upgrade]
    aiomq jobs [--queue Q] [--state S] [--cursor K] [--limit N]
    aiomq job ID | retry ID | cancel ID | abort ID
    aiomq pause Q | resume Q | queues | prune --older-than 7d [...]   (aiomq.cli_queues)
    aiomq demo [--jobs N] [--no-progress]
    aiomq web [--host H] [--port P] [--read-only]   (aiomq.cli_web)

Every option can also come from an ``AIOMQ_*`` environment variable (``--database-url`` from
``AIOMQ_DATABASE_URL``, ``--concurrency`` from ``AIOMQ_CONCURRENCY``, ...). Failures print one line,
``aiomq: error: ...``, and exit 2 for bad usage, 1 otherwise (``--log-level DEBUG`` adds the traceback).
This module is the only place aiomq configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, NoReturn

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from . import __version__, cli_metrics, cli_queues, cli_web
from .dsn import DatabaseURL, check_connection, make_engine, one_line, parse_database_url, reason
from .errors import CliError, SchemaMissingError, UsageError
from .model import Model, all_states, make_default_model
from .output import format_job, format_jobs
from .schema import check_schema, create_schema, describe_created, model_tables, schema_ddl, upgrade_ddl
from .source import AsyncMQSource
from .worker import AsyncMQWorker

__all__ = [
    "CliError",
    "DatabaseURL",
    "UsageError",
    "check_connection",
    "create_schema",
    "describe_created",
    "main",
    "make_engine",
    "model_tables",
    "parse_database_url",
    "schema_ddl",
]

log = logging.getLogger(__name__)

ENV_PREFIX = "AIOMQ_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# ---------------------------------------------------------------- argument parsing


class _EnvValue(str):
    """A default read from the environment; type errors then name the variable."""

    var = ""


def _env(option: str, fallback: str | None = None) -> str | None:
    var = ENV_PREFIX + option.upper().replace("-", "_")
    value = os.environ.get(var)
    if not value:
        return fallback
    env_value = _EnvValue(value)
    env_value.var = var
    return env_value


def _origin(value: str) -> str:
    return f" (from {value.var})" if isinstance(value, _EnvValue) else ""


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}{_origin(value)}")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}{_origin(value)}")
    return number


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}{_origin(value)}"
        )
    return level


def _job_id(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a job id is a number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"a job id is a positive number, got {value!r}")
    return number


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of argparse's usage block: the same shape as every other aiomq error.
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--database-url and --log-level, accepted before and after the command.

    On the commands their default is SUPPRESS, so an option given before the command (or its environment
    variable, read by the top-level parser) is not overwritten by the command's default.
    """
    parser.add_argument(
        "--database-url",
        metavar="URL",
        default=_env("database-url") if top else argparse.SUPPRESS,
        help="postgresql://user:password@host:port/db or postgresql+asyncpg://... (env AIOMQ_DATABASE_URL)",
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        metavar="LEVEL",
        default=_env("log-level") if top else argparse.SUPPRESS,
        help="DEBUG, INFO, WARNING, ERROR; DEBUG also prints tracebacks "
        "(default: INFO for worker, WARNING otherwise; env AIOMQ_LOG_LEVEL)",
    )


def _model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="MODULE:ATTR",
        default=_env("model"),
        help="an aiomq.Model (or a callable returning one) for custom tables; "
        "default: make_default_model (env AIOMQ_MODEL)",
    )


def _add_worker(commands: Any) -> None:
    worker = commands.add_parser("worker", help="run a worker for the queues of MODULE:ATTR")
    worker.add_argument(
        "queues",
        nargs="?",
        metavar="MODULE:ATTR",
        default=_env("queues"),
        help="a dict {queue: handler}, or a callable returning one (env AIOMQ_QUEUES)",
    )
    worker.add_argument(
        "--concurrency",
        type=_positive_int,
        default=_env("concurrency", "10"),
        help="most jobs in flight at once (default 10; env AIOMQ_CONCURRENCY)",
    )
    worker.add_argument(
        "--timeout",
        type=_positive_float,
        default=_env("timeout", "60"),
        metavar="SECONDS",
        help="seconds between maintenance passes (lost jobs, schedules) (default 60; env AIOMQ_TIMEOUT)",
    )
    worker.add_argument("--name", default=_env("name"), help="worker name (default host.pid; env AIOMQ_NAME)")
    _model_option(worker)
    cli_metrics.add_options(worker)
    _common(worker, top=False)
    worker.set_defaults(func=_cmd_worker, default_log_level="INFO")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="aiomq",
        description="An asyncio job queue on PostgreSQL (psycopg2_mq compatible).",
        epilog="Every option also reads an AIOMQ_* environment variable, e.g. AIOMQ_DATABASE_URL.",
    )
    parser.add_argument("--version", action="version", version=f"aiomq {__version__}")
    _common(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_worker(commands)

    schema = commands.add_parser(
        "schema", help="print the schema's DDL, or what a database lacks of it, or create what it lacks"
    )
    action = schema.add_mutually_exclusive_group()
    action.add_argument(
        "--create",
        action="store_true",
        help="add the missing types, tables, columns and indexes to the database at URL (a psycopg2_mq "
        "or aiomq 0.1 database is upgraded in place; idempotent)",
    )
    action.add_argument(
        "--upgrade",
        action="store_true",
        help="print only the DDL that --create would run on the database at URL; change nothing",
    )
    _model_option(schema)
    _common(schema, top=False)
    schema.set_defaults(func=_cmd_schema)

    jobs = commands.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--queue", default=_env("queue"), help="only this queue (env AIOMQ_QUEUE)")
    jobs.add_argument("--method", default=_env("method"), help="only this method (env AIOMQ_METHOD)")
    jobs.add_argument(
        "--state", default=_env("state"), help="pending, running, completed, ... (env AIOMQ_STATE)"
    )
    jobs.add_argument(
        "--cursor", default=_env("cursor"), metavar="KEY", help="only this cursor_key (env AIOMQ_CURSOR)"
    )
    jobs.add_argument(
        "--limit",
        type=_positive_int,
        default=_env("limit", "50"),
        help="at most N jobs (default 50; env AIOMQ_LIMIT)",
    )
    _model_option(jobs)
    _common(jobs, top=False)
    jobs.set_defaults(func=_cmd_jobs)

    for name, func, text in (
        ("job", _cmd_job, "show one job in full"),
        ("retry", _cmd_retry, "enqueue a new job like job ID; prints the new id"),
        ("cancel", _cmd_cancel, "cancel a pending or failed job"),
        ("abort", _cmd_abort, "abort a running job (a pending one is canceled)"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("id", type=_job_id, metavar="ID")
        _model_option(command)
        _common(command, top=False)
        command.set_defaults(func=func)

    cli_queues.add_commands(commands, _command_options, _on_source)
    cli_web.add_command(commands, _command_options, _env, _database, load_model)

    demo = commands.add_parser(
        "demo", help="a worker and a source on a real (or embedded) database, with live progress"
    )
    demo.add_argument(
        "--jobs",
        type=_positive_int,
        default=_env("jobs", "200"),
        help="plain jobs to run (default 200; env AIOMQ_JOBS)",
    )
    demo.add_argument(
        "--no-progress", action="store_true", help="plain progress lines instead of a progress bar"
    )
    _common(demo, top=False)
    demo.set_defaults(func=_cmd_demo)
    return parser


def _command_options(parser: argparse.ArgumentParser) -> None:
    _model_option(parser)
    _common(parser, top=False)


def _on_source(command: cli_queues.Command) -> Callable[[argparse.Namespace], int]:
    """A command's ``func``: connect, run ``command`` on an engine source, print what it returns."""

    async def run(args: argparse.Namespace) -> int:
        model = load_model(args.model)
        async with _connected(args, model) as (engine, _):
            print(await command(AsyncMQSource(engine=engine, model=model), args))
        return 0

    return lambda args: asyncio.run(run(args))


# ---------------------------------------------------------------- loading MODULE:ATTR


def load_object(spec: str, what: str) -> Any:
    """Import ``module:attr`` (attr may be dotted)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} must be MODULE:ATTR (e.g. myapp.jobs:QUEUES), got {spec!r}")
    # As `python -m` and uvicorn do: a module in the current directory imports with the `aiomq` script too.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as ex:
        if isinstance(ex, ModuleNotFoundError) and ex.name is not None and module_name.startswith(ex.name):
            raise CliError(f"cannot import {what} {spec!r}: no module named {ex.name!r}") from ex
        raise CliError(f"cannot import {what} {spec!r}: {type(ex).__name__}: {one_line(ex)}") from ex
    except Exception as ex:  # the module itself raised while importing
        raise CliError(
            f"importing module {module_name!r} failed: {type(ex).__name__}: {one_line(ex)}"
        ) from ex
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(
                f"cannot load {what} {spec!r}: {module_name!r} has no attribute {attr!r}"
            ) from None
    return obj


async def load_queues(spec: str) -> Mapping[str, Any]:
    obj = load_object(spec, "queues")
    if not isinstance(obj, Mapping) and callable(obj):
        try:
            obj = obj()
            if inspect.isawaitable(obj):
                obj = await obj
        except Exception as ex:
            raise CliError(f"calling {spec} failed: {type(ex).__name__}: {one_line(ex)}") from ex
    if not isinstance(obj, Mapping):
        raise CliError(
            f"{spec} must be a dict {{queue: handler}} or a callable returning one, got {type(obj).__name__}"
        )
    if not obj:
        raise CliError(f"{spec} names no queue")
    return obj


def load_model(spec: str | None) -> Model:
    if spec is None:
        return make_default_model(sa.MetaData())
    obj = load_object(spec, "model")
    if not isinstance(obj, Model) and callable(obj):
        try:
            obj = obj()
        except Exception as ex:
            raise CliError(f"calling {spec} failed: {type(ex).__name__}: {one_line(ex)}") from ex
    if not isinstance(obj, Model):
        raise CliError(f"{spec} must be an aiomq.Model or a callable returning one, got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------- commands


def _database(args: argparse.Namespace, why: str = "") -> DatabaseURL:
    raw = getattr(args, "database_url", None)
    if not raw:
        raise UsageError(f"no database URL{why}: pass --database-url or set AIOMQ_DATABASE_URL")
    return parse_database_url(raw)


@contextlib.asynccontextmanager
async def _connected(
    args: argparse.Namespace, model: Model, **engine_kw: Any
) -> AsyncIterator[tuple[AsyncEngine, DatabaseURL]]:
    db = _database(args)
    engine = make_engine(db, **engine_kw)
    try:
        await check_connection(engine, db)
        yield engine, db
    finally:
        await engine.dispose()


def _cmd_worker(args: argparse.Namespace) -> int:
    if not args.queues:
        raise UsageError("worker needs MODULE:ATTR naming its queues (or AIOMQ_QUEUES)")
    return asyncio.run(_worker(args))


async def _worker(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    queues = await load_queues(args.queues)
    db = _database(args)
    # Claims and finishes each hold a pooled connection briefly; room for one per job in flight.
    engine = make_engine(db, pool_size=5, max_overflow=max(10, args.concurrency))
    try:
        async with cli_metrics.serving(args, engine, model) as hooks:  # with --metrics-port only
            worker = AsyncMQWorker(  # validates the handlers and options before any connection
                engine=engine,
                queues=queues,
                model=model,
                concurrency=args.concurrency,
                timeout=args.timeout,
                name=args.name,
                listener_dsn=db.dsn,
                capture_signals=True,
                hooks=hooks,
            )
            # The worker retries an unreachable database for a minute and more; at start that is a
            # mistake in the URL far more often than an outage, so say so at once. A missing schema
            # never fixes itself.
            await check_connection(engine, db)
            async with engine.connect() as conn:
                await check_schema(conn, model)
            await worker.run()
    finally:
        await engine.dispose()
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    if args.upgrade:
        return asyncio.run(_schema_upgrade(args, model))
    if not args.create:
        sys.stdout.write(schema_ddl(model))
        return 0
    return asyncio.run(_schema_create(args, model))


async def _schema_upgrade(args: argparse.Namespace, model: Model) -> int:
    _database(args, " for --upgrade")
    async with _connected(args, model) as (engine, db):
        ddl = await upgrade_ddl(engine, model)
    # Comments, so the output stays a script psql can run
    sys.stdout.write(ddl or f"-- nothing to add: the schema is complete in {db}\n")
    return 0


async def _schema_create(args: argparse.Namespace, model: Model) -> int:
    _database(args, " for --create")
    async with _connected(args, model) as (engine, db):
        created = await create_schema(engine, model)
    if created:
        print(describe_created(created))
        print(f"the schema is complete in {db}")
    else:
        print(f"nothing to create: the schema is complete in {db}")
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    return asyncio.run(_jobs(args))


async def _jobs(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    states = all_states(model.JobStates)
    if args.state is not None and args.state not in states:
        raise UsageError(f"unknown state {args.state!r}: one of {', '.join(states)}")
    async with _connected(args, model) as (engine, _):
        jobs = await AsyncMQSource(engine=engine, model=model).find_jobs(
            queue=args.queue, method=args.method, state=args.state, cursor_key=args.cursor, limit=args.limit
        )
    print(format_jobs(jobs, limit=args.limit))
    return 0


def _cmd_job(args: argparse.Namespace) -> int:
    return asyncio.run(_job(args))


async def _job(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    async with _connected(args, model) as (engine, _):
        try:
            row = await AsyncMQSource(engine=engine, model=model).get_job(args.id)
        except LookupError:
            raise CliError(f"no job with id {args.id}") from None
    print(format_job(row, model))
    return 0


def _cmd_retry(args: argparse.Namespace) -> int:
    return asyncio.run(_retry(args))


async def _retry(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    async with _connected(args, model) as (engine, _):
        try:
            queued = await AsyncMQSource(engine=engine, model=model).retry_job(args.id)
        except LookupError:
            raise CliError(f"no job with id {args.id}") from None
    print(queued.id)  # only the id: scripts read it
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    return asyncio.run(_cancel(args))


async def _cancel(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    async with _connected(args, model) as (engine, _):
        try:
            await AsyncMQSource(engine=engine, model=model).cancel_job(args.id)
        except LookupError:
            raise CliError(f"no job with id {args.id}") from None
        except RuntimeError as ex:
            state = ex.args[2] if len(ex.args) == 3 else None  # ("job is not in a valid state", id, state)
            if state is None:
                raise
            raise CliError(
                f"cannot cancel job {args.id}: it is {state}; only pending or failed jobs can be canceled"
            ) from ex
    print(f"canceled job {args.id}")
    return 0


def _cmd_abort(args: argparse.Namespace) -> int:
    return asyncio.run(_abort(args))


async def _abort(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    async with _connected(args, model) as (engine, _):
        source = AsyncMQSource(engine=engine, model=model)
        try:
            await source.abort_job(args.id)
            state = (await source.get_job(args.id)).state
        except LookupError:
            raise CliError(f"no job with id {args.id}") from None
        except RuntimeError as ex:
            if len(ex.args) != 3:  # ("job is not pending or running", id, state)
                raise
            raise CliError(
                f"cannot abort job {args.id}: it is {ex.args[2]}; only pending or running jobs can be aborted"
            ) from ex
    if state == model.JobStates.CANCELED:
        print(f"canceled job {args.id} (it was pending)")
    else:
        print(f"asked the worker running job {args.id} to abort it")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo  # imports rich when present: only for this command

    return demo.run(database_url=args.database_url, jobs=args.jobs, progress=not args.no_progress)


# ---------------------------------------------------------------- errors and main


def _describe(ex: BaseException) -> tuple[int, str]:
    if isinstance(ex, CliError):
        return ex.code, one_line(ex)
    if isinstance(ex, SchemaMissingError | ValueError | TypeError | LookupError):
        return 1, one_line(ex)
    if isinstance(ex, sa.exc.DBAPIError):
        return 1, f"database error: {reason(ex)}"
    if isinstance(ex, OSError):  # the connection went away mid-command
        return 1, f"database connection failed: {one_line(ex)}"
    return 1, f"{type(ex).__name__}: {one_line(ex)}"


def main(argv: Sequence[str] | None = None) -> int:
    """The ``aiomq`` console script; returns the exit status."""
    debug = False
    try:
        args = build_parser().parse_args(argv)
        level = args.log_level or getattr(args, "default_log_level", "WARNING")
        debug = level == "DEBUG"
        logging.basicConfig(
            level=level, stream=sys.stderr, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
        )
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except KeyboardInterrupt:
        print("aiomq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `aiomq jobs | head`: stop quietly, and keep Python from complaining at exit
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as ex:
        code, message = _describe(ex)
        if debug:
            traceback.print_exc()
        print(f"aiomq: error: {message}", file=sys.stderr)
        return code
