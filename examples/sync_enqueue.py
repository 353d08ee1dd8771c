"""Enqueue from sync code (a WSGI view, Django, a cron script) for aiomq workers, with SyncMQSource.

    pip install aiomq 'psycopg[binary]'
    python examples/sync_enqueue.py postgresql://user@host/db

``SyncMQSource`` runs on a plain SQLAlchemy ``Session`` (or ``Engine``) with psycopg 3 (psycopg2 works too)
and writes exactly what ``AsyncMQSource`` writes: the job commits with your transaction, its NOTIFY wakes an
aiomq worker at once, and a call on a cursor joins the job already pending there.
"""

from __future__ import annotations

import sys

import sqlalchemy as sa
from sqlalchemy.orm import Session

from aiomq import QueuedJob, SyncMQSource, make_default_model

model = make_default_model(sa.MetaData())


def enqueue_welcome(session: Session, user_id: int) -> QueuedJob:
    """In a view: the mail goes out only if the transaction that signed the user up commits."""
    source = SyncMQSource(dbsession=session, model=model)
    return source.call("mail", "welcome", {"user": user_id}, cursor_key=f"user:{user_id}")


def main(url: str) -> int:
    engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
    try:
        with Session(engine) as session, session.begin():
            job = enqueue_welcome(session, 42)
        print(f"queued job={job.id} created={job.created}")
        return job.id
    finally:
        engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1])
