"""What the synthetic cohort is made of: planned patients, ECG records ready to write, and the name pools
their identifiers (and the staff in vendor files) are drawn from. The bottom of the synth modules: the planner
(synth_plan), the file writers (synth_vendor) and corrupt planting (synth_corrupt) all build on it."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from stence.data.synth_angio import CoronaryTree, View
from stence.data.synth_ecg import EcgPatient

FIRST_NAMES_F = (
    "Alma", "Brita", "Carla", "Dagny", "Edda", "Frida", "Greta", "Hilde", "Ines", "Jorun", "Kaja", "Liv",
)  # fmt: skip
FIRST_NAMES_M = (
    "Arvid", "Bodo", "Cyrus", "Dario", "Egon", "Falk", "Gero", "Hauke", "Ivo", "Jannes", "Kuno", "Lutz",
)  # fmt: skip
LAST_NAMES = (
    "Abelmann", "Birkfeld", "Czernik", "Dornquist", "Eschholt", "Fennrich", "Gulbrand", "Harvold",
    "Isenhart", "Jorvik", "Kesselring", "Lindqvar", "Morvath", "Nordhaus", "Ostrander", "Pellwitz",
)  # fmt: skip


@dataclass
class Patient:
    """One planned patient: identifiers, dates, lesions and the models that generate the data."""

    index: int
    patient_id: str
    name: str
    sex: str
    birth: dt.date
    study_date: dt.date
    segments: dict[int, int]
    ecg: EcgPatient
    tree: CoronaryTree
    study_uid: str
    folder: str
    views: list[View]


@dataclass(frozen=True)
class EcgRecord:
    """A record ready to write: digital signal (T, n_leads) int16 with its lead names."""

    name: str
    digital: np.ndarray
    leads: tuple[str, ...]
    fs: int
    when: dt.datetime
    comments: tuple[str, ...]
