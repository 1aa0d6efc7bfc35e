"""The job scheduler: schedules from the policy, coalesced missed runs, failures contained."""

from __future__ import annotations

import threading
import time

import pytest

from cdc_audit.job_context import JobContext
from cdc_audit.jobs import JobScheduler
from cdc_audit.policy import JobsPolicy, parse_policy

POLICY = parse_policy(
    "version: 1\nstreams:\n  user: {retention: 400d}\n"
    'jobs: {purge: "0 3 * * *", verify: "*/15 * * * *"}\n',
    "policy.yaml",
)


class Counting:
    def __init__(self, fail: bool = False) -> None:
        self.runs = 0
        self.fail = fail
        self.ran = threading.Event()

    def __call__(self, context: JobContext) -> str:
        self.runs += 1
        self.ran.set()
        if self.fail:
            raise RuntimeError("the database is gone\nsecond line")
        return "done"


def _scheduler(jobs: dict[str, Counting], every: float | None = None) -> JobScheduler:
    context = JobContext(dsn="", policy=POLICY)
    return JobScheduler(context, POLICY.jobs, every_seconds=every, jobs=jobs)


def test_only_jobs_with_a_schedule_are_scheduled() -> None:
    jobs = {name: Counting() for name in ("purge", "verify", "snapshot", "privileges")}
    scheduler = _scheduler(jobs)
    assert scheduler.scheduled == ["purge", "verify"]
    assert POLICY.jobs == JobsPolicy(purge="0 3 * * *", verify="*/15 * * * *")


def test_runs_missed_while_paused_are_coalesced_into_one() -> None:
    job = Counting()
    scheduler = _scheduler({"verify": job}, every=0.1)
    scheduler.start(paused=True)
    try:
        time.sleep(1.0)  # ten runs fall due meanwhile
        assert job.runs == 0
        scheduler.resume()
        assert job.ran.wait(5)
        time.sleep(0.05)
        assert job.runs == 1
    finally:
        scheduler.shutdown()


def test_a_failing_job_is_counted_and_the_scheduler_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failing, fine = Counting(fail=True), Counting()
    scheduler = _scheduler({"purge": failing, "verify": fine})
    scheduler.run_once("purge")
    scheduler.run_once("verify")
    assert scheduler.stats.failures == {"purge": 1}
    assert scheduler.stats.runs == {"verify": 1}
    assert scheduler.stats.last_summary == {"verify": "done"}
    failed = [r for r in caplog.records if r.getMessage() == "job failed"]
    assert failed and failed[0].fields == {"job": "purge", "error": "the database is gone"}  # type: ignore[attr-defined]
