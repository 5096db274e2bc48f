"""What one benchmark run did, job by job, and its manifest (SPEC §10.9, §12.6).

Shared by stage 1, stage 2 and the keypoint branch: one progress bar, one log line per job, and at the end the run
manifest with the failed jobs (and their reasons), the jobs left to other processes, the videos skipped for a
missing frame folder, and the degenerate cases (§8.9). A run with failed jobs ends with one ``error: …`` line on
stderr that names the first failure and the manifest, and exit status 3 (:data:`EXIT_JOBS_FAILED`).
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from model.utils.atomic import write_manifest
from model.utils.errors import EXIT_JOBS_FAILED, DecafError, set_interrupt_note

log = logging.getLogger("decaf.run")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


class StepCounter:
    """The steps of the job in progress, shown as the postfix of the run's bar (e.g. ``MLLM pass 3/11``), so a
    run keeps one bar. Offers the ``reset``/``update`` of a tqdm bar, which is what the stage-1 pipeline drives."""

    def __init__(self, bar: tqdm, label: str):
        self.bar, self.label = bar, label
        self.n, self.total = 0, None

    def reset(self, total: int | None = None) -> None:
        self.n, self.total = 0, total
        self._show()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._show()

    def _show(self) -> None:
        self.bar.set_postfix_str(f"{self.label} {self.n}/{'?' if self.total is None else self.total}")


class RunRecord:
    """The one progress bar of a run, its per-job outcomes, and the manifest written by :meth:`close`."""

    def __init__(self, total: int, description: str, fail_fast: bool,
                 skipped_videos: Sequence[tuple[str, str]] = ()):
        """``skipped_videos``: ``(video key, reason)`` of the videos left out of the job list (SPEC §10.9: missing
        frame folder); reported in the manifest, not failed."""
        self.bar = tqdm(total=total, desc=description, unit="job", dynamic_ncols=True)
        self.fail_fast = fail_fast
        self.failures: list[dict[str, str]] = []
        self.degenerate: list[dict[str, str]] = []
        self.claimed_elsewhere: list[str] = []
        self.skipped_videos = [{"video": video, "reason": reason} for video, reason in skipped_videos]
        self.warnings: list[str] = []
        self.finished_before = 0
        self.done = 0
        set_interrupt_note(self.interrupt_note)

    def interrupt_note(self) -> str:
        """What Ctrl-C reports: what finished, and how to resume."""
        return (f"{self.done} of {self.bar.total} job(s) finished in this run ({self.finished_before} were finished "
                f"before, {len(self.failures)} failed); run the same command again to resume: finished outputs are "
                f"kept and verified, the job in progress is computed again")

    @property
    def stopped(self) -> bool:
        return self.fail_fast and bool(self.failures)

    def skip(self, count: int = 1) -> None:
        """Jobs whose outputs were already finished (by an earlier run or a concurrent process)."""
        self.finished_before += count
        self.bar.update(count)

    def elsewhere(self, job: Any) -> None:
        """A job that another live process is computing right now (it holds the claim); left to it."""
        log.info("%s: being computed by another process; left to it", job.job_id)
        self.claimed_elsewhere.append(job.job_id)
        self.bar.update(1)

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def fail(self, job: Any, exc: BaseException) -> None:
        message = str(exc) if isinstance(exc, DecafError) else f"{type(exc).__name__}: {exc}"
        trace = "".join(traceback.format_exception(exc))
        if isinstance(exc, DecafError):
            log.error("%s failed: %s", job.job_id, message)  # an actionable one-liner; the trace is in the manifest
        else:
            log.error("%s failed: %s\n%s", job.job_id, message, trace)
        self.failures.append({"job": job.job_id, "error": message, "traceback": trace})
        self.bar.update(1)

    def succeed(self, job: Any, summary: str, degenerate: Sequence[str] = ()) -> None:
        self.done += 1
        for reason in degenerate:
            log.warning("%s: degenerate: %s", job.job_id, reason)
            self.degenerate.append({"job": job.job_id, "reason": reason})
        log.info("%s done: %s", job.job_id, summary)
        self.bar.update(1)

    def close(self, folders: Sequence[Path], command: str, args: argparse.Namespace, **extra: Any) -> int:
        """Write the manifest into each folder; return 0, or :data:`EXIT_JOBS_FAILED` after one ``error:`` line."""
        self.bar.close()
        set_interrupt_note(None)
        manifest, unwritten = None, None
        for folder in dict.fromkeys(folders):
            try:
                path = write_manifest(
                    folder, command, vars(args), **extra,
                    jobs={"in_shard": self.bar.total, "finished_before": self.finished_before, "done": self.done,
                          "failed": len(self.failures)},
                    failures=self.failures, degenerate=self.degenerate, claimed_elsewhere=self.claimed_elsewhere,
                    skipped_videos=self.skipped_videos, warnings=self.warnings)
            except DecafError as exc:  # e.g. the disk filled up: still say what happened to the jobs
                unwritten = str(exc)
            else:
                manifest = manifest or path
        if self.claimed_elsewhere:
            log.info("%d job(s) were being computed by other processes and were left to them",
                     len(self.claimed_elsewhere))
        if not self.failures and unwritten is None:
            return 0
        where = (f"all are listed in {manifest}" if unwritten is None
                 else f"the run manifest was not written: {unwritten}")
        if self.failures:
            first = self.failures[0]
            print(f"error: {len(self.failures)} of {self.bar.total} job(s) failed (first: {first['job']}: "
                  f"{_first_line(first['error'])}); {where}", file=sys.stderr)
        else:
            print(f"error: {where}", file=sys.stderr)
        return EXIT_JOBS_FAILED
