"""Identifying values of an HL7 aECG document, for the pseudonymiser and the leak scan only.

Every `id` (its `extension`, or its `root` when that is the identifier itself), person and organisation
`name` (text and given / family / prefix / suffix parts, joined too), `addr` part, `telecom`, `birthTime`
and time stamp (`effectiveTime`, `activityTime`, `time`: low / high / center / value) outside the waveform
`sequenceSet`s and annotation details, plus free `text`. The kind is taken from the nearest ancestor that
says whose it is: the trial subject's ID is `patient_id`, investigators are `physician`, performers and
authors `operators`, sites and organisations `institution`; device and manufacturer IDs and names are not
identifiers. Anything else goes under `other_id`.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element

from stence.data.ecg_formats import _ids
from stence.data.ecg_formats._xml import child, local, walk

_SKIP = frozenset({"sequenceSet", "annotation", "code", "value"})
_NOT_IDS = frozenset(
    {
        "manufacturedSeriesDevice",
        "assignedDevice",
        "playedManufacturedDevice",
        "manufacturerOrganization",
        "seriesAuthor",
    }
)
# Nearest ancestor -> kind of the ids and names below it (the first found going up wins).
_CONTEXT = {
    "trialSubject": "patient_id",
    "subjectDemographicPerson": "name",
    "subject": "name",
    "trialInvestigator": "physician",
    "investigatorPerson": "physician",
    "studyEventPerformer": "operators",
    "seriesPerformer": "operators",
    "assignedPerson": "operators",
    "assignedEntity": "operators",
    "performer": "operators",
    "secondaryPerformer": "operators",
    "trialSite": "institution",
    "testingSite": "institution",
    "location": "institution",
    "sponsorOrganization": "institution",
    "representedAuthoringOrganization": "institution",
    "clinicalTrial": "other_id",
    "clinicalTrialProtocol": "other_id",
}
_NAME_PARTS = ("prefix", "given", "family", "suffix")
_TIMES = frozenset({"effectiveTime", "activityTime", "time", "birthTime"})


def _kind(path: tuple[str, ...]) -> str | None:
    """Kind of an id or name from its ancestors (innermost first); None inside a device or manufacturer."""
    for tag in reversed(path):
        if tag in _NOT_IDS:
            return None
        if tag in _CONTEXT:
            return _CONTEXT[tag]
    return "other_id"


def _times(ids: dict[str, str], elem: Element, field: str) -> None:
    _ids.add_date(ids, field, elem.get("value"))
    for c in elem:
        if local(c.tag) in ("low", "high", "center"):
            _ids.add_date(ids, f"{field}{local(c.tag)}", c.get("value"))


def identifiers(root: Element) -> dict[str, str]:
    """Identifiers of the aECG document `root` (see the module docstring)."""
    ids: dict[str, str] = {}
    subject = next((e for e in root.iter() if local(e.tag) == "trialSubject"), None)
    if (sid := child(subject, "id")) is not None:
        _ids.add(ids, "patient_id", "trialSubject", sid.get("extension") or sid.get("root"))
    for elem, path in walk(root, _SKIP):
        tag, parent = local(elem.tag), (path[-1] if path else "document")
        kind = _kind((*path, tag))
        if tag == "id" and kind:
            _ids.add(
                ids,
                "patient_id" if kind == "name" else kind,
                parent,
                elem.get("extension") or elem.get("root"),
            )
        elif tag == "name" and kind:
            kind = "name" if kind == "patient_id" else kind
            parts = [(c.text or "") for p in _NAME_PARTS for c in elem if local(c.tag) == p]
            _ids.add(ids, kind, parent, (elem.text or "").strip())
            _ids.add_person(ids, kind, parent, parts)
        elif tag == "addr":
            parts = [(c.text or "") for c in elem]
            _ids.add(ids, "address", parent, ", ".join(p.strip() for p in parts if p.strip()))
            for p in parts:
                _ids.add(ids, "address", parent, p)
        elif tag == "telecom":
            _ids.add(ids, "contact", parent, elem.get("value"))
        elif tag == "birthTime":
            _ids.add(ids, "dob", parent, elem.get("value"))
        elif tag in _TIMES:
            _times(ids, elem, f"{parent}{tag}")
        elif tag == "text" and len(elem) == 0:
            _ids.add(ids, "free_text", parent, elem.text)
    return ids
