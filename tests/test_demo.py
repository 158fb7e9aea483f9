"""The Gradio demo through its HTTP API (gradio_client): each tab's endpoint, seeds, readable errors, the
missing-model notice, and a bounded load test with the queue limit.

Serves the embedded VAR (64 px) and tiny random STAR (16 px) / Infinity (32 px) pipeline folders on 127.0.0.1.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from demo_support import require, serve, tiny_folders

gr = require("gradio", "pip install gradio")
gradio_client = require("gradio_client", "pip install gradio_client")

from diffusers_var.demo import FAMILIES, MAX_SEED, build_demo  # noqa: E402

EMBEDDED_VAR = FAMILIES["var"][2]
if not (EMBEDDED_VAR / "model_index.json").is_file():
    pytest.skip(f"the embedded VAR pipeline is missing at {EMBEDDED_VAR}", allow_module_level=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("demo-pipelines"))


@pytest.fixture(scope="module")
def server(folders):
    demo = build_demo(
        var=EMBEDDED_VAR, star=folders["star"], infinity=folders["infinity"], device="cpu", max_images=4, queue_size=16
    )
    with serve(demo) as url:
        yield url, demo


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[0], verbose=False)


def images_of(gallery) -> list[np.ndarray]:
    """gradio_client's gallery output (items with a local file path) -> RGB arrays."""
    arrays = []
    for item in gallery:
        path = item["image"] if isinstance(item, dict) else item[0]
        path = path["path"] if isinstance(path, dict) else path
        arrays.append(np.asarray(PIL.Image.open(path).convert("RGB")))
    return arrays


def var_args(label="red circle on blue", num_images=2, seed=7, randomize=False, **overrides):
    args = dict(
        class_name=label,
        guidance_scale=4.0,
        top_k=900,
        top_p=0.95,
        more_smooth=False,
        num_images=num_images,
        seed=seed,
        randomize=randomize,
    )
    args.update(overrides)
    return args


def star_args(prompt="a red circle on a blue background", num_images=2, seed=3, randomize=False):
    return dict(
        prompt=prompt,
        negative_prompt="",
        guidance_scale=4.0,
        top_k=10,
        top_p=0.9,
        use_stable_sampler=True,
        num_images=num_images,
        seed=seed,
        randomize=randomize,
    )


def infinity_args(prompt="a red circle on a blue background", size="32x32", num_images=2, seed=5, randomize=False):
    return dict(
        prompt=prompt,
        negative_prompt="",
        size=size,
        guidance_scale=3.0,
        tau=0.5,
        top_k=900,
        top_p=0.97,
        num_images=num_images,
        seed=seed,
        randomize=randomize,
    )


def call(client, endpoint, args):
    return client.predict(*args.values(), api_name=endpoint)


# -- loading -----------------------------------------------------------------------------------------
def test_default_build_loads_embedded_pipelines_and_notices_missing_ones():
    demo = build_demo(device="cpu")
    markdown = " ".join(str(block.value) for block in demo.blocks.values() if isinstance(block, gr.Markdown))
    for key, (_, pipeline_class, folder) in FAMILIES.items():
        if (folder / "model_index.json").is_file():
            assert isinstance(demo.loaded_pipelines[key], pipeline_class)
        else:
            assert demo.loaded_pipelines[key] is None
            assert f"pipelines/{folder.name}" in markdown and f"--{key} PATH" in markdown


def test_bad_folders_become_notices_not_crashes(tmp_path, folders):
    demo = build_demo(var=tmp_path, star=EMBEDDED_VAR, infinity=None, device="cpu")
    assert all(pipe is None for pipe in demo.loaded_pipelines.values())
    notices = {
        block.elem_id: str(block.value)
        for block in demo.blocks.values()
        if isinstance(block, gr.Markdown) and block.elem_id
    }
    assert "no model_index.json" in notices["var-notice"]
    assert "VARPipeline, not a STARPipeline" in notices["star-notice"]
    assert "--infinity PATH" in notices["infinity-notice"]


# -- endpoints ---------------------------------------------------------------------------------------
def test_var_endpoint_count_size_and_seed(client):
    gallery, seed, info = call(client, "/generate_var", var_args(num_images=3))
    images = images_of(gallery)
    assert len(images) == 3 and all(image.shape == (64, 64, 3) for image in images)
    assert seed == 7 and "3 images of 64x64 px, seed 7" in info
    again = images_of(call(client, "/generate_var", var_args(num_images=3))[0])
    assert all(np.array_equal(a, b) for a, b in zip(images, again))
    other = images_of(call(client, "/generate_var", var_args(num_images=3, seed=8))[0])
    assert not all(np.array_equal(a, b) for a, b in zip(images, other))


def test_randomized_seed_is_reported_and_reproduces(client):
    gallery, seed, _ = call(client, "/generate_var", var_args(num_images=1, seed=0, randomize=True))
    assert isinstance(seed, (int, float)) and 0 <= seed <= MAX_SEED
    fixed = call(client, "/generate_var", var_args(num_images=1, seed=int(seed)))[0]
    assert np.array_equal(images_of(gallery)[0], images_of(fixed)[0])


