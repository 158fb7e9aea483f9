"""``diffusers-var evaluate``: the metric maths against independent formulas, the real Inception loading and feature
path (with randomly initialised weights saved to disk: the real file cannot be downloaded in tests), the command end
to end, reference statistics reuse, CLIP score with a tiny CLIP, and the errors for missing weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import REPO_ROOT
from diffusers_var import evaluation as ev
from diffusers_var.cli import main
from diffusers_var.fid_inception import WEIGHTS_FILENAMES, FIDInceptionV3, resize_bilinear_like_tensorflow1x
from diffusers_var.sample import write_npz
from diffusers_var.shapes import CLASSES, ShapesDataset


def _save_images(folder, images):
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    return folder


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised FID Inception saved as a state dict, in the place of the real file. He-initialised
    convolutions keep the features alive through the 94 layers (PyTorch's default init shrinks them to nothing)."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    nn.init.normal_(model.fc.weight, std=0.05)
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILENAMES[0]
    torch.save(model.state_dict(), path)
    return path


# ----------------------------------------------------------------------------------------------
# The maths
# ----------------------------------------------------------------------------------------------
def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()  # commuting (diagonal) covariances
    assert ev.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    x, y = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = x @ x.T, y @ y.T  # general case: tr sqrtm(S1 S2) = sum of sqrt(eigenvalues of S1 S2)
    expected = (
        ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    )
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    features = rng.normal(size=(50, 300))  # fewer samples than dimensions: singular covariance
    stats = ev.feature_statistics(features)
    assert abs(ev.frechet_distance(*stats, *stats)) < 1e-8
    other = rng.normal(size=(40, 300)) * rng.uniform(0.5, 1.5, 300) + 0.1
    # the small-set path (an (n1, n2) SVD) and the covariance path agree, and a set is at distance 0 from itself
    assert ev.frechet_distance_of_features(features, other) == pytest.approx(
        ev.frechet_distance(*stats, *ev.feature_statistics(other)), rel=1e-8
    )
    assert abs(ev.frechet_distance_of_features(features, features)) < 1e-9
    with pytest.raises(ValueError, match="at least 2 images"):
        ev.frechet_distance_of_features(features[:1], other)
    assert ev.frechet_distance_of_features(features[:10], other[:10]) == pytest.approx(
        ev.frechet_distance(*ev.feature_statistics(features[:10]), *ev.feature_statistics(other[:10])), rel=1e-8
    )


def _indefinite(sigma, size):
    """``sigma`` plus an off-diagonal symmetric perturbation: still symmetric with the same (non-negative) diagonal
    and trace, but with eigenvalues far below 0 (not a covariance)."""
    perturbed = sigma.copy()
    offset = 10 * np.abs(sigma).max()
    for i in range(0, size - 1, 2):
        perturbed[i, i + 1] += offset
        perturbed[i + 1, i] += offset
    return perturbed


def test_a_sigma_that_is_not_positive_semi_definite_is_refused(tmp_path):
    """Such a sigma passed the symmetry and diagonal checks; FID dropped its negative eigenvalues and clamped the
    result at 0, so a bogus reference gave a perfect FID of 0.0."""
    rng = np.random.default_rng(0)
    mu, sigma = ev.feature_statistics(rng.gamma(1.0, 0.3, (50, 64)))
    with pytest.raises(ValueError, match="`sigma2` is not a covariance matrix .not positive semi-definite"):
        ev.frechet_distance(mu, sigma, mu, _indefinite(sigma, 64))
    with pytest.raises(ValueError, match="`sigma1` is not a covariance matrix"):
        ev.frechet_distance(mu, _indefinite(sigma, 64), mu, sigma)
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma)) < 1e-9  # singular (50 < 64) but a covariance
    # real reference statistics pass: rank-deficient covariances (100 images, 2048 dimensions, rounding makes some of
    # their zero eigenvalues slightly negative) of ReLU-like and of correlated features, in float64 and stored as
    # float32
    relu = rng.gamma(1.0, 0.3, (100, 2048))
    correlated = rng.normal(size=(100, 64)) @ rng.normal(size=(64, 2048)) + relu
    for features in (relu, correlated):
        sigma = np.cov(features.astype(np.float32).astype(np.float64), rowvar=False)
        for dtype in (np.float64, np.float32):
            np.savez(tmp_path / "ref.npz", mu=features.mean(axis=0), sigma=sigma.astype(dtype))
            assert ev.ImageSet(tmp_path / "ref.npz", "--reference").arrays("sigma")["sigma"].dtype == dtype
    np.savez(tmp_path / "bad.npz", mu=features.mean(axis=0), sigma=_indefinite(sigma, 2048))
    with pytest.raises(ValueError, match="`--reference` .*: `sigma` is not a covariance matrix .not positive semi-"):
        ev.ImageSet(tmp_path / "bad.npz", "--reference")


def test_inception_score_follows_adm():
    assert ev.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0)  # one uniform prediction
    confident = np.full((12_000, 10), -50.0)
    confident[np.arange(12_000), np.arange(12_000) % 10] = 50.0  # sure of each image, all 10 classes equally often
    assert ev.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    # splits of 5,000: the score is the mean of the splits' scores (here 10, 10 and the last split's 5 classes -> 5)
    confident[10_000:] = confident[np.arange(10_000, 12_000) % 5]
    assert ev.inception_score(confident) == pytest.approx((10 + 10 + 5) / 3, rel=1e-6)
    # a class no image gives any probability to (its softmax underflows to 0 everywhere): 0 * log 0 was NaN
    certain = np.full((4, 3), -1e4)
    certain[np.arange(4), np.arange(4) % 2] = 0.0  # classes 0 and 1, never 2
    assert ev.inception_score(certain) == pytest.approx(2.0, rel=1e-12)


def _adm_precision_recall(reference, samples, k=3):
    """ADM's ManifoldEstimator, transcribed with numpy (partition for the k-th neighbour, <= radius)."""

    def radii(features):
        d = ((features[:, None] - features[None]) ** 2).sum(-1)
        return np.partition(d, k, axis=1)[:, k]

    def inside(points, manifold, manifold_radii):
        d = ((points[:, None] - manifold[None]) ** 2).sum(-1)
        return (d <= manifold_radii[None]).any(axis=1).mean()

    return inside(samples, reference, radii(reference)), inside(reference, samples, radii(samples))


