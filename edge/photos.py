"""Wound photos on the kit: is the still good enough, how large is what it shows, and the camera's own measure.

A nurse in a patient's home gets advice she can act on before the photo
leaves the house:

* **sharpness**: the variance of the Laplacian of a grey copy scaled to a fixed
  size (``SHARPNESS_WIDTH`` wide), so stills of any resolution compare. What
  counts as sharp depends on the camera, so each kit is calibrated
  (``calibrate``: a few stills of a detailed, still scene; the threshold is a
  fraction of their median) and uses ``DEFAULT_SHARPNESS_MIN`` until then;
* **exposure**: the share of pixels clipped at the dark or the bright end, and
  the mean. A badly exposed still is not also called blurred: darkness alone
  lowers the Laplacian's variance, and the nurse needs one thing to fix;
* **scale**: when an ArUco marker (DICT_4X4_50) of known side lies in view,
  millimetres per pixel from its mean side length.

The checks are advice: a flagged photo may still be kept, and its flags travel
with it in the upload's ``quality`` metadata (docs/images.md).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .config import EdgeConfig
from .files import write_json_atomically
from .media import KitMedia, StillFailed
from .scene import MARKER_DICTIONARY, Image

SHARPNESS_WIDTH = 1024  # the grey copy's width for the sharpness measure
DEFAULT_SHARPNESS_MIN = 60.0  # until the camera is calibrated
CALIBRATION_FRACTION = 0.35  # of a calibrated camera's median sharpness on a detailed, still scene
CALIBRATION_FILE = "camera-calibration.json"
CALIBRATION_STILLS = 5
CALIBRATION_SPREAD_MAX = 2.0  # largest / smallest sample: beyond it the scene or the camera moved
DARK_LEVEL, BRIGHT_LEVEL = 16, 240  # grey levels counted as clipped
CLIPPED_MAX = 0.20  # share of pixels clipped at one end that makes a still too dark or too bright
DARK_MEAN, BRIGHT_MEAN = 55.0, 210.0
JPEG_QUALITY = 95
PREVIEW_WIDTH = 1280


@dataclass(frozen=True)
class Problem:
    """One failed check, with what the nurse should do about it."""

    code: str  # "blurred", "dark" or "bright"
    sv: str
    en: str


PROBLEMS = {
    "blurred": Problem("blurred", "Bilden är suddig. Håll stilla och ta om.",
                       "The photo is blurred. Hold still and take it again."),
    "dark": Problem("dark", "Bilden är för mörk. Tänd en lampa eller ta bilden närmare ljuset och ta om.",
                    "The photo is too dark. Switch on a light or move closer to one and take it again."),
    "bright": Problem("bright", "Bilden är för ljus. Undvik direkt ljus eller blixt nära huden och ta om.",
                      "The photo is too bright. Avoid direct light or a flash close to the skin and take it again."),
}


@dataclass(frozen=True)
class Thresholds:
    sharpness_min: float = DEFAULT_SHARPNESS_MIN
    calibrated: bool = False


@dataclass(frozen=True)
class Quality:
    sharpness: float
    dark: float  # share of pixels at or below DARK_LEVEL
    bright: float  # share of pixels at or above BRIGHT_LEVEL
    mean: float  # mean grey level, 0-255
    sharpness_min: float
    calibrated: bool
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def metadata(self) -> dict[str, Any]:
        """The upload's ``quality`` metadata: the measures, the threshold used and the flags raised."""
        return {"sharpness": round(self.sharpness, 1), "dark": round(self.dark, 4), "bright": round(self.bright, 4),
                "mean": round(self.mean, 1), "sharpness_min": round(self.sharpness_min, 1),
                "calibrated": self.calibrated, "flags": [p.code for p in self.problems]}


def grey(image: Image) -> Image:
    return np.asarray(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), dtype=np.uint8)


def sharpness(image: Image) -> float:
    """Variance of the Laplacian of a grey copy ``SHARPNESS_WIDTH`` wide."""
    picture = grey(image) if image.ndim == 3 else image
    height = max(1, round(picture.shape[0] * SHARPNESS_WIDTH / picture.shape[1]))
    small = cv2.resize(picture, (SHARPNESS_WIDTH, height), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(small, cv2.CV_64F).var())


def exposure(image: Image) -> tuple[float, float, float]:
    """(share clipped dark, share clipped bright, mean grey level)."""
    picture = grey(image) if image.ndim == 3 else image
    counts = np.bincount(picture.ravel(), minlength=256)
    total = float(picture.size)
    dark = float(counts[: DARK_LEVEL + 1].sum()) / total
    bright = float(counts[BRIGHT_LEVEL:].sum()) / total
    mean = float(np.dot(counts, np.arange(256))) / total
    return dark, bright, mean


def assess(image: Image, thresholds: Thresholds) -> Quality:
    picture = grey(image)
    dark, bright, mean = exposure(picture)
    measured = sharpness(picture)
    problems = []
    if dark > CLIPPED_MAX or mean < DARK_MEAN:
        problems.append(PROBLEMS["dark"])
    elif bright > CLIPPED_MAX or mean > BRIGHT_MEAN:
        problems.append(PROBLEMS["bright"])
    elif measured < thresholds.sharpness_min:
        problems.append(PROBLEMS["blurred"])
    return Quality(measured, dark, bright, mean, thresholds.sharpness_min, thresholds.calibrated, tuple(problems))


# --- scale ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    mm_per_pixel: float
    marker_pixels: float  # the marker's mean side in the still
    marker_id: int


