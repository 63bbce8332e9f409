"""Label maps (#16): the Gumbel-softmax relaxation's known answers, label-map data, the scores, label-map models
through export, `translate` and the real service, and a brief training of pix2pix_labels that learns (#36)."""

import io
import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import METADATA, tiny
from PIL import Image
from rich.console import Console
from scipy.stats import chisquare
from serving import Server

from transfigure.models.categorical import OneHotInput, annealed_temperature, one_hot_map, relaxed_one_hot
from transfigure.models.generators import build_generator
from transfigure.pipeline.data.prepare import prepare_folder
from transfigure.pipeline.evaluate.metrics import label_map_scores
from transfigure.pipeline.evaluate.stage import evaluate_recipe
from transfigure.pipeline.export import model_card as card
from transfigure.pipeline.export.to_onnx import export_image_generator, export_label_map_generator
from transfigure.pipeline.images import resize_image, write_labels_atomic
from transfigure.pipeline.params import load_params
from transfigure.pipeline.pixels import colorize, palette
from transfigure.pipeline.schema import DatasetParams
from transfigure.pipeline.train import recipes
from transfigure.pipeline.train.context import Context
from transfigure.pipeline.train.loop import train

K = 11


def test_hard_gumbel_softmax_samples_follow_the_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.5, 0.0, -1.0, 1.0])
    samples = relaxed_one_hot(logits.view(1, 5, 1, 1).expand(20_000, 5, 1, 1), temperature=0.7, hard=True)
    counts = samples.sum((0, 2, 3)).numpy()
    expected = torch.softmax(logits, 0).numpy() * 20_000
    assert chisquare(counts, expected).pvalue > 0.01
    # The same counts against a wrong distribution (uniform) are rejected: the test can fail.
    assert chisquare(counts, np.full(5, 4_000.0)).pvalue < 1e-6


def test_soft_samples_approach_one_hot_as_the_temperature_falls():
    torch.manual_seed(1)
    logits = torch.randn(4_000, 6, 1, 1)
    largest = [relaxed_one_hot(logits, t, hard=False).amax(1).mean().item() for t in (5.0, 1.0, 0.2, 0.02)]
    assert largest == sorted(largest) and largest[-1] > 0.99 and largest[0] < 0.5


@pytest.mark.parametrize("noise", [True, False])
def test_straight_through_is_one_hot_forward_and_passes_a_gradient(noise):
    torch.manual_seed(2)
    logits = torch.randn(3, K, 4, 4, requires_grad=True)
    sample = relaxed_one_hot(logits, 0.5, hard=True, noise=noise)
    assert set(sample.unique().tolist()) == {0.0, 1.0} and torch.equal(sample.sum(1), torch.ones(3, 4, 4))
    (sample * torch.randn_like(sample)).sum().backward()
    assert logits.grad.abs().sum() > 0
    if not noise:  # no noise: the one-hot of the argmax itself
        assert torch.equal(sample.argmax(1), logits.argmax(1))


def test_the_temperature_anneals_exponentially_from_start_to_end():
    steps = [annealed_temperature(p, 1.0, 0.25) for p in (0.0, 0.5, 1.0, 1.5)]
    assert steps == pytest.approx([1.0, 0.5, 0.25, 0.25])  # equal ratios per equal progress; clamped after the end


def test_nearest_resizing_never_creates_a_class():
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array([2, 5, 7], dtype=np.uint8), size=(37, 53))
    for size in (8, 20, 64):
        for mode in ("resize_and_crop", "scale_width"):
            assert set(np.unique(resize_image(labels, size, mode, nearest=True))) <= {2, 5, 7}
    assert len(np.unique(resize_image(labels, 20, "resize_and_crop"))) > 3  # interpolation would invent some


def test_prepare_checks_a_label_side_and_names_bad_files(tmp_path):
    source = tmp_path / "pairs"
    for split in ("train", "test"):
        (source / "A" / split).mkdir(parents=True)
        (source / "B" / split).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(source / "A/train" / f"{name}.png")
    write_labels_atomic(source / "B/train/a.png", rng.integers(0, K, (24, 24)).astype(np.uint8), palette(K))
    Image.fromarray(np.full((24, 24), 3, np.uint8)).save(source / "B/train/b.png")  # single-channel: accepted
    write_labels_atomic(source / "B/train/c.png", np.full((24, 24), K, np.uint8), palette(K + 1))
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(source / "B/train/d.png")
    spec = DatasetParams(path=str(source), layout="aligned", size=16, labels={"domain": "B", "classes": K})
    report = prepare_folder(source, tmp_path / "out", spec, seed=0, log=lambda _: None)
    reasons = {
        item["path"].rsplit("/", 2)[-2] + "/" + item["path"].rsplit("/", 1)[-1]: item["reason"]
        for item in report["rejected"]
    }
    assert reasons == {
        "train/c.png": f"label value {K} is not below the {K} classes",
        "train/d.png": "a label map must be a single-channel or palette image of class indices; this one is RGB",
    }
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["labels"] == {"domain": "B", "classes": K, "palette": [list(c) for c in palette(K)]}
    written = Image.open(tmp_path / "out/trainB/b.png")
    assert written.mode == "P" and written.size == (16, 16) and np.unique(np.array(written)).tolist() == [3]


