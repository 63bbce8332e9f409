"""PatchNCE (models/patch_nce.py) against known answers and against CUT's definition, computed here patch by patch;
the feature layers and heads; and the `cut` recipe's params."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, tiny, tiny_networks
from torch import nn

from transfigure.models.generators import ResnetBlock, build_generator
from transfigure.models.patch_nce import (
    PatchProjector,
    default_feature_layers,
    encoder_features,
    patch_nce_loss,
    translation_and_features,
)
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.params import load_params
from transfigure.pipeline.train import recipes
from transfigure.pipeline.train.context import Context


def by_definition(query, key, batch_size, temperature, negatives_from_batch):
    """CUT's PatchNCE, one query at a time: the positive is the key at the query's own location, the negatives
    are the keys at every other location of the same image (of the batch, with negatives_from_batch)."""
    n = query.shape[0]
    per_image = n // batch_size
    losses = []
    for i in range(n):
        image = i // per_image
        pool = range(n) if negatives_from_batch else range(image * per_image, (image + 1) * per_image)
        negatives = [j for j in pool if j != i]
        logits = torch.stack([query[i] @ key[i], *[query[i] @ key[j] for j in negatives]]) / temperature
        losses.append(-torch.log_softmax(logits, dim=0)[0])
    return torch.stack(losses)


def unit_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_orthonormal_features_give_the_closed_form_of_one_logit_against_zeros(temperature):
    patches, batch = 6, 2
    features = torch.eye(8, dtype=torch.float64)[:patches].repeat(batch, 1)  # each image's patches orthonormal
    loss = patch_nce_loss(features, features, batch, temperature)
    # softmax of [1/T, 0, ..., 0] (patches - 1 zeros): -log(e^(1/T) / (e^(1/T) + patches - 1))
    expected = math.log1p((patches - 1) * math.exp(-1 / temperature))
    torch.testing.assert_close(loss, torch.full((batch * patches,), expected, dtype=torch.float64))


@pytest.mark.parametrize("negatives_from_batch", [False, True])
def test_random_features_match_the_definition_patch_by_patch(negatives_from_batch):
    query, key = unit_rows(3 * 5, 16, 0), unit_rows(3 * 5, 16, 1)
    loss = patch_nce_loss(query, key, 3, 0.07, negatives_from_batch)
    assert loss.shape == (15,)
    torch.testing.assert_close(loss, by_definition(query, key, 3, 0.07, negatives_from_batch))


def test_a_querys_own_location_never_counts_as_a_negative():
    """The own location is the positive only: its similarity moves the loss exactly as a positive logit would."""
    key = unit_rows(4, 8, 2)
    query = key.clone()
    loss = patch_nce_loss(query, key, 1, 0.1)
    others = torch.stack([torch.stack([query[i] @ key[j] for j in range(4) if j != i]) for i in range(4)]) / 0.1
    expected = torch.logsumexp(torch.cat([torch.full((4, 1), 1 / 0.1, dtype=torch.float64), others], 1), 1) - 1 / 0.1
    torch.testing.assert_close(loss, expected)


def test_negatives_from_the_batch_are_more_negatives():
    query, key = unit_rows(2 * 4, 8, 3), unit_rows(2 * 4, 8, 4)
    per_image, whole_batch = patch_nce_loss(query, key, 2), patch_nce_loss(query, key, 2, negatives_from_batch=True)
    assert torch.all(whole_batch > per_image), "more negatives in the denominator raise every patch's loss"


def test_gradients_reach_the_queries_only():
    query, key = unit_rows(8, 8, 5).requires_grad_(True), unit_rows(8, 8, 6).requires_grad_(True)
    patch_nce_loss(query, key, 2).sum().backward()
    assert key.grad is None, "the keys are detached, as in the reference"
    assert query.grad is not None and query.grad.abs().sum() > 0


def test_the_papers_feature_layers_in_our_resnet_layout():
    generator = build_generator("resnet_9blocks", ngf=8)
    layers = default_feature_layers(generator)
    modules = list(generator.model)
    assert layers == (0, 4, 7, 10, 14)
    assert isinstance(modules[0], nn.ReflectionPad2d)
    assert all(isinstance(modules[i], nn.Conv2d) and modules[i].stride == (2, 2) for i in (4, 7))
    blocks = [i for i, m in enumerate(modules) if isinstance(m, ResnetBlock)]
    assert (blocks.index(10), blocks.index(14)) == (0, 4), "the first and the fifth of nine blocks"


def test_encoder_features_are_the_activations_of_the_full_forward():
    generator = build_generator("resnet_3blocks", ngf=8).eval()
    x = torch.randn(2, 3, 32, 32)
    features = encoder_features(generator, x, (0, 4, 11))
    expected, out = [], x
    for index, layer in enumerate(generator.model):
        out = layer(out)
        if index in (0, 4, 11):
            expected.append(out)
    for got, want in zip(features, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layers", [(0, 4, 11), (1, 2)])  # layer 2: a norm that an in-place ReLU follows
def test_one_forward_gives_the_translation_and_the_encode_only_features(layers):
    generator = build_generator("resnet_3blocks", ngf=8).eval()
    x = torch.randn(2, 3, 32, 32)
    out, features = translation_and_features(generator, x, layers)
    torch.testing.assert_close(out, generator(x))
    for got, want in zip(features, encoder_features(generator, x, layers), strict=True):
        torch.testing.assert_close(got, want)


def test_the_heads_project_the_same_locations_to_unit_vectors():
    torch.manual_seed(0)
    projector = PatchProjector([3, 16], width=32)
    features = [torch.randn(2, 3, 10, 10), torch.randn(2, 16, 4, 4)]
    projected, locations = projector(features, num_patches=20)
    assert [p.shape for p in projected] == [(40, 32), (32, 32)], "capped at a layer's H x W locations"
    assert all(torch.allclose(p.norm(dim=1), torch.ones(len(p))) for p in projected)
    again, reused = projector(features, num_patches=20, locations=locations)
    assert all(torch.equal(a, b) for a, b in zip(reused, locations, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(again, projected, strict=True))


def test_cut_params_refuse_a_unet_and_layers_outside_the_encoder(tmp_path):
    with pytest.raises(UserError, match="ResNet generator"):
        recipes.params_of(load_params(REPO / "params.yaml", ["cut.generator.arch=unet_256"]), "cut")
    with pytest.raises(UserError, match="nce_layers"):  # resnet_3blocks: 13 layers before the decoder
        recipes.params_of(load_params(REPO / "params.yaml", ["cut.nce_layers=[0,13]"]), "cut")
    p = recipes.params_of(load_params(REPO / "params.yaml", ["cut.variant=fastcut"]), "cut")
    assert (p.chosen("lambda_NCE"), p.chosen("nce_idt"), p.chosen("flip_equivariance")) == (10.0, False, True)
    p = recipes.params_of(load_params(REPO / "params.yaml", ["cut.variant=fastcut", "cut.lambda_NCE=2"]), "cut")
    assert p.chosen("lambda_NCE") == 2.0


def test_fastcut_trains_without_the_identity_term_and_cut_with_it(workdir):
    from rich.console import Console

    from transfigure.pipeline.train.loop import train

    quiet = Console(quiet=True)
    for variant, identity in (("fastcut", False), ("cut", True)):
        params = load_params("params.yaml", [*tiny("cut", steps=2, every=2), f"cut.variant={variant}"])
        losses = train("cut", params, quiet, fresh=True)["losses"]
        assert all(math.isfinite(value) for value in losses.values())
        assert (losses["NCE_Y"] > 0) == identity, variant


def one_cut_step(keys_from_forward: bool, overrides: list[str]) -> tuple[dict, dict]:
    """One step from seed 0 on the first batch: the losses, and each parameter's gradient (G's and F's from the
    generator's update, D's from the critic's)."""
    params = load_params("params.yaml", [*tiny_networks("cut"), *overrides])
    p = recipes.params_of(params, "cut")
    torch.manual_seed(0)
    ctx = Context.create(p)
    model = recipes.get("cut")(p, ctx, Path(params.data.root) / p.dataset)
    model.keys_from_forward = keys_from_forward
    batch = ctx.to_device(next(iter(model.batches(params.seed, 0))))
    torch.manual_seed(1)  # the same patch locations in both runs
    losses = model.step(lambda: batch)
    grads = {f"{net}.{name}": w.grad for net in "GFD" for name, w in model.state.nets[net].named_parameters()}
    return losses, grads


@pytest.mark.parametrize(
    "overrides",
    [[], ["cut.variant=fastcut", "cut.flip_equivariance=false"], ["cut.nce_layers=[0,2]"]],
    ids=["cut", "fastcut-unflipped", "layer-before-in-place-relu"],
)
def test_keys_from_the_translations_forward_give_the_separate_passs_loss_and_gradients(workdir, overrides):
    reused, reused_grads = one_cut_step(True, overrides)
    separate, separate_grads = one_cut_step(False, overrides)
    assert reused.keys() == separate.keys()
    for name in reused:
        assert reused[name] == pytest.approx(separate[name], rel=1e-5, abs=1e-7), name
    assert reused_grads.keys() == separate_grads.keys()
    for name, grad in reused_grads.items():
        torch.testing.assert_close(grad, separate_grads[name], msg=name)
