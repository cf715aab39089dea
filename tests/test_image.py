"""Preprocessing matches CLIPImageProcessor; pad-to-square matches LLaVA-1.5."""
import numpy as np
import pytest
import torch
from PIL import Image

from minillava.image import ImageError, PAD_COLOR, open_image, pad_to_square, preprocess


def random_image(w, h, mode, seed):
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert("RGB").convert(mode)


@pytest.mark.parametrize("size", [(64, 48), (50, 90), (300, 300), (17, 400)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_preprocess_matches_clip_image_processor(size, mode):
    transformers = pytest.importorskip("transformers")
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    image = random_image(*size, mode, seed=hash((size, mode)) % 1000)
    ref = torch.as_tensor(np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]))
    ours = preprocess(image, 56, pad=False)
    assert ours.shape == (3, 56, 56)
    assert (ours - ref).abs().max().item() < 1e-2


def test_pad_to_square_centers_the_image_on_the_mean_color():
    assert PAD_COLOR == (122, 116, 104)
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    square = pad_to_square(image)
    assert square.size == (40, 40)
    px = np.asarray(square)
    assert (px[:10] == PAD_COLOR).all() and (px[30:] == PAD_COLOR).all()     # 10 rows above and below
    assert (px[10:30] == (255, 0, 0)).all()
    tall = np.asarray(pad_to_square(Image.new("RGB", (10, 30), (0, 255, 0))))
    assert (tall[:, :10] == PAD_COLOR).all() and (tall[:, 10:20] == (0, 255, 0)).all()


def test_padding_keeps_the_whole_image_in_view():
    image = Image.new("RGB", (120, 40), (0, 0, 255))
    image.paste((255, 255, 0), (0, 0, 10, 40))                 # a yellow strip at the left edge
    cropped, padded = preprocess(image, 56, pad=False), preprocess(image, 56, pad=True)
    yellow = lambda x: (x[0] > 1.0).float().mean().item()      # red channel high only in the yellow strip
    assert yellow(cropped) == 0.0 and yellow(padded) > 0.0


def test_open_image_errors_name_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageError, match="notes.txt: not an image"):
        open_image(tmp_path / "notes.txt")
    with pytest.raises(ImageError, match="missing.png: cannot read"):
        open_image(tmp_path / "missing.png")
    Image.new("LA", (4, 4)).save(tmp_path / "gray.png")
    assert open_image(tmp_path / "gray.png").mode == "RGB"
