"""Measuring: CPU time of a server and of this client over a measurement, and figures.

A :class:`Figure` is the median of a few repetitions after a warm-up, with the
CPU shares that tell which side held it back and the problems seen on the way.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from scripts.kit.launcher import Process
from scripts.kit.stats import Stats


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to ``needed`` if the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard


@dataclass
class Cpu:
    """CPU use of the server and of this client over one measurement."""

    server: Process
    wall0: float = 0.0
    server0: float = 0.0
    client0: float = 0.0
    server_s: float = 0.0
    client_s: float = 0.0
    wall_s: float = 0.0

    def __enter__(self) -> Cpu:
        self.wall0 = time.perf_counter()
        self.server0 = self.server.cpu_s()
        self.client0 = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self.wall0
        self.server_s = self.server.cpu_s() - self.server0
        self.client_s = time.process_time() - self.client0

    def shares(self) -> dict[str, float]:
        wall = max(self.wall_s, 1e-9)
        return {"server": self.server_s / wall, "client": self.client_s / wall}


def bound_side(shares: dict[str, float]) -> str:
    """Which side held the figure back: the one that used (nearly) a whole core."""
    server, client = shares["server"], shares["client"]
    if server >= 0.85 and server >= client:
        return "server"
    if client >= 0.85:
        return "client"
    return "neither"


@dataclass
class Figure:
    """One measured figure: the median of the repetitions, with what went with it."""

    value: float | None
    unit: str
    reps: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    bound: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        return {
            "value": None if self.value is None else round(self.value, 4),
            "unit": self.unit,
            "reps": [round(r, 4) for r in self.reps],
            "best": None if not self.reps else round(max(self.reps), 4),
            "cpu_share": {k: round(v, 3) for k, v in self.cpu.items()},
            "bound": self.bound,
            **({"detail": self.detail} if self.detail else {}),
            **({"problems": self.problems} if self.problems else {}),
        }


def check_stats(stats: Stats, runs: int) -> list[str]:
    """What went wrong in a measurement, as text (empty when nothing did)."""
    problems = []
    completed = stats.statuses.get("completed", 0)
    if completed != runs:
        problems.append(f"{completed} of {runs} runs completed ({dict(stats.statuses)})")
    for name in ("lost", "duplicated", "reordered", "wrong_count", "after_end"):
        if getattr(stats, name):
            problems.append(f"{name}: {getattr(stats, name)}")
    if stats.errors:
        problems.append(f"errors: {dict(stats.errors)}")
    return problems


def median_figure(
    runs: list[tuple[float, Cpu, Stats, int]], unit: str, detail: dict[str, Any] | None = None
) -> Figure:
    """The median of the repetitions; ``runs[0]`` is the warm-up, checked but not counted."""
    reps = runs[1:]
    values = [r[0] for r in reps]
    mid = sorted(range(len(reps)), key=lambda i: values[i])[len(reps) // 2]
    cpu = reps[mid][1].shares()
    detail = dict(detail or {})
    stats = reps[mid][2]
    if stats.events:
        detail["events_per_rep"] = stats.events
        detail["bytes_per_event"] = round(stats.bytes / stats.events, 1)
    problems: list[str] = []
    for _, _, stats, count in runs:
        problems.extend(check_stats(stats, count))
    return Figure(
        statistics.median(values),
        unit,
        values,
        cpu,
        bound_side(cpu),
        detail,
        sorted(set(problems)),
    )
