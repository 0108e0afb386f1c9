"""The toy shapes world: deterministic scenes of coloured shapes on plain or two-tone backgrounds.

`make_scene(seed)` draws 1-3 non-overlapping objects; `render(objects, background)` draws an explicit
list (edit tasks build their expected results with it). Every scene has a caption such as
"a red circle and a blue square on a grey background" and a boolean mask per object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {  # well separated in hue and lightness, so a blurry generated image still reads right
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "grey": (128, 128, 128), "black": (15, 15, 15), "beige": (225, 205, 160)}
VOCAB = sorted({"a", "an", "and", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS})


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    center: tuple[float, float]  # (x, y) in pixels
    size: float  # radius of the circumscribed circle, in pixels

    @property
    def phrase(self) -> str:
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.colour} {self.shape}"


@dataclass
class Scene:
    image: np.ndarray  # H x W x 3 uint8
    objects: list[Obj]
    background: tuple[str, ...]  # one colour, or two (top / bottom halves)
    masks: list[np.ndarray] = field(default_factory=list)

    @property
    def caption(self) -> str:
        return caption(self.objects, self.background)


def caption(objects: list[Obj], background: tuple[str, ...]) -> str:
    things = " and ".join(o.phrase for o in objects)
    return f"{things} on a {' and '.join(background)} background"


def user_caption(caption: str, rng: np.random.Generator) -> str:
    """A scene's caption as people type it: the objects in any order, with "a"/"an" or no article,
    with or without the background phrase ("red circle and a blue star", "a blue star on a grey
    background"). The model learns the short forms too, so a user's prompt is not out of distribution."""
    things, _, background = caption.partition(" on a ")
    nouns = [phrase.split(" ", 1)[1] for phrase in things.split(" and ")]  # "red circle", without its article
    order = rng.permutation(len(nouns))
    articles = rng.random() >= 0.2
    text = " and ".join(f"{'an' if nouns[i][0] in 'aeiou' else 'a'} {nouns[i]}" if articles else nouns[i]
                        for i in order)
    return f"{text} on a {background}" if rng.random() < 0.5 else text


def named_objects(caption: str) -> list[str]:
    """The objects a caption names ("red circle", ...) in any of its forms (`user_caption`), sorted."""
    things = caption.partition(" on a ")[0]
    return sorted(" ".join(phrase.split()[-2:]) for phrase in things.split(" and "))


def polygon(shape: str, center: tuple[float, float], size: float) -> np.ndarray | None:
    """Vertices of a shape (None for circles), upright, inscribed in a circle of radius `size`."""
    cx, cy = center
    if shape == "square":
        h = size / math.sqrt(2)
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif shape == "triangle":
        pts = [(cx + size * math.cos(a), cy + size * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        pts = []
        for k in range(10):
            r = size if k % 2 == 0 else size * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    else:
        return None
    return np.array(pts, dtype=np.float64)


def object_mask(obj: Obj, height: int, width: int) -> np.ndarray:
    canvas = np.zeros((height, width), np.uint8)
    pts = polygon(obj.shape, obj.center, obj.size)
    scale = 16  # sub-pixel precision of OpenCV drawing (shift = 4 bits)
    if pts is None:
        cv2.circle(canvas, (round(obj.center[0] * scale), round(obj.center[1] * scale)),
                   round(obj.size * scale), 1, thickness=-1, lineType=cv2.LINE_8, shift=4)
    else:
        cv2.fillPoly(canvas, [np.round(pts * scale).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def background_image(background: tuple[str, ...], height: int, width: int) -> np.ndarray:
    image = np.empty((height, width, 3), np.uint8)
    image[:] = BACKGROUNDS[background[0]]
    if len(background) == 2:
        image[height // 2 :] = BACKGROUNDS[background[1]]
    return image


def render(objects: list[Obj], background: tuple[str, ...], size: int = 64) -> Scene:
    """Draw objects (later ones on top) on the background."""
    image = background_image(background, size, size)
    masks = []
    for obj in objects:
        mask = object_mask(obj, size, size)
        image[mask] = COLOURS[obj.colour]
        masks.append(mask)
    return Scene(image, list(objects), tuple(background), masks)


OBJECT_COUNTS = (0.5, 0.3, 0.2)  # a random scene's chances of 1, 2 and 3 objects


def make_scene(seed: int, size: int = 64, n_objects: int | None = None, two_tone: float = 0.25,
               object_counts: tuple[float, float, float] = OBJECT_COUNTS) -> Scene:
    """A random scene, the same for the same seed (and size); `object_counts` the chances of 1, 2 and 3
    objects where `n_objects` is not given (one draw whatever the chances: a scene whose count they keep stays the same)."""
    rng = np.random.default_rng(seed)
    n = int(n_objects if n_objects is not None else rng.choice([1, 2, 3], p=object_counts))
    names = list(BACKGROUNDS)
    if rng.random() < two_tone:
        first, second = rng.choice(len(names), 2, replace=False)
        background = (names[first], names[second])
    else:
        background = (names[rng.integers(len(names))],)
    objects: list[Obj] = []
    scale = size / 64
    for _ in range(200):
        if len(objects) == n:
            break
        radius = float(rng.uniform(7, 15 if n == 1 else 12)) * scale
        margin = radius + 2 * scale
        center = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
        if all(math.dist(center, o.center) > radius + o.size + 3 * scale for o in objects):
            objects.append(Obj(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                               center, radius))
    return render(objects, background, size)


def with_object(scene: Scene, index: int, size: int | None = None, **changes) -> Scene:
    """The scene with object `index` changed (colour, shape, center, size): an edit's expected result."""
    objects = list(scene.objects)
    objects[index] = replace(objects[index], **changes)
    return render(objects, scene.background, size or scene.image.shape[0])