def test_var_random_class(client):
    gallery, _, _ = call(client, "/generate_var", var_args(label="(random class)", num_images=2))
    assert len(images_of(gallery)) == 2


def test_star_endpoint_count_size_and_seed(client, folders):
    if folders["star"] is None:
        pytest.skip("STAR text-encoder fixtures are absent")
    gallery, seed, info = call(client, "/generate_star", star_args())
    images = images_of(gallery)
    assert len(images) == 2 and all(image.shape == (16, 16, 3) for image in images) and seed == 3
    again = images_of(call(client, "/generate_star", star_args())[0])
    assert all(np.array_equal(a, b) for a, b in zip(images, again))


def test_infinity_endpoint_count_size_and_seed(client, folders):
    if folders["infinity"] is None:
        pytest.skip("Infinity tokenizer fixtures are absent")
    gallery, seed, info = call(client, "/generate_infinity", infinity_args(num_images=3))
    images = images_of(gallery)
    assert len(images) == 3 and all(image.shape == (32, 32, 3) for image in images) and seed == 5
    again = images_of(call(client, "/generate_infinity", infinity_args(num_images=3))[0])
    assert all(np.array_equal(a, b) for a, b in zip(images, again))
    gallery, _, info = call(client, "/generate_infinity", infinity_args(size="30x40", num_images=1))
    assert images_of(gallery)[0].shape == (30, 40, 3) and "1 image of 30x40 px" in info  # as the Size choices say


def editor_value(tmp_path, paint: bool = True, everything: bool = False) -> dict:
    """An Edit-tab image editor value as a client sends it: the example image and a layer painted over its middle
    (or over all of it)."""
    from diffusers_var.demo import edit_example_image

    PIL.Image.fromarray(edit_example_image()).save(tmp_path / "background.png")
    layer = np.zeros((256, 256, 4), dtype=np.uint8)
    if paint:
        layer[(slice(None), slice(None)) if everything else (slice(90, 170), slice(100, 180))] = 255
    PIL.Image.fromarray(layer).save(tmp_path / "layer.png")
    return {
        "background": gradio_client.handle_file(str(tmp_path / "background.png")),
        "layers": [gradio_client.handle_file(str(tmp_path / "layer.png"))],
        "composite": None,
    }


def edit_args(value, family="var", mode=0, what="yellow square on blue", num_images=2, seed=3, mask_dilation=0):
    from diffusers_var.demo import EDIT_MODES

    return dict(
        editor_value=value,
        family=family,
        mode_name=EDIT_MODES[mode],
        text=what,
        strength=0.5,
        guidance_scale=4.0,
        num_images=num_images,
        seed=seed,
        randomize=False,
        mask_dilation=mask_dilation,
    )


@pytest.mark.parametrize(
    "family, what, size",
    [("var", "yellow square on blue", 64), ("star", "a yellow square", 16), ("infinity", "a yellow square", 128)],
)
def test_edit_endpoint_every_family_and_mode(client, folders, tmp_path, family, what, size):
    """In-painting the painted region, out-painting around it, image-to-image; seeds reproduce. The Infinity folder
    has no default size: the editor picks the supported size nearest the 256 px image."""
    if family != "var" and folders[family] is None:
        pytest.skip(f"{family} fixtures are absent")
    value = editor_value(tmp_path)
    for mode in range(3):
        gallery, seed, info = call(client, "/edit", edit_args(value, family, mode, what))
        images = images_of(gallery)
        assert len(images) == 2 and all(image.shape == (size, size, 3) for image in images), (mode, info)
        assert seed == 3 and "seed 3" in info
    again = images_of(call(client, "/edit", edit_args(value, family, 2, what))[0])
    assert all(np.array_equal(a, b) for a, b in zip(images, again))
    # a margin around the painted region: other in-paintings than without it
    plain = images_of(call(client, "/edit", edit_args(value, family, 0, what))[0])
    margin = images_of(call(client, "/edit", edit_args(value, family, 0, what, mask_dilation=2))[0])
    assert len(margin) == 2 and not all(np.array_equal(a, b) for a, b in zip(plain, margin))


def test_edit_endpoint_readable_errors(client, tmp_path):
    (tmp_path / "blank").mkdir()
    (tmp_path / "all").mkdir()
    for args, message in [
        (edit_args(editor_value(tmp_path / "blank", paint=False)), "Paint the region"),
        (edit_args(editor_value(tmp_path / "all", everything=True), mode=1), "the whole image is painted"),
        (edit_args(editor_value(tmp_path), what="purple blob"), "Unknown class 'purple blob'"),
    ]:
        with pytest.raises(Exception) as info:
            call(client, "/edit", args)
        assert message in str(info.value) and "Traceback" not in str(info.value), message
    assert len(images_of(call(client, "/edit", edit_args(editor_value(tmp_path), num_images=1))[0])) == 1


