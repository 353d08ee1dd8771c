"""The public names are exactly DESIGN.md's, plus the documented additions."""

from __future__ import annotations

import dataclasses

import aiomq


def test_public_names() -> None:
    design = {
        "AsyncMQSource",
        "AsyncMQWorker",
        "make_default_model",
        "FailedJobError",
        "JobStates",
        "QueuedJob",
        "JobInfo",
    }
    additions = {"JobContext", "Model", "SchemaMissingError"}
    version_0_2 = {"Retry", "QueueStats", "SyncMQSource"}
    assert set(aiomq.__all__) == design | additions | version_0_2
    for name in aiomq.__all__:
        assert getattr(aiomq, name) is not None


def test_records_are_frozen() -> None:
    assert dataclasses.fields(aiomq.QueuedJob)
    assert aiomq.QueuedJob.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert aiomq.JobInfo.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert [f.name for f in dataclasses.fields(aiomq.QueuedJob)] == [
        "id",
        "queue",
        "method",
        "cursor_key",
        "scheduled_time",
        "created",
    ]


def test_failed_job_error() -> None:
    ex = aiomq.FailedJobError({"why": "no"}, update_cursor=True)
    assert ex.result == {"why": "no"}
    assert ex.update_cursor is True
    assert str(ex) == "Job execution manually aborted."
    assert issubclass(aiomq.SchemaMissingError, RuntimeError)
