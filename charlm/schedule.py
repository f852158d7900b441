"""Learning rate as a pure function of the position in the run, measured in epochs.

Keeping the schedule stateless makes resuming exact: the position (epoch plus the
fraction of the epoch's characters consumed) is all a checkpoint needs to carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from charlm.config import Phase


@dataclass(frozen=True)
class _Segment:
    start: float  # epochs
    end: float
    phase: Phase
    cycle_index: int | None  # global SGDR cycle index, None for constant phases


class Schedule:
    def __init__(self, phases: tuple[Phase, ...] | list[Phase]) -> None:
        self.segments: list[_Segment] = []
        position, cycle = 0.0, 0
        for phase in phases:
            if phase.kind == "constant":
                self.segments.append(_Segment(position, position + phase.total_epochs, phase, None))
                position += phase.total_epochs
            else:
                for length in phase.cycle_lengths:
                    self.segments.append(_Segment(position, position + length, phase, cycle))
                    position += length
                    cycle += 1
        self.total_epochs = int(position)

    def lr(self, position: float) -> float:
        """Learning rate at ``position`` epochs into the run."""
        for seg in self.segments:
            if position < seg.end:
                break
        phase = seg.phase
        if phase.kind == "constant":
            return phase.lr
        t = min(max((position - seg.start) / (seg.end - seg.start), 0.0), 1.0)
        return phase.lr_min + (phase.lr - phase.lr_min) * (1.0 + math.cos(math.pi * t)) / 2.0

    def cycle_ending_at(self, epoch: int) -> int | None:
        """The SGDR cycle that ends with epoch ``epoch`` (0-based), if any."""
        for seg in self.segments:
            if seg.cycle_index is not None and int(seg.end) == epoch + 1:
                return seg.cycle_index
        return None
