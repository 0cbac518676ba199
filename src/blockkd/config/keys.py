"""Which keys each recipe section declares: the plain sections' dataclasses and the named sections'
registries (``data``, ``optim``, ``schedule``: common keys plus each entry's own).

Why its own module: reading recipes (``recipe``) checks keys as each file is read and validation
(the package ``__init__``) parses them; both import this, so neither imports the other back.
"""
from __future__ import annotations

from .. import data, optim, schema
from .sections import ModelSection, OptimSection, OutputSection, ScheduleSection, TeacherSection, TrainSection

PLAIN = {"model": ModelSection, "teacher": TeacherSection, "train": TrainSection, "output": OutputSection}


def named(section: str):
    """(common dataclass, registry, kind) of the sections whose ``name`` picks an entry with own keys."""
    return {"data": (data.DataSection, data.DATASETS, "dataset"),
            "optim": (OptimSection, optim.OPTIMIZERS, "optimizer"),
            "schedule": (ScheduleSection, optim.SCHEDULES, "schedule")}[section]


def declared_keys(section: str) -> list[str]:
    """Every key ``section`` may hold for some choice of its ``name`` (checked for the actual one later)."""
    if section in PLAIN:
        return [f.name for f in schema.fields(PLAIN[section])]
    if section == "method":
        return ["name", "options"]
    cls, registry, _ = named(section)
    keys = [f.name for f in schema.fields(cls)]
    for name in registry.names():
        keys += [f.name for f in schema.fields(registry.get(name).options) if f.name not in keys]
    return keys
