"""What every benchmark gets: the plan (quick or full), a temp dir, and a progress log."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Plan:
    quick: bool
    baseline_mode: str = "threads"

    @property
    def isolation_healthy(self) -> int:
        return 8 if self.quick else 16

    @property
    def isolation_seconds(self) -> float:
        return 3.5 if self.quick else 20.0

    @property
    def isolation_grace(self) -> float:
        """How long a phase waits for healthy requests still in flight after it ends."""
        return 3.0 if self.quick else 10.0

    @property
    def reaction_reps(self) -> int:
        return 3 if self.quick else 10

    @property
    def spawn_sessions(self) -> int:
        return 50 if self.quick else 200

    @property
    def throughput_seconds(self) -> float:
        return 2.0 if self.quick else 10.0

    @property
    def settle(self) -> float:
        """Pauses between steps that let a server finish what the last step started."""
        return 0.5 if self.quick else 1.0

    @property
    def scale_workers(self) -> int:
        return 200 if self.quick else 1000

    @property
    def scale_window(self) -> float:
        return 5.0 if self.quick else 20.0

    @property
    def memory_workers(self) -> int:
        return 8 if self.quick else 16

    @property
    def stop_workers(self) -> int:
        return 20 if self.quick else 100


@dataclass
class Bench:
    plan: Plan
    tmp: Path
    started: float

    def say(self, message: str) -> None:
        """Progress on stderr, so stdout ends with the table and the JSON line."""
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)
