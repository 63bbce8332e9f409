"""CUT and FastCUT (Park et al., ECCV 2020): one generator, one critic, and PatchNCE instead of a cycle.

Loss balance and order, the reference's (taesungp/contrastive-unpaired-translation, cut_model.py): fake_B = G(A)
(with `nce_idt`, G runs on A and B together and also gives idt_B = G(B)); then the critic's update, 0.5 x
(real + fake) (parts.critic_loss) on that fake_B; then G's, against the updated and frozen critic: lambda_GAN x
adversarial(D(fake_B)) + lambda_NCE x PatchNCE(A, fake_B), averaged over the feature layers, and with `nce_idt`
the mean of that and PatchNCE(B, idt_B). The features are G's own encoder activations (models/patch_nce.py)
through a small MLP head per layer ("F"), trained with G; the source's (the keys, which PatchNCE detaches) are
those recorded in the forward that gave fake_B, where the reference runs the encoder again for the same
tensors (a pass of their own after a flip or with batch norm). FastCUT also flips half the batches: G sees the
mirrored input and its features are mirrored back before PatchNCE, so G learns to commute with flips. No image
pool, as in the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from transfigure.models.discriminators import build_discriminator
from transfigure.models.generators import build_generator
from transfigure.models.init import init_weights
from transfigure.models.patch_nce import (
    PatchProjector,
    default_feature_layers,
    encoder_features,
    patch_nce_loss,
    translation_and_features,
)
from transfigure.pipeline.data.datasets import UnpairedDataset, first_items
from transfigure.pipeline.evaluate import measures
from transfigure.pipeline.schema import (
    AugmentParams,
    DiscriminatorParams,
    GeneratorParams,
    NonNegativeFloat,
    PositiveInt,
    RecipeParams,
)
from transfigure.pipeline.train.parts import (
    TINY_CRITIC,
    critic_loss,
    eval_mode,
    generator_adversarial,
    set_requires_grad,
)
from transfigure.pipeline.train.recipes.base import Export, Recipe, TrainingState, register

# What each variant means when a knob is left unset (the reference's --CUT_mode).
VARIANTS = {
    "cut": {"lambda_NCE": 1.0, "nce_idt": True, "flip_equivariance": False},
    "fastcut": {"lambda_NCE": 10.0, "nce_idt": False, "flip_equivariance": True},
}


class CUTParams(RecipeParams):
    init_type: Literal["normal", "xavier", "kaiming", "orthogonal"] = "xavier"  # the reference CUT's
    augment: AugmentParams = AugmentParams(flip=True)
    generator: GeneratorParams = GeneratorParams()
    discriminator: DiscriminatorParams = DiscriminatorParams()
    variant: Literal["cut", "fastcut"] = "cut"
    lambda_GAN: NonNegativeFloat = 1.0
    lambda_NCE: NonNegativeFloat | None = None  # unset: the variant's (cut 1, fastcut 10)
    nce_idt: bool | None = None  # unset: the variant's (cut yes, fastcut no)
    flip_equivariance: bool | None = None  # unset: the variant's (cut no, fastcut yes)
    nce_layers: list[int] | None = None  # indices into the generator's layers; unset: the paper's five
    num_patches: PositiveInt = 256
    nce_temperature: Annotated[float, Field(gt=0)] = 0.07
    negatives_from_batch: bool = False
    projection_width: PositiveInt = 256

    @model_validator(mode="after")
    def _resnet_with_known_layers(self) -> CUTParams:
        if not self.generator.arch.startswith("resnet_"):
            raise ValueError("generator.arch: CUT takes its features from a ResNet generator (resnet_Nblocks)")
        # The stem's 4 layers and the downsampling's 6 come before the residual blocks.
        encoder = 10 + int(self.generator.arch.removeprefix("resnet_").removesuffix("blocks"))
        if self.nce_layers is not None and (not self.nce_layers or not all(0 <= i < encoder for i in self.nce_layers)):
            raise ValueError(f"nce_layers: indices of the encoder's layers, 0 to {encoder - 1} for this generator")
        return self

    def chosen(self, knob: str):
        """A variant knob: as set, or the variant's."""
        value = getattr(self, knob)
        return VARIANTS[self.variant][knob] if value is None else value

    def feature_layers(self, generator: nn.Module) -> tuple[int, ...]:
        return tuple(self.nce_layers) if self.nce_layers is not None else default_feature_layers(generator)