def test_painted_mask_reads_layers_or_the_composite():
    from diffusers_var.demo import painted_mask

    background = np.zeros((8, 8, 4), dtype=np.uint8)
    background[..., 3] = 255  # an opaque black image (a transparent one is edited on white, as the page shows it)
    layer = np.zeros((8, 8, 4), dtype=np.uint8)
    layer[2:4, 5:7, 3] = 255
    image, mask = painted_mask({"background": background, "layers": [layer], "composite": None})
    assert image.shape == (8, 8, 3) and mask.sum() == 4 and mask[2:4, 5:7].all()
    composite = background.copy()
    composite[0, 0] = 255
    assert painted_mask({"background": background, "layers": [], "composite": composite})[1].sum() == 1
    for empty in (None, {"background": None, "layers": [], "composite": None}):
        with pytest.raises(gr.Error, match="Upload an image") as raised:
            painted_mask(empty)
        assert raised.value.print_exception is False  # a user's mistake: no traceback in the server's log
    with pytest.raises(gr.Error, match="A painted layer of 1x1 pixels does not match the image's 8x8"):
        painted_mask({"background": background, "layers": [layer[:1, :1]], "composite": None})  # (was: "nothing")
    for pixels in (np.full((8, 8, 3), np.nan, np.float32), np.full((8, 8, 3), 60000, np.uint16)):  # NaN; would wrap
        with pytest.raises(gr.Error, match=r"must be 8-bit \(uint8\) pixels"):
            painted_mask({"background": pixels, "layers": [], "composite": None})


# -- readable errors; the app keeps serving ------------------------------------------------------------
@pytest.mark.parametrize(
    "endpoint, args, message",
    [
        # out of a slider's range over HTTP: gradio's own message named no slider
        ("/generate_var", var_args(num_images=5), "Number of images must be a number from 1 to 4; got 5"),
        ("/generate_var", var_args(num_images=1, top_p=1.5), "Top-p (0 = off) must be a number from 0 to 1; got 1.5"),
        ("/generate_var", var_args(label="purple blob"), "Unknown class 'purple blob'"),
        (
            "/generate_var",
            var_args(label="999"),
            "`class_labels` entries must be integers in [0, 89]",
        ),  # pipeline's ValueError
        ("/generate_var", var_args(num_images=1, top_k=2.5), "Top-k must be a whole number; got 2.5"),  # API only
        ("/generate_star", star_args(prompt="   "), "Please enter a prompt"),
        ("/generate_infinity", infinity_args(prompt=""), "Please enter a prompt"),
        ("/generate_infinity", infinity_args(size="1000x1000"), "is not near any supported size"),
        ("/generate_infinity", infinity_args(size="big"), "Size must look like HEIGHTxWIDTH"),
        # a slider sent nothing or text over HTTP: gradio's own bounds check raised a TypeError (its generic message)
        (
            "/generate_var",
            var_args(num_images=1, guidance_scale=None),
            "Guidance scale (cfg) must be a number from 0 to 10; got None",
        ),
        ("/generate_var", var_args(num_images=None), "Number of images must be a number from 1 to 4; got None"),
        ("/generate_var", var_args(num_images=1, top_p="abc"), "Top-p (0 = off) must be a number from 0 to 1"),
    ],
)
def test_bad_input_gives_a_readable_error_and_the_app_keeps_serving(client, folders, endpoint, args, message):
    family = endpoint.split("_")[1]
    if family != "var" and folders[family] is None:
        pytest.skip(f"{family} fixtures are absent")
    with pytest.raises(Exception) as info:
        call(client, endpoint, args)
    assert message in str(info.value) and "Traceback" not in str(info.value)
    assert len(images_of(call(client, "/generate_var", var_args(num_images=1))[0])) == 1


def test_the_functions_behind_the_api_turn_what_no_slider_sends_into_readable_errors(server, tmp_path):
    """The HTTP API (or a script calling the app's functions) can send NaN, infinity or nothing where a slider
    sends numbers, and any text as the edit mode: readable errors, not a ValueError / OverflowError / TypeError."""
    functions = {f.api_name: f.fn for f in server[1].fns.values() if getattr(f, "api_name", None)}
    nan, inf = float("nan"), float("inf")
    for overrides, message in [
        (dict(seed=nan), "Seed must be a whole number"),
        (dict(seed=inf), "Seed must be a whole number"),
        (dict(num_images=nan), "Number of images must be a whole number"),
        (dict(guidance_scale=None), "Guidance scale must be a number; got None"),
        (dict(top_p="high"), "Top-p must be a number"),
        (dict(label=["a"]), "The class must be a name or an index, got list"),
    ]:
        with pytest.raises(gr.Error, match=message):
            functions["generate_var"](**var_args(**{"num_images": 1, **overrides}))
    from diffusers_var.demo import _prompt

    with pytest.raises(gr.Error, match="The prompt must be text, got int"):
        _prompt(5)
    with pytest.raises(gr.Error, match="Pick a mode: In-paint"):
        functions["edit"](**{**edit_args(editor_value(tmp_path)), "mode_name": "bogus"})


