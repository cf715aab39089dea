"""Image preprocessing: what CLIPImageProcessor does, plus LLaVA-1.5's pad-to-square.

    X_v = normalize(center_crop(resize_shorter_side(pad_to_square(image))))   -> (3, S, S)
"""
import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .constants import CLIP_MEAN, CLIP_STD

# LLaVA-1.5 pads with the CLIP mean colour as 0-255 integers: (122, 116, 104).
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)
MAX_DOWNLOAD_BYTES = 50 << 20


class ImageError(ValueError):
    """An image that cannot be opened; the message names the file or URL."""


def to_rgb(image):
    """Any PIL mode -> RGB. Transparency is composited onto white, as transformers does."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")      # L, P, CMYK, I;16, ...


def pad_to_square(image, color=PAD_COLOR):
    """Center the image on a square canvas of its longer side (LLaVA-1.5 `image_aspect_ratio: pad`),
    so that the center crop that follows cuts nothing away."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess(image, size, pad=True):
    """PIL image -> normalized float tensor (3, size, size)."""
    image = to_rgb(image)
    if pad:
        image = pad_to_square(image)
    w, h = image.size
    # Resize the shorter side to `size` (bicubic), keeping the aspect ratio; the long side is truncated
    # with int() as transformers and torchvision do.
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)   # (3, S, S)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (x - mean) / std


def open_image(source, timeout=15):
    """A path or an http(s) URL -> RGB PIL image, or an ImageError that says what went wrong."""
    if str(source).startswith(("http://", "https://")):
        data = fetch(source, timeout)
    else:
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageError(f"{source}: cannot read ({e.strerror or e})") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ImageError(f"{source}: not an image Pillow can open ({type(e).__name__})") from None
    return to_rgb(image)


def fetch(url, timeout):
    import requests
    try:
        with requests.get(url, stream=True, timeout=timeout, headers={"User-Agent": "minillava"}) as r:
            if r.status_code != 200:
                raise ImageError(f"{url}: HTTP {r.status_code}")
            kind = r.headers.get("Content-Type", "")
            if kind and not kind.startswith("image/"):
                raise ImageError(f"{url}: not an image (Content-Type {kind})")
            data = bytearray()
            for chunk in r.iter_content(1 << 16):
                data += chunk
                if len(data) > MAX_DOWNLOAD_BYTES:
                    raise ImageError(f"{url}: larger than {MAX_DOWNLOAD_BYTES >> 20} MB")
            return bytes(data)
    except requests.RequestException as e:
        raise ImageError(f"{url}: cannot fetch ({type(e).__name__})") from None
