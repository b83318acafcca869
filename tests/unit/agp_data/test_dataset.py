"""Image/mask reading, AnomalyDataset items and the few-shot expansion."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from agp_data.dataset import AnomalyDataset
from agp_data.errors import DataError
from agp_data.fewshot import ExpandedDataset, fewshot_transforms, select_shots
from agp_data.images import IMAGE_EXTENSIONS, image_size, is_image_file, read_image, read_mask
from agp_data.samples import Sample


# --------------------------------------------------------------------------------------------
# read_image / read_mask
# --------------------------------------------------------------------------------------------
def test_image_extensions():
    assert set(IMAGE_EXTENSIONS) == {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
    assert is_image_file("a/B.JPG") and is_image_file("x.TiFf") and not is_image_file("x.txt")


def test_read_grayscale_and_palette(tmp_path):
    gray = np.array([[0, 50], [200, 255]], dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    image = read_image(str(tmp_path / "g.png"))
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.repeat(gray[..., None], 3, -1))

    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    palette.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert np.asarray(read_image(str(tmp_path / "p.png")))[0, 1].tolist() == [200, 100, 0]


def test_read_rgba_composites_on_black(tmp_path):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [200, 100, 50, 0]]], dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    pixels = np.asarray(read_image(str(tmp_path / "a.png")))
    assert pixels.tolist() == [[[200, 100, 50], [100, 50, 25], [0, 0, 0]]]


def test_read_16_bit_scales_the_full_range(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 257 per grey level
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    assert np.asarray(read_image(str(tmp_path / "d.png")))[..., 0].tolist() == [[0, 1, 128, 255]]
    Image.fromarray(values).save(tmp_path / "d.tif")
    assert np.asarray(read_image(str(tmp_path / "d.tif")))[..., 1].tolist() == [[0, 1, 128, 255]]


def test_read_applies_exif_orientation(tmp_path):
    array = np.zeros((16, 32, 3), dtype=np.uint8)  # 32 wide, 16 high
    array[:8, :8] = [255, 0, 0]  # red block top-left (blocks survive JPEG's 8x8 coding)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90° clockwise for display
    Image.fromarray(array).save(tmp_path / "r.jpg", exif=exif, quality=100, subsampling=0)
    image = read_image(str(tmp_path / "r.jpg"))
    assert image.size == (16, 32)
    pixels = np.asarray(image).astype(int)
    # Rotating clockwise moves the top-left block to the top-right.
    assert pixels[2, 13, 0] > 200 and pixels[2, 13, 1] < 60
    assert pixels[2, 2, 0] < 60
    assert image_size(str(tmp_path / "r.jpg")) == (16, 32)


def test_read_bmp_and_cmyk_jpeg(tmp_path):
    Image.new("RGB", (3, 2), (1, 2, 3)).save(tmp_path / "x.bmp")
    assert np.asarray(read_image(str(tmp_path / "x.bmp"))).tolist() == [[[1, 2, 3]] * 3] * 2
    Image.new("CMYK", (3, 2), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    assert np.asarray(read_image(str(tmp_path / "c.jpg"))).min() > 240  # no ink = white


def test_corrupt_and_missing_images_are_data_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(DataError, match=r"cannot read image .*bad\.png: .*; replace or delete the file"):
        read_image(str(tmp_path / "bad.png"))
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="cannot read image .*cut.jpg"):
        read_image(str(tmp_path / "cut.jpg"))
    with pytest.raises(DataError, match="cannot read image .*absent.png: no such file"):
        read_image(str(tmp_path / "absent.png"))
    with pytest.raises(DataError, match="cannot read mask"):
        read_mask(str(tmp_path / "bad.png"))
    with pytest.raises(DataError, match="cannot read image"):
        image_size(str(tmp_path / "bad.png"))


def test_read_mask_binarises_and_resizes(tmp_path):
    values = np.array([[0, 1, 0, 0], [0, 0, 255, 0], [0, 0, 0, 0], [3, 0, 0, 0]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "m.png")
    assert read_mask(str(tmp_path / "m.png")).tolist() == (values > 0).tolist()
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[1, 1, 2] = 4  # only the blue channel marks it
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert read_mask(str(tmp_path / "rgb.png")).tolist() == [[False, False], [False, True]]
    sixteen = np.zeros((2, 2), dtype=np.uint16)
    sixteen[0, 0] = 1  # 1 of 65535: still defect
    Image.fromarray(sixteen).save(tmp_path / "m16.png")
    assert read_mask(str(tmp_path / "m16.png")).tolist() == [[True, False], [False, False]]
    block = np.zeros((4, 4), dtype=np.uint8)
    block[:2, :2] = 255
    Image.fromarray(block).save(tmp_path / "block.png")
    resized = read_mask(str(tmp_path / "block.png"), size=(8, 6))
    assert resized.shape == (6, 8) and resized.dtype == bool
    assert resized[:3, :4].all() and not resized[3:, :].any() and not resized[:, 4:].any()


# --------------------------------------------------------------------------------------------
# AnomalyDataset
# --------------------------------------------------------------------------------------------
def _sample_files(tmp_path):
    left_half = np.zeros((8, 8, 3), dtype=np.uint8)
    left_half[:, :4] = 255
    Image.fromarray(left_half).save(tmp_path / "halves.png")
    Image.new("RGB", (10, 6), (51, 102, 153)).save(tmp_path / "flat.png")
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[4:, 4:] = 1
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return [
        Sample(str(tmp_path / "flat.png"), None, 0, "b", "good", "train"),
        Sample(str(tmp_path / "halves.png"), str(tmp_path / "mask.png"), 1, "a", "scratch", "test"),
    ]


def test_dataset_items(tmp_path):
    samples = _sample_files(tmp_path)
    dataset = AnomalyDataset(samples, image_size=4, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.25))
    assert len(dataset) == 2 and dataset.categories == ["a", "b"]
    flat = dataset[0]
    assert flat["image"].shape == (3, 4, 4) and flat["image"].dtype == torch.float32
    expected = torch.tensor([(0.2 - 0.1) / 0.5, (0.4 - 0.2) / 0.5, (0.6 - 0.3) / 0.25])
    assert torch.allclose(flat["image"], expected.view(3, 1, 1).expand(3, 4, 4), atol=1e-6)
    assert flat["mask"].shape == (1, 4, 4) and flat["mask"].sum() == 0
    assert (flat["label"], flat["category"], flat["index"], flat["path"]) == (0, "b", 0, samples[0].image)

    halves = dataset[1]
    reference = (
        np.asarray(Image.open(samples[1].image).resize((4, 4), Image.Resampling.BILINEAR), np.float32) / 255
    )
    assert torch.allclose(halves["image"][0], (torch.from_numpy(reference[..., 0]) - 0.1) / 0.5, atol=1e-6)
    assert halves["mask"][0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert halves["label"] == 1 and halves["index"] == 1 and dataset[-1]["index"] == 1
    with pytest.raises(IndexError):
        dataset[2]


def test_dataset_default_collate(tmp_path):
    dataset = AnomalyDataset(_sample_files(tmp_path), 4, (0.5,) * 3, (0.5,) * 3)
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["image"].shape == (2, 3, 4, 4) and batch["mask"].shape == (2, 1, 4, 4)
    assert batch["label"].tolist() == [0, 1] and batch["index"].tolist() == [0, 1]
    assert batch["category"] == ["b", "a"]


def test_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="no samples"):
        AnomalyDataset([], 4, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(DataError, match="mean must have 3 values"):
        AnomalyDataset(_sample_files(tmp_path), 4, (0.5,), (0.5,) * 3)
    with pytest.raises(DataError, match="std values must be positive"):
        AnomalyDataset(_sample_files(tmp_path), 4, (0.5,) * 3, (0.5, 0.0, 0.5))


def test_dataset_on_generated_data(generated_dataset):
    from agp_data.layouts import load_samples

    dataset = AnomalyDataset(
        load_samples("synthetic", generated_dataset, split="test"), 32, (0.5,) * 3, (0.5,) * 3
    )
    defective = [dataset[i] for i in range(len(dataset)) if dataset.samples[i].label == 1]
    assert defective and all(item["mask"].sum() > 0 for item in defective)
    assert all(dataset[i]["mask"].sum() == 0 for i in range(len(dataset)) if dataset.samples[i].label == 0)


# --------------------------------------------------------------------------------------------
# Few-shot
# --------------------------------------------------------------------------------------------
def _train_samples(category: str, count: int) -> list[Sample]:
    return [Sample(f"/d/{category}/{i:02d}.png", None, 0, category, "good", "train") for i in range(count)]


def test_select_shots_is_seeded_per_category():
    samples = _train_samples("a", 20) + _train_samples("b", 20)
    samples += [
        Sample("/d/a/test.png", None, 0, "a", "good", "test"),
        Sample("/d/a/bad.png", None, 1, "a", "x", "test"),
    ]
    shots = select_shots(samples, 2, seed=0)
    assert [s.category for s in shots] == ["a", "a", "b", "b"]
    assert all(s.split == "train" and s.label == 0 for s in shots)
    assert select_shots(list(reversed(samples)), 2, seed=0) == shots  # input order does not matter
    assert select_shots(samples, 2, seed=1) != shots
    assert select_shots(_train_samples("a", 20), 2, seed=0) == shots[:2]  # independent of category b
    with pytest.raises(DataError, match="category 'a' has 20 normal training images, fewer than k=21"):
        select_shots(samples, 21, seed=0)


def _asymmetric_dataset(tmp_path) -> AnomalyDataset:
    """A 16-px image whose red channel is exactly its mask (an L-shaped blob off-centre)."""
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[..., 1] = np.arange(16, dtype=np.uint8)[None, :] * 8  # green ramp: breaks symmetry
    blob = np.zeros((16, 16), dtype=bool)
    blob[2:6, 3:12] = True
    blob[6:11, 3:6] = True
    image[blob, 0] = 255
    Image.fromarray(image).save(tmp_path / "l.png")
    Image.fromarray(blob.astype(np.uint8) * 255).save(tmp_path / "l_mask.png")
    sample = Sample(str(tmp_path / "l.png"), str(tmp_path / "l_mask.png"), 1, "c", "x", "test")
    return AnomalyDataset([sample], 16, (0.0,) * 3, (1.0,) * 3)


def test_expanded_dataset_has_32_distinct_transforms_of_image_and_mask(tmp_path):
    base = _asymmetric_dataset(tmp_path)
    expanded = ExpandedDataset(base, factor=32)
    assert len(expanded) == 32 and expanded.factor == 32
    items = [expanded[i] for i in range(32)]
    assert [item["index"] for item in items] == list(range(32))
    assert torch.equal(items[0]["image"], base[0]["image"]) and torch.equal(items[0]["mask"], base[0]["mask"])
    for i in range(32):
        for j in range(i):
            assert not torch.allclose(items[i]["image"], items[j]["image"], atol=1e-3), (i, j)
    for t, item in enumerate(items):
        follows = (item["image"][0] > 0.5).float()  # where the red blob went
        mask = item["mask"][0]
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        if t < 8:  # quarter turns and flips are exact
            assert torch.equal(follows, mask), t
        else:  # small rotations interpolate the image; the mask must still sit on the blob
            overlap = (follows * mask).sum() / torch.maximum(follows, mask).sum()
            assert overlap > 0.7, (t, float(overlap))
    # Distinct masks too (for the dihedral part, where they are exact).
    masks = {tuple(items[t]["mask"].flatten().tolist()) for t in range(8)}
    assert len(masks) == 8
    batch = next(iter(DataLoader(expanded, batch_size=32)))
    assert batch["image"].shape == (32, 3, 16, 16) and batch["index"].tolist() == list(range(32))


def test_expansion_factor_and_item_mapping(tmp_path):
    base = AnomalyDataset(_sample_files(tmp_path), 8, (0.0,) * 3, (1.0,) * 3)
    expanded = ExpandedDataset(base, factor=8)
    assert len(expanded) == 16
    item = expanded[13]  # base item 1 under transform 5 (flip, then one quarter turn)
    assert item["path"] == base.samples[1].image and item["index"] == 13
    expected = torch.rot90(torch.flip(base[1]["image"], dims=(-1,)), 1, dims=(-2, -1))
    assert torch.equal(item["image"], expected)
    with pytest.raises(DataError, match="between 1 and 32"):
        fewshot_transforms(33)
    assert len(fewshot_transforms()) == 32


def test_s3_dataset_item_uses_the_cache(tmp_path, s3_bucket):
    from agp_data import storage

    samples = _sample_files(tmp_path)
    uri = f"s3://{s3_bucket}/imgs"
    storage.upload_dir(str(tmp_path), uri)
    remote = [
        Sample(
            f"{uri}/{os.path.basename(s.image)}",
            s.mask and f"{uri}/{os.path.basename(s.mask)}",
            s.label,
            s.category,
            s.defect,
            s.split,
        )
        for s in samples
    ]
    cache = str(tmp_path / "s3cache")
    remote_item = AnomalyDataset(remote, 4, (0.5,) * 3, (0.5,) * 3, cache_dir=cache)[1]
    local_item = AnomalyDataset(samples, 4, (0.5,) * 3, (0.5,) * 3)[1]
    assert torch.equal(remote_item["image"], local_item["image"]) and torch.equal(
        remote_item["mask"], local_item["mask"]
    )
    assert remote_item["path"] == remote[1].image
    assert sum(len(files) for _, _, files in os.walk(cache)) == 2  # image and mask


def _write_samples(tmp_path, count: int, size: int = 24) -> list[Sample]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        mask = tmp_path / f"img{i}_mask.png"
        Image.fromarray((rng.random((size, size)) > 0.5).astype(np.uint8) * 255).save(mask)
        samples.append(Sample(image=str(path), mask=str(mask), label=1, category="c", defect="scratch", split="test"))
    return samples


def test_decoded_images_are_read_once_while_the_budget_lasts(tmp_path):
    samples = _write_samples(tmp_path, 3)
    cached = AnomalyDataset(samples, image_size=16, mean=[0.5] * 3, std=[0.25] * 3, decoded_cache_mb=1)
    uncached = AnomalyDataset(samples, image_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    first = [cached[i] for i in range(3)]
    for i in range(3):  # the cache gives exactly what decoding gives
        assert torch.equal(first[i]["image"], uncached[i]["image"])
        assert torch.equal(first[i]["mask"], uncached[i]["mask"])
    for sample in samples:  # later epochs never touch the files again
        os.remove(sample.image)
        os.remove(sample.mask)
    assert all(torch.equal(cached[i]["image"], first[i]["image"]) for i in range(3))
    assert all(torch.equal(cached[i]["mask"], first[i]["mask"]) for i in range(3))
    with pytest.raises(DataError):
        uncached[0]


def test_decoded_cache_stops_at_its_budget(tmp_path):
    samples = _write_samples(tmp_path, 3)
    one_image = 16 * 16 * 3 + 16 * 16  # its pixels and its mask
    dataset = AnomalyDataset(samples, image_size=16, mean=[0.5] * 3, std=[0.25] * 3,
                             decoded_cache_mb=(one_image + 10) / 2**20)
    for i in range(3):
        dataset[i]
    assert list(dataset._decoded) == [0] and list(dataset._decoded_masks) == [0]
    os.remove(samples[2].image)
    with pytest.raises(DataError):  # past the budget: read from disk as before
        dataset[2]