class GeneratorAndEncoder(nn.Module):
    """G's translation; with `layers` its encoder's features, and with `encode_only=False` both from one forward
    (the reference's netG(x, layers, encode_only)). One module, so that DDP sees every use of G."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor, layers: tuple[int, ...] | None = None, encode_only: bool = True):
        if layers is None:
            return self.generator(x)
        if encode_only:
            return encoder_features(self.generator, x, layers)
        return translation_and_features(self.generator, x, layers)


@register
class CUT(Recipe):
    name = "cut"
    Params = CUTParams
    losses = ("G", "G_adv", "NCE", "NCE_Y", "D")
    tiny = ("generator.arch=resnet_1blocks", "generator.ngf=4", *TINY_CRITIC, "num_patches=16", "projection_width=8")

    @classmethod
    def build_networks(cls, p: CUTParams) -> dict[str, nn.Module]:
        g, d = p.generator, p.discriminator
        generator = build_generator(g.arch, 3, 3, g.ngf, g.norm, g.dropout, g.upsample)
        # The heads' input widths are the chosen layers' channels, read from one small forward.
        with torch.no_grad(), eval_mode([generator]):
            features = encoder_features(generator, torch.zeros(1, 3, 32, 32), p.feature_layers(generator))
        nets = {
            "G": generator,
            "D": build_discriminator(d.kind, 3, d.ndf, d.n_layers, d.norm, d.spectral_norm),
            "F": PatchProjector([f.shape[1] for f in features], p.projection_width),
        }
        for net in nets.values():
            init_weights(net, p.init_type, p.init_gain)
        return nets

    @classmethod
    def exports(cls, p: CUTParams) -> dict[str, Export]:
        return {"AtoB": Export("G", "image_translation", "A", "B")}

    @classmethod
    def evaluate(cls, generators, p: CUTParams, inputs: measures.EvalInputs) -> dict:
        return measures.translation(generators, inputs)

    def set_up(self, data_dir: Path) -> TrainingState:
        p, ctx = self.p, self.ctx
        dataset = UnpairedDataset(data_dir, "train", p.augment)
        nets = {k: ctx.prepare(v) for k, v in self.build_networks(p).items()}
        self.layers = p.feature_layers(nets["G"])
        # Keys from the translation's forward are the reference's own-pass keys, except under batch norm: its
        # statistics (and running averages) would be A's and B's together, where the reference's are A's.
        self.keys_from_forward = p.generator.norm != "batch"
        self.G, self.D = ctx.forward(GeneratorAndEncoder(nets["G"])), ctx.forward(nets["D"])
        self.F = ctx.forward(nets["F"])
        optimizers = {
            # One Adam over G and the heads: the reference's two, with the same settings, update alike.
            "G": ctx.optimizer([*nets["G"].parameters(), *nets["F"].parameters()]),
            "D": ctx.optimizer(nets["D"].parameters()),
        }
        self.fixed = ctx.to_device(first_items(dataset, min(8, len(dataset.a))))
        return TrainingState(dataset, nets, optimizers, example_inputs={"G": {"image": self.fixed["A"][:2]}})

    def step(self, next_batch) -> dict[str, float]:
        p, ctx, obj = self.p, self.ctx, self.ctx.objective
        batch = next_batch()
        real_A, real_B = batch["A"], batch["B"]
        identity = p.chosen("nce_idt")
        flipped = bool(p.chosen("flip_equivariance") and torch.rand(()) < 0.5)

        sources = torch.cat([real_A, real_B]) if identity else real_A
        with ctx.autocast():
            if self.keys_from_forward and not flipped:
                out, source_features = self.G(sources, self.layers, encode_only=False)
            else:  # the keys are the unflipped source's: a pass of their own
                out, source_features = self.G(sources.flip(3) if flipped else sources), None
        fake_B, idt_B = out[: len(real_A)], out[len(real_A) :]

        # The reference's order: the critic first, on this forward's fakes, then G against the updated critic.
        d_losses = [self._critic_step(real_B, fake_B.detach())]
        for _ in range(ctx.n_critic - 1):
            extra = next_batch()
            with torch.no_grad(), ctx.autocast():
                fresh = self.G(extra["A"])
            d_losses.append(self._critic_step(extra["B"], fresh))

        set_requires_grad([self.state.nets["D"]], False)
        with ctx.autocast():
            adv = p.lambda_GAN * generator_adversarial(obj, self.D(fake_B))
            sides = [(real_A, fake_B, slice(None, len(real_A)))]
            if identity:
                sides.append((real_B, idt_B, slice(len(real_A), None)))
            pairs = []
            for source, translated, rows in sides:
                features = None if source_features is None else [feature[rows] for feature in source_features]
                pairs.append(self._projections(source, translated, flipped, features))
        # PatchNCE in fp32: dot products over 256-wide features at a temperature of 0.07 need the precision.
        nce_terms = [self._patch_nce(queries, keys, len(real_A)) for queries, keys in pairs]
        nce = nce_terms[0]
        nce_y = nce_terms[1] if identity else torch.zeros((), device=ctx.device)
        g_loss = adv + (0.5 * (nce + nce_y) if identity else nce)
        ctx.update(g_loss, self.state.optimizers["G"])
        set_requires_grad([self.state.nets["D"]], True)

        values = torch.stack([g_loss, adv, nce, nce_y, torch.stack(d_losses).mean()]).tolist()
        return dict(zip(self.losses, values, strict=True))

    def _projections(self, source, translated, flipped: bool, source_features: list | None) -> tuple[list, list]:
        """The heads' outputs for the translation's patches (queries) and the source's (keys), same locations.
        The keys' features are `source_features` when given (the patch_nce_loss detaches them either way)."""
        queries = self.G(translated, self.layers)
        if flipped:  # back to the source's orientation, so locations correspond
            queries = [feature.flip(3) for feature in queries]
        if source_features is None:
            source_features = self.G(source, self.layers)
        keys, locations = self.F(source_features, self.p.num_patches)
        queries, _ = self.F(queries, self.p.num_patches, locations)
        return queries, keys

    def _patch_nce(self, queries: list, keys: list, batch_size: int) -> torch.Tensor:
        p = self.p
        per_layer = [
            patch_nce_loss(q.float(), k.float(), batch_size, p.nce_temperature, p.negatives_from_batch).mean()
            for q, k in zip(queries, keys, strict=True)
        ]
        return p.chosen("lambda_NCE") * torch.stack(per_layer).mean()

    def _critic_step(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        with ctx.autocast():
            loss = critic_loss(ctx.objective, self.D, real, fake)
        ctx.update_critics(loss, self.state.optimizers["D"], self.state.nets["D"])
        return loss.detach()

    @torch.no_grad()
    def sample_columns(self) -> dict[str, torch.Tensor]:
        """real A | fake B, then real B | G(B) (what the identity PatchNCE keeps close to B)."""
        with self.ctx.autocast():
            return {
                "real A": self.fixed["A"],
                "fake B": self.G(self.fixed["A"]),
                "real B": self.fixed["B"],
                "G(B)": self.G(self.fixed["B"]),
            }
