"""Stand-ins shared by the pipeline and evaluation tests: an encoder that embeds an image as its mean
colour, a knowledge base of solid colours, and a System 2 that always picks the last candidate; and the
small image folders (colours, patterns, shapes) and PNG helpers several test files use."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fgvr.knowledge_base import KnowledgeBase
from fgvr.pipeline import DualSystem
from fgvr.slow_path import SlowAnswer
from fgvr.trigger import Trigger

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "orange": (230, 140, 20),
           "purple": (140, 30, 200)}


class ColourEncoder:
    """Embeds an image as its normalised mean colour (3-d) plus a constant: a stand-in for a real encoder."""

    embed_dim = 4

    def __init__(self):
        self.calls = 0

    def encode_images(self, images, batch_size=64):
        self.calls += 1
        x = torch.tensor([[*(np.asarray(im.resize((4, 4)), dtype=np.float32).reshape(-1, 3).mean(0) / 255), 0.2]
                          for im in images])
        return torch.nn.functional.normalize(x, dim=1)


def colour_kb(enc):
    classes = sorted(COLOURS)
    imgs = [Image.new("RGB", (8, 8), COLOURS[c]) for c in classes]
    protos = enc.encode_images(imgs)
    return KnowledgeBase(classes=classes, encoder_spec={}, encoder_key="colour", embed_dim=protos.shape[1],
                         prototypes=protos, exemplars=protos, exemplar_labels=torch.arange(len(classes)),
                         text_prototypes=None, fusion={"w": 1.0, "tau": 0.02}, stats=None)


class PickLast:
    """A System 2 that is sure the LAST candidate is right; records what it was asked."""

    name = "pick-last"

    def __init__(self):
        self.batches = []

    def rank(self, queries):
        self.batches.append(queries)
        out = []
        for q in queries:
            p = [0.01] * len(q.candidates)
            p[-1] = 1.0
            z = sum(p)
            out.append(SlowAnswer(probs=[x / z for x in p], rationale="last one", tokens_in=10, tokens_out=2,
                                  rules_used=[r for r in q.rules]))
        return out


def make_data(root: Path, per_class: int = 4) -> Path:
    """An image folder of the five colours plus "yellow" (a class the colour base does not know), shaded
    per image, and one unreadable image in red/."""
    shades = [(0, 0, 0), (40, 40, 40), (-40, 20, 0), (90, 90, 90), (20, -30, 60)]
    for name, rgb in list(COLOURS.items()) + [("yellow", (230, 220, 30))]:
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            c = tuple(max(0, min(255, a + b)) for a, b in zip(rgb, shades[i % len(shades)]))
            Image.new("RGB", (12, 12), c).save(d / f"{i}.png")
    (root / "red" / "broken.png").write_bytes(b"\x89PNG but not really")
    return root


def colour_system(slow=None, threshold=0.35, **kw):
    """A DualSystem over the colour base: ColourEncoder, no System 2 unless `slow`, a fixed threshold."""
    enc = ColourEncoder()
    return DualSystem(colour_kb(enc), enc, slow, Trigger(threshold=threshold), k=3, weight=1.0, **kw)


def pattern_images(root: Path, per_class: int, seed: int) -> None:
    """Three noisy 32x32 patterns (red_disc, blue_stripes, green_checker), `per_class` images each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    masks = {"red_disc": ((yy - 16) ** 2 + (xx - 16) ** 2 < 100, (220, 30, 30)),
             "blue_stripes": ((xx // 4) % 2 == 0, (30, 40, 220)),
             "green_checker": (((xx // 8) + (yy // 8)) % 2 == 0, (30, 200, 40))}
    for name, (mask, rgb) in masks.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = np.full((32, 32, 3), 128, np.int64)
            a[mask] = rgb
            a += rng.integers(-25, 25, a.shape)
            Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")


SHAPES = ("blue stripes", "green checker", "red disc")


def shape_image(name: str, seed: int, size: int = 48) -> Image.Image:
    """A noisy picture of one of three patterns, distinct enough for Lite0 features at 3 shots."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    a = np.full((size, size, 3), 200, np.int64)
    if name == "red disc":
        a[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2] = (220, 30, 30)
    elif name == "blue stripes":
        a[(xx // 6) % 2 == 0] = (30, 40, 210)
    else:
        a[((xx // 8) + (yy // 8)) % 2 == 0] = (30, 170, 40)
    a += rng.integers(-20, 20, a.shape)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def write_shapes(root: Path, per_class: int, seed: int) -> Path:
    """An image folder of the three SHAPES (blue_stripes, green_checker, red_disc), `per_class` each."""
    for c, name in enumerate(SHAPES):
        (root / name.replace(" ", "_")).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_image(name, seed * 1000 + c * 100 + i).save(root / name.replace(" ", "_") / f"{i}.png")
    return root


def png_bytes(im: Image.Image) -> bytes:
    """`im` encoded as PNG."""
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; its (compressed) pixels are a few bytes. Decoding it would
    allocate width x height pixels: the server must refuse from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
