"""Images in and out of the API: context frames go up as base64 PNG/JPEG, generated frames
come back as PNG/JPEG bytes that the caller wants as numpy, PIL or as they are."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ImageLike = Any  # PIL.Image.Image | numpy uint8 (H, W, 3) | str | Path | bytes (PNG/JPEG)


def encode_image(image: ImageLike) -> str:
    """Base64 PNG/JPEG of a PIL image, a uint8 (H, W, 3) array, a file path or image bytes."""
    if isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3:
                raise ValueError(f"context: arrays must be uint8 (H, W, 3), got {image.dtype} "
                                 f"{image.shape}")  # fmt: skip
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise ValueError(f"context: {type(image).__name__} is not an image")
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        data = buf.getvalue()
    return base64.b64encode(data).decode()


def encode_context(context: Any) -> list[str]:
    """One image, a list of them or a (K, H, W, 3) array as the API's list of base64 images."""
    if isinstance(context, np.ndarray) and context.ndim == 4:  # (K, H, W, 3)
        context = list(context)
    elif not isinstance(context, (list, tuple)):
        context = [context]
    return [encode_image(c) for c in context]


def decode_image(data: bytes, as_: str = "numpy") -> Any:
    """Frame bytes as a uint8 (R, R, 3) array ("numpy"), a PIL image ("pil") or as is."""
    if as_ == "bytes":
        return data
    image = Image.open(io.BytesIO(data))
    image.load()
    if as_ == "pil":
        return image
    if as_ == "numpy":
        return np.asarray(image.convert("RGB"))
    raise ValueError(f"as_: {as_!r} is not one of ['numpy', 'pil', 'bytes']")
