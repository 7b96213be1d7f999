"""The body sites a wound or symptom image may show (docs/images.md, "Patient reference and body sites").

A fixed list, so images of the same site for the same patient can be compared
across consultations. The FHIR export codes each with the SNOMED CT code of
its structure and says the side in ``bodySite.text``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BodySite:
    key: str
    sv: str
    en: str
    snomed: str | None  # SNOMED CT code of the structure; None for "other"

    def label(self) -> dict[str, str]:
        return {"sv": self.sv, "en": self.en}


_SITES = (
    BodySite("sacrum", "Korsbenet", "Sacrum", "54735007"),
    BodySite("heel_left", "Vänster häl", "Left heel", "76853006"),
    BodySite("heel_right", "Höger häl", "Right heel", "76853006"),
    BodySite("hip_left", "Vänster höft", "Left hip", "29836001"),
    BodySite("hip_right", "Höger höft", "Right hip", "29836001"),
    BodySite("buttock_left", "Vänster skinka", "Left buttock", "46862004"),
    BodySite("buttock_right", "Höger skinka", "Right buttock", "46862004"),
    BodySite("leg_left", "Vänster ben", "Left leg", "61685007"),
    BodySite("leg_right", "Höger ben", "Right leg", "61685007"),
    BodySite("foot_left", "Vänster fot", "Left foot", "22335008"),
    BodySite("foot_right", "Höger fot", "Right foot", "7769000"),
    BodySite("back", "Ryggen", "Back", "77568009"),
    BodySite("chest", "Bröstkorgen", "Chest", "51185008"),
    BodySite("abdomen", "Buken", "Abdomen", "113345001"),
    BodySite("arm_left", "Vänster arm", "Left arm", "53120007"),
    BodySite("arm_right", "Höger arm", "Right arm", "53120007"),
    BodySite("head", "Huvudet", "Head", "69536005"),
    BodySite("mouth", "Munnen", "Mouth", "123851003"),
    BodySite("other", "Annat (se anteckning)", "Other (see note)", None),
)

BODY_SITES: dict[str, BodySite] = {site.key: site for site in _SITES}