def test_edit_inputs_that_would_waste_or_mislead_are_refused(server):
    """Out-painting a region smaller than the token grid's cells kept nothing and regenerated the whole image; a
    tiny PNG of a huge image took gigabytes of server memory; a transparent upload was edited on black (the page
    shows it on white); an editor value that is no dict was an AttributeError; a class typed with a trailing space
    was unknown in the VAR tab but not in the Edit tab."""
    from diffusers_var.demo import MAX_EDIT_PIXELS, edit_example_image, painted_mask

    functions = {f.api_name: f.fn for f in server[1].fns.values() if getattr(f, "api_name", None)}
    dab = np.zeros((256, 256, 4), np.uint8)
    dab[110:134, 110:134] = 255  # one stroke of the default 24 px brush: inside no whole cell of the 8x8 grid
    value = {"background": edit_example_image(), "layers": [dab], "composite": None}
    with pytest.raises(gr.Error, match="covers none .with this Margin., so nothing would be kept"):
        functions["edit"](**edit_args(value, mode=1, num_images=1))
    big = np.zeros((256, 256, 4), np.uint8)
    big[64:192, 64:192] = 255  # whole cells: kept
    gallery, _, _ = functions["edit"](**edit_args({**value, "layers": [big]}, mode=1, num_images=1))
    assert len(gallery) == 1
    with pytest.raises(gr.Error, match="keeps nothing|nothing would be kept"):  # a margin that eats the region
        functions["edit"](**edit_args({**value, "layers": [big]}, mode=1, num_images=1, mask_dilation=3))
    side = int(MAX_EDIT_PIXELS**0.5) + 1
    with pytest.raises(gr.Error, match="too large"):
        painted_mask({"background": np.zeros((side, side, 3), np.uint8), "layers": [], "composite": None})
    with pytest.raises(gr.Error, match="must be its background, layers and composite"):
        painted_mask("photo.png")
    transparent = np.zeros((4, 4, 4), np.uint8)
    transparent[1:3, 1:3] = (255, 0, 0, 255)
    image, _ = painted_mask({"background": transparent, "layers": [], "composite": None})
    assert (image[0, 0] == 255).all() and (image[1, 1] == (255, 0, 0)).all()
    padded = var_args(label="red circle on blue ", num_images=1)
    assert len(functions["generate_var"](**padded)[0]) == 1


def upload_value(path) -> dict:
    """An Edit-tab editor value with ``path`` as the uploaded background, no paint (image-to-image needs none)."""
    return {"background": gradio_client.handle_file(str(path)), "layers": [], "composite": None}


def test_edit_uploads_that_are_no_image_or_too_large_are_named(client, tmp_path, monkeypatch):
    """Through the HTTP API gradio's editor decoded the upload before the app saw it: text named .png, an SVG or a
    truncated PNG were gradio's generic error, and with `diffusers-var demo`'s PIL limit an image above 33.5 MP raised
    Pillow's decompression-bomb error there (the page showed only "Error")."""
    from diffusers_var.demo import MAX_EDIT_PIXELS

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", MAX_EDIT_PIXELS)  # as `diffusers-var demo` sets it
    PIL.Image.new("L", (6000, 6000)).save(tmp_path / "huge.png")  # 36 MP, a small file
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>')
    PIL.Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    for name, message in [
        ("huge.png", "too large (more than 33,554,432 pixels): at most 16 megapixels (4096x4096)"),
        ("text.png", "'text.png' is not an image this demo can read"),
        ("vector.svg", "'vector.svg' is not an image this demo can read"),
        ("cut.png", "'cut.png' could not be decoded: it is damaged or cut short"),
    ]:
        with pytest.raises(Exception) as info:
            call(client, "/edit", edit_args(upload_value(tmp_path / name), mode=2, num_images=1))
        assert message in str(info.value) and "Traceback" not in str(info.value), (name, str(info.value))
    # the page sends its canvas as PNG bytes: decoded by the same function
    from diffusers_var.demo import decode_editor_image

    with pytest.raises(gr.Error, match="The uploaded image could not be decoded"):
        decode_editor_image((tmp_path / "cut.png").read_bytes())
    assert decode_editor_image((tmp_path / "full.png").read_bytes()).shape == (64, 64, 3)


def test_edit_uploads_decode_as_the_page_shows_them(client, tmp_path, monkeypatch):
    """Through the HTTP API a 16-bit grayscale PNG reached the pipeline 99.6% white (gradio's editor converted it with
    PIL, which clips 16-bit values at 255) and a photo's EXIF orientation was ignored; the page (its canvas) shows
    the gradient and the photo upright."""
    import diffusers_var.demo as demo_module

    seen = []
    painted_mask = demo_module.painted_mask
    monkeypatch.setattr(demo_module, "painted_mask", lambda value: seen.append(painted_mask(value)) or seen[-1])
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))  # dark to white, left to right
    PIL.Image.fromarray(ramp).save(tmp_path / "gray16.png")
    assert PIL.Image.open(tmp_path / "gray16.png").mode.startswith("I;16")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise: portrait
    PIL.Image.new("RGB", (40, 20), "green").save(tmp_path / "photo.jpg", exif=exif)
    call(client, "/edit", edit_args(upload_value(tmp_path / "gray16.png"), mode=2, num_images=1))
    image = seen[-1][0]
    assert image.shape == (32, 64, 3) and abs(float(image.mean()) - 127.5) < 2, image.mean()
    assert image[:, 0].max() == 0 and image[:, -1].min() == 255
    call(client, "/edit", edit_args(upload_value(tmp_path / "photo.jpg"), mode=2, num_images=1))
    assert seen[-1][0].shape == (40, 20, 3)


