"""A synthetic wound photo: what the kit's synthetic camera gives as a full-resolution still.

Tests and demos need stills with known faults: a sharp picture of skin with a
pressure ulcer and fine detail (pores, hairs, the wound's granulation), or the
same picture blurred (a shaking hand), too dark (a dim room), overexposed (a
flash too close), and optionally with an ArUco scale marker of known size
lying beside the wound. ``render_scene`` draws one; the same scene and seed
always give the same picture, and each capture adds its own sensor noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

Image = npt.NDArray[np.uint8]  # height x width x 3, BGR, as OpenCV keeps pictures

STILL_WIDTH, STILL_HEIGHT = 2592, 1944  # a 5-megapixel sensor, like the Pi camera v1 and many webcams
MARKER_DICTIONARY = cv2.aruco.DICT_4X4_50
SKIN = (150, 178, 222)  # BGR: light skin


@dataclass(frozen=True)
class SyntheticScene:
    """What the synthetic camera sees. ``blur`` is a Gaussian sigma in pixels of the full still;
    ``exposure`` multiplies the light (0.15: a dark room, 3.0: overexposed); ``marker_mm`` places an
    ArUco marker (DICT_4X4_50, id ``marker_id``) of that side, at ``pixels_per_mm``, turned by
    ``marker_angle`` degrees. ``fail``: the still fails with this reason, as with a camera unplugged
    during it (the video stream goes on)."""

    width: int = STILL_WIDTH
    height: int = STILL_HEIGHT
    blur: float = 0.0
    exposure: float = 1.0
    marker_mm: float | None = None
    pixels_per_mm: float = 10.0
    marker_angle: float = 12.0
    marker_id: int = 7
    seed: int = 1
    fail: str = ""

    @property
    def marker_pixels(self) -> float | None:
        """The marker's side in pixels, when there is one."""
        return None if self.marker_mm is None else self.marker_mm * self.pixels_per_mm


