"""The Encoder contract every image encoder meets (fgvr.encoder), checked on the real EfficientNet-Lite0
and the tiny CLIP: shapes, dtypes, normalisation, batching, the resize policy, the missing text tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fgvr.encoder import Encoder, NoTextTowerError, l2_normalise, pil_to_tensor, resize_center_crop
from fgvr.models import parse_spec, registry


def test_resize_center_crop_keeps_aspect_and_centre():
    # a wide image: left third red, middle third green, right third blue
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, :100, 0] = 255
    arr[:, 100:200, 1] = 255
    arr[:, 200:, 2] = 255
    out = resize_center_crop(Image.fromarray(arr), 50)
    assert out.size == (50, 50) and out.mode == "RGB"
    x = pil_to_tensor(out)
    assert x.shape == (3, 50, 50) and x.dtype == torch.float32
    # the crop is the middle third, undistorted: green, no red or blue from the sides (the outermost
    # columns sit on the colour edges, where bicubic resampling rings)
    inner = x[:, :, 2:-2]
    assert inner[1].min() > 250 and inner[0].max() < 5 and inner[2].max() < 5


def test_resize_center_crop_upscales_small_and_converts_modes():
    out = resize_center_crop(Image.new("LA", (7, 30), (90, 255)), 32)
    assert out.size == (32, 32) and out.mode == "RGB"
    assert pil_to_tensor(out).max() <= 255 and pil_to_tensor(out).min() >= 0


def test_l2_normalise_is_float32_and_safe_on_zero_rows():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float16)
    y = l2_normalise(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y[0], torch.tensor([0.6, 0.8]))
    assert torch.isfinite(y).all()


@pytest.fixture(scope="module")
def lite0_spec():
    # the real weights at a 96px input: the contract does not depend on the size, the CPU time does.
    # Tests lease it themselves (loaded once, the registry keeps it), so the unload below can be verified.
    spec = parse_spec("efficientnet-lite0", image_size=96)
    yield spec
    assert registry.unload(spec) == "unloaded"


def test_efficientnet_meets_the_encoder_contract(lite0_spec, sample_photos):
    with registry.use(lite0_spec) as lite0:
        assert isinstance(lite0, Encoder)
        pixels = lite0.preprocess(sample_photos)
        emb = lite0.encode_pixels(pixels)
        dim = lite0.embed_dim
    assert pixels.shape == (2, 3, 96, 96) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0  # (x-127)/128 of 0..255
    assert emb.shape == (2, dim) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    assert not emb.requires_grad


def test_encode_images_batches_equal_one_batch(lite0_spec, sample_photos):
    images = sample_photos + [sample_photos[0].rotate(90, expand=True)]
    with registry.use(lite0_spec) as lite0:
        one = lite0.encode_images(images, batch_size=64)
        many = lite0.encode_images(images, batch_size=2)
        empty = lite0.encode_images([])
    torch.testing.assert_close(one, many, atol=1e-5, rtol=0)
    assert empty.shape == (0, 1280)


def test_image_only_encoder_refuses_text_clearly(lite0_spec):
    with registry.use(lite0_spec) as lite0:
        assert lite0.has_text is False
        with pytest.raises(NoTextTowerError, match="image-only"):
            lite0.encode_texts(["a photo of a cardinal"])


def test_clip_meets_the_encoder_contract(tiny_clip_dir, sample_photos):
    with registry.use(parse_spec(str(tiny_clip_dir))) as enc:
        assert isinstance(enc, Encoder) and enc.has_text
        pixels = enc.preprocess(sample_photos)
        assert pixels.shape == (2, 3, enc.image_size, enc.image_size) and pixels.dtype == torch.float32
        torch.testing.assert_close(enc.encode_pixels(pixels), enc.encode_images(sample_photos, batch_size=1))
        assert enc.encode_texts([]).shape == (0, enc.embed_dim)
        empty = enc.encode_texts([""])  # an empty description is still a valid (special-token-only) text
        assert empty.shape == (1, enc.embed_dim) and torch.isfinite(empty).all()


def test_resize_filter_is_part_of_the_efficientnet_definition(lite0_spec):
    """New specs upscale bilinear (chosen on train images, benchmarks/preprocessing.py) and shrink bicubic;
    a spec of the first revision (what older bases record) keeps bicubic both ways, so such a base is
    encoded as it was built. The revision is in the spec's key, so the two never share a registry slot."""
    from fgvr.models.families.efficientnet import RESIZE, REVISION
    from fgvr.errors import SpecError

    small = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8))
    assert lite0_spec.revision == REVISION and RESIZE[REVISION] == ("bilinear", "bicubic")
    old = lite0_spec.replace(revision="0.1.0")
    assert old.key != lite0_spec.key
    with registry.use(lite0_spec) as enc:
        size = enc.image_size
        new_px = enc.preprocess([small])
        big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (500, 400, 3), dtype=np.uint8))
        big_px = enc.preprocess([big])
    with registry.use(old) as enc_old:
        old_px = enc_old.preprocess([small])
        assert torch.equal(big_px, enc_old.preprocess([big]))  # shrinking: bicubic in both revisions
    del enc, enc_old  # the registry verifies the release: no reference may remain
    assert registry.unload(old) == "unloaded"
    want_new = (pil_to_tensor(small.resize((size, size), Image.BILINEAR)) - 127.0) / 128.0
    want_old = (pil_to_tensor(small.resize((size, size), Image.BICUBIC)) - 127.0) / 128.0
    assert torch.equal(new_px[0], want_new) and torch.equal(old_px[0], want_old)
    assert not torch.equal(new_px, old_px)
    with pytest.raises(SpecError, match="unknown efficientnet-lite0 revision"):
        from fgvr.models.families.efficientnet import EfficientNetEncoder

        EfficientNetEncoder(lite0_spec.replace(revision="9.9"), torch.nn.Identity())


def test_efficientnet_pixels_are_exactly_the_reference_formula(lite0_spec):
    """The batch is filled in place by numpy (faster than a tensor per image and a stack); the pixels must be
    bit-identical to the reference (stack of CHW float tensors - 127) / 128, for every input mode, or bases
    built before would stop matching their fingerprint."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (37, 61, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (300, 200), dtype=np.uint8), mode="L"),
              Image.fromarray(rng.integers(0, 256, (224, 224, 4), dtype=np.uint8), mode="RGBA")]
    with registry.use(lite0_spec) as enc:
        got = enc.preprocess(images)
        crops = [resize_center_crop(im, enc.image_size, enc.upscale, enc.downscale) for im in images]
    ref = torch.stack([torch.from_numpy(np.asarray(c.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                       for c in crops])
    ref = (ref - 127.0) / 128.0
    assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == ref.shape
    assert torch.equal(got, ref)
    one = pil_to_tensor(images[1])
    assert one.is_contiguous() and one.shape == (3, 300, 200) and torch.equal(one[0], one[2])