def test_seed_that_is_no_whole_number_is_named_in_every_tab(client, folders, tmp_path):
    """The seed box (gr.Number, precision 0) rounded 2.5 to 2 without a word, and text ("7", "abc") or a list was a
    TypeError in gradio's bounds check: its generic "the app has raised an exception"."""
    cases = [("/generate_var", var_args(num_images=1, seed=2.5), 2.5), ("/generate_var", var_args(seed="7"), "'7'")]
    if folders["star"] is not None:
        cases.append(("/generate_star", {**star_args(num_images=1), "seed": "abc"}, "'abc'"))
    if folders["infinity"] is not None:
        cases.append(("/generate_infinity", {**infinity_args(num_images=1), "seed": [1]}, "[1]"))
    cases.append(("/edit", {**edit_args(editor_value(tmp_path), mode=2, num_images=1), "seed": 2.5}, 2.5))
    for endpoint, args, shown in cases:
        with pytest.raises(Exception) as info:
            call(client, endpoint, args)
        message = f"Seed must be a whole number from 0 to {MAX_SEED}; got {shown}."
        assert message in str(info.value) and "Traceback" not in str(info.value), (endpoint, str(info.value))
    assert call(client, "/generate_var", var_args(num_images=1, seed=2.0))[1] == 2  # a whole float is that seed


def test_a_negative_prompt_of_spaces_is_no_negative_prompt(server, folders, monkeypatch):
    """The prompt was stripped, the negative prompt not: "   " was used as a negative prompt (other images than "")."""
    import diffusers_var.demo as demo_module

    functions = {f.api_name: f.fn for f in server[1].fns.values() if getattr(f, "api_name", None)}
    seen = []
    monkeypatch.setattr(demo_module, "_run", lambda *args, **kwargs: seen.append(kwargs["negative_prompt"]))
    for family, args in (("star", star_args(num_images=1)), ("infinity", infinity_args(num_images=1))):
        if folders[family] is None:
            continue
        for negative, expected in (("", None), ("   ", None), ("  blurry ", "blurry")):
            functions[f"generate_{family}"](**{**args, "negative_prompt": negative})
            assert seen[-1] == expected, (family, negative, seen[-1])
        with pytest.raises(gr.Error, match="The negative prompt must be text, got int"):
            functions[f"generate_{family}"](**{**args, "negative_prompt": 5})


def test_painted_mask_names_what_is_wrong_with_a_direct_value():
    """A 1-D background was called "too large (64 pixels)"; layers that are no list were a TypeError; a gray + alpha
    background reached the pipeline as two channels."""
    from diffusers_var.demo import painted_mask

    with pytest.raises(gr.Error, match=r"must be \(height, width\) grayscale or \(height, width, channels\)"):
        painted_mask({"background": np.zeros(64, np.uint8), "layers": [], "composite": None})
    with pytest.raises(gr.Error, match="got shape .64, 64, 3, 1."):
        painted_mask({"background": np.zeros((64, 64, 3, 1), np.uint8), "layers": [], "composite": None})
    with pytest.raises(gr.Error, match="The image editor's layers must be a list of images, got int"):
        painted_mask({"background": np.zeros((8, 8, 3), np.uint8), "layers": 5, "composite": None})
    gray_alpha = np.zeros((4, 4, 2), np.uint8)
    gray_alpha[1:3, 1:3] = (100, 255)  # an opaque gray square on transparent (white, as the page shows it)
    image, _ = painted_mask({"background": gray_alpha, "layers": [], "composite": None})
    assert image.shape == (4, 4, 3) and (image[0, 0] == 255).all() and (image[1, 1] == 100).all()


def test_edit_tab_text_says_what_in_painting_keeps(server):
    """The Edit tab said in-painting keeps the tokens outside the painted region "at every scale"; the coarse scales'
    cells that are mostly painted are regenerated and reach past it, so the unpainted part can change."""
    text = " ".join(str(block.value) for block in server[1].blocks.values() if isinstance(block, gr.Markdown))
    assert "In-painting" in text and "at every scale" not in text
    assert "the unpainted part stays close to the image but can change too" in text


