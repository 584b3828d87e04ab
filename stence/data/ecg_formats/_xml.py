"""Safe parsing of vendor ECG XML, and small helpers over namespaced ElementTree elements.

Parsing goes through defusedxml: a DOCTYPE is accepted (MUSE writes `<!DOCTYPE RestingECG SYSTEM
"restecg.dtd">`) but never fetched, and any entity declaration or external reference is refused before it
is expanded (billion laughs, `<!ENTITY x SYSTEM "file:///etc/passwd">`): ECG_XML_FORBIDDEN. Malformed or
truncated XML, and bytes that do not decode in the encoding the XML declaration names, are ECG_BAD_XML.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree as DET

from stence.data.ecg_formats._limits import read_bounded
from stence.data.limits import Limits
from stence.errors import ECG_BAD_XML, ECG_XML_FORBIDDEN, BadInputError

MAX_DEPTH = 64  # element nesting walked; real exports nest < 20 deep, a crafted one could nest 10^5

_FORBIDDEN = (
    defusedxml.EntitiesForbidden,
    defusedxml.ExternalReferenceForbidden,
    defusedxml.DTDForbidden,
    defusedxml.NotSupportedError,
)


def parse_xml(path: Path, limits: Limits) -> Element:
    """The root element of the XML file at `path`, read within `limits.max_header_bytes`."""
    data = read_bounded(path, limits)
    try:
        return DET.fromstring(data, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except _FORBIDDEN as e:
        # the exception's text may carry the entity's value or system ID: only its kind is reported
        raise BadInputError(
            ECG_XML_FORBIDDEN,
            f"XML declares entities or references external resources ({type(e).__name__}); refused unread",
        ) from None
    except ParseError as e:  # expat's message is a kind and a position, never document text
        raise BadInputError(ECG_BAD_XML, f"malformed or truncated XML ({e})") from None
    except (LookupError, UnicodeError, ValueError) as e:
        raise BadInputError(ECG_BAD_XML, f"XML cannot be decoded ({type(e).__name__})") from None


def local(tag: object) -> str:
    """The tag without its namespace (`{urn:hl7-org:v3}series` -> `series`); "" for comments and PIs."""
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def child(elem: Element | None, *names: str) -> Element | None:
    """The first descendant along the path of local `names` (each a direct child of the previous)."""
    for name in names:
        if elem is None:
            return None
        elem = next((c for c in elem if local(c.tag) == name), None)
    return elem


def children(elem: Element | None, name: str) -> list[Element]:
    """Direct children with local tag `name`."""
    return [] if elem is None else [c for c in elem if local(c.tag) == name]


def text(elem: Element | None, *names: str) -> str:
    """Stripped text of the element at `names` under `elem` ("" when absent)."""
    found = child(elem, *names) if names else elem
    return (found.text or "").strip() if found is not None else ""


def walk(root: Element, skip: frozenset[str] = frozenset()) -> Iterator[tuple[Element, tuple[str, ...]]]:
    """(element, local tags of its ancestors from the root's children down) for every element below
    `root`, depth first, without recursion; subtrees whose local tag is in `skip` are not entered.

    Raises ECG_BAD_XML past MAX_DEPTH levels (no real export nests that deep).
    """
    stack: list[tuple[Element, tuple[str, ...]]] = [(c, ()) for c in reversed(list(root))]
    while stack:
        elem, path = stack.pop()
        tag = local(elem.tag)
        if not tag or tag in skip:
            continue
        yield elem, path
        if len(path) >= MAX_DEPTH:
            raise BadInputError(ECG_BAD_XML, f"XML nested deeper than {MAX_DEPTH} levels")
        stack.extend((c, (*path, tag)) for c in reversed(list(elem)))
