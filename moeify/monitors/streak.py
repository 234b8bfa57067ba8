"""`Streak`: how many consecutive optimizer steps a per-layer condition has held.

Monitors see one observation per `every_n_steps` optimizer steps; a streak adds
`steps_in_window` for each observation where its condition holds and starts over at the first
one where it does not. Windows in which a layer routed no tokens are not passed in at all, so
they neither extend nor break a streak. Patience thresholds are therefore in optimizer steps,
with the resolution of one observation window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Streak:
    steps: int = 0  # consecutive steps the condition has held (0 = not holding)
    since: int | None = None  # first step of the current run
    active: bool = False  # the run has reached `patience` (its start event was raised)
    ended_steps: int = 0  # length of the run that the last "end" closed

    def update(self, holds: bool, step: int, steps_in_window: int, patience: int) -> str | None:
        """Advance by one observation. Returns "start" when the run reaches `patience` steps,
        "end" when an active run stops holding, else None."""
        if holds:
            if self.steps == 0:
                self.since = step - steps_in_window + 1
            self.steps += steps_in_window
            if not self.active and self.steps >= patience:
                self.active = True
                return "start"
            return None
        was_active, self.ended_steps = self.active, self.steps
        self.steps, self.since, self.active = 0, None, False
        return "end" if was_active else None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Streak:
        return cls(**state)