# -- temporary files ------------------------------------------------------------------------------------
def test_generated_images_are_deleted_from_gradio_temp_folder():
    """The app set no delete_cache: every generated image (and upload) stayed in gradio's temporary folder for
    good. By default files older than an hour go every 10 minutes; a short setting shows them go."""
    from diffusers_var.demo import DELETE_CACHE

    assert DELETE_CACHE == (600, 3600)
    from diffusers_var import VARPipeline

    var = VARPipeline.from_pretrained(EMBEDDED_VAR)  # (a pipeline object: loaded once for the three builds)
    assert build_demo(var=var, star=None, infinity=None, device="cpu").delete_cache == DELETE_CACHE
    assert build_demo(var=var, star=None, infinity=None, device="cpu", delete_cache=None).delete_cache is None
    demo = build_demo(var=var, star=None, infinity=None, device="cpu", delete_cache=(1, 1))
    with serve(demo) as url:
        kept = {file for files in demo.temp_file_sets for file in files}  # e.g. the Edit tab's example image
        call(gradio_client.Client(url, verbose=False), "/generate_var", var_args(num_images=2))
        written = {file for files in demo.temp_file_sets for file in files} - kept
        assert len(written) == 2 and all(Path(file).is_file() for file in written)
        deadline = time.monotonic() + 30
        while any(Path(file).exists() for file in written) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(Path(file).exists() for file in written)
        assert kept and all(Path(file).is_file() for file in kept)  # what the page still shows stays


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_images=2.5), "`max_images` (--max-images) must be a whole number from 1 to 64, got 2.5"),
        (dict(max_images="4"), "`max_images` (--max-images) must be a whole number from 1 to 64, got '4'"),
        (dict(max_images=True), "`max_images` (--max-images) must be a whole number from 1 to 64, got True"),
        (dict(concurrency_limit=0), "`concurrency_limit` (--concurrency) must be a whole number from 1 to 64, got 0"),
        (dict(concurrency_limit=-1), "`concurrency_limit` (--concurrency) must be a whole number from 1 to 64"),
        (dict(queue_size=0), "`queue_size` (--queue-size) must be a whole number from 1 to 10000, got 0"),
        (dict(queue_size=-5), "`queue_size` (--queue-size) must be a whole number from 1 to 10000, got -5"),
        (dict(device="cuda:99"), "`device` 'cuda:99' is not usable here"),
        (dict(delete_cache=(0, 60)), "`delete_cache` must be None (keep the files) or (frequency, age)"),
        (dict(delete_cache="hourly"), "`delete_cache` must be None (keep the files) or (frequency, age)"),
        # every tab said "Not available" (the reason only in the log) for a dtype given as text or an integer dtype
        (dict(var=EMBEDDED_VAR, dtype="float32"), "`dtype` must be one of torch.float32, torch.float16"),
        (dict(var=EMBEDDED_VAR, dtype=torch.int8), "`dtype` must be one of torch.float32, torch.float16"),
        ({}, "nothing to serve: `var`, `star` and `infinity` are all None"),  # (the command line refuses it too)
        (dict(var=EMBEDDED_VAR, lora_scales=["a"]), "`lora_scales` must be a list of numbers, got ['a']"),
        (dict(var=EMBEDDED_VAR, lora_scales=0.5), "`lora_scales` must be a list of numbers, got 0.5"),
    ],
)
def test_build_demo_refuses_what_the_command_line_refuses(kwargs, message):
    """build_demo (the Python API demos/app.py re-exports) took concurrency_limit 0 (requests never finished), a
    queue of 0 or -5, 2.5 images, and a CUDA device on a machine without one (a raw AssertionError)."""
    with pytest.raises(ValueError) as raised:
        build_demo(**{"var": None, "star": None, "infinity": None, **kwargs})
    assert message in str(raised.value)


# -- CoDe in the VAR tab -------------------------------------------------------------------------------
def tiny_refiner_folder(root, vqvae=None):
    """A one-block random VAR on the embedded var-shapes tokenizer (or ``vqvae``), saved as a VARPipeline folder."""
    import torch

    from diffusers_var import VARPipeline, VARTransformer2DModel

    var = VARPipeline.from_pretrained(EMBEDDED_VAR, dtype=torch.float32)
    torch.manual_seed(0)
    config = var.transformer.config
    refiner = VARTransformer2DModel(
        num_classes=config.num_classes,
        depth=1,
        embed_dim=32,
        num_heads=1,
        vocab_size=config.vocab_size,
        latent_channels=config.latent_channels,
        patch_nums=config.patch_nums,
    )
    refiner.init_weights()
    VARPipeline(transformer=refiner.eval(), vqvae=vqvae or var.vqvae).save_pretrained(root)
    return root


def test_var_tab_offers_code_with_a_refiner(tmp_path):
    from diffusers_var import VARCoDePipeline

    folder = tiny_refiner_folder(tmp_path / "refiner")
    demo = build_demo(var=EMBEDDED_VAR, star=None, infinity=None, device="cpu", max_images=4, var_refiner=folder)
    code = demo.loaded_pipelines["var_code"]
    assert isinstance(code, VARCoDePipeline) and code.transformer is demo.loaded_pipelines["var"].transformer
    with serve(demo) as url:
        client = gradio_client.Client(url, verbose=False)
        args = var_args(num_images=2)
        plain = images_of(call(client, "/generate_var", {**args, "use_code": False, "draft_steps": 4})[0])
        refined, _, info = call(client, "/generate_var", {**args, "use_code": True, "draft_steps": 4})
        refined = images_of(refined)
        assert len(refined) == 2 and "2 images of 64x64 px, seed 7" in info
        assert not all(np.array_equal(a, b) for a, b in zip(plain, refined))  # the random refiner drew the fine scales
        again = images_of(call(client, "/generate_var", {**args, "use_code": True, "draft_steps": 4})[0])
        assert all(np.array_equal(a, b) for a, b in zip(refined, again))
        other = images_of(call(client, "/generate_var", {**args, "use_code": True, "draft_steps": 2})[0])
        assert not all(np.array_equal(a, b) for a, b in zip(refined, other))


