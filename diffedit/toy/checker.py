"""OpenCV checker of the toy world: reads back shape, colour, position and size of every object.

The background is estimated from the border (one colour, or two for top/bottom two-tone scenes);
pixels far from it form objects (connected components). Each object is then re-cut at half the way
from its local background to its own colour, so blur neither fattens nor thins it; its colour is the
palette colour nearest (in Lab) to the median of its confident pixels, and its shape comes from the
angular harmonics of its area around the centroid: a triangle's mass repeats every 120 degrees, a
square's every 90, a star's every 72, a circle's not at all. Those harmonics survive blur and
rounded corners (vertex counting does not), so generated images are read as a person would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from diffedit.toy.shapes import COLOURS

_LAB = {name: cv2.cvtColor(np.uint8([[rgb]]), cv2.COLOR_RGB2LAB)[0, 0].astype(np.float32)
        for name, rgb in COLOURS.items()}
_POLYGONS = {3: "triangle", 4: "square", 5: "star"}  # symmetry order -> shape
ROUND = 0.06  # below this strength of the strongest 3/4/5-fold harmonic, a shape is a circle


@dataclass
class Detected:
    shape: str
    colour: str
    centroid: tuple[float, float]  # (x, y)
    bbox: tuple[int, int, int, int]  # x, y, w, h
    area: int
    mask: np.ndarray

    @property
    def size(self) -> float:
        """Radius of the circle of the same area (a scale-free size)."""
        return math.sqrt(self.area / math.pi)


def border_medians(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median colours of the top and the bottom half's border pixels (backgrounds may be two-tone)."""
    h = image.shape[0]
    top = np.concatenate([image[0], image[: h // 2, 0], image[: h // 2, -1]])
    bottom = np.concatenate([image[-1], image[h // 2 :, 0], image[h // 2 :, -1]])
    return np.median(top, 0).astype(np.float32), np.median(bottom, 0).astype(np.float32)


def _border_colours(image: np.ndarray) -> list[np.ndarray]:
    a, b = border_medians(image)
    return [a] if np.abs(a - b).max() < 40 else [a, b]


def _background(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-pixel background colour, distance of each pixel from the background)."""
    img = image.astype(np.float32)
    colours = _border_colours(image)
    h = image.shape[0]
    bg = np.empty(img.shape, np.float32)
    bg[: h // 2], bg[h // 2 :] = colours[0], colours[-1]
    dist = np.linalg.norm(img - bg, axis=2)
    if len(colours) == 2:  # the (possibly blurred) seam between the two tones is background too
        band = slice(max(h // 2 - max(2, h // 16), 0), h // 2 + max(2, h // 16))
        a, ab = colours[0], colours[1] - colours[0]
        t = np.clip(((img[band] - a) @ ab) / max(float(ab @ ab), 1.0), 0, 1)
        dist[band] = np.minimum(dist[band], np.linalg.norm(img[band] - (a + t[..., None] * ab), axis=2))
    return bg, dist


def foreground(image: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Pixels far from the (estimated) background."""
    return _background(np.asarray(image)[..., :3])[1] > threshold


def colour_name(rgb: np.ndarray) -> str:
    """The palette colour nearest to an RGB colour, in Lab space."""
    lab = cv2.cvtColor(np.clip(rgb, 0, 255).astype(np.uint8).reshape(1, 1, 3), cv2.COLOR_RGB2LAB)[0, 0]
    return min(_LAB, key=lambda name: float(np.linalg.norm(lab.astype(np.float32) - _LAB[name])))


def symmetry(mask: np.ndarray) -> dict[int, float]:
    """Strength (0..1) of the 3-, 4- and 5-fold angular harmonics of a mask's area around its centroid."""
    ys, xs = np.nonzero(mask)
    y0, x0 = ys.min(), xs.min()
    crop = mask[y0 : ys.max() + 1, x0 : xs.max() + 1].astype(np.float32)
    scale = 4 if crop.size < 4096 else 1  # small objects: measure on a smooth upsampled outline
    if scale > 1:
        crop = cv2.resize(np.pad(crop, 1), None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    ys, xs = np.nonzero(crop > 0.5)
    angles = np.arctan2(ys - ys.mean(), xs - xs.mean())
    return {k: float(abs(np.exp(-1j * k * angles).sum()) / len(angles)) for k in _POLYGONS}


def shape_name(mask: np.ndarray) -> str:
    strength = symmetry(mask)
    k = max(strength, key=strength.get)
    return _POLYGONS[k] if strength[k] > ROUND else "circle"


def check(image: np.ndarray, min_area: int = 12, threshold: float = 60.0) -> list[Detected]:
    """Objects found in an RGB uint8 image, largest first."""
    image = np.asarray(image)[..., :3]
    img = image.astype(np.float32)
    bg, dist = _background(image)
    seeds = cv2.morphologyEx((dist > threshold).astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(seeds, connectivity=8)
    found = []
    for k in range(1, count):
        if stats[k, cv2.CC_STAT_AREA] < min_area:
            continue
        x, y, w, h = stats[k, :4]
        pad = 3
        win = np.s_[max(y - pad, 0) : y + h + pad, max(x - pad, 0) : x + w + pad]
        seed = labels[win] == k
        d = dist[win][seed]
        own = np.median(img[win][seed][d >= np.percentile(d, 70)], 0)  # the object's colour
        ref = own - bg[win]
        # how far each pixel is on the way from its background to the object's colour
        alpha = ((img[win] - bg[win]) * ref).sum(2) / np.maximum((ref * ref).sum(2), 1.0)
        near = cv2.dilate(seed.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        cut = (near & (alpha > 0.5)).astype(np.uint8)
        n, parts, part_stats, centroids = cv2.connectedComponentsWithStats(cut, connectivity=8)
        if n < 2:
            continue
        j = 1 + int(np.argmax(part_stats[1:, cv2.CC_STAT_AREA]))
        part = parts == j
        confident = img[win][part & (alpha > 0.8)]
        mask = np.zeros(image.shape[:2], bool)
        mask[win] = part
        oy, ox = win[0].start, win[1].start
        px, py, pw, ph = (int(v) for v in part_stats[j, :4])
        found.append(Detected(
            shape=shape_name(part),
            colour=colour_name(np.median(confident if len(confident) >= 4 else img[win][part], 0)),
            centroid=(float(centroids[j][0] + ox), float(centroids[j][1] + oy)),
            bbox=(px + ox, py + oy, pw, ph), area=int(part_stats[j, cv2.CC_STAT_AREA]), mask=mask,
        ))
    return sorted(found, key=lambda d: -d.area)


def shows(image: np.ndarray, shape: str | None = None, colour: str | None = None) -> bool:
    """Whether some object in the image has this shape and/or colour ("the image shows a red circle")."""
    return any((shape is None or d.shape == shape) and (colour is None or d.colour == colour) for d in check(image))
