"""Layout parsers on small trees written here, locally and over S3 (moto server)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from agp_data import storage
from agp_data.dataset import AnomalyDataset
from agp_data.errors import DataError
from agp_data.images import read_mask
from agp_data.layouts import (
    DATASETS,
    FolderLayout,
    folder_test_indices,
    list_categories,
    load_samples,
    scan_layout,
)


def _image(path, value=100, size=(8, 6), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    channels = {"RGB": 3, "L": 1}[mode]
    array = np.full((size[1], size[0], channels), value, dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array).save(path)


def _mask(path, value=1, size=(8, 6), box=(2, 1, 5, 4)):
    """A mask whose defect pixels hold ``value`` (masks in the wild use 1, 7, 255 ...)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = value
    Image.fromarray(array).save(path)


def _rel(samples, root):
    return [
        (os.path.relpath(s.image, root), s.mask and os.path.relpath(s.mask, root), s.label, s.defect, s.split)
        for s in samples
    ]


@pytest.fixture
def mvtec_tree(tmp_path):
    root = tmp_path / "mvtec"
    b = root / "bottle"
    _image(b / "train/good/000.png")
    _image(b / "train/good/001.JPG")  # any extension, any case
    _image(b / "test/good/000.png")
    _image(b / "test/broken/000.png")
    _image(b / "test/broken/001.bmp")
    _image(b / "test/broken/002.png")  # no mask: label 1, mask None
    _mask(b / "ground_truth/broken/000_mask.png", value=1)
    _mask(b / "ground_truth/broken/001_mask.bmp", value=7)
    _mask(b / "ground_truth/broken/009_mask.png")  # matches no image
    _image(root / "cable/train/good/a.png")
    _image(root / "cable/test/good/a.png")
    (root / "license.txt").write_text("not an image")
    (b / "train/good/.DS_Store").write_text("junk")
    (b / "train/good/notes.txt").write_text("junk")
    return str(root)


def test_datasets_constant():
    assert DATASETS == ("synthetic", "mvtec", "visa", "btad", "mvtec3d", "folder")


def test_mvtec_layout(mvtec_tree):
    samples = load_samples("mvtec", mvtec_tree, categories=["bottle"])
    assert _rel(samples, mvtec_tree) == [
        ("bottle/train/good/000.png", None, 0, "good", "train"),
        ("bottle/train/good/001.JPG", None, 0, "good", "train"),
        ("bottle/test/broken/000.png", "bottle/ground_truth/broken/000_mask.png", 1, "broken", "test"),
        ("bottle/test/broken/001.bmp", "bottle/ground_truth/broken/001_mask.bmp", 1, "broken", "test"),
        ("bottle/test/broken/002.png", None, 1, "broken", "test"),
        ("bottle/test/good/000.png", None, 0, "good", "test"),
    ]
    assert {s.category for s in samples} == {"bottle"}
    assert list_categories("mvtec", mvtec_tree) == ["bottle", "cable"]
    assert len(load_samples("mvtec", mvtec_tree)) == 8
    assert [s.split for s in load_samples("mvtec", mvtec_tree, split="test", categories="cable")] == ["test"]
    scan = scan_layout("mvtec", mvtec_tree)
    assert [os.path.relpath(p, mvtec_tree) for p in scan.orphan_masks] == [
        "bottle/ground_truth/broken/009_mask.png"
    ]
    # Mask values 1 and 7 both count as defect.
    for sample in samples[2:4]:
        mask = read_mask(sample.mask)
        assert mask.dtype == bool and mask.sum() == 9 and mask[1:4, 2:5].all()


def test_synthetic_is_the_mvtec_layout(mvtec_tree):
    assert load_samples("synthetic", mvtec_tree) == load_samples("mvtec", mvtec_tree)


def test_layout_errors_name_the_path_and_the_fix(tmp_path, mvtec_tree):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match=f"dataset root {missing} does not exist.*train/good"):
        load_samples("mvtec", missing)
    with pytest.raises(DataError, match="unknown category 'bottl'.*available: bottle, cable"):
        load_samples("mvtec", mvtec_tree, categories=["bottl"])
    with pytest.raises(DataError, match="looks like a single category: use its parent"):
        load_samples("mvtec", os.path.join(mvtec_tree, "bottle"))
    with pytest.raises(DataError, match="unknown dataset 'mvtech'"):
        load_samples("mvtech", mvtec_tree)
    with pytest.raises(DataError, match="unknown split"):
        load_samples("mvtec", mvtec_tree, split="val")
    with pytest.raises(DataError, match="needs a root"):
        load_samples("mvtec", None)
    # A category folder without any images.
    _mask(os.path.join(mvtec_tree, "empty", "ground_truth", "x", "0_mask.png"))
    with pytest.raises(DataError, match="category 'empty' in .* has no images"):
        load_samples("mvtec", mvtec_tree, categories=["empty"])
    _image(os.path.join(mvtec_tree, "trainonly", "train", "good", "0.png"))
    with pytest.raises(DataError, match="category 'trainonly' .* has no test images"):
        load_samples("mvtec", mvtec_tree, categories=["trainonly"], split="test")