def test_a_refiner_of_another_tokenizer_becomes_a_notice(tmp_path):
    from diffusers_var import MultiScaleVQModel

    other = MultiScaleVQModel.from_pretrained(EMBEDDED_VAR / "vqvae")
    with __import__("torch").no_grad():
        other.quantize.embedding.weight.mul_(2)
    folder = tiny_refiner_folder(tmp_path / "refiner", vqvae=other)
    demo = build_demo(var=EMBEDDED_VAR, star=None, infinity=None, device="cpu", var_refiner=folder)
    assert demo.loaded_pipelines["var_code"] is None and demo.loaded_pipelines["var"] is not None
    notices = {
        block.elem_id: str(block.value)
        for block in demo.blocks.values()
        if isinstance(block, gr.Markdown) and block.elem_id
    }
    assert "CoDe is not available" in notices["var-code-notice"] and "tokenizer" in notices["var-code-notice"]


# -- load ----------------------------------------------------------------------------------------------
def test_eight_clients_three_requests_each_all_complete(server):
    url = server[0]

    def session(index):
        client = gradio_client.Client(url, verbose=False)
        return [
            len(images_of(call(client, "/generate_var", var_args(num_images=2, seed=100 * index + r))[0]))
            for r in range(3)
        ]

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(session, range(8), timeout=240))
    assert counts == [[2, 2, 2]] * 8, counts
    assert time.perf_counter() - start < 240


def test_full_queue_answers_busy():
    """queue_size=1, one generation at a time: a burst of requests gets some 'Queue is full' answers while the
    others still complete with images."""
    demo = build_demo(var=EMBEDDED_VAR, star=None, infinity=None, device="cpu", max_images=8, queue_size=1)
    with serve(demo) as url:
        client = gradio_client.Client(url, verbose=False)
        barrier = threading.Barrier(10)

        def one(index):
            barrier.wait(timeout=60)
            try:
                return len(images_of(call(client, "/generate_var", var_args(num_images=8, seed=index))[0]))
            except Exception as err:  # noqa: BLE001 - the busy answer is what we are after
                return str(err)

        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(one, range(10), timeout=240))
    done = [r for r in results if r == 8]
    busy = [r for r in results if isinstance(r, str)]
    assert done and busy, results
    assert all("Queue is full" in r for r in busy), busy


# -- command line ----------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _keep_pil_image_limit(monkeypatch):
    """The demo command lowers PIL's decompression-bomb limit for its server process: put it back after a test."""
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", PIL.Image.MAX_IMAGE_PIXELS)


