"""The inference engine against real ONNX Runtime sessions of small exported generators."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import METADATA, make_engine, tiny_translator_network

from tests.corpus import gradient
from transfigure.models.generators import build_generator
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.export import model_card as card
from transfigure.pipeline.export.quantize import write_int8_companion
from transfigure.pipeline.export.to_onnx import export_image_generator
from transfigure.pipeline.schema import Int8Params
from transfigure.pipeline.serve.engine import InferenceError, open_engine
from transfigure.pipeline.serve.options import InferenceOptions

# One worker runs the whole module, so its module-scoped fixtures are made once (tests/README.md).
pytestmark = pytest.mark.xdist_group("test_infer")


@pytest.fixture(scope="module")
def instance_model(tmp_path_factory, tiny_translator):
    return tiny_translator_network(), tiny_translator(tmp_path_factory.mktemp("models") / "instance.onnx")


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    # No normalisation: each output pixel depends only on a window of input pixels, so tiles can match.
    torch.manual_seed(0)
    net = build_generator("resnet_2blocks", ngf=8, norm="none").eval()
    path = tmp_path_factory.mktemp("models") / "local.onnx"
    export_image_generator(net, path, METADATA)
    return net, path


def _torch_translate(net: torch.nn.Module, image: np.ndarray, multiple: int = 4) -> np.ndarray:
    """PyTorch on the same image, reflect-padded at the bottom and right to the multiple and cropped back."""
    height, width = image.shape[:2]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    x = torch.nn.functional.pad(x, (0, -width % multiple, 0, -height % multiple), mode="reflect")
    with torch.no_grad():
        y = net(x)[0, :, :height, :width]
    return ((y + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_reads_names_and_multiple_from_the_model(instance_model):
    engine = make_engine(instance_model[1], providers=["cpu"])
    assert (engine.input_name, engine.output_name) == ("image", "translated")
    assert engine.multiple == 4
    assert engine.provider == "cpu"
    assert engine.card.direction == "AtoB"


def test_odd_sizes_keep_their_size_and_match_pytorch(instance_model):
    net, path = instance_model
    engine = make_engine(path, providers=["cpu"])
    for width, height in [(37, 23), (32, 24), (9, 41)]:
        image = gradient(width, height, seed=width)
        out = engine.translate(image)
        assert out.shape == (height, width, 3) and out.dtype == np.uint8
        assert _max_diff(out, _torch_translate(net, image)) <= 1


def test_a_batch_equals_its_images_one_by_one(instance_model):
    engine = make_engine(instance_model[1], providers=["cpu"])
    images = [gradient(30, 22, seed=seed) for seed in range(3)]
    batch = engine.translate_batch(images)
    assert len(batch) == 3
    for image, out in zip(images, batch, strict=True):
        assert _max_diff(out, engine.translate(image)) <= 1


def test_tiles_match_the_whole_image_without_seams(local_model):
    net, path = local_model
    engine = make_engine(path, providers=["cpu"])
    image = gradient(300, 200, seed=7)
    whole = engine.translate(image)
    tiled = make_engine(path, providers=["cpu"], tile=64).translate(image)
    assert tiled.shape == whole.shape == (200, 300, 3)
    assert _max_diff(whole, _torch_translate(net, image)) <= 1
    diff = np.abs(tiled.astype(np.int16) - whole.astype(np.int16))
    # Tiles only lack context near their own borders, and the ramps fade those borders out.
    assert diff.mean() < 1.0
    assert diff.max() <= 16
    # An image no larger than the tile is translated whole.
    assert np.array_equal(make_engine(path, providers=["cpu"], tile=300).translate(image), whole)


def test_an_image_too_small_for_the_network_raises_inference_error(instance_model):
    engine = make_engine(instance_model[1], providers=["cpu"])
    # Reflection padding at the coarsest level needs 2 px there: the engine found 8 px at load, and says so in
    # its own words rather than ONNX Runtime's (which names a Pad node).
    assert engine.min_side == 8
    with pytest.raises(InferenceError, match="^the image is 4x4; this model needs at least 8 px on each side$"):
        engine.translate(gradient(4, 4))
    assert engine.translate(gradient(8, 8)).shape == (8, 8, 3)


def test_unknown_provider_lists_the_valid_names(instance_model):
    with pytest.raises(UserError, match="--providers: unknown provider 'gpu'; expected some of tensorrt, cuda, cpu"):
        make_engine(instance_model[1], providers=["gpu"])


def test_require_gpu_says_what_loaded(instance_model):
    if make_engine(instance_model[1]).provider != "cpu":
        pytest.skip("a GPU provider loads on this machine")
    with pytest.raises(UserError, match="no GPU provider loaded.*loaded: cpu"):
        make_engine(instance_model[1], require_gpu=True)
    with pytest.raises(UserError, match=r"none of the requested providers \(cuda\) loaded; loaded: cpu"):
        make_engine(instance_model[1], providers=["cuda"])


def test_missing_or_broken_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model not found"):
        make_engine(tmp_path / "absent.onnx")
    (tmp_path / "notes.onnx").write_text("not a model\n")
    with pytest.raises(UserError, match="cannot load notes.onnx"):
        make_engine(tmp_path / "notes.onnx")


def test_registered_model_uri_resolves_through_mlflow(instance_model, local_model, tmp_path, monkeypatch, capfd):
    from transfigure.pipeline import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # artifacts of the sqlite store land in ./mlruns
    mlflow = tracking._mlflow()
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    tiles = [card.companion_path(instance_model[1], suffix) for suffix in (card.STATISTICS, card.TILE)]
    tracking.register_onnx(run_id, instance_model[1], "horse2zebra", extra=tiles)
    int8 = write_int8_companion(
        local_model[1], [gradient(20, 16, seed=n) for n in range(3)], [gradient(20, 16)], Int8Params(), "t"
    )
    tracking.register_onnx(run_id, local_model[1], "horse2zebra", extra=[Path(int8["path"])])
    mlflow.MlflowClient().set_registered_model_alias("horse2zebra", "champion", "1")

    image = gradient(20, 16)
    first, newest = (make_engine(path, providers=["cpu"]).translate(image) for _, path in (instance_model, local_model))
    # MLflow reserves the alias "latest" for the newest version; "/latest" says the same.
    for uri, expected in [
        ("models:/horse2zebra@latest", newest),
        ("models:/horse2zebra/latest", newest),
        ("models:/horse2zebra@champion", first),
    ]:
        assert np.array_equal(open_engine(uri, InferenceOptions(providers=("cpu",))).translate(image), expected), uri
    assert "Downloading artifacts" not in capfd.readouterr().err, "MLflow's progress bar for a local copy"
    # The int8 companion travels with its model through the registry.
    assert open_engine("models:/horse2zebra@latest", InferenceOptions(precision="int8")).precision == "int8"
    with pytest.raises(UserError, match="no int8 model beside it"):
        open_engine("models:/horse2zebra@champion", InferenceOptions(precision="int8"))
    # So do the tiling companions: tiles of a registered instance-norm model share a thumbnail's statistics.
    champion = open_engine("models:/horse2zebra@champion", InferenceOptions(providers=("cpu",)))
    assert champion.tiling == "thumbnail statistics"
    with pytest.raises(UserError, match="models:/zebra2horse@latest"):
        open_engine("models:/zebra2horse@latest", InferenceOptions(providers=("cpu",)))


def test_a_registered_model_from_a_folder_without_a_store_is_refused_without_creating_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no MLflow store: no mlflow.db in"):
        open_engine("models:/horse2zebra@latest", InferenceOptions(providers=("cpu",)))
    assert list(tmp_path.iterdir()) == []