def test_visa_layout(tmp_path):
    root = tmp_path / "visa"
    _image(root / "candle/Data/Images/Normal/0000.JPG")
    _image(root / "candle/Data/Images/Normal/0001.JPG")
    _image(root / "candle/Data/Images/Anomaly/000.JPG")
    _image(root / "candle/Data/Images/Anomaly/001.JPG")
    _mask(root / "candle/Data/Masks/Anomaly/000.png", value=255)
    _image(root / "pcb1/Data/Images/Normal/0000.JPG")
    _image(root / "pcb1/Data/Images/Anomaly/000.JPG")
    _mask(root / "pcb1/Data/Masks/Anomaly/000.png", value=3)
    os.makedirs(root / "split_csv")
    (root / "split_csv/1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/001.JPG,\n"
        "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,\n"
        "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/000.JPG,pcb1/Data/Masks/Anomaly/000.png\n"
    )
    root = str(root)
    assert list_categories("visa", root) == ["candle", "pcb1"]
    samples = load_samples("visa", root, categories=["candle"])
    assert _rel(samples, root) == [
        ("candle/Data/Images/Normal/0000.JPG", None, 0, "good", "train"),
        ("candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png", 1, "anomaly", "test"),
        ("candle/Data/Images/Anomaly/001.JPG", None, 1, "anomaly", "test"),
        ("candle/Data/Images/Normal/0001.JPG", None, 0, "good", "test"),
    ]
    assert read_mask(load_samples("visa", root, categories=["pcb1"], split="test")[0].mask).sum() == 9

    # A listed file that is missing is an error naming it.
    os.remove(os.path.join(root, "pcb1/Data/Images/Normal/0000.JPG"))
    with pytest.raises(
        DataError, match="1 file\\(s\\) listed .* missing, e.g. .*pcb1/Data/Images/Normal/0000.JPG"
    ):
        load_samples("visa", root, categories=["pcb1"])
    assert len(load_samples("visa", root, categories=["candle"])) == 4  # other categories still load
    os.remove(os.path.join(root, "split_csv/1cls.csv"))
    with pytest.raises(DataError, match="is not a VisA root: missing .*split_csv/1cls.csv"):
        load_samples("visa", root)


def test_btad_layout(tmp_path):
    root = tmp_path / "btad"
    _image(root / "01/train/ok/0000.bmp")
    _image(root / "01/test/ok/0000.bmp")
    _image(root / "01/test/ko/0001.bmp")
    _mask(root / "01/ground_truth/ko/0001.png", value=255)
    _image(root / "02/train/ok/0000.png")
    _image(root / "02/test/ko/0007.png")
    _mask(root / "02/ground_truth/ko/0007.bmp", value=1)
    root = str(root)
    assert list_categories("btad", root) == ["01", "02"]
    assert _rel(load_samples("btad", root, categories=["01"]), root) == [
        ("01/train/ok/0000.bmp", None, 0, "good", "train"),
        ("01/test/ko/0001.bmp", "01/ground_truth/ko/0001.png", 1, "ko", "test"),
        ("01/test/ok/0000.bmp", None, 0, "good", "test"),
    ]
    (defective,) = load_samples("btad", root, categories=["02"], split="test")
    assert os.path.relpath(defective.mask, root) == "02/ground_truth/ko/0007.bmp"


def test_mvtec3d_layout_uses_rgb_only(tmp_path):
    root = tmp_path / "mvtec3d"
    c = root / "bagel"
    _image(c / "train/good/rgb/000.png")
    (c / "train/good/xyz").mkdir(parents=True)
    (c / "train/good/xyz/000.tiff").write_bytes(b"depth data, ignored")
    _image(c / "validation/good/rgb/000.png")  # not used for training
    _image(c / "test/good/rgb/000.png")
    _mask(c / "test/good/gt/000.png", value=0)
    _image(c / "test/hole/rgb/000.png")
    _mask(c / "test/hole/gt/000.png", value=255)
    (root / "readme.txt").write_text("x")
    root = str(root)
    assert _rel(load_samples("mvtec3d", root), root) == [
        ("bagel/train/good/rgb/000.png", None, 0, "good", "train"),
        ("bagel/test/good/rgb/000.png", None, 0, "good", "test"),
        ("bagel/test/hole/rgb/000.png", "bagel/test/hole/gt/000.png", 1, "hole", "test"),
    ]
    assert scan_layout("mvtec3d", root).orphan_masks == []


