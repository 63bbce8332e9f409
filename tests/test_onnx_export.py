"""ONNX export: the contract (names, dtypes, dynamic sizes, metadata), parity with PyTorch, atomic writes,
the fp16 variant, the conditional generator and the import of reference CycleGAN/pix2pix checkpoints."""

import copy
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from transfigure.models.dcgan import ConditionalGenerator
from transfigure.models.generators import build_generator
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.export.model_card import IMAGE_INPUT, IMAGE_OUTPUT, ModelCard
from transfigure.pipeline.export.reference import import_reference_checkpoint
from transfigure.pipeline.export.to_onnx import (
    FP16_ATOL,
    ExportParityError,
    export_image_generator,
    export_sampler,
)
from transfigure.pipeline.train import recipes

# One worker runs the whole module, so its module-scoped fixtures are made once (tests/README.md).
pytestmark = pytest.mark.xdist_group("test_onnx_export")

METADATA = {
    "recipe": "cyclegan",
    "direction": "AtoB",
    "source_domain": "horse",
    "target_domain": "zebra",
    "training_commit": "0123abcd",
    "params_hash": "feedbeef",
}
# A size no export in this file traces or checks parity on, per size multiple.
UNSEEN_SIZE = {4: (2, 44, 28), 32: (2, 96, 64)}


def image_input(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(7)) * 2 - 1


