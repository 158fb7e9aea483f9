"""Training data sources and the generated shapes dataset + its pixel judge."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_var import shapes
from diffusers_var.training.data import HFDataset, ImageFolderDataset, collate


def test_shapes_dataset_is_deterministic_and_captioned():
    for size, message in (
        ((0, 32), r"`num_images` must be in \[1, 10,000,000\], got 0"),
        ((10**9, 32), r"`num_images` must be in \[1, 10,000,000\], got 1000000000"),  # (minutes, then out of memory)
        ((4, 7), r"`resolution` must be >= 16"),
    ):
        with pytest.raises(ValueError, match=message):  # each names its own value
            shapes.ShapesDataset(*size)
    from diffusers_var.training.data import build_dataset

    for data in ({"num_images": 10**9}, {"num_images": 10**9, "concept": "bar"}):  # the config's key is named
        with pytest.raises(ValueError, match=r"`data.num_images` must be in"):
            build_dataset({"type": "shapes", **data}, 32)
    a, b = shapes.ShapesDataset(40, 32, seed=7), shapes.ShapesDataset(40, 32, seed=7)
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, shapes.ShapesDataset(40, 32, seed=8).images)
    item = a[0]
    assert (
        item["pixel_values"].shape == (3, 32, 32)
        and -1 <= item["pixel_values"].min()
        and item["pixel_values"].max() <= 1
    )
    cls = shapes.CLASSES[item["class_labels"]]
    assert item["caption"] == f"a {cls.color} {cls.shape} on a {cls.background} background"
    assert shapes.NUM_CLASSES == 90


@pytest.mark.parametrize(
    "make",
    [
        lambda: shapes.ShapesDataset(40, 32, seed=7),
        lambda: shapes.ConceptShapesDataset(40, 32, seed=7, concept_replaces="square", need_labels=True),
    ],
    ids=["shapes", "concept"],
)
def test_a_shapes_set_too_large_to_hold_is_drawn_when_read_with_the_same_pixels(make, monkeypatch):
    held = make()
    monkeypatch.setattr(shapes._DrawnShapes, "MAX_RENDERED_BYTES", 40 * 32 * 32 * 3 - 1)
    drawn = make()
    assert held.images is not None and drawn.images is None
    for index in (0, 17, 39, -1, np.int64(5), torch.tensor(6)):  # samplers may hand numpy or torch integers
        a, b = held[index], drawn[index]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["class_labels"] == b["class_labels"]
        assert a["caption"] == b["caption"]
    assert not torch.equal(drawn[0]["pixel_values"], drawn[1]["pixel_values"])
    with pytest.raises(IndexError):
        drawn[40]


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
    (tmp_path / "cats" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "meta caption"}) + "\n"
    )
    assert ImageFolderDataset(tmp_path, 16, need_captions=True)[0]["caption"] == "meta caption"
    (tmp_path / "cats" / "metadata.jsonl").write_text(  # an empty "text" falls back to "caption"
        json.dumps({"file_name": "a.png", "text": "", "caption": "the caption key"}) + "\n"
    )
    assert ImageFolderDataset(tmp_path, 16, need_captions=True)[0]["caption"] == "the caption key"
    (tmp_path / "cats" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "meta caption"}) + "\n"
    )
    (tmp_path / "dogs" / "a.txt").unlink()
    with pytest.raises(ValueError, match="no caption"):
        ImageFolderDataset(tmp_path, 16, need_captions=True)
    # a malformed metadata.jsonl is named with its line (it gave KeyError / AttributeError / TypeError tracebacks,
    # or json's message without a file); a caption that is not text is refused here, not at the first step
    meta = tmp_path / "cats" / "metadata.jsonl"
    for line, message in (
        ('{"text": "a"}', "line 2 must be a JSON object with a string `file_name`"),
        ('["a.png", "a"]', "line 2 must be a JSON object"),
        ('{"file_name": 5, "text": "x"}', "line 2 must be a JSON object with a string `file_name`"),
        ("{bad json", "line 2 is not JSON"),
        ('{"file_name": "a.png", "text": 1}', "line 2 has a caption that is not a string"),
    ):
        meta.write_text(json.dumps({"file_name": "a.png", "text": "meta caption"}) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=rf"`data.path`: '.*metadata.jsonl' {message}"):
            ImageFolderDataset(tmp_path, 16, need_captions=True)
    meta.write_bytes(b'{"file_name": "a.png", "text": "caf\xe9"}\n')  # Latin-1
    with pytest.raises(ValueError, match=r"`data.path`: cannot read '.*metadata.jsonl' as UTF-8"):
        ImageFolderDataset(tmp_path, 16, need_captions=True)


def test_captions_are_normalised_alike_in_both_formats(tmp_path):
    """metadata.jsonl captions were taken as written (padding kept, a blank one accepted) while .txt captions were
    stripped and a blank one refused; a .txt saved with a UTF-8 byte-order mark kept '\ufeff' in its caption."""
    PIL.Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    meta = tmp_path / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": "a.png", "text": "  a padded caption \n"}) + "\n")
    assert ImageFolderDataset(tmp_path, 16, need_captions=True)[0]["caption"] == "a padded caption"
    meta.write_text(json.dumps({"file_name": "a.png", "text": " \t"}) + "\n")
    with pytest.raises(ValueError, match="has no caption"):
        ImageFolderDataset(tmp_path, 16, need_captions=True)
    (tmp_path / "a.txt").write_text("the caption file")  # a blank metadata caption is none: the .txt is used
    assert ImageFolderDataset(tmp_path, 16, need_captions=True)[0]["caption"] == "the caption file"
    meta.unlink()
    (tmp_path / "a.txt").write_bytes("\ufeffa caption with a BOM".encode())
    assert ImageFolderDataset(tmp_path, 16, need_captions=True)[0]["caption"] == "a caption with a BOM"
    (tmp_path / "a.txt").unlink()
    meta.write_bytes("\ufeff".encode() + json.dumps({"file_name": "a.png", "text": "x"}).encode() + b"\n")
    assert ImageFolderDataset(tmp_path, 16, need_captions=True)[0]["caption"] == "x"


def test_image_folder_walk_follows_links_skips_hidden_and_warns_on_top_level_images(tmp_path, caplog):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for folder, color in ((root / "cats", (250, 0, 0)), (elsewhere / "dogs", (0, 250, 0))):
        folder.mkdir(parents=True)
        PIL.Image.new("RGB", (20, 20), color).save(folder / "a.png")
    (root / "dogs").symlink_to(elsewhere / "dogs", target_is_directory=True)  # a class folder that is a link
    (root / "cats" / "loop").symlink_to(root, target_is_directory=True)  # a link back up is no loop
    for hidden in (root / ".ipynb_checkpoints", root / "cats" / "__MACOSX"):
        hidden.mkdir()
        PIL.Image.new("RGB", (20, 20), (0, 0, 250)).save(hidden / "a.png")
    PIL.Image.new("RGB", (20, 20), (0, 0, 250)).save(root / "cats" / "._a.png")  # a macOS resource fork's name
    PIL.Image.new("RGB", (20, 20), (0, 0, 250)).save(root / "stray.png")  # beside the class folders
    with caplog.at_level("WARNING"):
        ds = ImageFolderDataset(root, 16, need_labels=True)
    assert ds.class_names == ["cats", "dogs"] and ds.labels == [0, 1] and len(ds) == 2
    assert [p.name for p in ds.files] == ["a.png", "a.png"]
    assert ds[1]["pixel_values"][1].mean() > 0.9  # the green dog through the link
    assert "left out 1 image(s) at the top" in caplog.text and "stray.png" in caplog.text
    assert len(ImageFolderDataset(root, 16)) == 3  # unconditional training takes the top-level image too


def test_image_folders_read_every_format_generate_writes(tmp_path):
    """TIFF images (which generate --out writes) were left out of training folders without a word."""
    for suffix in (".png", ".tif", ".tiff", ".gif", ".webp"):
        PIL.Image.new("RGB", (20, 20), (250, 0, 0)).save(tmp_path / f"a{suffix}")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, 16)
    assert sorted(p.suffix for p in ds.files) == [".gif", ".png", ".tif", ".tiff", ".webp"]
    assert all(ds[i]["pixel_values"][0].mean() > 0.9 for i in range(len(ds)))


def test_a_class_folder_without_a_readable_image_is_refused_not_dropped(tmp_path, caplog, capsys):
    """d/a, d/b (empty, or only unreadable images), d/c gave the classes ['a', 'c'] with ids [0, 1] without a word:
    c trained as class 1. Unconditional training still takes the readable images."""
    root = tmp_path / "images"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
    for name in ("a", "c"):
        PIL.Image.new("RGB", (16, 16)).save(root / name / "0.png")
    (root / ".cache").mkdir()  # hidden folders are no classes
    with pytest.raises(
        ValueError, match=r"`data.path`: class folder\(s\) .* no readable image: 'b' \(no images\)\. .*shift"
    ):
        ImageFolderDataset(root, 16, need_labels=True)
    (root / "b" / "0.png").write_bytes(b"not an image")
    (root / "b" / "1.png").write_bytes(b"nor this")
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match=r"'b' \(only 2 unreadable image\(s\)\)"):
        ImageFolderDataset(root, 16, need_labels=True)
    assert "skipped 2 unreadable image(s)" in caplog.text and "1.png" in caplog.text  # named as before
    assert len(ImageFolderDataset(root, 16)) == 2
    PIL.Image.new("RGB", (16, 16)).save(root / "b" / "2.png")
    ds = ImageFolderDataset(root, 16, need_labels=True)
    assert ds.class_names == ["a", "b", "c"] and ds.labels == [0, 1, 2]

    # a training run stops at it before it makes its output folder
    from diffusers_var.cli import main

    (root / "b" / "2.png").unlink()
    run = tmp_path / "run"
    tokenizer = Path(__file__).resolve().parents[1] / "pipelines" / "var-shapes" / "vqvae"
    args = ["train", "var", f"output_dir={run}", f"tokenizer_path={tokenizer}", "data.type=imagefolder"]
    assert main([*args, f"data.path={root}", "batch_size=2", "model.depth=1"]) == 2
    assert "error: `data.path`: class folder(s)" in capsys.readouterr().err and not run.exists()


def test_sixteen_bit_grayscale_images_are_scaled_not_clipped(tmp_path):
    from diffusers_var.pil_images import to_grayscale, to_rgb

    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    PIL.Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    with PIL.Image.open(tmp_path / "ramp16.png") as image:
        assert image.mode.startswith("I")  # PIL's convert("RGB") turns all but the darkest pixels white here
        rgb, gray = np.asarray(to_rgb(image)), np.asarray(to_grayscale(image))
    expected = np.rint(ramp * (255 / 65535)).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert np.array_equal(gray, expected)
    item = ImageFolderDataset(tmp_path, 32)[0]["pixel_values"]
    assert -1 <= item.min() < -0.9 and 0.9 < item.max() <= 1 and abs(float(item.mean())) < 0.05
    floats = PIL.Image.fromarray(np.full((4, 4), 0.5, np.float32))  # mode F in [0, 1]
    assert np.asarray(to_rgb(floats)).max() == 128
    eight = PIL.Image.fromarray(np.full((4, 4), 200, np.int32))  # mode I holding 8-bit values stays as it is
    assert np.asarray(to_rgb(eight)).max() == 200
    for bad in (np.nan, np.inf):  # a float TIFF's NaN was cast to 0: a black image, without a word
        pixels = np.full((4, 4), 0.5, np.float32)
        pixels[1, 2] = bad
        with pytest.raises(ValueError, match="holds pixel values that are not finite numbers"):
            to_rgb(PIL.Image.fromarray(pixels))


def broken_stream_png(path, size=(24, 24)):
    """A PNG whose chunks and CRCs are all valid but whose compressed pixel data is garbage: PIL's verify() accepts
    it, decoding fails with "broken data stream"."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")
    data, out, pos = buffer.getvalue(), bytearray(buffer.getvalue()[:8]), 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IDAT":
            body = zlib.compress(b"\x00" * 8)[:2] + bytes(range(7, 7 + len(body) - 2))  # valid header, garbage deflate
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        pos += 12 + length
    path.write_bytes(bytes(out))