def test_folder_split_rule():
    assert folder_test_indices(10, 0.2) == [4, 9]
    assert folder_test_indices(10, 0.3) == [3, 6, 9]
    assert folder_test_indices(100, 0.29) == [i for i in range(100) if (i + 1) * 29 // 100 > i * 29 // 100]
    assert len(folder_test_indices(100, 0.29)) == 29
    assert folder_test_indices(3, 0.2) == []
    assert folder_test_indices(5, 0.0) == []


def test_folder_layout(tmp_path):
    root = tmp_path / "parts"
    for i in range(10):
        _image(root / f"ok/img_{i:02d}.png")
    _image(root / "bad/a.png")
    _image(root / "bad/scratch/b.jpg")
    _image(root / "bad/c.png")  # no mask
    _mask(root / "masks/a_mask.png", value=9)
    _mask(root / "masks/scratch/b.png", value=255)
    _mask(root / "masks/zzz.png")  # matches no image
    layout = FolderLayout(
        normal_dir="ok", abnormal_dir="bad", mask_dir="masks", test_fraction=0.2, category="part"
    )
    samples = load_samples("folder", str(root), folder=layout)
    root = str(root)
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert len(train) == 8 and all(s.label == 0 and s.category == "part" for s in train)
    assert _rel(test, root) == [
        ("bad/a.png", "masks/a_mask.png", 1, "abnormal", "test"),
        ("bad/c.png", None, 1, "abnormal", "test"),
        ("bad/scratch/b.jpg", "masks/scratch/b.png", 1, "scratch", "test"),
        ("ok/img_04.png", None, 0, "good", "test"),
        ("ok/img_09.png", None, 0, "good", "test"),
    ]
    assert [os.path.relpath(p, root) for p in scan_layout("folder", root, folder=layout).orphan_masks] == [
        "masks/zzz.png"
    ]
    # Absolute folders work without a root; a missing folder names itself.
    absolute = FolderLayout(normal_dir=os.path.join(root, "ok"))
    assert len(load_samples("folder", None, folder=absolute, split="train")) == 8
    assert list_categories("folder", None, folder=absolute) == ["folder"]
    with pytest.raises(DataError, match="normal_dir .*/nope does not exist"):
        load_samples("folder", root, folder=FolderLayout(normal_dir="nope"))
    with pytest.raises(DataError, match="needs a FolderLayout"):
        load_samples("folder", root)
    with pytest.raises(DataError, match="test_fraction=1.5"):
        load_samples("folder", root, folder=FolderLayout(normal_dir="ok", test_fraction=1.5))


def test_folder_normal_dir_may_contain_the_abnormal_dir(tmp_path):
    for i in range(5):
        _image(tmp_path / f"all/{i}.png")
    _image(tmp_path / "all/defects/d.png")
    samples = load_samples("folder", str(tmp_path), folder=FolderLayout("all", abnormal_dir="all/defects"))
    assert sum(s.label for s in samples) == 1 and len(samples) == 6


def test_layouts_over_s3_match_local(mvtec_tree, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/datasets/mvtec"
    storage.upload_dir(mvtec_tree, uri)
    local = load_samples("mvtec", mvtec_tree)
    remote = load_samples("mvtec", uri + "/")
    assert [
        (s.image[len(uri) + 1 :], s.mask and s.mask[len(uri) + 1 :], s.label, s.split) for s in remote
    ] == [
        (
            os.path.relpath(s.image, mvtec_tree),
            s.mask and os.path.relpath(s.mask, mvtec_tree),
            s.label,
            s.split,
        )
        for s in local
    ]
    assert list_categories("mvtec", uri) == ["bottle", "cable"]
    assert scan_layout("mvtec", uri).orphan_masks == [f"{uri}/bottle/ground_truth/broken/009_mask.png"]

    index = next(i for i, s in enumerate(remote) if s.mask and s.mask.endswith(".bmp"))
    cache = str(tmp_path / "cache")
    remote_item = AnomalyDataset(remote, 16, (0.5,) * 3, (0.25,) * 3, cache_dir=cache)[index]
    local_item = AnomalyDataset(local, 16, (0.5,) * 3, (0.25,) * 3)[index]
    assert remote_item["path"].startswith("s3://") and remote_item["label"] == 1
    assert torch.equal(remote_item["image"], local_item["image"])
    assert torch.equal(remote_item["mask"], local_item["mask"]) and remote_item["mask"].sum() > 0
    assert any(os.scandir(cache))  # the images came through the local cache

    with pytest.raises(DataError, match="dataset root s3://.*/nothing does not exist"):
        load_samples("mvtec", f"s3://{s3_bucket}/nothing")
    with pytest.raises(DataError, match="malformed S3 URI 's3:/x'"):
        load_samples("mvtec", "s3:/x")


def test_folder_layout_over_s3(s3_bucket, tmp_path):
    for i in range(5):
        _image(tmp_path / f"ok/{i}.png")
    _image(tmp_path / "bad/x.png")
    _mask(tmp_path / "masks/x_mask.png")
    uri = f"s3://{s3_bucket}/folder"
    storage.upload_dir(str(tmp_path), uri)
    samples = load_samples("folder", uri, folder=FolderLayout("ok", "bad", "masks", test_fraction=0.2))
    assert [(s.image, s.mask, s.split) for s in samples if s.label] == [
        (f"{uri}/bad/x.png", f"{uri}/masks/x_mask.png", "test")
    ]
    assert sum(s.split == "train" for s in samples) == 4
