"""The one job loop of stage 1, stage 2 and the keypoint branch (SPEC §10.9, §12.6).

Every benchmark command runs the same steps: list the jobs, take this process's shard (whole videos,
:func:`model.jobs.benchmarks.shard_jobs`), then per video **scan** which outputs are finished, and per pending job
**claim** its outputs (:func:`model.utils.atomic.output_claim`), **re-check** them (another process may have finished
them since the scan), **compute** and write them atomically, and **record** the outcome on the run's
:class:`~model.utils.run_record.RunRecord`. A command supplies only what differs: which outputs a job has, when an
output counts as finished, and the computation. One failed job never stops the run (§10.9) unless ``--fail_fast``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from model.jobs.benchmarks import Job
from model.utils.atomic import output_claim
from model.utils.run_record import RunRecord

#: ``(output kind, path) → True`` if that output is complete; may raise a DecafError for an output that exists but
#: cannot be reused (a corrupt cache, or one made with other settings), which fails the job
IsFinished = Callable[[str, Path], bool]


@dataclass
class Outcome:
    """What one computed job reports: a one-line summary, degenerate cases (§8.9) and notes worth a warning."""

    summary: str
    degenerate: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


#: the computation of one job, given the outputs it still has to write (kind → path)
Compute = Callable[[dict[str, Path]], Outcome]


@dataclass
class Scan:
    """The jobs of a scan: those with outputs to write, how many were finished, and those that cannot run."""

    pending: list[tuple[Job, dict[str, Path]]] = field(default_factory=list)
    finished: int = 0
    unusable: list[tuple[Job, Exception]] = field(default_factory=list)

    def by_video(self) -> list[list[tuple[Job, dict[str, Path]]]]:
        """The pending jobs in runs of the same video, order kept: a video's expressions share its per-video
        work (its visual prefixes in stage 1, §5.8f; its SAM2 features in stage 2, §8.10)."""
        groups: list[list[tuple[Job, dict[str, Path]]]] = []
        for job, outputs in self.pending:
            if groups and groups[-1][0][0].video_key == job.video_key:
                groups[-1].append((job, outputs))
            else:
                groups.append([(job, outputs)])
        return groups

    def report(self, record: RunRecord) -> None:
        """Count the finished jobs and fail the unusable ones on ``record``."""
        record.skip(self.finished)
        for job, exc in self.unusable:
            record.fail(job, exc)


@dataclass(frozen=True)
class JobRunner:
    """Scan, claim, re-check, compute and record, with one command's notion of a finished output."""

    is_finished: IsFinished
    overwrite: bool = False  # --overwrite: nothing counts as finished

    def missing(self, outputs: Mapping[str, Path]) -> dict[str, Path]:
        """The outputs still to write."""
        if self.overwrite:
            return dict(outputs)
        return {kind: path for kind, path in outputs.items() if not self.is_finished(kind, path)}

    def scan(self, jobs: Iterable[tuple[Job, Mapping[str, Path]]]) -> Scan:
        """Sort ``(job, outputs)`` into pending, finished and unusable, without touching a run record (stage 1
        scans before the model loads and the progress bar starts)."""
        scan = Scan()
        for job, outputs in jobs:
            try:
                missing = self.missing(outputs)
            except Exception as exc:  # the reason is reported with the job, the run goes on (§10.9)
                scan.unusable.append((job, exc))
                continue
            if missing:
                scan.pending.append((job, missing))
            else:
                scan.finished += 1
        return scan

    def run(self, job: Job, outputs: Mapping[str, Path], compute: Compute, record: RunRecord) -> None:
        """One pending job: claim its outputs, leave it to a process that holds them, skip it if they were
        finished meanwhile, else compute the rest and record the outcome."""
        try:
            with contextlib.ExitStack() as claims:
                claimed = {kind: path for kind, path in outputs.items()
                           if claims.enter_context(output_claim(path))}
                if not claimed:
                    record.elsewhere(job)
                    return
                todo = self.missing(claimed)
                if not todo:
                    record.skip()
                    return
                outcome = compute(todo)
        except Exception as exc:  # one failed job must not stop a benchmark run (§10.9)
            record.fail(job, exc)
            return
        record.succeed(job, outcome.summary, outcome.degenerate)
        for note in outcome.notes:  # logged and listed under the manifest's "warnings"
            record.warn(f"{job.job_id}: {note}")
