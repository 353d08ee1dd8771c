"""Enqueue from sync code (a WSGI view, a cron script) for aiomq workers: use psycopg2_mq's MQSource.

    pip install psycopg2-mq psycopg2-binary
    python examples/sync_enqueue.py postgresql://user@host/db

psycopg2_mq writes the same rows and NOTIFYs as aiomq, so its ``MQSource`` on a plain (sync) SQLAlchemy
session is aiomq's sync enqueue path: the job commits with your transaction and an aiomq worker picks it
up at once. Two differences to remember: it returns the job id (not a ``QueuedJob``), and it does not
collapse on a cursor unless you pass ``collapse_on_cursor=True`` (aiomq's default when a cursor is given).
"""

from __future__ import annotations

import sys

import sqlalchemy as sa
from psycopg2_mq import MQSource, make_default_model
from sqlalchemy.orm import Session

# psycopg2_mq's own description of the same tables (only used to write rows; aiomq created them)
model = make_default_model(sa.MetaData())


def enqueue_welcome(session: Session, user_id: int) -> int:
    source = MQSource(dbsession=session, model=model)
    return int(
        source.call(
            "mail", "welcome", {"user": user_id}, cursor_key=f"user:{user_id}", collapse_on_cursor=True
        )
    )


def main(url: str) -> int:
    engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg2"))
    try:
        with Session(engine) as session, session.begin():
            job_id = enqueue_welcome(session, 42)
        print(f"queued job={job_id}")
        return job_id
    finally:
        engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1])
