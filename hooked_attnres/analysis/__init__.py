"""Analyses built on caches and interventions (routing mass, schedules, effects)."""

from hooked_attnres.analysis.schedule import RecencySchedule, recency_schedule, schedule_deviation

__all__ = ["RecencySchedule", "recency_schedule", "schedule_deviation"]