def test_precision_recall_follows_adm():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(120, 8)).astype(np.float32)
    samples = (rng.normal(size=(90, 8)) * 1.3 + 0.4).astype(np.float32)
    precision, recall = ev.precision_recall(reference, samples)
    expected = _adm_precision_recall(reference.astype(np.float64), samples.astype(np.float64))
    assert (precision, recall) == pytest.approx(expected, abs=1e-6)
    assert 0.1 < precision < 0.99 and 0.1 < recall < 0.99  # not a degenerate case
    assert ev.precision_recall(reference, reference) == (1.0, 1.0)
    collapsed = reference[:1] + rng.normal(size=(10, 8)).astype(np.float32) * 1e-3  # mode collapse onto one image
    precision, recall = ev.precision_recall(reference, collapsed)
    assert precision == 1.0 and recall < 0.5
    assert ev.precision_recall(reference, samples + 100) == (0.0, 0.0)
    # the fractions are float64, as ADM's np.mean of booleans: 5 of 6 reference points recalled is 5 / 6 exactly
    # (float32 gave 0.8333333134651184)
    reference = rng.normal(size=(6, 8)).astype(np.float32)
    reference[5] += 100
    assert ev.precision_recall(reference, reference[:5]) == (1.0, 5 / 6)


def test_tensorflow_bilinear_resize():
    """TensorFlow 1's resize has no half-pixel offset: the source of output pixel i is i * in / out."""
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]
    expected = torch.tensor(
        [[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]], dtype=torch.float32
    )
    torch.testing.assert_close(resize_bilinear_like_tensorflow1x(x, 4)[0, 0], expected)
    assert not torch.allclose(torch.nn.functional.interpolate(x, size=4, mode="bilinear")[0, 0], expected)


# ----------------------------------------------------------------------------------------------
# The network path
# ----------------------------------------------------------------------------------------------
def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(inception_weights, tmp_path):
    model = ev.load_inception(ev.inception_weights_path(str(inception_weights)))  # the command's loading path
    clean = ShapesDataset(12, 32, seed=5).images
    rng = np.random.default_rng(0)
    sets = {"clean": clean}
    for sigma in (16, 64):
        sets[f"noise{sigma}"] = np.clip(clean + rng.normal(0, sigma, clean.shape), 0, 255).round().astype(np.uint8)
    features = {
        name: ev.inception_features(
            model, ev.ImageSet(_save_images(tmp_path / name, images), "--samples"), batch_size=6
        )
        for name, images in sets.items()
    }
    pool, logits = features["clean"]
    assert pool.shape == (12, 2048) and logits.shape == (12, 1008) and pool.std(axis=0).mean() > 1e-3
    fid = {name: ev.frechet_distance_of_features(pool, f[0]) for name, f in features.items()}
    assert abs(fid["clean"]) < 1e-6 * fid["noise16"]
    assert 0 < fid["noise16"] < fid["noise64"], fid
    assert ev.precision_recall(pool, pool) == (1.0, 1.0)

    # the same images from an ADM-layout .npz read in other batch sizes: the same arrays, in the same order
    npz = tmp_path / "clean.npz"
    write_npz(npz, {"arr_0": (clean.shape, np.uint8, iter([clean[:5], clean[5:]]))})
    np.testing.assert_array_equal(np.concatenate(list(ev.ImageSet(npz, "--samples").batches(7))), clean)