def render_scene(scene: SyntheticScene, capture: int = 0) -> Image:
    """The still the synthetic camera takes of ``scene``; ``capture`` varies only the sensor noise."""
    rng = np.random.default_rng(scene.seed)
    h, w = scene.height, scene.width
    picture = np.empty((h, w, 3), dtype=np.float32)
    picture[:] = SKIN
    # Mottled skin: a coarse random field, smoothly enlarged.
    mottle = cv2.resize(rng.normal(0.0, 9.0, (h // 64 + 2, w // 64 + 2)).astype(np.float32), (w, h),
                        interpolation=cv2.INTER_CUBIC)
    picture += mottle[:, :, None]
    # Pores and fine texture: pixel-level detail a blur or a shaking hand wipes out first.
    pores = cv2.GaussianBlur(rng.normal(0.0, 22.0, (h, w)).astype(np.float32), (0, 0), 0.8)
    picture += pores[:, :, None]
    _draw_hairs(picture, rng)
    _draw_wound(picture, rng, w // 2, h // 2, w // 5, h // 6)
    if scene.marker_pixels is not None:
        _draw_marker(picture, scene, w * 3 // 4, h // 4)
    picture *= scene.exposure
    if scene.blur > 0:
        picture = np.asarray(cv2.GaussianBlur(picture, (0, 0), scene.blur), dtype=np.float32)
    noise = np.random.default_rng((scene.seed, capture)).normal(0.0, 2.0, (h, w)).astype(np.float32)
    picture += noise[:, :, None] * max(scene.exposure, 0.2)
    return np.clip(picture, 0, 255).astype(np.uint8)


def _draw_hairs(picture: npt.NDArray[np.float32], rng: np.random.Generator) -> None:
    h, w = picture.shape[:2]
    for _ in range(120):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        angle = rng.uniform(0, math.pi)
        length = rng.uniform(40, 160)
        end = (int(x + length * math.cos(angle)), int(y + length * math.sin(angle)))
        cv2.line(picture, (x, y), end, (70, 80, 100), 1, cv2.LINE_AA)


def _draw_wound(picture: npt.NDArray[np.float32], rng: np.random.Generator, cx: int, cy: int, rx: int,
                ry: int) -> None:
    """A stage 3 pressure ulcer: reddened rim, red granulation, yellow slough (drawn in its own box only)."""
    half_w, half_h = rx * 2, ry * 2
    box = picture[cy - half_h:cy + half_h, cx - half_w:cx + half_w]
    h, w = box.shape[:2]
    centre = (w // 2, h // 2)
    # The reddened rim, smooth: drawn small, blurred and enlarged.
    small = np.zeros((h // 8, w // 8), dtype=np.float32)
    cv2.ellipse(small, (w // 16, h // 16), (int(rx * 1.35) // 8, int(ry * 1.35) // 8), 15, 0, 360, 1.0, -1)
    rim = cv2.resize(cv2.GaussianBlur(small, (0, 0), rx / 48), (w, h), interpolation=cv2.INTER_LINEAR)
    box += rim[:, :, None] * np.array([-30, -45, 5], dtype=np.float32)
    bed = np.zeros((h, w), dtype=np.float32)
    cv2.ellipse(bed, centre, (rx, ry), 15, 0, 360, 1.0, -1, cv2.LINE_AA)
    lumps = rng.normal(0.0, 1.0, (h // 3, w // 3)).astype(np.float32)
    granulation = 1.0 + 0.5 * cv2.resize(lumps, (w, h), interpolation=cv2.INTER_CUBIC).clip(-1.6, 1.6)
    red = np.array([55, 50, 165], dtype=np.float32)
    inside = bed[:, :, None]
    box *= 1.0 - inside
    box += inside * red * granulation[:, :, None]
    for _ in range(5):  # slough
        sx = int(centre[0] + rng.uniform(-0.6, 0.6) * rx)
        sy = int(centre[1] + rng.uniform(-0.6, 0.6) * ry)
        cv2.ellipse(box, (sx, sy), (int(rng.uniform(0.08, 0.2) * rx), int(rng.uniform(0.06, 0.15) * ry)),
                    float(rng.uniform(0, 180)), 0, 360, (90, 190, 215), -1, cv2.LINE_AA)


def _draw_marker(picture: npt.NDArray[np.float32], scene: SyntheticScene, cx: int, cy: int) -> None:
    """The ArUco marker printed on a white card (a quiet zone of a quarter side), turned by ``marker_angle``."""
    side = scene.marker_pixels
    assert side is not None
    scale = 8  # drawn large and warped down, so its edges are as a lens would give them
    cells = 6  # DICT_4X4_50: 4x4 bits and a one-bit black border
    drawn = cv2.aruco.generateImageMarker(cv2.aruco.getPredefinedDictionary(MARKER_DICTIONARY), scene.marker_id,
                                          cells * 10 * scale)
    margin = drawn.shape[0] // 4
    card = cv2.copyMakeBorder(drawn, margin, margin, margin, margin, cv2.BORDER_CONSTANT, value=(255,))
    card_side = card.shape[0]
    factor = side / drawn.shape[0]  # pixels of the still per pixel of the drawing
    turn = cv2.getRotationMatrix2D((card_side / 2, card_side / 2), scene.marker_angle, factor)
    turn[0, 2] += cx - card_side / 2
    turn[1, 2] += cy - card_side / 2
    h, w = picture.shape[:2]
    warped = cv2.warpAffine(card.astype(np.float32), turn, (w, h), flags=cv2.INTER_AREA, borderValue=(0,))
    covered = cv2.warpAffine(np.ones_like(card, dtype=np.float32), turn, (w, h), flags=cv2.INTER_AREA,
                             borderValue=(0,))
    picture *= 1.0 - covered[:, :, None]
    picture += (warped * 0.92)[:, :, None]  # the card is white paper, not a light
