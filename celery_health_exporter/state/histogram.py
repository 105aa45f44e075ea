"""A Prometheus histogram kept as plain numbers: the one used across the state model."""
from __future__ import annotations

from bisect import bisect_left


class Histogram:
    """Non-cumulative bucket counts (the last slot is above the largest bound, +Inf) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple, counts: list | None = None, total: float = 0.0):
        self.bounds = bounds
        self.counts = list(counts) if counts is not None else [0] * (len(bounds) + 1)
        self.sum = total

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs ending with +Inf, as the exposition format wants."""
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out

    def add(self, other: "Histogram", sign: int = 1) -> None:
        self.counts = [a + sign * b for a, b in zip(self.counts, other.counts)]
        self.sum += sign * other.sum

    def copy(self) -> "Histogram":
        return Histogram(self.bounds, self.counts, self.sum)
