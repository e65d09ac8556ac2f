"""Decoding an upload: the size and pixel checks made before a pixel is decoded, base64, thumbnails, and
reading the images out of a request (multipart or JSON)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from pathlib import Path
from typing import Any

from fastapi import Request
from PIL import Image

from fgvr.data import BYTES_PER_PIXEL_BUDGET, ImageError, decode_bytes, load_image
from fgvr.serve.settings import ServeSettings, UploadError

def check_header(data: bytes, max_pixels: int) -> tuple[int, int]:
    """The image's (width, height) from its header alone; refuses what is not an image or would decode to
    more than `max_pixels` pixels, or take more than `max_pixels` x 4 bytes in its decoded mode (a 16-bit
    or float image counts what it becomes). PIL's open reads only the header: nothing is decoded here."""
    if not data:
        raise UploadError(400, "empty image (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                mode = im.mode
    except Image.UnidentifiedImageError:
        raise UploadError(400, "not an image (unknown or unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UploadError(413, f"refused as a decompression bomb: {e}") from None
    except Exception as e:  # noqa: BLE001 - a header PIL cannot parse is a bad image, whatever the exception
        raise UploadError(400, f"cannot read the image header: {e or type(e).__name__}") from None
    if w * h > max_pixels:
        raise UploadError(413, f"image is {w}x{h} = {w * h:,} pixels, over this server's limit of "
                               f"{max_pixels:,} (a decompression bomb, or a photo to shrink first)")
    need, budget = decode_bytes(mode, w, h), max_pixels * BYTES_PER_PIXEL_BUDGET
    if need > budget:
        raise UploadError(413, f"image is {w}x{h} in mode {mode}: decoding takes {need:,} bytes, over this "
                               f"server's budget of {budget:,} (send it as 8-bit RGB, or smaller)")
    return w, h


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Header check, then the same decoder `fgvr classify` uses on files (`fgvr.data.load_image`: EXIF
    orientation, reduced-scale JPEG decoding, transparency, 16-bit data, truncation), on the bytes in
    memory (they once went through a temporary file, which cost a file's creation, write and removal per
    request)."""
    check_header(data, max_pixels)
    try:
        return load_image("upload", max_pixels=max_pixels, data=data)
    except ImageError as e:
        raise UploadError(400, e.reason) from None


def b64decode(text: Any) -> bytes:
    """Standard base64, with or without a `data:image/...;base64,` prefix; anything else is a 400."""
    if not isinstance(text, str):
        raise UploadError(400, "expected the image as a base64 string")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UploadError(400, "the image is not valid base64") from None


def thumbnail_jpeg(path: str | Path, side: int = 256) -> bytes:
    """A small JPEG of an image file (decoded by load_image, so a non-image path yields ImageError)."""
    im = load_image(path, max_side=side)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


async def read_images(request: Request, settings: ServeSettings, field: str,
                      many: bool) -> list[tuple[bytes, str]]:
    """The uploaded images of a request (multipart or base64 JSON) as (bytes, name), checked against the
    limits in `settings`; `UploadError` for anything the client got wrong."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        try:
            # the parser's own file cap sits well above ours, so too many images gets our 413, not its 400
            form = await request.form(max_files=4 * settings.max_batch_images + 16, max_fields=64)
        except Exception as e:  # noqa: BLE001 - the multipart parser's own errors are the client's
            raise UploadError(400, f"cannot parse the multipart form: {e}") from None
        files = [f for key in dict.fromkeys((field, "image", "images")) for f in form.getlist(key)
                 if hasattr(f, "read")]
        out = [(await f.read(), f.filename or f"upload-{i}") for i, f in enumerate(files)]
        await form.close()
    elif ctype.startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise UploadError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise UploadError(400, f'expected a JSON object {{"{field}": ...}}')
        raw = body.get(field) if many else body.get("image")
        if raw is None:
            raise UploadError(400, f'the JSON object has no "{field if many else "image"}" field')
        items = raw if many else [raw]
        if many and not isinstance(raw, list):
            raise UploadError(400, f'"{field}" must be a list of base64 strings')
        names = body.get("names") if isinstance(body.get("names"), list) else []
        out = [(b64decode(x), str(names[i]) if i < len(names) else f"upload-{i}") for i, x in enumerate(items)]
    else:
        raise UploadError(415, "send multipart/form-data (field 'image') or application/json "
                               '({"image": "<base64>"})')
    if not out:
        raise UploadError(400, f"no image in the request (multipart field '{field}')")
    if many and len(out) > settings.max_batch_images:
        raise UploadError(413, f"{len(out)} images in one request, over this server's limit of "
                               f"{settings.max_batch_images}")
    if not many and len(out) > 1:
        raise UploadError(400, "one image per /v1/classify request; use /v1/classify/batch for several")
    for data, name in out:
        if len(data) > settings.max_upload_bytes:
            raise UploadError(413, f"image {name} is {len(data):,} bytes, over the limit of "
                                   f"{settings.max_upload_bytes:,}")
    return out