def find_scale(image: Image, marker_mm: float) -> Scale | None:
    """Millimetres per pixel from the largest ArUco marker in view, or None when there is none."""
    parameters = cv2.aruco.DetectorParameters()
    parameters.cornerRefinementMethod = cv2.aruco.CORNER_REFINE_SUBPIX  # corners to a fraction of a pixel
    detector = cv2.aruco.ArucoDetector(cv2.aruco.getPredefinedDictionary(MARKER_DICTIONARY), parameters)
    corners, ids, _ = detector.detectMarkers(grey(image))
    if ids is None or len(corners) == 0:
        return None
    sides = []
    for found in corners:
        points = np.asarray(found, dtype=np.float64).reshape(4, 2)
        sides.append(float(np.mean(np.linalg.norm(points - np.roll(points, -1, axis=0), axis=1))))
    largest = int(np.argmax(sides))
    return Scale(marker_mm / sides[largest], sides[largest], int(np.asarray(ids).ravel()[largest]))


# --- calibration ---------------------------------------------------------------------------


class CalibrationError(Exception):
    """The calibration stills cannot set a threshold; the message says what to do."""


@dataclass(frozen=True)
class Calibration:
    camera: str  # the configured camera it was measured on
    sharpness_min: float
    median: float
    samples: tuple[float, ...]
    fraction: float
    calibrated_at: str  # ISO 8601

    def thresholds(self) -> Thresholds:
        return Thresholds(self.sharpness_min, calibrated=True)


def calibrate(stills: Sequence[Image], camera: str, now: datetime,
              fraction: float = CALIBRATION_FRACTION) -> Calibration:
    """The camera's sharpness threshold from a few stills of a detailed, still, well-lit scene."""
    if len(stills) < 3:
        raise CalibrationError("at least three stills are needed")
    samples = []
    for still in stills:
        dark, bright, mean = exposure(grey(still))
        if dark > CLIPPED_MAX or mean < DARK_MEAN:
            raise CalibrationError("the scene is too dark: light it well and calibrate again")
        if bright > CLIPPED_MAX or mean > BRIGHT_MEAN:
            raise CalibrationError("the scene is too bright: avoid direct light and calibrate again")
        samples.append(sharpness(still))
    if min(samples) <= 0 or max(samples) / min(samples) > CALIBRATION_SPREAD_MAX:
        raise CalibrationError("the stills differ too much in sharpness: fix the camera (a stand or a table) "
                               "in front of a detailed, still scene such as a printed page, and calibrate again")
    median = statistics.median(samples)
    return Calibration(camera, median * fraction, median, tuple(samples), fraction, now.isoformat())


def save_calibration(data_dir: Path, calibration: Calibration) -> Path:
    """Write the calibration atomically into the kit's data directory."""
    path = data_dir / CALIBRATION_FILE
    write_json_atomically(path, asdict(calibration), indent=2)
    return path


def load_calibration(data_dir: Path, camera: str) -> Calibration | None:
    """The stored calibration of ``camera``; None when there is none, it is unreadable, or for another camera."""
    try:
        data = json.loads((data_dir / CALIBRATION_FILE).read_text())
        calibration = Calibration(str(data["camera"]), float(data["sharpness_min"]), float(data["median"]),
                                  tuple(float(s) for s in data["samples"]), float(data["fraction"]),
                                  str(data["calibrated_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return calibration if calibration.camera == camera and calibration.sharpness_min > 0 else None


def thresholds_for(data_dir: Path, camera: str) -> Thresholds:
    calibration = load_calibration(data_dir, camera)
    return calibration.thresholds() if calibration is not None else Thresholds()


async def calibrate_camera(config: EdgeConfig, now: datetime, stills: int = CALIBRATION_STILLS) -> Calibration:
    """``nara edge calibrate-camera``: take ``stills`` stills with the kit's camera, calibrate, and save."""
    media = await KitMedia.open(config.camera, "none", config.width, config.height, config.fps)
    try:
        if media.status.camera != "ok":
            raise CalibrationError(f"the camera cannot be used ({media.status.camera_detail}); if the kit's agent "
                                   "is running it holds the camera: stop it first (systemctl stop nara-edge)")
        taken = []
        for _ in range(stills):
            try:
                taken.append(await media.still())
            except StillFailed as exc:
                raise CalibrationError(f"the camera gave no still: {exc.detail}") from None
    finally:
        await media.close()
    calibration = calibrate(taken, config.camera, now)
    save_calibration(config.data_dir, calibration)
    return calibration


# --- the still as kept ---------------------------------------------------------------------


def encode_jpeg(image: Image, quality: int = JPEG_QUALITY) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("the still could not be encoded as JPEG")
    return data.tobytes()


def preview_jpeg(image: Image, width: int = PREVIEW_WIDTH) -> bytes:
    """A smaller JPEG for the kit's screen."""
    if image.shape[1] > width:
        height = round(image.shape[0] * width / image.shape[1])
        image = np.asarray(cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA), dtype=np.uint8)
    return encode_jpeg(image, 85)


@dataclass(frozen=True)
class Examined:
    """A still as the nurse sees it judged: the full-quality JPEG, a preview, the checks and the scale."""

    jpeg: bytes
    preview: bytes
    width: int
    height: int
    quality: Quality
    scale: Scale | None


def examine(image: Image, thresholds: Thresholds, marker_mm: float) -> Examined:
    """Check, measure and encode a still (CPU work: run it off the event loop)."""
    return Examined(encode_jpeg(image), preview_jpeg(image), int(image.shape[1]), int(image.shape[0]),
                    assess(image, thresholds), find_scale(image, marker_mm))
