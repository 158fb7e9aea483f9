"""Training data sources and the generated shapes dataset + its pixel judge."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest

from diffusers_var import shapes
from diffusers_var.training.data import ImageFolderDataset, collate


def test_shapes_dataset_is_deterministic_and_captioned():
    a, b = shapes.ShapesDataset(40, 32, seed=7), shapes.ShapesDataset(40, 32, seed=7)
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, shapes.ShapesDataset(40, 32, seed=8).images)
    item = a[0]
    assert item["pixel_values"].shape == (3, 32, 32) and -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
    cls = shapes.CLASSES[item["class_labels"]]
    assert item["caption"] == f"a {cls.color} {cls.shape} on a {cls.background} background"
    assert shapes.NUM_CLASSES == 90


def test_judge_reads_real_samples():
    ds = shapes.ShapesDataset(300, 64, seed=11)
    judged = shapes.judge_images(ds.images)
    accuracy = shapes.attribute_accuracy(judged, [shapes.CLASSES[i] for i in ds.class_ids])
    assert min(accuracy.values()) >= 0.98, accuracy


def test_judge_rejects_blank_and_wrong_images():
    blank = np.full((1, 64, 64, 3), 128, np.uint8)
    assert shapes.judge_images(blank) == [None]
    ds = shapes.ShapesDataset(20, 64, seed=1)
    swapped = [shapes.CLASSES[(i + 1) % shapes.NUM_CLASSES] for i in ds.class_ids]
    assert shapes.attribute_accuracy(shapes.judge_images(ds.images), swapped)["all"] == 0.0


def test_class_id_errors():
    assert shapes.CLASSES[shapes.class_id("circle", "red", "blue")] == shapes.ShapeClass("circle", "red", "blue")
    with pytest.raises(ValueError, match="background"):
        shapes.class_id("circle", "red", "red")


def test_image_folder_labels_captions_and_bad_files(tmp_path, caplog):
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        PIL.Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / cls / "a.png")
        (tmp_path / cls / "a.txt").write_text(f"a photo of {cls}")
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not an image")
    ds = ImageFolderDataset(tmp_path, 16, need_labels=True, need_captions=True)
    assert ds.skipped == 1 and len(ds) == 2 and ds.class_names == ["cats", "dogs"]
    batch = collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["class_labels"].tolist() == [0, 1] and batch["caption"] == ["a photo of cats", "a photo of dogs"]
    # metadata.jsonl captions (HF imagefolder layout)
    (tmp_path / "cats" / "a.txt").unlink()
    (tmp_path / "cats" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "meta caption"}) + "\n")
    assert ImageFolderDataset(tmp_path, 16, need_captions=True)[0]["caption"] == "meta caption"
    (tmp_path / "dogs" / "a.txt").unlink()
    with pytest.raises(ValueError, match="no caption"):
        ImageFolderDataset(tmp_path, 16, need_captions=True)
