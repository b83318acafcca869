"""Images are opened only by the decoders of IMAGE_EXTENSIONS: every variant a camera or tool
writes in those formats still reads, anything else (EPS: Ghostscript) is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from agp_data.errors import DataError
from agp_data.images import read_image, read_mask

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 255, (12, 16, 3), dtype=np.uint8)


def palette() -> Image.Image:
    return Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)


WRITERS = {
    "rgb.png": lambda: Image.fromarray(RGB),
    "deep.png": lambda: Image.fromarray(RNG.integers(0, 65535, (12, 16), dtype=np.uint16)),
    "palette.png": palette,
    "photo.jpg": lambda: Image.fromarray(RGB),
    "cmyk.jpg": lambda: Image.fromarray(RGB).convert("CMYK"),
    "scan.bmp": lambda: Image.fromarray(RGB),
    "scan.tif": lambda: Image.fromarray(RGB),
    "web.webp": lambda: Image.fromarray(RGB),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_accepted_format_reads(tmp_path, name):
    path = tmp_path / name
    WRITERS[name]().save(path)
    image = read_image(str(path))
    assert image.mode == "RGB" and image.size == (16, 12)


def test_other_formats_are_refused_in_one_line(tmp_path):
    eps = tmp_path / "drawing.png"  # the name does not decide: the decoder would be Ghostscript's
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n%%EOF\n")
    gif = tmp_path / "anim.png"
    Image.fromarray(RGB).save(gif, format="GIF")
    for path in (eps, gif):
        with pytest.raises(DataError) as caught:
            read_image(str(path))
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(DataError):
        read_mask(str(gif))
