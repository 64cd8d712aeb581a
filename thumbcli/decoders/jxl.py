"""JPEG XL through pillow-jxl-plugin (libjxl), for a libvips without its own `jxlload`: the only `import pillow_jxl`."""

from __future__ import annotations

import contextlib
import io

from thumbcli.decoders import MissingDecoder, Pixels, ScaleNeeded
from thumbcli.errors import FileRejected
from thumbcli.spec import Limits

_LABEL = "JPEG XL"


def decode(data: bytes, limits: Limits, scale_needed: ScaleNeeded | None = None) -> Pixels:
    """The image, 8-bit, with its ICC profile.

    Opening decodes the whole image, so its size is checked before this is called, from the
    registry's probe of the header (`formats.jxl_size`, by `resample`).
    """
    del limits, scale_needed  # checked before; libvips makes every size from the one decode
    try:
        import pillow_jxl  # noqa: F401 - registers the JPEG XL plugin with Pillow
        from PIL import Image, ImageOps
    except (ImportError, OSError):  # OSError: a worker's account may not read the wheel
        raise MissingDecoder(_LABEL, "jxl") from None
    Image.MAX_IMAGE_PIXELS = None  # --max-pixels was checked from the header, before this decode
    try:
        with Image.open(io.BytesIO(data), formats=["JXL"]) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            profile = image.info.get("icc_profile") or b""
    except (OSError, ValueError, SyntaxError, RuntimeError) as exc:
        raise FileRejected(_reason(str(exc))) from None
    if upright.mode not in ("L", "LA", "RGB", "RGBA"):
        upright = upright.convert("RGBA" if "A" in upright.getbands() else "RGB")
    return Pixels(upright.tobytes(), upright.width, upright.height, len(upright.getbands()), bytes(profile))


def _reason(text: str) -> str:
    lowered = text.lower()
    if "truncat" in lowered or "not enough" in lowered or "end of" in lowered:
        return f"{_LABEL}: truncated"
    if "cannot identify" in lowered or "signature" in lowered or "generic error" in lowered:
        return f"{_LABEL}: damaged, or not a JPEG XL file"
    return f"{_LABEL}: could not decode ({text.strip().splitlines()[0][:200] if text.strip() else 'no reason given'})"


def preload() -> None:
    """Import the plugin and Pillow's own (Image.open loads them on first use) now, if installed."""
    with contextlib.suppress(ImportError):
        import pillow_jxl  # noqa: F401
        from PIL import Image, ImageOps  # noqa: F401

        Image.init()


def version() -> str | None:
    """pillow-jxl-plugin's version, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return f"pillow-jxl-plugin {installed_version('pillow-jxl-plugin')}"
    except PackageNotFoundError:
        return None