def _folder_with_a_broken_stream(root):
    for cls, color in (("cats", (10, 20, 30)), ("dogs", (30, 20, 10))):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            PIL.Image.new("RGB", (24, 24), color).save(root / cls / f"{i}.png")
    broken = root / "dogs" / "2-broken.png"
    broken_stream_png(broken)
    with PIL.Image.open(broken) as image:
        image.verify()  # passes the up-front check ...
    with pytest.raises(OSError), PIL.Image.open(broken) as image:
        image.load()  # ... and fails to decode
    return broken


def test_images_that_fail_to_decode_are_skipped_or_named(tmp_path, caplog):
    broken = _folder_with_a_broken_stream(tmp_path)
    ds = ImageFolderDataset(tmp_path, 16, need_labels=True)
    index = ds.files.index(broken)
    with caplog.at_level("WARNING"):
        item = ds[index]
        ds[index]
    assert item["class_labels"] == ds.labels[index + 1]  # the next readable image stands in for it
    assert [r.getMessage() for r in caplog.records].count(
        next(r.getMessage() for r in caplog.records if str(broken) in r.getMessage())
    ) == 1  # warned once, naming it
    strict = ImageFolderDataset(tmp_path, 16, need_labels=True, bad_images="error")
    with pytest.raises(ValueError, match=f"{re.escape(str(broken))}.*data.bad_images=skip"):
        strict[index]


