"""The model card as a type: cards written before it existed read back into it and write out unchanged, key for
key and in the same order, so models exported earlier still load and new ones read the same."""

from typing import get_args, get_type_hints

import onnx
import pytest
from onnx import TensorProto, helper

from transfigure.pipeline.errors import UserError
from transfigure.pipeline.export import model_card as card
from transfigure.pipeline.export.model_card import Int8Check, ModelCard
from transfigure.pipeline.train.recipes.base import Export

PROVENANCE = {
    "recipe": "cyclegan",
    "direction": "AtoB",
    "source_domain": "digits:A",
    "target_domain": "digits:B",
    "training_commit": "f66c81d81c021045a5e3ea4b6505912a2340f832",
    "params_hash": "52d82711ea1c7e02",
    "training_step": "500",
}
TRANSLATOR = {
    "kind": "image_translation",
    "multiple": "4",
    "normalization": "RGB float32 NCHW in [-1, 1]",
    "input": "image",
    "output": "translated",
    "instance_norm_layers": "11",
}
# Read from the files `dvc repro` wrote for cyclegan with the code before ModelCard (artifacts/cyclegan/AtoB.*).
FLOAT32 = {**PROVENANCE, **TRANSLATOR, "precision": "float32"}
INT8 = {
    **PROVENANCE,
    **TRANSLATOR,
    "precision": "int8",
    "int8_calibration": "32 images of digits:trainA",
    "int8_mean_level_difference": "0.4422",
    "int8_max_level_difference": "7",
    "int8_psnr_db": "49.99",
    "int8_quality": "passed",
}
STATISTICS = {
    **PROVENANCE,
    **TRANSLATOR,
    "kind": "thumbnail_statistics",
    "output": "statistics",
    "statistics_width": "1088",
    "context": "36",
}
TILE = {**STATISTICS, "kind": "statistics_tile", "input": "image,statistics", "output": "translated"}
# As the code before ModelCard wrote them (export/to_onnx.py's dicts, in their order).
SAMPLER = {**PROVENANCE, "recipe": "cdcgan", "direction": "generator", "source_domain": "digits:noise"}
CONDITIONAL = {
    **SAMPLER,
    "kind": "conditional_generation",
    "z_dim": "100",
    "n_classes": "10",
    "image_size": "32",
    "normalization": "RGB float32 NCHW in [-1, 1]",
    "input": "z,label",
    "output": "image",
    "precision": "float32",
}
FLOW = {
    **SAMPLER,
    "recipe": "flowgan",
    "kind": "flow_sampling",
    "latent_shape": "3,32,32",
    "normalization": "RGB float32 NCHW in [-1, 1]",
    "input": "z",
    "output": "image",
    "precision": "float32",
}
LABEL_MAP = {
    **PROVENANCE,
    "recipe": "pix2pix",
    "kind": "label_map",
    "multiple": "256",
    "normalization": "RGB float32 NCHW in [-1, 1]",
    "input": "image",
    "output": "labels",
    "classes": "3",
    "palette": "#000000,#ff0000,#00ff00",
    "precision": "float32",
}
LABELS_IN = {**PROVENANCE, **TRANSLATOR, "instance_norm_layers": "0", "input_type": "label_map", "classes": "3"}
LABELS_IN |= {"palette": "#000000,#ff0000,#00ff00", "precision": "float32"}
REFERENCE = {
    "recipe": "reference-import",
    "direction": "AtoB",
    "source_domain": "A",
    "target_domain": "B",
    "training_commit": "unknown",
    "params_hash": "",
    "source_checkpoint": "latest_net_G.pth",
    "source_checkpoint_sha256": "ab" * 32,
    "source_flags": "--netG resnet_9blocks",
    **TRANSLATOR,
    "precision": "float32",
}
WRITTEN = [FLOAT32, INT8, STATISTICS, TILE, CONDITIONAL, FLOW, LABEL_MAP, LABELS_IN, REFERENCE]


@pytest.mark.parametrize("metadata", WRITTEN, ids=lambda m: f"{m['recipe']}-{m['kind']}-{m.get('precision')}")
def test_a_card_written_before_reads_back_and_writes_the_same_keys_in_the_same_order(metadata):
    assert list(ModelCard.from_metadata(metadata).to_metadata().items()) == list(metadata.items())


def test_the_card_types_what_the_engine_sampler_and_precision_read():
    translator = ModelCard.from_metadata(INT8)
    assert translator.multiple == 4 and translator.inputs == ("image",) and translator.training_step == "500"
    assert translator.int8 == Int8Check("32 images of digits:trainA", "0.4422", "7", "49.99", "passed")
    assert translator.latent_sample_shape is None and not translator.labels_in and not translator.labels_out
    assert ModelCard.from_metadata(TILE).inputs == (card.IMAGE_INPUT, card.STATISTICS)
    assert ModelCard.from_metadata(TILE).context == 36
    assert ModelCard.from_metadata(CONDITIONAL).latent_sample_shape == (100,)
    assert ModelCard.from_metadata(FLOW).latent_sample_shape == (3, 32, 32)
    assert ModelCard.from_metadata(LABEL_MAP).labels_out and ModelCard.from_metadata(LABELS_IN).labels_in
    assert ModelCard.from_metadata(REFERENCE).extra["source_flags"] == "--netG resnet_9blocks"


def test_companions_of_another_export_are_told_apart():
    model = ModelCard.from_metadata(FLOAT32)
    assert model.differing(ModelCard.from_metadata(INT8)) == []
    retrained = ModelCard.from_metadata({**TILE, "params_hash": "retrained", "multiple": "8"})
    assert model.differing(retrained, also=("multiple",)) == ["params_hash", "multiple"]


def test_a_model_from_elsewhere_keeps_what_it_has_and_a_bad_number_is_named():
    assert ModelCard.from_metadata({"multiple": "8"}).to_metadata() == {"multiple": "8"}
    assert ModelCard.from_metadata({}) == ModelCard()
    with pytest.raises(UserError, match="multiple 'eight' is not a whole number"):
        ModelCard.from_metadata({"multiple": "eight"})
    with pytest.raises(UserError, match="latent_shape '3,x,32'"):
        ModelCard.from_metadata({"latent_shape": "3,x,32"})


def test_a_card_round_trips_through_an_onnx_file(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["translated"])],
        "identity",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("translated", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
    )
    model = helper.make_model(graph)
    helper.set_model_props(model, ModelCard.from_metadata(INT8).to_metadata())
    path = tmp_path / "AtoB.int8.onnx"
    path.write_bytes(model.SerializeToString())
    assert ModelCard.read(path) == ModelCard.from_metadata(INT8)
    assert [(prop.key, prop.value) for prop in onnx.load(str(path)).metadata_props] == list(INT8.items())


def test_what_a_recipe_exports_is_named_as_the_card_names_it():
    """train/recipes may not import the card (docs/ARCHITECTURE.md), so `Export` spells its names out; they agree."""
    hints = get_type_hints(Export)
    kinds = {card.IMAGE_TRANSLATION, card.LABEL_MAP, card.CONDITIONAL_GENERATION, card.FLOW_SAMPLING}
    assert set(get_args(hints["kind"])) == kinds
    assert set(get_args(get_args(hints["inputs"])[0])) == {card.IMAGE_INPUT, card.LATENT_INPUT, card.LABEL_INPUT}