def test_an_image_folder_follows_links_and_leaves_out_hidden_files(tmp_path):
    """A notebook's .ipynb_checkpoints copies had been counted twice in the statistics, a linked folder not at all."""
    images = ShapesDataset(4, 32, seed=1).images
    _save_images(tmp_path / "elsewhere", images[2:])
    root = _save_images(tmp_path / "samples", images[:2])
    (root / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    _save_images(root / ".ipynb_checkpoints", images[:2])
    Image.fromarray(images[0]).save(root / "._000000.png")
    Image.fromarray((images[1].astype(np.uint16) * 257)[..., 0]).save(root / "gray16.png")  # 16-bit grayscale
    read = np.concatenate(list(ev.ImageSet(root, "--samples").batches(8)))
    assert len(read) == 5 and np.array_equal(read[:2], images[:2]) and np.array_equal(read[3:], images[2:])
    assert np.array_equal(read[2], np.repeat(images[1][..., :1], 3, axis=-1))  # scaled to 8 bits, not clipped


def test_bad_weight_files_are_clear_errors(tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(b"PK\x03\x04 not a whole file")
    with pytest.raises(ValueError, match="could not read the Inception weights"):
        ev.load_inception(truncated)
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(ValueError, match="does not hold the FID Inception weights"):
        ev.load_inception(other)
    text = tmp_path / "notes.pth"  # not a torch file at all (the unpickler raised a KeyError)
    text.write_text("these are not weights\n" * 10)
    with pytest.raises(ValueError, match="could not read the Inception weights"):
        ev.load_inception(text)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
def _sample_folder(folder, images, prompts=None):
    _save_images(folder / "images", images)
    lines = []
    for i in range(len(images)):
        entry = {"index": i, "file_name": f"images/{i:06d}.png"}
        if prompts is not None:
            entry["prompt"] = prompts[i]
        lines.append(json.dumps(entry) + "\n")
    (folder / "metadata.jsonl").write_text("".join(lines))
    return folder


def test_evaluate_command_and_reference_statistics(inception_weights, tmp_path, capsys):
    samples = _sample_folder(tmp_path / "samples", ShapesDataset(6, 32, seed=1).images)
    reference = _save_images(tmp_path / "reference", ShapesDataset(8, 32, seed=2).images)
    write_npz(
        tmp_path / "samples.npz", {"arr_0": ((6, 32, 32, 3), np.uint8, iter([ShapesDataset(6, 32, seed=1).images]))}
    )
    stats = tmp_path / "stats" / "reference.npz"
    common = ["--inception-weights", str(inception_weights), "--device", "cpu", "--no-progress", "--batch-size", "8"]
    assert (
        main(
            [
                "evaluate",
                "--samples",
                str(samples),
                "--reference",
                str(reference),
                "--save-reference-stats",
                str(stats),
                "--out",
                str(tmp_path / "result.json"),
                *common,
            ]
        )
        == 0
    )
    first = json.loads((tmp_path / "result.json").read_text())
    assert json.loads(capsys.readouterr().out) == first
    assert first["num_samples"] == 6 and first["num_reference"] == 8
    assert (
        first["fid"] > 0
        and first["inception_score"] >= 1.0
        and 0 <= first["precision"] <= 1
        and 0 <= first["recall"] <= 1
    )
    with np.load(stats) as data:
        assert data["inception_pool_3"].shape == (8, 2048) and data["sigma"].shape == (2048, 2048)

    # The same samples as an .npz against the saved statistics: the same numbers without touching the reference images.
    assert main(["evaluate", "--samples", str(tmp_path / "samples.npz"), "--reference", str(stats), *common]) == 0
    captured = capsys.readouterr()
    second = json.loads(captured.out)
    assert "note" not in captured.err  # its mu / sigma are its features' own: FID from the features, as before
    for key in ("fid", "inception_score", "precision", "recall"):
        assert second[key] == pytest.approx(first[key], rel=1e-6, abs=1e-9), key
    upper = tmp_path / "SAMPLES.NPZ"  # the extension in capitals, as image extensions are taken
    upper.write_bytes((tmp_path / "samples.npz").read_bytes())
    assert main(["evaluate", "--samples", str(upper), "--reference", str(stats), *common]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(first["fid"], rel=1e-6, abs=1e-9)

    # ADM's reference batches may hold statistics only: FID from them, precision/recall left out of "auto".
    with np.load(stats) as data:
        np.savez(tmp_path / "stats_only.npz", mu=data["mu"], sigma=data["sigma"])
    assert main(["evaluate", "--samples", str(samples), "--reference", str(tmp_path / "stats_only.npz"), *common]) == 0
    third = json.loads(capsys.readouterr().out)
    assert third["fid"] == pytest.approx(first["fid"], rel=1e-6) and "precision" not in third
    assert (
        main(
            [
                "evaluate",
                "--samples",
                str(samples),
                "--reference",
                str(tmp_path / "stats_only.npz"),
                "--metrics",
                "pr",
                *common,
            ]
        )
        == 2
    )
    assert "holds statistics only" in capsys.readouterr().err

    # An ADM reference batch: images and its own (TensorFlow) statistics, which FID uses. Statistics saved from it
    # kept our features' statistics instead, so the saved file gave another FID than the reference it came from.
    with np.load(stats) as data:
        foreign_mu = data["mu"] + 0.05 * np.random.default_rng(0).standard_normal(2048)
        np.savez(tmp_path / "adm.npz", arr_0=ShapesDataset(8, 32, seed=2).images, mu=foreign_mu, sigma=data["sigma"])
    adm, saved = ["--reference", str(tmp_path / "adm.npz")], tmp_path / "from_adm.npz"
    assert main(["evaluate", "--samples", str(samples), *adm, "--save-reference-stats", str(saved), *common]) == 0
    from_adm = json.loads(capsys.readouterr().out)
    # the same command again replaces its own file (its statistics_given key made it "not a file this command wrote")
    assert main(["evaluate", "--samples", str(samples), *adm, "--save-reference-stats", str(saved), *common]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(from_adm["fid"], rel=1e-6)
    assert from_adm["fid"] != pytest.approx(first["fid"], rel=1e-3)  # the given statistics were used
    assert main(["evaluate", "--samples", str(samples), "--reference", str(saved), *common]) == 0
    again = json.loads(capsys.readouterr().out)
    for key in ("fid", "precision", "recall"):
        assert again[key] == pytest.approx(from_adm[key], rel=1e-6, abs=1e-9), key

    # Someone else's file: mu / sigma beside features they are not the statistics of, without the statistics_given
    # marker. FID uses the given mu / sigma, as ADM's evaluator does (the features' statistics were used, silently):
    # the FID of the statistics alone, with a note; precision/recall come from the features.
    with np.load(stats) as data:
        given = {"mu": foreign_mu, "sigma": data["sigma"]}
        np.savez(tmp_path / "given_and_features.npz", **given, inception_pool_3=data["inception_pool_3"])
        np.savez(tmp_path / "given_only.npz", **given)
    assert (
        main(["evaluate", "--samples", str(samples), "--reference", str(tmp_path / "given_and_features.npz"), *common])
        == 0
    )
    captured = capsys.readouterr()
    mixed = json.loads(captured.out)
    assert "its `mu` / `sigma` are not the statistics of its `inception_pool_3` features" in captured.err
    assert main(["evaluate", "--samples", str(samples), "--reference", str(tmp_path / "given_only.npz"), *common]) == 0
    assert mixed["fid"] == json.loads(capsys.readouterr().out)["fid"] != pytest.approx(first["fid"], rel=1e-3)
    assert (mixed["precision"], mixed["recall"]) == (first["precision"], first["recall"])


def test_which_statistics_fid_takes_from_a_reference_npz(tmp_path):
    """The given mu / sigma whenever an .npz has them (ADM's rule), except beside features whose own statistics they
    are (up to rounding) and not marked as given: a --save-reference-stats file made from images."""
    features = np.random.default_rng(0).gamma(1.0, 0.3, (10, 2048)).astype(np.float32)
    mu, sigma = ev.feature_statistics(features)

    def uses_given(**arrays):
        np.savez(tmp_path / "ref.npz", **arrays)
        return ev.ImageSet(tmp_path / "ref.npz", "--reference").uses_given_statistics

    assert not uses_given(inception_pool_3=features)
    assert uses_given(mu=mu, sigma=sigma)
    assert not uses_given(mu=mu, sigma=sigma, inception_pool_3=features)  # this package's file: unchanged
    assert not uses_given(mu=mu.astype(np.float32), sigma=sigma.astype(np.float32), inception_pool_3=features)
    assert uses_given(mu=mu, sigma=sigma, inception_pool_3=features, **{ev.GIVEN_STATISTICS_KEY: np.array(True)})
    assert uses_given(mu=mu + 0.01, sigma=sigma, inception_pool_3=features)  # not their statistics: ADM's rule
    assert uses_given(mu=mu, sigma=sigma * 1.01, inception_pool_3=features)
    assert uses_given(mu=mu, sigma=sigma, inception_pool_3=features[:1])  # too few features for statistics


def test_missing_weights_and_bad_flags_are_one_error_line(tmp_path, monkeypatch, capsys, inception_weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    samples = _save_images(tmp_path / "samples", ShapesDataset(4, 32, seed=1).images)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    for argv, message in [
        ([], f"put {WEIGHTS_FILENAMES[0]} (from https://"),
        ([], f"into {cache}/, or pass `--inception-weights FILE`"),
        (["--inception-weights", str(tmp_path / "nope.pth")], "`--inception-weights`"),
        (["--metrics", "fid"], "`--reference` is required"),
        (["--metrics", "fid,kid"], "`--metrics` must be"),
        (["--metrics", "clip"], "`--metrics clip` needs the prompts"),
        (["--samples", str(tmp_path / "missing")], "`--samples`"),
    ]:
        assert main(["evaluate", "--samples", str(samples), *argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    # torch-fidelity's cache file is found without a flag
    cache.mkdir(parents=True)
    shutil.copy(inception_weights, cache / WEIGHTS_FILENAMES[0])
    assert ev.inception_weights_path() == cache / WEIGHTS_FILENAMES[0]


def test_clip_score_with_a_tiny_clip(tmp_path, capsys):
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(REPO_ROOT / "pipelines" / "star-shapes" / "tokenizer")
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    clip_dir = tmp_path / "clip"
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)

    labels = [0, 31, 62, 85, 7]
    images = ShapesDataset(64, 64, seed=3).images[:5]
    prompts = [CLASSES[i].caption for i in labels]
    samples = _sample_folder(tmp_path / "samples", images, prompts)
    assert (
        main(
            [
                "evaluate",
                "--samples",
                str(samples),
                "--metrics",
                "clip",
                "--clip-model",
                str(clip_dir),
                "--device",
                "cpu",
                "--no-progress",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    clip = ev.load_clip(str(clip_dir))
    per_image = ev.clip_scores(clip, ev.ImageSet(samples, "--samples"), prompts, batch_size=2)
    # each image scored alone against its own prompt, straight through transformers
    model, _, processor = clip
    expected = []
    for image, prompt in zip(images, prompts):
        tokens = tokenizer([prompt], return_tensors="pt")
        pixels = processor(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        expected.append(100 * max(torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item(), 0))
    np.testing.assert_allclose(per_image, expected, atol=1e-4)
    assert (per_image > 0).sum() >= 2  # the check above compares real values, not only clamped zeros
    assert result["clip_score"] == pytest.approx(float(np.mean(expected)), abs=1e-4)
    assert (
        main(
            [
                "evaluate",
                "--samples",
                str(samples),
                "--metrics",
                "clip",
                "--clip-model",
                str(tmp_path / "none"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "`--clip-model`" in capsys.readouterr().err


def test_a_sample_run_whose_images_were_deleted_is_read_from_its_npz(inception_weights, tmp_path, capsys):
    """The README suggests deleting a finished run's images/ to save space (samples.npz holds them): evaluate said
    the folder "holds no images". It reads the npz, with a note, and the prompts from metadata.jsonl; without the
    npz either, the error says what is missing and what to do."""
    images = ShapesDataset(6, 32, seed=1).images
    prompts = [CLASSES[i].caption for i in range(6)]
    run = _sample_folder(tmp_path / "run", images, prompts)
    (run / "run.json").write_text(json.dumps({"settings": {"model": "m", "seed": 0, "total": 6}, "batch_size": 2}))
    write_npz(run / "samples.npz", {"arr_0": ((6, 32, 32, 3), np.uint8, iter([images]))})
    common = ["--metrics", "is", "--inception-weights", str(inception_weights), "--device", "cpu", "--no-progress"]
    assert main(["evaluate", "--samples", str(run), *common]) == 0
    with_images = json.loads(capsys.readouterr().out)
    shutil.rmtree(run / "images")
    assert main(["evaluate", "--samples", str(run), *common]) == 0
    captured = capsys.readouterr()
    from_npz = json.loads(captured.out)
    assert from_npz["num_samples"] == 6
    assert from_npz["inception_score"] == pytest.approx(with_images["inception_score"], rel=1e-6)
    note = f"note: `--samples` {str(run)!r} has no images/ folder: evaluating its samples.npz."
    assert note in captured.err.splitlines(), captured.err
    assert ev.ImageSet(run, "--samples").prompts == prompts  # (CLIP score still has them)
    (run / "run.json").unlink()  # metadata.jsonl beside samples.npz: a sample run too
    assert ev.ImageSet(run, "--samples").length == 6
    (run / "run.json").write_text(json.dumps({"settings": {"model": "m", "seed": 0, "total": 6}, "batch_size": 2}))
    (run / "samples.npz").unlink()
    missing = "with neither its images/ folder nor samples.npz"
    _one_error(capsys, ["--samples", str(run), *common], "`--samples`", "(run.json, metadata.jsonl)", missing)
    (run / "metadata.jsonl").unlink()  # (a run that never finished)
    _one_error(
        capsys, ["--samples", str(run), *common], "`--samples`", "(run.json)", missing, "run its sample command"
    )


def test_an_image_folder_reads_every_format_generate_writes(inception_weights, tmp_path, capsys):
    """An image folder's .tif, .tiff and .gif images (formats generate --out offers) were left out without a word;
    they are read (a GIF's first frame), and the files of other types left out are counted in a note."""
    images = ShapesDataset(4, 32, seed=1).images
    root = tmp_path / "mixed"
    root.mkdir()
    Image.fromarray(images[0]).save(root / "a.png")
    Image.fromarray(images[1]).save(root / "b.tif")
    Image.fromarray(images[2]).save(root / "c.TIFF")
    first, second = Image.fromarray(images[3]), Image.fromarray(images[0])
    first.save(root / "d.gif", save_all=True, append_images=[second])
    (root / "notes.txt").write_text("mine")
    (root / "eval.json").write_text("{}")
    (root / ".hidden.json").write_text("{}")  # hidden: left out as the folder walk leaves it, not counted
    read = np.concatenate(list(ev.ImageSet(root, "--samples").batches(8)))
    assert len(read) == 4 and np.array_equal(read[:3], images[:3])
    gif_error = np.abs(read[3].astype(int) - images[3]).mean()
    assert gif_error < 8 and gif_error < np.abs(read[3].astype(int) - images[0]).mean()  # the first frame, palette
    common = ["--metrics", "is", "--inception-weights", str(inception_weights), "--device", "cpu", "--no-progress"]
    assert main(["evaluate", "--samples", str(root), *common]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["num_samples"] == 4
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: `--samples` {str(root)!r}: 2 file(s) of other types left out (.json, .txt); images are .png, .jpg, "
        ".jpeg, .webp, .bmp, .tif, .tiff, .gif."
    ], captured.err
    for name in ("a.png", "b.tif", "c.TIFF", "d.gif"):
        (root / name).unlink()
    _one_error(capsys, ["--samples", str(root), *common], "holds no images", "2 file(s) of other types left out")


# ----------------------------------------------------------------------------------------------
# Bad inputs and outputs: one error line naming the flag, before the feature passes
# ----------------------------------------------------------------------------------------------
def _no_features(monkeypatch):
    """Fail the test if the feature pass starts: the error must come before it."""

    def fail(*args, **kwargs):
        raise AssertionError("the feature pass ran before the error")

    monkeypatch.setattr(ev, "inception_features", fail)


def _one_error(capsys, argv, *messages):
    assert main(["evaluate", *argv, "--no-progress", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for message in messages:
        assert message in err, err
    assert "NaN" not in captured.out
    return captured


def test_metrics_the_set_sizes_cannot_give(tmp_path, monkeypatch, capsys, inception_weights):
    """``auto`` leaves out what the set sizes cannot give (precision/recall with 2 images a side; FID with one), so
    the FID it can give is not lost to a late error; a metric asked for by name fails before the feature pass."""
    two = _save_images(tmp_path / "two", ShapesDataset(2, 32, seed=1).images)
    one = _save_images(tmp_path / "one", ShapesDataset(1, 32, seed=2).images)
    common = ["--inception-weights", str(inception_weights), "--device", "cpu", "--no-progress"]
    assert main(["evaluate", "--samples", str(two), "--reference", str(two), *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fid"] == pytest.approx(0, abs=1e-6) and result["fid"] >= 0 and "precision" not in result
    assert main(["evaluate", "--samples", str(one), "--reference", str(two), *common]) == 0
    captured = capsys.readouterr()
    assert "fid" not in json.loads(captured.out) and "--metrics auto left out FID" in captured.err
    _no_features(monkeypatch)
    for samples, metric in ((two, "pr"), (one, "fid")):
        argv = ["--samples", str(samples), "--reference", str(two), "--metrics", metric, *common[:2]]
        _one_error(capsys, argv, f"`--metrics` {metric}")
    # stored features too few (none, one): their count, not "reference statistics"
    for count in (0, 1):
        np.savez(tmp_path / "features.npz", inception_pool_3=np.zeros((count, 2048), np.float32))
        for metric in ("fid", "pr"):
            argv = ["--samples", str(two), "--reference", str(tmp_path / "features.npz"), "--metrics", metric]
            _one_error(
                capsys,
                [*argv, *common[:2]],
                f"got 2 sample(s), {count} reference feature vector(s) (`inception_pool_3`)",
            )


def test_bad_output_paths_fail_before_the_work(tmp_path, monkeypatch, capsys, inception_weights):
    samples = _save_images(tmp_path / "samples", ShapesDataset(4, 32, seed=1).images)
    (tmp_path / "file").write_text("x")
    # someone else's statistics (pytorch-fid's --save-stats: mu and sigma) and a JSON file that only shares two keys
    np.savez(tmp_path / "fid_stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    (tmp_path / "notes.json").write_text(json.dumps({"samples": "mine", "num_samples": 3, "notes": "keep"}))
    common = ["--samples", str(samples), "--reference", str(samples), "--inception-weights", str(inception_weights)]
    _no_features(monkeypatch)
    for flag, target, message in [
        ("--save-reference-stats", tmp_path / "fid_stats.npz", "exists and is not a file this command wrote"),
        ("--out", tmp_path / "notes.json", "exists and is not a file this command wrote"),
        ("--out", tmp_path, "is a folder"),
        ("--out", tmp_path / "file" / "r.json", "is a file, not a folder"),
        ("--save-reference-stats", tmp_path / "samples", "is a folder"),
        ("--save-reference-stats", tmp_path / "file" / "sub" / "s.npz", "is a file, not a folder"),
        # the inputs and files this command did not write were replaced (the samples turned into JSON)
        ("--out", samples / "000000.png", "is an input of this evaluation (or inside one)"),
        ("--out", tmp_path / "file", "exists and is not a file this command wrote"),
        ("--save-reference-stats", tmp_path / "file", "exists and is not a file this command wrote"),
        ("--out", "", "is empty"),
        # legal names whose atomic write's temporary name is too long: --out ended in a traceback after the work,
        # --save-reference-stats in an error naming neither the flag nor printing the results
        ("--out", tmp_path / ("a" * 235 + ".json"), "is too long: at most"),
        ("--save-reference-stats", tmp_path / ("b" * 236 + ".npz"), "is too long: at most"),
        # a file --reference then refused (it tells an .npz by its suffix)
        ("--save-reference-stats", tmp_path / "refstats", "must name an .npz file"),
    ]:
        _one_error(capsys, [*common, flag, str(target)], f"`{flag}`", message)
    assert (tmp_path / "file").read_text() == "x"
    assert set(np.load(tmp_path / "fid_stats.npz").files) == {"mu", "sigma"}
    _one_error(capsys, [*common, "--out", str(samples / "new.png")], "is an input of this evaluation")
    # an unfinished `diffusers-var sample` folder (no metadata.jsonl yet) was scored as a plain image folder
    unfinished = tmp_path / "unfinished"
    _save_images(unfinished / "images", ShapesDataset(2, 32, seed=1).images)
    (unfinished / "run.json").write_text('{"settings": {"total": 90}}')
    _one_error(capsys, ["--samples", str(unfinished)], "`--samples`", "has not finished")
    _one_error(capsys, ["--samples", str(unfinished / "images")], "`--samples`", "is in a `diffusers-var sample` run")
    # an .npz of empty images, one in Fortran order (its message showed a shape that looked right), a null prompt
    for name, images in (
        ("empty", np.zeros((2, 0, 5, 3), np.uint8)),
        ("fortran", np.asfortranarray(np.zeros((2, 8, 8, 3), np.uint8))),
    ):
        np.savez(tmp_path / f"{name}.npz", arr_0=images)
    _one_error(capsys, ["--samples", str(tmp_path / "empty.npz")], "`arr_0` must be uint8 images", "(2, 0, 5, 3)")
    _one_error(capsys, ["--samples", str(tmp_path / "fortran.npz")], "in Fortran order")
    nulled = tmp_path / "nulled"
    _save_images(nulled / "images", ShapesDataset(1, 32, seed=1).images)
    (nulled / "metadata.jsonl").write_text('{"file_name": "images/000000.png", "prompt": null}\n')
    _one_error(
        capsys,
        ["--samples", str(nulled), "--metrics", "clip"],
        "entry 1 has a `prompt` that is not a non-empty string",
    )
    # the other metrics need no prompt: auto leaves clip out with a note, and goes on to the feature pass
    with pytest.raises(AssertionError, match="the feature pass ran"):
        main(["evaluate", "--samples", str(nulled), "--inception-weights", str(inception_weights), "--no-progress"])
    assert "--metrics auto left out clip: `--samples`" in capsys.readouterr().err
    # a CLIP model that cannot be loaded: auto leaves clip out with a note (it failed the whole evaluation), while
    # clip asked for by name is the error
    prompted = _sample_folder(tmp_path / "prompted", ShapesDataset(2, 32, seed=1).images, ["a red square"] * 2)
    missing_clip = ["--clip-model", str(tmp_path / "no-clip")]
    with pytest.raises(AssertionError, match="the feature pass ran"):
        main(["evaluate", "--samples", str(prompted), *missing_clip, "--inception-weights", str(inception_weights)])
    assert "note: --metrics auto left out clip: `--clip-model`" in capsys.readouterr().err
    _one_error(capsys, ["--samples", str(prompted), "--metrics", "clip", *missing_clip], "`--clip-model`")
    # without --reference there is nothing to save: both flags named
    _one_error(
        capsys,
        ["--samples", str(samples), "--save-reference-stats", str(tmp_path / "s.npz")],
        "`--save-reference-stats`",
        "`--reference`",
    )
    # a reference of one image has no covariance: said before the feature passes (it failed after them)
    one = _save_images(tmp_path / "one", ShapesDataset(1, 32, seed=2).images)
    _one_error(
        capsys,
        ["--samples", str(samples), "--reference", str(one), "--save-reference-stats", str(tmp_path / "s.npz")],
        "`--save-reference-stats`",
        "has 1 image",
    )


def test_a_name_longer_than_the_file_system_takes_is_one_error_line(tmp_path, monkeypatch, capsys, inception_weights):
    """A path with a name past NAME_MAX (255 bytes): ``Path.is_dir()`` / ``is_file()`` raise ENAMETOOLONG instead of
    answering False, which ended the command in a traceback (exit code 1)."""
    samples = _save_images(tmp_path / "samples", ShapesDataset(4, 32, seed=1).images)
    long = str(tmp_path / ("x" * 300))
    common = ["--samples", str(samples), "--reference", str(samples), "--inception-weights", str(inception_weights)]
    _no_features(monkeypatch)
    for argv, flag in [
        (["--samples", long, "--inception-weights", str(inception_weights)], "--samples"),
        (
            ["--samples", str(samples), "--reference", long, "--inception-weights", str(inception_weights)],
            "--reference",
        ),
        ([*common, "--out", f"{long}/r.json"], "--out"),
        ([*common, "--save-reference-stats", f"{long}/s.npz"], "--save-reference-stats"),
        (["--samples", str(samples), "--metrics", "is", "--inception-weights", long], "--inception-weights"),
    ]:
        _one_error(capsys, argv, f"`{flag}` ", "is 300 bytes long, more than the 255 the file system takes")


def test_a_late_write_failure_still_prints_the_results(tmp_path, monkeypatch, capsys, inception_weights):
    samples = _save_images(tmp_path / "samples", ShapesDataset(4, 32, seed=1).images)
    real_write = ev.write_atomic

    def failing_write(path, write, **kwargs):
        if path.suffix == ".json":
            raise PermissionError(13, "Permission denied")
        return real_write(path, write, **kwargs)

    monkeypatch.setattr(ev, "write_atomic", failing_write)
    argv = ["--samples", str(samples), "--inception-weights", str(inception_weights), "--metrics", "is"]
    captured = _one_error(capsys, [*argv, "--out", str(tmp_path / "r.json")], "`--out`", "was not written")
    assert json.loads(captured.out)["inception_score"] >= 1.0


def test_non_finite_statistics_and_metrics_are_errors(tmp_path, monkeypatch, capsys, inception_weights):
    samples = _save_images(tmp_path / "samples", ShapesDataset(4, 32, seed=1).images)
    common = ["--samples", str(samples), "--inception-weights", str(inception_weights)]
    sigma = np.eye(2048)
    np.savez(tmp_path / "nan_mu.npz", mu=np.full(2048, np.nan), sigma=sigma)
    np.savez(tmp_path / "inf_sigma.npz", mu=np.zeros(2048), sigma=np.where(sigma > 0, np.inf, 0.0))
    np.savez(tmp_path / "nan_pool.npz", inception_pool_3=np.full((5, 2048), np.nan, np.float32))
    np.savez(tmp_path / "negative_sigma.npz", mu=np.zeros(2048), sigma=-sigma)  # gave a negative FID
    np.savez(tmp_path / "skewed_sigma.npz", mu=np.zeros(2048), sigma=sigma + np.triu(np.ones((2048, 2048)), 1))
    np.savez(tmp_path / "indefinite_sigma.npz", mu=np.zeros(2048), sigma=_indefinite(sigma, 2048))  # gave FID 0.0
    with monkeypatch.context() as patch:
        _no_features(patch)
        for name, key in [("nan_mu", "mu"), ("inf_sigma", "sigma"), ("nan_pool", "inception_pool_3")]:
            path = str(tmp_path / f"{name}.npz")
            _one_error(capsys, [*common, "--reference", path], "`--reference`", path, f"`{key}`", "NaN or infinite")
        for name in ("negative_sigma", "skewed_sigma", "indefinite_sigma"):
            path = str(tmp_path / f"{name}.npz")
            _one_error(capsys, [*common, "--reference", path], "`--reference`", "`sigma` is not a covariance")

    # features that come out non-finite (broken weights) give an error, never "NaN" in the JSON
    def nan_features(model, images, batch_size=64, progress=False):
        return np.full((images.length, 2048), np.nan, np.float32), np.full((images.length, 1008), np.nan, np.float32)

    monkeypatch.setattr(ev, "inception_features", nan_features)
    _one_error(capsys, [*common, "--reference", str(samples)], "`--samples`", "NaN or infinite")


def test_unreadable_inputs_are_one_error_line(tmp_path, monkeypatch, capsys, inception_weights):
    images = ShapesDataset(4, 32, seed=1).images
    good = _save_images(tmp_path / "good", images)
    np.save(tmp_path / "array.npy", images)
    (tmp_path / "array.npy").rename(tmp_path / "renamed.npz")
    np.savez(tmp_path / "whole.npz", arr_0=images)
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:200])
    (tmp_path / "text.npz").write_text("not an archive")
    np.savez(tmp_path / "object.npz", mu=np.array([{"a": 1}] * 3, dtype=object), sigma=np.eye(3))
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(10), sigma=np.eye(10))
    np.savez(tmp_path / "ints.npz", mu=np.zeros(2048, np.int64), sigma=np.eye(2048))
    np.savez(tmp_path / "mu_only.npz", mu=np.zeros(2048))
    np.savez(tmp_path / "other_keys.npz", foo=np.zeros(3))
    no_name = _sample_folder(tmp_path / "no_name", images)
    (no_name / "metadata.jsonl").write_text('{"file_name": "images/000000.png"}\n{"index": 1}\n')
    missing = _sample_folder(tmp_path / "missing", images)
    (missing / "images" / "000002.png").unlink()
    weights = ["--inception-weights", str(inception_weights)]
    with monkeypatch.context() as patch:
        _no_features(patch)
        for flag in ("--samples", "--reference"):
            other = [] if flag == "--samples" else ["--samples", str(good)]
            for name, message in [
                ("renamed.npz", "is a .npy array"),
                ("truncated.npz", "not an .npz archive"),
                ("text.npz", "not an .npz archive"),
            ]:
                path = str(tmp_path / name)
                _one_error(capsys, [flag, path, *other, *weights], f"`{flag}`", path, message)
        for name, message in [
            ("object.npz", "object (pickled) array"),
            ("shapes.npz", "(2048,)"),
            ("ints.npz", "must be a float array"),
            ("mu_only.npz", "only one of `mu` and `sigma`"),
            ("other_keys.npz", "neither images"),
        ]:
            path = str(tmp_path / name)
            _one_error(capsys, ["--samples", str(good), "--reference", path, *weights], "`--reference`", message)
        _one_error(capsys, ["--samples", str(no_name), *weights], "`--samples`", "line 2 has no `file_name`")
        _one_error(capsys, ["--samples", str(missing), *weights], "`--samples`", "000002.png", "not there")
    # a file that is not an image, found during the pass: named
    (good / "x.png").write_bytes(b"not a png")
    _one_error(capsys, ["--samples", str(good), "--metrics", "is", *weights], "`--samples`", "x.png", "cannot read")
    # a link to nothing: named too (it was left out, and the set was smaller than its folder without a word)
    (good / "x.png").unlink()
    (good / "gone.png").symlink_to(tmp_path / "nowhere.png")
    _one_error(capsys, ["--samples", str(good), "--metrics", "is", *weights], "`--samples`", "gone.png", "cannot read")


def test_a_clip_hub_id_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    """The README's "nothing is downloaded": a Hub id not in the cache went to the network (about 1.7 GB, or 50 s of
    retries offline) before the error. Now it is one error at once, the network never asked (offline mode off)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    asked = []
    monkeypatch.setattr(huggingface_hub.file_download, "get_hf_file_metadata", lambda *a, **k: asked.append(a))
    with pytest.raises(ValueError, match="`--clip-model` 'openai/clip-vit-large-patch14' could not be loaded") as err:
        ev.load_clip("openai/clip-vit-large-patch14")
    assert asked == []
    # huggingface_hub 1.x and later install only the `hf` command (no `huggingface-cli`)
    assert "`hf download openai/clip-vit-large-patch14`" in str(err.value)