def run_onnx(path, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def eager(net: torch.nn.Module, *inputs: torch.Tensor) -> np.ndarray:
    """PyTorch's output in eval mode, from a copy so the fixture's network keeps its own mode."""
    with torch.no_grad():
        return copy.deepcopy(net).eval()(*inputs).numpy()


def dims(value_info: onnx.ValueInfoProto) -> list:
    """Each dimension as its symbol (str) when dynamic, else its size (int)."""
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    net = build_generator("resnet_2blocks", ngf=8)
    path = tmp_path_factory.mktemp("resnet") / "model.onnx"
    return net, path, export_image_generator(net, path, METADATA, fp16=True)


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    net = build_generator("unet_5down", ngf=8, norm="batch")
    # Training steps give batch norm real running statistics; the export must use them (eval mode).
    with torch.no_grad():
        for _ in range(3):
            net(image_input(4, 32, 32) * 0.5 + 0.2)
    path = tmp_path_factory.mktemp("unet") / "model.onnx"
    return net, path, export_image_generator(net, path, METADATA)


@pytest.mark.parametrize("fixture", ["resnet", "unet"])
def test_image_export_follows_the_contract(fixture, request):
    net, path, result = request.getfixturevalue(fixture)
    model = onnx.load(str(path))
    (graph_input,) = model.graph.input
    (graph_output,) = model.graph.output
    assert (graph_input.name, graph_output.name) == (IMAGE_INPUT, IMAGE_OUTPUT) == ("image", "translated")
    for value in (graph_input, graph_output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        batch, channels, height, width = dims(value)
        assert channels == 3
        assert all(isinstance(d, str) and d for d in (batch, height, width))
    # Standard ONNX ops only, no exporter-private functions, so every runtime and TensorRT can load it.
    assert not model.functions and all(not node.domain for node in model.graph.node)

    metadata = ModelCard.read(path).to_metadata()
    assert metadata.items() >= METADATA.items()
    assert metadata["multiple"] == str(net.size_multiple)
    assert metadata["normalization"] == "RGB float32 NCHW in [-1, 1]"
    assert (metadata["input"], metadata["output"]) == ("image", "translated")
    assert metadata["precision"] == "float32"

    assert result["path"] == str(path)
    assert result["max_abs_error"] < 1e-4
    assert {case["batch"] for case in result["cases"]} == {1, 3}
    assert any(case["height"] != case["width"] for case in result["cases"])
    sizes = [(case["height"], case["width"]) for case in result["cases"]]
    assert all(h % net.size_multiple == 0 and w % net.size_multiple == 0 for h, w in sizes)


@pytest.mark.parametrize("fixture", ["resnet", "unet"])
def test_onnx_runs_sizes_never_seen_at_export(fixture, request):
    net, path, _ = request.getfixturevalue(fixture)
    x = image_input(*UNSEEN_SIZE[net.size_multiple])
    output = run_onnx(path, {"image": x.numpy()})
    assert output.shape == tuple(x.shape)
    np.testing.assert_allclose(output, eager(net, x), atol=1e-4, rtol=0)


def test_export_leaves_the_callers_network_in_its_mode(unet):
    net, _, _ = unet
    assert net.training


def test_export_writes_no_temporary_files(resnet, unet):
    names = sorted(p.name for p in resnet[1].parent.iterdir())
    assert names == ["model.fp16.onnx", "model.onnx", "model.statistics.onnx", "model.tile.onnx"]
    assert [p.name for p in unet[1].parent.iterdir()] == ["model.onnx"]


def test_failed_export_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the model from the last good export")
    net = build_generator("resnet_2blocks", ngf=8)
    # A tolerance no float32 export meets: the export runs in full and then fails its parity check.
    with pytest.raises(ExportParityError, match=r"max abs error .* at batch \d, \d+x\d+; nothing written"):
        export_image_generator(net, path, METADATA, atol=1e-12)
    assert path.read_bytes() == b"the model from the last good export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_export_refuses_metadata_without_the_contract_keys(tmp_path):
    net = build_generator("resnet_2blocks", ngf=8)
    incomplete = {k: v for k, v in METADATA.items() if k != "params_hash"}
    with pytest.raises(ValueError, match="params_hash"):
        export_image_generator(net, tmp_path / "model.onnx", incomplete)
    with pytest.raises(ValueError, match="multiple"):
        export_image_generator(net, tmp_path / "model.onnx", {**METADATA, "multiple": "8"})
    assert not list(tmp_path.iterdir())


def test_fp16_model_keeps_float32_io_and_stays_close(resnet):
    net, path, result = resnet
    fp16_path = path.with_name("model.fp16.onnx")
    assert result["fp16"]["path"] == str(fp16_path)
    assert result["fp16"]["max_abs_error"] < FP16_ATOL == 5e-2
    model = onnx.load(str(fp16_path))
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [
        onnx.TensorProto.FLOAT
    ] * 2
    weights = [t for t in model.graph.initializer if t.name.endswith("weight")]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert ModelCard.read(fp16_path).to_metadata()["precision"] == "float16"

    x = image_input(*UNSEEN_SIZE[4])
    output = run_onnx(fp16_path, {"image": x.numpy()})
    assert output.dtype == np.float32
    assert np.abs(output - eager(net, x)).max() < FP16_ATOL


def test_fp16_is_only_written_on_request(unet):
    _, path, result = unet
    assert result["fp16"] is None
    assert not path.with_name("model.fp16.onnx").exists()


def test_conditional_generator_export(tmp_path):
    net = ConditionalGenerator(z_dim=16, n_classes=10, image_size=32, ngf=8)
    path = tmp_path / "cdcgan.onnx"
    metadata = {"recipe": "cdcgan", "training_commit": "0123abcd", "params_hash": "feedbeef"}
    spec = recipes.get("cdcgan").exports(recipes.get("cdcgan").Params(z_dim=16))["generator"]
    result = export_sampler(net, path, metadata, spec.kind, spec.inputs, spec.card_attributes)

    model = onnx.load(str(path))
    z, label = model.graph.input
    (image,) = model.graph.output
    assert (z.name, label.name, image.name) == ("z", "label", "image")
    assert z.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert label.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch, z_dim = dims(z)
    assert isinstance(batch, str) and z_dim == 16
    assert dims(label) == [batch]

    assert (
        ModelCard.read(path).to_metadata().items()
        >= {**metadata, "z_dim": "16", "n_classes": "10", "image_size": "32"}.items()
    )
    assert [case["batch"] for case in result["cases"]] == [1, 5]
    assert result["max_abs_error"] < 1e-4

    zs = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([9, 0, 4])
    output = run_onnx(path, {"z": zs.numpy(), "label": labels.numpy()})
    np.testing.assert_allclose(output, eager(net, zs, labels), atol=1e-4, rtol=0)


def test_reading_a_card_names_a_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_bytes(b"\xff\xfe not a protobuf \x00\x01")
    with pytest.raises(UserError, match="notes.onnx"):
        ModelCard.read(path)
    with pytest.raises(UserError, match="missing.onnx"):
        ModelCard.read(tmp_path / "missing.onnx")


# Reference checkpoints


@pytest.fixture(scope="module")
def resnet6_checkpoint(tmp_path_factory):
    """A resnet_6blocks/instance generator as the reference saves it from DataParallel in old PyTorch."""
    net = build_generator("resnet_6blocks", 3, 3, 64, "instance")
    state = {f"module.{key}": value for key, value in net.state_dict().items()}
    # Pre-0.4 PyTorch saved running statistics for instance norm layers too.
    for norm, channels in {"model.2": 64, "model.5": 128, "model.10.conv_block.2": 256}.items():
        state[f"module.{norm}.running_mean"] = torch.zeros(channels)
        state[f"module.{norm}.running_var"] = torch.ones(channels)
        state[f"module.{norm}.num_batches_tracked"] = torch.tensor(0)
    path = tmp_path_factory.mktemp("reference") / "latest_net_G_A.pth"
    torch.save(state, path)
    return net, path


@pytest.mark.slow
def test_import_reference_checkpoint(resnet6_checkpoint, tmp_path):
    net, pth = resnet6_checkpoint
    out = tmp_path / "horse2zebra.onnx"
    result = import_reference_checkpoint(pth, "resnet_6blocks", "instance", False, out)
    assert result["max_abs_error"] < 1e-4
    assert result["fp16"] is None

    x = image_input(1, 40, 24)
    np.testing.assert_allclose(run_onnx(out, {"image": x.numpy()}), eager(net, x), atol=1e-4, rtol=0)

    metadata = ModelCard.read(out).to_metadata()
    assert (
        metadata.items()
        >= {
            "recipe": "reference-import",
            "direction": "AtoB",
            "source_domain": "A",
            "target_domain": "B",
            "training_commit": "unknown",
            "params_hash": "",
            "multiple": "4",
            "source_checkpoint": "latest_net_G_A.pth",
            "source_checkpoint_sha256": hashlib.sha256(pth.read_bytes()).hexdigest(),
        }.items()
    )


def test_import_with_wrong_depth_suggests_the_right_flags(resnet6_checkpoint, tmp_path):
    _, pth = resnet6_checkpoint
    out = tmp_path / "g.onnx"
    with pytest.raises(UserError) as caught:
        import_reference_checkpoint(pth, "resnet_9blocks", "instance", False, out)
    message = str(caught.value)
    assert "latest_net_G_A.pth does not fit --arch resnet_9blocks --norm instance" in message
    assert "missing keys" in message and "model.16.conv_block.1.weight" in message
    assert "This looks like --arch resnet_6blocks --norm instance" in message
    assert "--dropout" not in message.split("This looks like")[1]
    assert "\n" not in message
    assert not out.exists()


def test_import_of_a_damaged_file_says_the_flags_fit(resnet6_checkpoint, tmp_path):
    _, pth = resnet6_checkpoint
    state = torch.load(pth, weights_only=True)
    state["module.model.1.weight"] = state["module.model.1.weight"][:, :, :5, :5]
    damaged = tmp_path / "damaged.pth"
    torch.save(state, damaged)
    with pytest.raises(UserError) as caught:
        import_reference_checkpoint(damaged, "resnet_6blocks", "instance", False, tmp_path / "g.onnx")
    message = str(caught.value)
    assert "shape mismatches (1): model.1.weight (checkpoint (64, 3, 5, 5), network (64, 3, 7, 7))" in message
    assert "as given: the file is damaged" in message


def test_import_with_wrong_norm_suggests_the_right_flags(tmp_path):
    # The weights' values never matter here, so the 41M-parameter file is built on the meta device.
    with torch.device("meta"):
        layout = build_generator("unet_128", 3, 3, 64, "batch").state_dict()
    pth = tmp_path / "latest_net_G.pth"
    torch.save({key: torch.zeros(value.shape, dtype=value.dtype) for key, value in layout.items()}, pth)
    with pytest.raises(UserError) as caught:
        import_reference_checkpoint(pth, "unet_128", "instance", True, tmp_path / "g.onnx")
    message = str(caught.value)
    assert "latest_net_G.pth does not fit --arch unet_128 --norm instance --dropout" in message
    assert "missing keys (13): model.model.0.bias," in message
    assert "unexpected keys (22): model.model.1.model.2.weight," in message
    assert "This looks like --arch unet_128 --norm batch --dropout" in message


def test_import_refuses_files_that_are_not_state_dicts(tmp_path):
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], not_a_dict)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"<html>404 not found</html>")
    pickled_object = tmp_path / "model.pth"
    torch.save({"net": UserError("a pickled object, not a tensor")}, pickled_object)
    for path in (not_a_dict, garbage, pickled_object, tmp_path / "missing.pth"):
        with pytest.raises(UserError, match=path.name):
            import_reference_checkpoint(path, "resnet_9blocks", "instance", False, tmp_path / "g.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.pth", "list.pth", "model.pth"]


def test_import_refuses_an_unknown_architecture(resnet6_checkpoint, tmp_path):
    _, pth = resnet6_checkpoint
    with pytest.raises(UserError, match="resnet_x"):
        import_reference_checkpoint(pth, "resnet_x", "instance", False, tmp_path / "g.onnx")
