"""aiomq: an asyncio message queue on PostgreSQL, compatible with psycopg2_mq."""

from __future__ import annotations

from .errors import FailedJobError as FailedJobError
from .errors import SchemaMissingError as SchemaMissingError
from .model import JobStates as JobStates
from .model import Model as Model
from .model import make_default_model as make_default_model
from .queues import QueueStats as QueueStats
from .records import JobContext as JobContext
from .records import JobInfo as JobInfo
from .records import QueuedJob as QueuedJob
from .retry import Retry as Retry
from .source import AsyncMQSource as AsyncMQSource
from .sync_source import SyncMQSource as SyncMQSource
from .worker import AsyncMQWorker as AsyncMQWorker

__version__ = "0.1.0.dev0"

__all__ = [
    "AsyncMQSource",
    "AsyncMQWorker",
    "FailedJobError",
    "JobContext",
    "JobInfo",
    "JobStates",
    "Model",
    "QueueStats",
    "QueuedJob",
    "Retry",
    "SchemaMissingError",
    "SyncMQSource",
    "make_default_model",
]