def test_the_built_in_digits_labels_hold_the_digit_on_its_strokes(digits_root):
    manifest = json.loads((digits_root / "digits_labels/manifest.json").read_text())
    assert manifest["labels"]["classes"] == K
    for entry in [e for e in manifest["images"] if e["domain"] == "B"][:50]:
        values = set(np.unique(np.array(Image.open(digits_root / "digits_labels" / entry["path"]))).tolist())
        assert values == {0, 1 + entry["label"]}, entry


def test_label_map_scores_known_answer():
    truth = torch.tensor([[[0, 0, 3, 3], [0, 0, 3, 3]], [[0, 5, 5, 5], [0, 0, 0, 0]]])
    predicted = torch.tensor([[[0, 0, 3, 3], [0, 3, 3, 3]], [[0, 5, 5, 2], [0, 0, 0, 0]]])
    scores = label_map_scores(truth, predicted, 6)
    assert scores["pixel_accuracy"] == pytest.approx(14 / 16)
    iou = {"0": 8 / 9, "2": 0.0, "3": 4 / 5, "5": 2 / 3}
    assert {k: v for k, v in scores["per_class_iou"].items() if v is not None} == pytest.approx(iou)
    assert scores["per_class_iou"]["1"] is None and scores["per_class_iou"]["4"] is None  # in neither map
    assert scores["miou"] == pytest.approx(sum(iou.values()) / 4)
    assert scores["majority_class_accuracy"] == 1.0  # image 1: 3 as in the truth; image 2: 5 (2 px) over 2 (1 px)
    swapped = label_map_scores(truth, torch.where(predicted == 5, 2, predicted), 6)
    assert swapped["majority_class_accuracy"] == 0.5


@pytest.fixture(scope="module")
def label_models(tmp_path_factory):
    """A photo -> labels model and a labels -> photo model, small and seeded, exported."""
    root = tmp_path_factory.mktemp("label-models")
    torch.manual_seed(0)
    to_labels = build_generator("unet_5down", 3, K, 4, "batch", tanh=False)
    export_label_map_generator(to_labels, root / "labels.onnx", METADATA)
    from_labels = OneHotInput(build_generator("resnet_1blocks", K, 3, 4, "instance"), K)
    result = export_image_generator(from_labels, root / "photo.onnx", METADATA)
    assert result["input_type"] == card.LABEL_MAP and result["tiles"] is None
    return root


def test_a_label_map_model_has_its_card_and_translate_writes_palette_pngs(label_models, run_cli, tmp_path):
    model = label_models / "labels.onnx"
    meta = card.ModelCard.read(model).to_metadata()
    assert meta["kind"] == card.LABEL_MAP and meta["classes"] == str(K) and meta["output"] == card.LABELS_OUTPUT
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    images = {name: rng.integers(0, 255, (40, 56, 3), dtype=np.uint8) for name in ("x", "y")}
    for name, image in images.items():
        Image.fromarray(image).save(photos / f"{name}.png")
    assert run_cli("translate", str(photos), str(tmp_path / "maps"), "--model", str(model)).returncode == 0
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for name, image in images.items():
        written = Image.open(tmp_path / "maps" / f"{name}.png")
        x = np.pad(image, ((0, 24), (0, 8), (0, 0)), mode="reflect").transpose(2, 0, 1)[None] / 127.5 - 1
        expected = session.run(None, {"image": x.astype(np.float32)})[0][0, :40, :56]
        assert written.mode == "P" and np.array_equal(np.array(written), expected)
    coloured = run_cli("translate", str(photos / "x.png"), str(tmp_path / "rgb"), "--model", str(model), "--colorize")
    assert coloured.returncode == 0
    rgb = np.array(Image.open(tmp_path / "rgb/x.png"))
    assert np.array_equal(rgb, colorize(np.array(Image.open(tmp_path / "maps/x.png")), palette(K)))
    refused = run_cli("translate", str(photos), str(tmp_path / "jpg"), "--model", str(model), "--format", "jpg")
    assert refused.returncode == 2 and "label maps are written as PNG" in refused.stderr


