"""The worker's scheduled jobs, on APScheduler 3, run only by the active worker.

The policy's `jobs` section gives each job a five-field cron expression (UTC). The scheduler
starts when a worker becomes the slot's active worker and stops with its session, so a
standby never runs a job. A run that was missed (the worker was down, or a run was still
going) is coalesced into one run, never replayed once per missed time, and one job never runs
twice at once. Each job is also a command for cron and systemd timer users.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from .archive import archive_job
from .db import connect
from .drift import privileges_job
from .job_context import JobContext
from .policy import JobsPolicy
from .purge import purge_job
from .snapshot import snapshot_job
from .trail_commands import verify_database

__all__ = ["JOBS", "JobScheduler", "JobStats", "verify_job"]

JobFunction = Callable[[JobContext], str]

_log = logging.getLogger("cdc_audit.jobs")

# A run later than this after its time is skipped as missed (and coalesced with the next).
_MISFIRE_GRACE_SECONDS = 3600


def verify_job(context: JobContext) -> str:
    """Incremental verification: from the newest verified checkpoint to the head."""
    with connect(context.dsn) as conn:
        verdicts = verify_database(
            conn, context.schema, None, None, context.progress, since_last=True
        )
    failed = [v for v in verdicts if not v.ok]
    for verdict in failed:
        _log.error(
            "verification failed",
            extra={
                "fields": {
                    "stream": verdict.stream,
                    "first_bad_seq": verdict.first_bad_seq,
                    "problem": verdict.problem,
                }
            },
        )
    checked = sum(v.checked for v in verdicts)
    verdict_text = f"FAILED in {len(failed)} stream(s)" if failed else "ok"
    return f"verify: {checked} new event(s) in {len(verdicts)} stream(s): {verdict_text}"


JOBS: Mapping[str, JobFunction] = {
    "purge": purge_job,
    "archive": archive_job,
    "verify": verify_job,
    "snapshot": snapshot_job,
    "privileges": privileges_job,
}


@dataclass
class JobStats:
    """Runs and failures per job, for status and metrics."""

    runs: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    last_summary: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class JobScheduler:
    """The jobs of one policy, scheduled while started."""

    def __init__(
        self,
        context: JobContext,
        schedules: JobsPolicy,
        *,
        every_seconds: float | None = None,
        jobs: Mapping[str, JobFunction] = JOBS,
    ) -> None:
        """`every_seconds` replaces every cron schedule with that interval (for tests and
        for trying a schedule out); jobs without a schedule stay off either way."""
        self.context = context
        self.stats = JobStats()
        self._jobs = jobs
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": _MISFIRE_GRACE_SECONDS,
            },
        )
        for name in jobs:
            cron = getattr(schedules, name, None)
            if cron is None:
                continue
            trigger = (
                IntervalTrigger(seconds=every_seconds, timezone=UTC)
                if every_seconds is not None
                else CronTrigger.from_crontab(cron, timezone=UTC)
            )
            self._scheduler.add_job(self.run_once, trigger, args=[name], id=name, name=name)

    @property
    def scheduled(self) -> list[str]:
        return sorted(job.id for job in self._scheduler.get_jobs())

    def start(self, *, paused: bool = False) -> None:
        self._scheduler.start(paused=paused)

    def resume(self) -> None:
        self._scheduler.resume()

    def shutdown(self) -> None:
        """Stop scheduling and wait for a job that is running to finish."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    def run_once(self, name: str) -> None:
        """Run one job now; a failure is logged and counted, never raised (the next run is
        on schedule)."""
        stats = self.stats
        try:
            summary = self._jobs[name](self.context)
        except Exception as exc:  # a job must never stop the worker
            with stats.lock:
                stats.failures[name] = stats.failures.get(name, 0) + 1
            message = str(exc).strip().splitlines()
            _log.error(
                "job failed",
                extra={"fields": {"job": name, "error": message[0] if message else repr(exc)}},
            )
            return
        with stats.lock:
            stats.runs[name] = stats.runs.get(name, 0) + 1
            stats.last_summary[name] = summary
        _log.info("job done", extra={"fields": {"job": name, "summary": summary}})
