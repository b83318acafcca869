"""agp_data.integrity: mask problems found from headers, images decoded in full (and
remembered), with one-line DataErrors naming the files and the fix."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from agp_data import integrity, storage
from agp_data.config import DataConfig
from agp_data.errors import DataError
from agp_data.samples import Sample


def _png(path, value=90, size=(12, 10)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    return str(path)


def _truncate(path: str) -> str:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


def _sample(image, mask=None, label=None) -> Sample:
    label = (1 if mask is not None else 0) if label is None else label
    return Sample(image=str(image), mask=mask, label=label, category="widget",
                  defect="dent" if label else "good", split="test")


@pytest.fixture
def good_samples(tmp_path) -> list[Sample]:
    # Big enough that the truncated half of a file still holds the whole header.
    return [
        _sample(_png(tmp_path / "good.png", size=(64, 48))),
        _sample(_png(tmp_path / "dent.png", size=(64, 48)), _png(tmp_path / "dent_mask.png", 255, (64, 48))),
    ]


# --------------------------------------------------------------------------------------------
# check_masks
# --------------------------------------------------------------------------------------------
def test_check_masks_is_quiet_on_a_clean_dataset(generated_dataset):
    from agp_data.layouts import load_samples

    assert integrity.check_masks(load_samples("mvtec", generated_dataset)) == []


def test_missing_masks_are_one_warning_with_the_count_and_first_three(tmp_path):
    images = [_png(tmp_path / f"d{i}.png") for i in range(5)]
    samples = [_sample(image, label=1) for image in images] + [_sample(_png(tmp_path / "ok.png"))]
    (warning,) = integrity.check_masks(samples)
    assert warning == (
        f"5 defect images have no mask (all pixels count as normal): {images[0]}, {images[1]}, "
        f"{images[2]} and 2 more; add the masks or remove the images, or pass --strict-data to stop on this"
    )


def test_masks_of_another_size_are_reported_from_headers(tmp_path):
    image = _png(tmp_path / "dent.png", size=(12, 10))
    mask = _png(tmp_path / "dent_mask.png", 255, size=(6, 5))
    ok = _sample(_png(tmp_path / "ok.png"), _png(tmp_path / "ok_mask.png", 255))
    (warning,) = integrity.check_masks([_sample(image, mask), ok])
    assert warning.startswith(
        f"1 mask differs in size from the image (resized to fit): {mask} "
        f"(mask is 6x5, image {image} is 12x10);"
    )
    assert warning.endswith("fix or remove these masks, or pass --strict-data to stop on this")


def test_check_masks_reads_headers_only(tmp_path, monkeypatch):
    image = _truncate(_png(tmp_path / "dent.png", size=(64, 48)))  # decoding it would fail
    mask = _png(tmp_path / "dent_mask.png", 255, size=(64, 48))

    def no_decoding(*args, **kwargs):
        raise AssertionError("check_masks must not decode pixels")

    monkeypatch.setattr(integrity, "decoded_size", no_decoding)
    assert integrity.check_masks([_sample(image, mask)]) == []


def test_strict_raises_one_line_with_every_kind(tmp_path):
    samples = [
        _sample(_png(tmp_path / "nomask.png"), label=1),
        _sample(_png(tmp_path / "dent.png"), _png(tmp_path / "dent_mask.png", 255, size=(3, 3))),
    ]
    with pytest.raises(DataError) as info:
        integrity.check_masks(samples, strict=True)
    message = str(info.value)
    assert "\n" not in message
    assert "1 defect image has no mask" in message and "nomask.png" in message
    assert "1 mask differs in size" in message and "dent_mask.png" in message
    assert "--strict-data to go on with a warning" in message
    assert integrity.check_masks(samples[:0], strict=True) == []


def test_unreadable_mask_header_is_a_warning_not_a_crash(tmp_path):
    mask = tmp_path / "dent_mask.png"
    mask.write_bytes(b"garbage")
    (warning,) = integrity.check_masks([_sample(_png(tmp_path / "dent.png"), str(mask))])
    assert warning == f"1 image or mask cannot be read: {mask}; remove or replace them"


def test_inspect_and_check_masks_share_one_definition(tmp_path):
    # The defect image without a mask and the mask of another size are what `agpctl data
    # inspect` reports as missing_mask / size_mismatch; both come from integrity.
    from agp_data import inspect

    assert inspect.Problem is integrity.Problem
    nomask = _sample(_png(tmp_path / "x.png"), label=1)
    assert integrity.lacks_mask(nomask) and not integrity.lacks_mask(_sample(_png(tmp_path / "y.png")))


# --------------------------------------------------------------------------------------------
# verify_images
# --------------------------------------------------------------------------------------------
def test_verify_images_passes_good_data_and_reports_progress(good_samples, tmp_path):
    seen: list[tuple[int, int]] = []
    integrity.verify_images(
        good_samples, on_progress=lambda d, t: seen.append((d, t)), cache_dir=str(tmp_path / "c")
    )
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_truncated_png_fails_with_its_name(good_samples, tmp_path):
    bad = _truncate(good_samples[1].image)
    with pytest.raises(DataError) as info:
        integrity.verify_images(good_samples, cache_dir=str(tmp_path / "c"))
    message = str(info.value)
    assert message.startswith(f"cannot decode image {bad} (image file is truncated")
    assert message.endswith("): remove or replace it") and "\n" not in message


def test_several_bad_files_are_counted_and_the_first_three_named(tmp_path):
    samples = []
    for i in range(4):
        garbage = tmp_path / f"g{i}.png"
        garbage.write_bytes(b"this is not an image")
        samples.append(_sample(str(garbage)))
    bad_mask = _truncate(_png(tmp_path / "m_mask.png", 255, size=(64, 48)))
    samples.insert(0, _sample(_png(tmp_path / "m.png", size=(64, 48)), bad_mask))
    samples.append(_sample(str(tmp_path / "missing.png")))
    with pytest.raises(DataError) as info:
        integrity.verify_images(samples, cache_dir=str(tmp_path / "c"), workers=3)
    message = str(info.value)
    assert message.startswith(f"6 images or masks cannot be decoded: {bad_mask} (image file is truncated")
    assert f"{tmp_path / 'g0.png'} (cannot identify image file" in message
    assert f"{tmp_path / 'g1.png'} (" in message and "g2.png" not in message
    assert message.endswith(" and 3 more; remove or replace them")


def test_a_second_run_does_not_decode_again_until_a_file_changes(good_samples, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    opened: list[str] = []
    real = integrity.decoded_size

    def counting(path, *args, **kwargs):
        opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(integrity, "decoded_size", counting)
    integrity.verify_images(good_samples, cache_dir=cache)
    assert sorted(opened) == sorted([good_samples[0].image, good_samples[1].image, good_samples[1].mask])
    assert os.path.isfile(os.path.join(cache, integrity.VERIFIED_CACHE))

    opened.clear()
    progress: list[tuple[int, int]] = []
    integrity.verify_images(good_samples, cache_dir=cache, on_progress=lambda d, t: progress.append((d, t)))
    assert opened == [] and progress == [(3, 3)]

    # A changed file (here: truncated, so its size changes) is decoded again, and fails.
    _truncate(good_samples[0].image)
    with pytest.raises(DataError, match="cannot decode image .*good.png"):
        integrity.verify_images(good_samples, cache_dir=cache)
    assert opened == [good_samples[0].image]


def test_bad_files_are_never_remembered(tmp_path):
    garbage = tmp_path / "g.png"
    garbage.write_bytes(b"nope")
    for _ in range(2):
        with pytest.raises(DataError, match="cannot decode image"):
            integrity.verify_images([_sample(str(garbage))], cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 1, "files": 7}', '{"version": 99}'])
def test_a_corrupt_cache_file_is_ignored(good_samples, tmp_path, content):
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / integrity.VERIFIED_CACHE).write_text(content)
    integrity.verify_images(good_samples, cache_dir=str(cache))
    remembered = json.loads((cache / integrity.VERIFIED_CACHE).read_text())
    assert len(remembered["files"]) == 3


def test_a_cache_that_cannot_be_written_is_not_fatal(good_samples, tmp_path):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("x")
    integrity.verify_images(good_samples, cache_dir=str(blocker))


def test_default_cache_location_is_the_agp_cache(good_samples, agp_cache_dir):
    integrity.verify_images(good_samples)
    assert os.path.isfile(os.path.join(agp_cache_dir, integrity.VERIFIED_CACHE))


def test_verify_images_on_s3(s3_bucket, tmp_path, monkeypatch):
    _png(tmp_path / "src" / "d.png", size=(64, 48))
    _png(tmp_path / "src" / "d_mask.png", 255, (64, 48))
    base = f"s3://{s3_bucket}/ds"
    storage.upload_dir(str(tmp_path / "src"), base)
    remote = _sample(f"{base}/d.png", f"{base}/d_mask.png")
    cache = str(tmp_path / "cache")
    integrity.verify_images([remote], cache_dir=cache)
    assert os.listdir(os.path.join(cache, "s3"))  # fetched where training reads them from

    monkeypatch.setattr(integrity, "decoded_size", lambda *a, **k: pytest.fail("decoded again"))
    integrity.verify_images([remote], cache_dir=cache)

    storage.write_bytes(f"{base}/d.png", b"replaced by garbage")
    monkeypatch.undo()
    with pytest.raises(DataError, match=f"cannot decode image {base}/d.png"):
        integrity.verify_images([remote], cache_dir=cache)


def test_data_config_has_strict_off_by_default():
    assert DataConfig().strict is False and DataConfig(strict=True).strict is True
