"""OpenCV checker of the toy world: reads back shape, colour, position and size of every object.

The background is estimated from the border (one colour, or two for top/bottom two-tone scenes);
pixels far from it form objects (connected components); each object's colour is the palette colour
nearest its median pixel in Lab space, and its shape comes from contour geometry: circularity and
polygon vertex count, with low solidity marking stars. Tolerant of the blur and colour drift of
generated images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from diffedit.toy.shapes import BACKGROUNDS, COLOURS

_LAB = {name: cv2.cvtColor(np.uint8([[rgb]]), cv2.COLOR_RGB2LAB)[0, 0].astype(np.float32)
        for name, rgb in COLOURS.items()}


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


def _border_colours(image: np.ndarray) -> list[np.ndarray]:
    h = image.shape[0]
    top = np.concatenate([image[0], image[: h // 2, 0], image[: h // 2, -1]])
    bottom = np.concatenate([image[-1], image[h // 2 :, 0], image[h // 2 :, -1]])
    a, b = np.median(top, 0), np.median(bottom, 0)
    return [a] if np.abs(a - b).max() < 40 else [a, b]


def foreground(image: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Pixels far from the (estimated) background."""
    img = image.astype(np.float32)
    colours = _border_colours(image)
    h = image.shape[0]
    if len(colours) == 1:
        dist = np.linalg.norm(img - colours[0], axis=2)
    else:
        dist = np.empty(image.shape[:2], np.float32)
        dist[: h // 2] = np.linalg.norm(img[: h // 2] - colours[0], axis=2)
        dist[h // 2 :] = np.linalg.norm(img[h // 2 :] - colours[1], axis=2)
    return dist > threshold


def _colour_name(pixels: np.ndarray) -> str:
    lab = cv2.cvtColor(np.median(pixels, 0).astype(np.uint8)[None, None], cv2.COLOR_RGB2LAB)[0, 0].astype(np.float32)
    return min(_LAB, key=lambda name: float(np.linalg.norm(lab - _LAB[name])))


def _shape_name(mask: np.ndarray) -> str:
    scale = 4  # upsampled contours measure small shapes more reliably
    big = cv2.resize(mask.astype(np.uint8) * 255, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    contours, _ = cv2.findContours((big > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    area, perimeter = cv2.contourArea(contour), cv2.arcLength(contour, True)
    hull = cv2.convexHull(contour)
    solidity = area / max(cv2.contourArea(hull), 1e-6)
    if solidity < 0.8:
        return "star"
    circularity = 4 * math.pi * area / max(perimeter * perimeter, 1e-6)
    vertices = len(cv2.approxPolyDP(hull, 0.04 * cv2.arcLength(hull, True), True))
    if vertices == 3 or circularity < 0.68:
        return "triangle"
    if circularity > 0.84 and vertices > 4:
        return "circle"
    # squares: four corners filling their minimum-area rectangle; circles are rounder than squares
    (_, (w, h), _) = cv2.minAreaRect(contour)
    fill = area / max(w * h, 1e-6)
    return "square" if fill > 0.9 or vertices == 4 else "circle"


def check(image: np.ndarray, min_area: int = 12) -> list[Detected]:
    """Objects found in an RGB uint8 image, largest first."""
    image = np.asarray(image)[..., :3]
    mask = foreground(image)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)).astype(bool)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    found = []
    for k in range(1, count):
        area = int(stats[k, cv2.CC_STAT_AREA])
        if area < min_area:
            continue
        component = labels == k
        found.append(Detected(
            shape=_shape_name(component), colour=_colour_name(image[component]),
            centroid=(float(centroids[k][0]), float(centroids[k][1])),
            bbox=tuple(int(v) for v in stats[k, :4]), area=area, mask=component,
        ))
    return sorted(found, key=lambda d: -d.area)


def shows(image: np.ndarray, shape: str | None = None, colour: str | None = None) -> bool:
    """Whether some object in the image has this shape and/or colour."""
    return any((shape is None or d.shape == shape) and (colour is None or d.colour == colour) for d in check(image))


def background_names() -> list[str]:
    return list(BACKGROUNDS)