def test_a_label_map_input_model_translates_label_pngs_and_rejects_bad_ones(label_models, run_cli, tmp_path):
    maps = tmp_path / "maps"
    rng = np.random.default_rng(1)
    write_labels_atomic(maps / "good.png", rng.integers(0, K, (32, 36)).astype(np.uint8), palette(K))
    write_labels_atomic(maps / "too_high.png", np.full((32, 32), 12, np.uint8), palette(13))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(maps / "rgb.png")
    out = run_cli("translate", str(maps), str(tmp_path / "photos"), "--model", str(label_models / "photo.onnx"))
    assert out.returncode == 1, out.stderr
    assert Image.open(tmp_path / "photos/good.png").mode == "RGB"
    assert f"too_high.png: label value 12 is not below the {K} classes" in out.stdout
    assert "rgb.png: a label map must be a single-channel or palette image" in out.stdout


def test_the_service_answers_label_maps_over_both_protocols(label_models):
    image = np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    with Server(label_models / "labels.onnx") as server:
        png = httpx.post(f"{server.url}/v1/translate", content=_png(image), headers={"Content-Type": "image/png"})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        answer = Image.open(io.BytesIO(png.content))
        assert answer.mode == "P" and answer.size == (32, 32)
        meta = httpx.get(f"{server.url}/v2/models/labels").json()
        assert meta["outputs"] == [{"name": "labels", "datatype": "UINT8", "shape": [-1, -1, -1]}]
        body = {
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": image.ravel().tolist()}]
        }
        infer = httpx.post(f"{server.url}/v2/models/labels/infer", json=body).json()
        (tensor,) = infer["outputs"]
        assert tensor["name"] == "labels" and tensor["shape"] == [1, 32, 32]
        assert np.array_equal(np.array(tensor["data"]).reshape(32, 32), np.array(answer))
        jpeg = httpx.post(
            f"{server.url}/v1/translate?format=jpeg", content=_png(image), headers={"Content-Type": "image/png"}
        )
        assert jpeg.status_code == 422 and "label maps come as PNG" in jpeg.json()["error"]


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_one_hot_map_is_the_one_hot_of_each_class():
    labels = torch.tensor([[[0, 2], [1, 2]]])
    assert torch.equal(one_hot_map(labels, 3).argmax(1), labels) and one_hot_map(labels, 3).sum() == 4


@pytest.mark.slow
def test_brief_training_reads_the_digits_better_than_any_constant_map(workdir, digits_root):
    # The default recipe (cross-entropy alone), narrower and briefer, at a constant rate: it learns, far from the bar.
    brief = ["steps=100", "generator.ngf=16", "lr_decay=false", "checkpoint_every=100"]
    brief += ["sample_every=100", "log_every=100"]
    params = load_params("params.yaml", [f"pix2pix_labels.{setting}" for setting in brief])
    quiet = Console(file=io.StringIO())
    train("pix2pix_labels", params, quiet)
    scores = evaluate_recipe("pix2pix_labels", params, quiet)["AtoB"]
    manifest = json.loads((digits_root / "digits_labels/manifest.json").read_text())
    tests = [e for e in manifest["images"] if e["domain"] == "B" and e["split"] == "test"]
    maps = [np.array(Image.open(digits_root / "digits_labels" / entry["path"])) for entry in tests]
    truth = torch.tensor(np.stack(maps)).long()
    constant = max(label_map_scores(truth, torch.full_like(truth, k), K)["miou"] for k in range(K))
    # A constant map scores one class's IoU over the 11 present (0.074 for the page); 100 steps reach 0.110.
    assert scores["miou"] > 1.25 * constant, (scores, constant)


def test_cross_entropy_alone_leaves_the_critic_untrained(workdir):
    params = load_params("params.yaml", [*tiny("pix2pix_labels"), "pix2pix_labels.lambda_GAN=0"])
    p = recipes.params_of(params, "pix2pix_labels")
    ctx = Context.create(p)
    model = recipes.get("pix2pix_labels")(p, ctx, Path(params.data.root) / p.dataset)
    stream = iter(model.batches(params.seed, 0))
    weights = {name: {k: v.clone() for k, v in model.state.nets[name].state_dict().items()} for name in ("G", "D")}
    losses = model.step(lambda: ctx.to_device(next(stream)))
    assert losses["G_adv"] == 0 and losses["D"] == 0 and losses["CE"] > 0

    def changed(name: str) -> bool:
        return any(not torch.equal(v, model.state.nets[name].state_dict()[k]) for k, v in weights[name].items())

    assert changed("G") and not changed("D")  # the critic (weights and batch-norm statistics) is not even run
