"""Tiled translation: instance-norm tiles normalized with a thumbnail's statistics match the whole image, and the
PyTorch definition of those statistics (models/thumbnail_norm.py) against known answers."""

import numpy as np
import pytest
import torch
from conftest import METADATA, make_engine
from PIL import Image
from torch import nn

from tests.corpus import gradient
from transfigure.models.generators import build_generator
from transfigure.models.thumbnail_norm import StatisticsGraph, TileGraph, context_radius, statistics_width
from transfigure.pipeline.export import model_card as card
from transfigure.pipeline.export.to_onnx import export_image_generator
from transfigure.pipeline.fidelity import photo_like

pytestmark = pytest.mark.xdist_group("test_tiling")


@pytest.fixture(scope="module")
def instance_model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiles") / "AtoB.onnx"
    result = export_image_generator(build_generator("resnet_2blocks", ngf=8), path, METADATA)
    return path, result


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def test_tile_graph_with_an_images_own_statistics_is_the_network():
    torch.manual_seed(0)
    net = build_generator("resnet_2blocks", ngf=8, norm="instance").eval()
    x = torch.rand(2, 3, 36, 44) * 2 - 1
    statistics = StatisticsGraph(net).eval()(x)
    assert statistics.shape == (2, statistics_width(net)) == (2, 2 * (8 + 16 + 32 + 4 * 32 + 16 + 8))
    with torch.no_grad():
        assert torch.allclose(TileGraph(net).eval()(x, statistics), net(x), atol=1e-5)
        # The first layer's statistics are the mean and variance of the first convolution's output.
        first = net.model[1](net.model[0](x))
        assert torch.allclose(statistics[:, :8], first.mean((2, 3)), atol=1e-5)
        assert torch.allclose(statistics[:, 8:16], first.var((2, 3), unbiased=False), atol=1e-4)


def test_context_radius_is_the_receptive_field():
    # Two 3x3 convolutions see 2 pixels each way; a dilated 3x3 (dilation 2) and a 5x5 see 2 + 2.
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    assert context_radius(plain, multiple=1) == 2
    wide = nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.InstanceNorm2d(4), nn.Conv2d(4, 3, 5, padding=2))
    assert context_radius(wide, multiple=1) == 4
    assert context_radius(plain, multiple=4) == 4  # rounded up to the multiple, so tile origins stay aligned


def test_export_writes_the_companions_with_their_card(instance_model):
    path, result = instance_model
    statistics = card.ModelCard.read(card.companion_path(path, card.STATISTICS)).to_metadata()
    tile = card.ModelCard.read(card.companion_path(path, card.TILE)).to_metadata()
    assert statistics["kind"] == card.THUMBNAIL_STATISTICS and tile["kind"] == card.STATISTICS_TILE
    assert tile["input"] == "image,statistics" and tile["context"] == result["tiles"]["context"] == "28"
    assert statistics["params_hash"] == tile["params_hash"] == METADATA["params_hash"]
    assert card.ModelCard.read(path).to_metadata()["instance_norm_layers"] == "9"
    assert result["tiles"]["max_abs_error"] < 1e-4


