"""Stand-ins shared by the pipeline and evaluation tests: an encoder that embeds an image as its mean
colour, a knowledge base of solid colours, and a System 2 that always picks the last candidate."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fgvr.knowledge_base import KnowledgeBase
from fgvr.slow_path import SlowAnswer

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
