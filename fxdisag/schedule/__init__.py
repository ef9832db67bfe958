"""Schedules as plain data: every rank's action list for one training step.

``actions`` (the kinds table, :class:`Action`, :class:`Schedule`) -> ``builders``
(GPipe and 1F1B AF-Pipe at p = 1, the expert-parallel baseline), ``ring`` (p
groups of each kind) -> ``validate`` (accept exactly what the
runtime can run) -> ``grid`` (draw it) -> ``simulate`` (time it with the cost model).
"""

from fxdisag.schedule.actions import (
    CHANNELS,
    KINDS,
    Action,
    ActionKind,
    KindInfo,
    Schedule,
    Stages,
    consumes,
    produced_by,
    required_before,
)
from fxdisag.schedule.builders import af_pipe_schedule, ep_schedule, one_f_one_b_schedule
from fxdisag.schedule.chunks import chunk_schedule
from fxdisag.schedule.grid import format_grid, grid_step
from fxdisag.schedule.ring import ring_schedule, stage_costs
from fxdisag.schedule.validate import ScheduleError, validate

__all__ = [
    "CHANNELS",
    "KINDS",
    "Action",
    "ActionKind",
    "KindInfo",
    "Schedule",
    "Stages",
    "ScheduleError",
    "af_pipe_schedule",
    "chunk_schedule",
    "consumes",
    "ep_schedule",
    "format_grid",
    "grid_step",
    "one_f_one_b_schedule",
    "produced_by",
    "required_before",
    "ring_schedule",
    "stage_costs",
    "validate",
]