def test_cli_demo_binds_localhost_without_share_by_default(monkeypatch):
    from diffusers_var import cli
    from diffusers_var.demo import MAX_EDIT_PIXELS

    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: seen.update(kwargs, blocks=self))
    assert cli.main(["demo", "--star", "none", "--infinity", "none", "--device", "cpu", "--queue-size", "5"]) == 0
    assert seen["server_name"] == "127.0.0.1" and seen["share"] is False and seen["server_port"] == 7860
    assert seen["max_file_size"] == "50mb" and PIL.Image.MAX_IMAGE_PIXELS == MAX_EDIT_PIXELS  # uploads bounded
    assert seen["blocks"].loaded_pipelines["star"] is None and seen["blocks"]._queue.max_size == 5


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--var", "{tmp}/nonexistent"], "`--var` "),
        (["--var", "{tmp}"], "`--var` "),  # a folder without model_index.json
        (["--var", "pipelines/star-shapes"], "`--var` "),  # a STAR folder given for VAR
        (["--star", "pipelines/var-shapes"], "`--star` "),
        (["--var-refiner", "pipelines/star-shapes"], "`--var-refiner` "),
        (["--var", "none", "--var-refiner", "default"], "`--var-refiner` "),  # nothing to refine
        (["--var", "none", "--star", "none", "--infinity", "none"], "nothing to serve"),
        (["--host", "999.1.1.1"], "`--host 999.1.1.1`: not a name or address this machine can resolve"),
    ],
)
def test_cli_demo_checks_the_folders_it_is_given_before_loading(argv, flag, monkeypatch, tmp_path, capsys):
    """A folder named on the command line that holds no pipeline of its family is a one-line error before anything is
    loaded (build_demo, for Python, turns it into a tab notice: a person at the terminal would not see it)."""
    from diffusers_var import cli, demo

    monkeypatch.setattr(demo, "build_demo", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: pytest.fail("served"))
    assert cli.main(["demo", "--device", "cpu", *[a.replace("{tmp}", str(tmp_path)) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and flag in err, err


def test_cli_demo_without_any_model_is_an_error(monkeypatch, tmp_path, capsys):
    """No embedded pipeline installed and none named: nothing to serve, rather than an app of notices."""
    from diffusers_var import cli

    for key, (title, pipeline_class, _) in list(FAMILIES.items()):
        monkeypatch.setitem(FAMILIES, key, (title, pipeline_class, tmp_path / key))
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: pytest.fail("served"))
    assert cli.main(["demo", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: nothing to serve") and len(err.splitlines()) == 1, err


def test_cli_demo_var_refiner(monkeypatch, tmp_path):
    from diffusers_var import VARCoDePipeline, cli

    folder = tiny_refiner_folder(tmp_path / "refiner")
    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: seen.update(kwargs, blocks=self))
    assert (
        cli.main(["demo", "--star", "none", "--infinity", "none", "--device", "cpu", "--var-refiner", str(folder)])
        == 0
    )
    assert isinstance(seen["blocks"].loaded_pipelines["var_code"], VARCoDePipeline)
    assert cli.main(["demo", "--star", "none", "--infinity", "none", "--device", "cpu"]) == 0
    assert seen["blocks"].loaded_pipelines["var_code"] is None  # no refiner by default


def test_a_code_folder_with_a_refiner_is_refused(monkeypatch, tmp_path, capsys):
    """`--var CODE_FOLDER --var-refiner OTHER` served the CoDe folder's own refiner and ignored the flag."""
    from diffusers_var import VARCoDePipeline, VARPipeline, cli

    refiner = tiny_refiner_folder(tmp_path / "refiner")
    drafter = VARPipeline.from_pretrained(EMBEDDED_VAR)
    code = VARCoDePipeline.from_var_pipelines(drafter, VARPipeline.from_pretrained(refiner))
    code.save_pretrained(tmp_path / "code")
    capsys.readouterr()  # the loading's progress bars
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: pytest.fail("served"))
    base = ["demo", "--star", "none", "--infinity", "none", "--device", "cpu", "--var", str(tmp_path / "code")]
    for refiner_flag in (str(refiner), "default"):
        assert cli.main([*base, "--var-refiner", refiner_flag]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: `--var-refiner` and a CoDe pipeline as `--var` do not go together"), err
        assert len(err.splitlines()) == 1
    for var in (code, tmp_path / "code"):  # build_demo, for Python
        with pytest.raises(ValueError, match="`var_refiner` .--var-refiner. and a CoDe pipeline as `var`"):
            build_demo(var=var, star=None, infinity=None, device="cpu", var_refiner=refiner)


def test_cli_demo_fast_path(monkeypatch, tmp_path, capsys):
    """``--fast`` puts every served pipeline (CoDe's refiner too) on the fast path, in bfloat16 by default (on the CPU
    it only casts), and the app generates; it refuses ``--cpu-offload``, and ``--compile-cache`` needs it."""
    from diffusers_var import cli

    folder = tiny_refiner_folder(tmp_path / "refiner")
    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: seen.update(kwargs, blocks=self))
    base = ["demo", "--star", "none", "--infinity", "none", "--device", "cpu"]
    assert cli.main([*base, "--fast", "--var-refiner", str(folder)]) == 0
    var, code = seen["blocks"].loaded_pipelines["var"], seen["blocks"].loaded_pipelines["var_code"]
    assert var._fast_inference and code._fast_inference
    assert var.transformer.blocks[0].attn.to_qkv.weight.dtype == torch.bfloat16
    assert code.refiner.blocks[0].attn.to_qkv.weight.dtype == torch.bfloat16
    images = var(class_labels=[1], generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    capsys.readouterr()
    assert cli.main([*base, "--fast", "--cpu-offload"]) == 2
    assert "`fast` (--fast) cannot be combined with `cpu_offload`" in capsys.readouterr().err
    assert cli.main([*base, "--cpu-offload"]) == 2  # nothing to offload to: it was ignored without a word
    assert "`cpu_offload` (--cpu-offload) keeps the weights on the CPU between calls" in capsys.readouterr().err
    assert cli.main([*base, "--compile-cache", str(tmp_path / "cache")]) == 2
    assert "`--compile-cache` holds the fast path's compiled code" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_demos_app_is_a_launcher_for_the_same_app():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demos_app", EMBEDDED_VAR.parents[1] / "demos" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build_demo is build_demo


def test_demos_app_without_gradio_is_one_error_line(tmp_path):
    """``diffusers-var demo`` says how to get gradio; ``python demos/app.py`` gave an ImportError traceback."""
    import os
    import subprocess
    import sys

    (tmp_path / "gradio.py").write_text("raise ModuleNotFoundError('No module named gradio', name='gradio')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(EMBEDDED_VAR.parents[1] / "src")])}
    result = subprocess.run(
        [sys.executable, str(EMBEDDED_VAR.parents[1] / "demos" / "app.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith("error: the demo needs gradio") and "pip install gradio" in result.stderr
