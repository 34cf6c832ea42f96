import io

import numpy as np
import pytest
from PIL import Image

from recycle.images import ImageError, load_image


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I", "F"])
def test_modes_become_rgb(mode):
    src = Image.new("RGB", (20, 10), (200, 100, 50)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "F", "I") else "PNG"
    out = load_image(_png(src, format=fmt))
    assert out.mode == "RGB" and out.size == (20, 10)


def test_rgba_composites_on_white():
    src = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(_png(src)).getpixel((0, 0)) == (255, 255, 255)


def test_16bit_is_rescaled_not_clipped():
    arr = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    out = np.asarray(load_image(_png(Image.fromarray(arr))))
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out[..., 0])) > 32


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored pixels must be rotated 90° clockwise for display
    out = load_image(_png(img, format="JPEG", exif=exif.tobytes()))
    assert out.size == (10, 30)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty"),
        (b"not an image at all", "not a recognised image"),
    ],
)
def test_bad_bytes(data, match):
    with pytest.raises(ImageError, match=match):
        load_image(data)


def test_truncated_png():
    data = _png(Image.effect_noise((64, 64), 50))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


def test_decompression_bomb_and_limit(tmp_path):
    bomb = _png(Image.new("1", (20000, 20000)))
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb)
    with pytest.raises(ImageError, match="too large"):
        load_image(_png(Image.new("L", (100, 100))), max_pixels=5_000)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ImageError, match="ghost.png: file not found"):
        load_image(tmp_path / "ghost.png")


def test_max_side_downscales_keeping_aspect():
    out = load_image(_png(Image.new("RGB", (3000, 1500), (10, 20, 30))), max_side=1024)
    assert out.size == (1024, 512) and out.getpixel((5, 5)) == (10, 20, 30)