def test_batch_norm_models_get_no_companions(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "batch.onnx"
    result = export_image_generator(build_generator("resnet_2blocks", ngf=8, norm="batch"), path, METADATA)
    assert result["tiles"] is None and not card.companion_path(path, card.TILE).exists()
    engine = make_engine(path, providers=["cpu"], tile=32)
    assert engine.translate(gradient(100, 90)).shape == (90, 100, 3)
    assert engine.tiling.startswith("blended overlaps (no instance norm")


@pytest.mark.parametrize("size", [(300, 200), (301, 197), (64, 257)])
def test_a_full_size_thumbnail_makes_tiles_equal_the_whole_image(instance_model, size):
    engine = make_engine(instance_model[0], providers=["cpu"])
    image = gradient(*size, seed=size[0])
    whole = engine.translate(image)
    tiling = make_engine(instance_model[0], providers=["cpu"], tile=64, thumbnail=max(size))
    tiled = tiling.translate(image)
    assert tiling.tiling == "thumbnail statistics"
    # Edge, corner and non-multiple tiles come out at their exact size, and equal to float rounding.
    assert tiled.shape == whole.shape == (size[1], size[0], 3)
    assert _diff(tiled, whole).max() <= 1


def test_a_smaller_thumbnail_stays_close_where_tiles_alone_do_not(instance_model, tmp_path):
    # A photograph enlarged 4x, as large photos are smooth at the pixel level: a half-size thumbnail keeps it.
    small = Image.fromarray(photo_like(60, 90, seed=5))
    image = np.asarray(small.resize((360, 240), Image.Resampling.BICUBIC))
    engine = make_engine(instance_model[0], providers=["cpu"])
    whole = engine.translate(image)
    shared = _diff(make_engine(instance_model[0], providers=["cpu"], tile=64, thumbnail=180).translate(image), whole)
    alone = tmp_path / "alone.onnx"
    alone.write_bytes(instance_model[0].read_bytes())  # the same model without its companions
    by_itself = make_engine(alone, providers=["cpu"], tile=64)
    separate = _diff(by_itself.translate(image), whole)
    assert "no alone.statistics.onnx and alone.tile.onnx beside the model" in by_itself.tiling
    # A random network is far more sensitive to its statistics than a trained one (docs/BENCHMARKS.md, Tiling):
    # measured 9 levels mean with the thumbnail against 28 alone; the thumbnail must keep most of the gain.
    assert separate.mean() > 2.5 * shared.mean(), (separate.mean(), shared.mean())
    assert np.percentile(separate, 99) > 2 * np.percentile(shared, 99)


def test_companions_from_another_export_are_not_used(instance_model, tmp_path):
    import onnx

    path = tmp_path / "AtoB.onnx"
    model = onnx.load(str(instance_model[0]))
    for prop in model.metadata_props:
        if prop.key == "params_hash":
            prop.value = "retrained"
    path.write_bytes(model.SerializeToString())
    for suffix in (card.STATISTICS, card.TILE):
        card.companion_path(path, suffix).write_bytes(card.companion_path(instance_model[0], suffix).read_bytes())
    engine = make_engine(path, providers=["cpu"], tile=64)
    assert engine.translate(gradient(100, 80)).shape == (80, 100, 3)
    assert "AtoB.statistics.onnx does not belong to this model (params_hash differ)" in engine.tiling


@pytest.mark.slow
def test_a_field_wider_than_can_be_measured_keeps_blended_tiles(tmp_path):
    torch.manual_seed(0)
    # unet_256's eight 4x4 stride-2 levels see about 700 px each way: no tile of a practical size is exact.
    net = build_generator("unet_256", ngf=4, norm="instance")
    assert context_radius(net, net.size_multiple) is None
    assert context_radius(build_generator("unet_5down", ngf=4, norm="instance"), 32) == 64
    result = export_image_generator(net, tmp_path / "unet.onnx", METADATA)
    assert result["tiles"] is None and not card.companion_path(tmp_path / "unet.onnx", card.TILE).exists()


def test_a_long_thin_image_keeps_enough_of_its_short_side_in_the_thumbnail(instance_model):
    from transfigure.pipeline.errors import UserError

    # 300x8 at a 64 px thumbnail would be 64x4, below the 8 px this network needs: the thumbnail keeps 8.
    engine = make_engine(instance_model[0], providers=["cpu"], tile=64, thumbnail=64)
    assert engine.min_side == 8
    assert engine.translate(gradient(300, 8)).shape == (8, 300, 3) and engine.tiling == "thumbnail statistics"
    with pytest.raises(UserError, match="--thumbnail 32: must be at least the tile's size \\(64\\)"):
        make_engine(instance_model[0], tile=64, thumbnail=32)
