"""The encoder fingerprint: every base stores its encoder's embedding of one generated image, and a
system that would query it with an encoder giving other features (another model of the same width named
in a hand-resealed manifest, changed weights) is refused in one line."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
from PIL import Image

from fgvr.errors import KnowledgeBaseError
from fgvr.knowledge_base import build_knowledge_base, load_knowledge_base
from fgvr.knowledge_base.integrity import fingerprint_image, seal_manifest
from fgvr.models import parse_spec
from fgvr.pipeline import open_system


def _data(root):
    for name, c in {"red": (220, 20, 20), "blue": (20, 20, 220)}.items():
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), tuple(min(255, v + 30 * i) for v in c)).save(root / name / f"{i}.png")
    return root


def _other_weights(src, dst):
    """The same architecture and width with other weights: a copy whose every float tensor is perturbed."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    g = torch.Generator().manual_seed(1)
    t = {k: (v + torch.randn(v.shape, generator=g) * (v.float().std() if v.numel() > 1 else v.float().abs()).clamp(min=0.05) if v.is_floating_point() else v)
         for k, v in load_file(f).items()}
    save_file(t, f, metadata={"format": "pt"})
    return dst


def _reseal(kb, edit):
    m = json.loads((kb / "manifest.json").read_text())
    edit(m)
    (kb / "manifest.json").write_text(json.dumps(seal_manifest(m)))


def test_the_fingerprint_image_is_fixed():
    a, b = fingerprint_image(), fingerprint_image()
    assert a.size == (224, 224) and a.mode == "RGB" and a.tobytes() == b.tobytes()
    import numpy as np

    assert len(np.unique(np.asarray(a).reshape(-1, 3), axis=0)) > 1000  # noise and gradients, not a flat image


def test_a_resealed_manifest_naming_another_encoder_of_the_same_width_is_refused(tmp_path, tiny_clip_dir):
    kb = tmp_path / "kb"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_knowledge_base(_data(tmp_path / "d"), kb, shots=2, encoder=str(tiny_clip_dir), progress=False)
    fp = load_knowledge_base(kb).manifest["encoder"]["fingerprint"]
    assert len(fp["embedding"]) == load_knowledge_base(kb).embed_dim
    with open_system(kb, threshold=0.5) as system:  # the encoder it was built with: accepted
        assert system.kb.classes == ["blue", "red"]

    other = parse_spec(str(_other_weights(tiny_clip_dir, tmp_path / "other-clip")))
    def forge(m):
        m["encoder"].update(key=other.key, name=other.name, spec=other.to_json())
    _reseal(kb, forge)
    load_knowledge_base(kb)  # every file and seal check passes ...
    with pytest.raises(KnowledgeBaseError, match="fingerprint cosine") as e:  # ... the features do not
        with open_system(kb, threshold=0.5):
            pass
    assert "\n" not in str(e.value)


def test_a_base_without_a_fingerprint_loads_with_a_warning(tmp_path, tiny_clip_dir):
    kb = tmp_path / "kb"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_knowledge_base(_data(tmp_path / "d"), kb, shots=2, encoder=str(tiny_clip_dir), progress=False)
    _reseal(kb, lambda m: m["encoder"].pop("fingerprint"))
    with pytest.warns(UserWarning, match="no encoder fingerprint"):
        with open_system(kb, threshold=0.5):
            pass
