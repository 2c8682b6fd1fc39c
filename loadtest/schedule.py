"""Load schedules as plain functions (the locust shape classes in ``shapes.py`` call them)."""

from __future__ import annotations

import math


def step_users(elapsed_s: float, step_users: int, step_seconds: float, max_users: int) -> int:
    """Users wanted ``elapsed_s`` seconds into a step-load run: one step at t=0, one more per period,
    capped at ``max_users``."""
    return min(max_users, step_users * (1 + math.floor(elapsed_s / step_seconds)))
