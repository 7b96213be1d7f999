"""The kit's photo checks on full-resolution synthetic stills: the verdict a nurse reads, the camera's own
calibration, and the scale from a marker of known size."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.config import config_errors
from edge.photo_flow import PhotoFormError, PhotoRequest, body_sites, read_form
from edge.photos import (
    CALIBRATION_FILE,
    DEFAULT_SHARPNESS_MIN,
    CalibrationError,
    Thresholds,
    assess,
    calibrate,
    examine,
    find_scale,
    save_calibration,
    thresholds_for,
)
from edge.scene import STILL_HEIGHT, STILL_WIDTH, SyntheticScene, render_scene

NOW = datetime(2026, 3, 2, 10, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def sharp() -> np.ndarray:
    return render_scene(SyntheticScene())


def test_a_sharp_well_lit_still_passes_and_is_kept_at_full_resolution(sharp: np.ndarray) -> None:
    examined = examine(sharp, Thresholds(), 20.0)
    assert examined.quality.ok and examined.quality.problems == ()
    kept = cv2.imdecode(np.frombuffer(examined.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert kept.shape == (STILL_HEIGHT, STILL_WIDTH, 3)
    assert float(np.abs(kept.astype(np.int16) - sharp.astype(np.int16)).mean()) < 2.5  # JPEG quality 95
    preview = cv2.imdecode(np.frombuffer(examined.preview, np.uint8), cv2.IMREAD_COLOR)
    assert preview.shape[1] == 1280
    metadata = examined.quality.metadata()
    assert metadata["flags"] == [] and metadata["sharpness"] > 4 * DEFAULT_SHARPNESS_MIN
    assert examined.scale is None  # no marker in view


@pytest.mark.parametrize(("scene", "code", "swedish", "english"), [
    (SyntheticScene(blur=3.0), "blurred", "Bilden är suddig. Håll stilla och ta om.",
     "The photo is blurred. Hold still and take it again."),
    (SyntheticScene(exposure=0.15), "dark", "Bilden är för mörk.", "The photo is too dark."),
    (SyntheticScene(exposure=3.0), "bright", "Bilden är för ljus.", "The photo is too bright."),
])
def test_a_faulty_still_fails_with_one_message_the_nurse_can_act_on(scene: SyntheticScene, code: str, swedish: str,
                                                                     english: str) -> None:
    quality = assess(render_scene(scene), Thresholds())
    assert not quality.ok
    assert [p.code for p in quality.problems] == [code]  # a dark still is not also called blurred
    assert quality.problems[0].sv.startswith(swedish) and "ta om" in quality.problems[0].sv
    assert quality.problems[0].en.startswith(english)
    assert quality.metadata()["flags"] == [code]


def test_calibration_sets_the_cameras_own_threshold(sharp: np.ndarray, tmp_path: Path) -> None:
    soft = render_scene(SyntheticScene(blur=1.5))  # a slightly shaken hand
    assert assess(soft, thresholds_for(tmp_path, "synthetic")).ok  # the default forgives it
    stills = [render_scene(SyntheticScene(), capture=n) for n in range(3)]
    calibration = calibrate(stills, "synthetic", NOW)
    save_calibration(tmp_path, calibration)
    stored = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    assert stored["camera"] == "synthetic" and len(stored["samples"]) == 3
    thresholds = thresholds_for(tmp_path, "synthetic")
    assert thresholds.calibrated and thresholds.sharpness_min > 4 * DEFAULT_SHARPNESS_MIN
    flagged = assess(soft, thresholds)
    assert [p.code for p in flagged.problems] == ["blurred"]  # this camera can do better
    assert flagged.metadata()["calibrated"] is True
    assert assess(sharp, thresholds).ok
    # Another camera's calibration does not count.
    assert thresholds_for(tmp_path, "/dev/video0") == Thresholds()


def test_calibration_refuses_a_scene_that_moved_or_is_dark() -> None:
    moving = [render_scene(SyntheticScene(blur=b)) for b in (0.0, 0.0, 2.5)]
    with pytest.raises(CalibrationError, match="differ too much"):
        calibrate(moving, "synthetic", NOW)
    dark = [render_scene(SyntheticScene(exposure=0.15), capture=n) for n in range(3)]
    with pytest.raises(CalibrationError, match="too dark"):
        calibrate(dark, "synthetic", NOW)


@pytest.mark.parametrize(("pixels_per_mm", "angle"), [(10.0, 12.0), (6.0, 33.0), (3.0, -20.0), (2.2, 5.0)])
def test_a_marker_of_known_size_gives_the_scale_within_two_percent(pixels_per_mm: float, angle: float) -> None:
    scene = SyntheticScene(marker_mm=20.0, pixels_per_mm=pixels_per_mm, marker_angle=angle)
    scale = find_scale(render_scene(scene), 20.0)
    assert scale is not None and scale.marker_id == scene.marker_id
    true_mm_per_pixel = 1 / pixels_per_mm
    assert abs(scale.mm_per_pixel - true_mm_per_pixel) / true_mm_per_pixel < 0.02


async def test_calibrate_camera_command_stores_the_threshold_in_the_kits_data_dir(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('server = "http://127.0.0.1:9"\ncredential = "credential.json"\ncamera = "synthetic"\n'
                      'data_dir = "data"\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nara.cli", "edge", "calibrate-camera", "--config", str(config), "--stills", "3",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    assert "photos below" in out.decode()
    thresholds = thresholds_for(tmp_path / "data", "synthetic")
    assert thresholds.calibrated and thresholds.sharpness_min > 4 * DEFAULT_SHARPNESS_MIN
    # Without a camera it says what to do.
    config.write_text('server = "http://127.0.0.1:9"\ncredential = "credential.json"\ncamera = "none"\n'
                      'data_dir = "data"\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nara.cli", "edge", "calibrate-camera", "--config", str(config),
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2 and "the camera cannot be used" in err.decode()


def test_the_marker_size_is_a_setting() -> None:
    base = {"server": "https://nara.example.se", "credential": "/c.json"}
    config, errors = config_errors(base)
    assert config is not None and config.marker_mm == 20.0
    config, errors = config_errors({**base, "marker_mm": 30})
    assert config is not None and config.marker_mm == 30.0
    _, errors = config_errors({**base, "marker_mm": "20 mm"})
    assert [e.field for e in errors] == ["marker_mm"] and "side in mm" in errors[0].message


@pytest.mark.parametrize(("form", "code"), [
    ({"note": "", "consent": "yes"}, "body_site_missing"),
    ({"body_site": "knee", "consent": "yes"}, "body_site_missing"),
    ({"body_site": "sacrum"}, "consent_missing"),
    ({"body_site": "sacrum", "consent": True}, "consent_missing"),
    ({"body_site": "sacrum", "consent": "no", "note": "x" * 2001}, "note_too_long"),
])
def test_the_photo_form_says_what_is_missing(form: dict[str, object], code: str) -> None:
    with pytest.raises(PhotoFormError) as refused:
        read_form(form)
    assert refused.value.code == code


def test_the_photo_form_and_a_request_read_as_the_nurse_meant() -> None:
    assert read_form({"body_site": "heel_left", "note": " Blåsa ", "consent": "no"}) == ("heel_left", "Blåsa", False)
    by = {"id": "p1", "name": "Dr A", "role": "clinician"}
    request = PhotoRequest.from_event({"type": "photo-requested", "by": by, "body_site": "sacrum",
                                       "note": "Visa kanten"}, 0.0)
    assert request.public() == {"by": "Dr A", "role": "clinician", "body_site": "sacrum",
                                "label": {"sv": "Korsbenet", "en": "Sacrum"}, "note": "Visa kanten"}
    vague = PhotoRequest.from_event({"type": "photo-requested", "by": None, "body_site": "elbow", "note": None}, 0.0)
    assert (vague.body_site, vague.note, vague.public()["label"]) == (None, "", None)
    assert [site["key"] for site in body_sites()][:2] == ["sacrum", "heel_left"] and body_sites()[-1]["key"] == "other"