def test_training_on_a_folder_with_a_broken_image(tmp_path, capsys, caplog):
    """The issue: a PNG with valid CRCs but a broken data stream ended `train tokenizer` with "OSError: broken data
    stream" and no file name. Skipped by default; with data.bad_images=error a one-line error names it."""
    from diffusers_var.cli import main

    broken = _folder_with_a_broken_stream(tmp_path / "images")
    model = (
        '{"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "vocab_size": 16, "z_channels": 4, '
        '"patch_nums": [1, 2, 4], "using_sa": false, "using_mid_sa": false}'
    )
    common = [
        "train",
        "tokenizer",
        "data.type=imagefolder",
        f"data.path={tmp_path / 'images'}",
        "resolution=8",
        "batch_size=9",
        "max_steps=1",
        "ema_decay=null",
        "mixed_precision=no",
        "sample_every=0",
        f"model={model}",
    ]
    with caplog.at_level("WARNING"):
        assert main([*common, f"output_dir={tmp_path / 'skip'}"]) == 0
    assert any(str(broken) in record.getMessage() for record in caplog.records)
    assert main([*common, f"output_dir={tmp_path / 'error'}", "data.bad_images=error"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: `data`: cannot read image") and str(broken) in err


def sideways_photo(path, upright_rgb: np.ndarray) -> None:
    """A JPEG stored rotated a quarter turn with the EXIF orientation tag (6) that turns it back, as phones write."""
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    PIL.Image.fromarray(upright_rgb).transpose(PIL.Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)


def test_training_images_are_turned_upright_as_their_exif_says(tmp_path):
    """A phone photo (pixels stored sideways, an EXIF orientation tag) trained sideways."""
    top_white = np.zeros((32, 32, 3), np.uint8)
    top_white[:16] = 255
    sideways_photo(tmp_path / "photo.jpg", top_white)
    with PIL.Image.open(tmp_path / "photo.jpg") as stored:
        assert np.asarray(stored)[:, :16].mean() > 200  # stored: the white half is on the left
    item = ImageFolderDataset(tmp_path, 32)[0]["pixel_values"]
    assert item[:, :16].mean() > 0.8 and item[:, 16:].mean() < -0.8  # trained: white on top, as viewers show it


class _Rows:
    """What HFDataset reads of a ``datasets.Dataset``: rows by index, a column by name, column names, features."""

    def __init__(self, rows: list[dict], features: dict | None = None):
        self.rows, self.column_names, self.features = rows, list(rows[0]), features

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        return [row[key] for row in self.rows] if isinstance(key, str) else self.rows[key]


@pytest.fixture
def hf_rows(monkeypatch, tmp_path):
    """``HFDataset(str(tmp_path), ...)`` loads the rows given to the returned function, through a stand-in for the
    ``datasets`` package (not needed by the tests, and never the network)."""
    fake = types.ModuleType("datasets")
    fake.Image = type("Image", (), {})
    monkeypatch.setitem(sys.modules, "datasets", fake)

    def load(rows, features=None):
        fake.load_from_disk = lambda path: _Rows(rows, features)

    return load


def test_hf_rows_without_a_caption_or_class_id_are_errors_naming_the_row_and_column(hf_rows, tmp_path):
    """A null caption was trained on as the prompt "None"; a label 2.7 as class 2."""
    image = PIL.Image.new("RGB", (16, 16), (200, 0, 0))
    hf_rows([{"image": image, "text": "a red", "label": 2.0}, {"image": image, "text": "a blue", "label": 1}])
    ds = HFDataset(str(tmp_path), 8, label_column="label", caption_column="text")
    assert [(ds[i]["caption"], ds[i]["class_labels"]) for i in range(2)] == [("a red", 2), ("a blue", 1)]
    assert type(ds[0]["class_labels"]) is int
    for column, values, message in (
        ("text", ["a red", None], r"`data\.caption_column`: row 1 of the dataset has no caption \(None\)"),
        ("text", ["a red", " "], r"`data\.caption_column`: row 1 .*no caption \(' '\)"),
        ("label", [0, 2.7], r"`data\.label_column`: row 1 of the dataset has label 2\.7, not a class id"),
        ("label", [-1, 0], r"`data\.label_column`: row 0 .*label -1, not a class id"),
        ("label", [0, None], r"`data\.label_column`: row 1 .*label None"),
    ):
        hf_rows([{"image": image, column: value} for value in values])
        keys = {"caption_column": "text"} if column == "text" else {"label_column": "label"}
        with pytest.raises(ValueError, match=message):
            HFDataset(str(tmp_path), 8, **keys)


def test_hf_image_columns_of_file_paths_are_errors_naming_the_column(hf_rows, tmp_path):
    """A column of file path strings ended in an AttributeError traceback from PIL's EXIF code."""
    image = PIL.Image.new("RGB", (16, 16), (200, 0, 0))
    hf_rows([{"image": image}, {"image": "/data/1.png"}, {"image": image}])
    ds = HFDataset(str(tmp_path), 8)  # (data.bad_images=skip: it is no unreadable image, and not skipped)
    assert ds[0]["pixel_values"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"`data\.image_column`: row 1 of the dataset holds str '/data/1\.png', not "):
        ds[1]
    hf_rows([{"image": "/data/0.png"}], features={"image": "Value('string')"})  # told before any row is read
    with pytest.raises(
        ValueError, match=r"`data\.image_column`: column 'image' holds Value\('string'\), not images.*cast_column"
    ):
        HFDataset(str(tmp_path), 8)
