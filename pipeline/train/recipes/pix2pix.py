"""pix2pix (Isola et al. 2017): a conditional GAN on aligned pairs, critic on concat(A, B), plus L1 to the truth.

Loss balance and order, the reference's (pix2pix_model.py): fake_B = G(A); the critic first, 0.5 x (real + fake)
on (A, B) and (A, fake_B) (parts.critic_loss); then G against the updated critic: adversarial(D(A, fake_B)) +
lambda_L1 |fake_B - B|. Its objective defaults to the reference's non-saturating cross-entropy (nsgan).

Label maps (models/categorical.py). With `output.kind: categorical`, G gives K logits per pixel: G minimises
lambda_GAN x adversarial + lambda_CE x the cross-entropy against the true classes, and the critic sees (A, one-hot
map) pairs, real = the one-hot truth, fake = a Gumbel-softmax sample of G's logits (straight-through with `hard`)
at a temperature annealed exponentially from `temperature.start` to `temperature.end`. With `input.kind:
categorical`, A is a label map fed to G (and to the critic) as K one-hot channels. Which side holds label maps is
the dataset's `labels`; these settings must agree with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from transfigure.models.categorical import OneHotInput, annealed_temperature, one_hot_map, relaxed_one_hot
from transfigure.models.discriminators import build_discriminator
from transfigure.models.generators import build_generator
from transfigure.models.init import init_weights
from transfigure.pipeline.data.datasets import PairedDataset, first_items, label_side
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.evaluate import measures
from transfigure.pipeline.pixels import label_maps_in_model_range
from transfigure.pipeline.schema import (
    OBJECTIVES,
    DiscriminatorParams,
    GeneratorParams,
    NonNegativeFloat,
    RecipeParams,
    Strict,
)
from transfigure.pipeline.train.parts import TINY_CRITIC, critic_loss, generator_adversarial, set_requires_grad
from transfigure.pipeline.train.recipes.base import Export, Recipe, TrainingState, register

Classes = Annotated[int, Field(ge=2, le=256)]


class TemperatureParams(Strict):
    start: Annotated[float, Field(gt=0)] = 1.0
    end: Annotated[float, Field(gt=0)] = 0.5  # Jang et al.'s floor


class InputParams(Strict):
    """An RGB image, or (categorical) a label map of `classes` classes, one-hot encoded for the networks."""

    kind: Literal["rgb", "categorical"] = "rgb"
    classes: Classes | None = None

    @model_validator(mode="after")
    def _classes_when_categorical(self) -> InputParams:
        if (self.kind == "categorical") != (self.classes is not None):
            raise ValueError("classes: set it with kind categorical, and only then")
        return self


class OutputParams(InputParams):
    """An RGB image, or (categorical) K logits per pixel: a label map of `classes` classes."""

    temperature: TemperatureParams = TemperatureParams()
    hard: bool = True  # straight-through: the critic sees exact one-hot maps, as it does the truth
    relaxation: Literal["gumbel", "softmax"] = "gumbel"  # softmax: no noise, the ablation of the Gumbel sample


class Pix2PixParams(RecipeParams):
    dataset: str = "digits_paired"
    objective: Literal[OBJECTIVES] = "nsgan"  # the reference's "vanilla"
    generator: GeneratorParams = GeneratorParams(arch="unet_256", norm="batch", dropout=True)
    discriminator: DiscriminatorParams = DiscriminatorParams(norm="batch")
    lambda_L1: NonNegativeFloat = 100.0
    lambda_CE: NonNegativeFloat = 1.0  # the cross-entropy's weight, for a categorical output
    lambda_GAN: NonNegativeFloat = 1.0
    output: OutputParams = OutputParams()
    input: InputParams = InputParams()


@register
class Pix2Pix(Recipe):
    name = "pix2pix"
    Params = Pix2PixParams
    layout = "aligned"
    losses = ("G", "G_adv", "L1", "CE", "D")
    tiny = ("generator.arch=unet_5down", "generator.ngf=4", *TINY_CRITIC)

    @classmethod
    def build_networks(cls, p: Pix2PixParams) -> dict[str, nn.Module]:
        g, d = p.generator, p.discriminator
        labels_out = p.output.kind == "categorical"
        in_channels = p.input.classes if p.input.kind == "categorical" else 3
        out_channels = p.output.classes if labels_out else 3
        generator = build_generator(
            g.arch, in_channels, out_channels, g.ngf, g.norm, g.dropout, g.upsample, tanh=not labels_out
        )
        nets = {
            "G": OneHotInput(generator, p.input.classes) if p.input.kind == "categorical" else generator,
            # The critic sees the condition and the output side by side.
            "D": build_discriminator(d.kind, in_channels + out_channels, d.ndf, d.n_layers, d.norm, d.spectral_norm),
        }
        for net in nets.values():
            init_weights(net, p.init_type, p.init_gain)
        return nets

    @classmethod
    def exports(cls, p: Pix2PixParams) -> dict[str, Export]:
        return {"AtoB": Export("G", "label_map" if p.output.kind == "categorical" else "image_translation", "A", "B")}

    @classmethod
    def evaluate(cls, generators, p: Pix2PixParams, inputs: measures.EvalInputs) -> dict:
        if p.output.kind == "categorical":
            return measures.label_maps(generators["AtoB"], inputs)
        return measures.translation(generators, inputs)

    def set_up(self, data_dir: Path) -> TrainingState:
        p, ctx = self.p, self.ctx
        dataset = PairedDataset(data_dir, "train", p.augment)
        self.palette = self._check_label_side(label_side(dataset.manifest))
        nets = {k: ctx.prepare(v) for k, v in self.build_networks(p).items()}
        self.G, self.D = ctx.forward(nets["G"]), ctx.forward(nets["D"])
        optimizers = {"G": ctx.optimizer(nets["G"].parameters()), "D": ctx.optimizer(nets["D"].parameters())}
        self.fixed = ctx.to_device(first_items(dataset, min(8, len(dataset))))
        return TrainingState(dataset, nets, optimizers, example_inputs={"G": {"image": self.fixed["A"][:2]}})

    def _check_label_side(self, labels: dict | None) -> list | None:
        """The dataset's label-map side must be where params say: B for a categorical output, A for a categorical
        input, with the same number of classes; returns its palette (None without label maps)."""
        p, section = self.p, self.name
        wanted = {"A": p.input, "B": p.output}
        for domain, side in wanted.items():
            field = "input" if domain == "A" else "output"
            has_maps = labels is not None and labels["domain"] == domain
            if has_maps and (side.kind, side.classes) != ("categorical", labels["classes"]):
                raise UserError(
                    f"{section}.{field}: {p.dataset} has label maps of {labels['classes']} classes in {domain}; "
                    f"set {section}.{field}: {{kind: categorical, classes: {labels['classes']}}}"
                )
            if side.kind == "categorical" and not has_maps:
                raise UserError(
                    f"{section}.{field}.kind: categorical needs label maps in {domain}, and {p.dataset} has "
                    + (f"them in {labels['domain']}" if labels else "none (data.datasets.<name>.labels)")
                )
        return labels["palette"] if labels else None

    def step(self, next_batch) -> dict[str, float]:
        p, ctx, obj = self.p, self.ctx, self.ctx.objective
        batch = next_batch()
        real_A, real_B = batch["A"], batch["B"]
        with ctx.autocast():
            output = self.G(real_A)
        fake_B = self._as_critic_sees(output)
        condition, real_B_seen = self._condition(real_A), self._target(real_B)

        zero = torch.zeros((), device=ctx.device)
        # At lambda_GAN 0 the critic is left alone: training it, and G's pass through it, would only cost time.
        adversarial = p.lambda_GAN > 0
        d_losses = [self._critic_step(condition, real_B_seen, fake_B.detach())] if adversarial else [zero]
        for _ in range(ctx.n_critic - 1 if adversarial else 0):
            extra = next_batch()
            with torch.no_grad(), ctx.autocast():
                fresh = self._as_critic_sees(self.G(extra["A"]))
            d_losses.append(self._critic_step(self._condition(extra["A"]), self._target(extra["B"]), fresh))

        set_requires_grad([self.state.nets["D"]], False)
        with ctx.autocast():
            adv = zero
            if adversarial:
                adv = p.lambda_GAN * generator_adversarial(obj, self.D(torch.cat([condition, fake_B], 1)))
            if p.output.kind == "categorical":
                l1, ce = zero, F.cross_entropy(output.float(), real_B) * p.lambda_CE
            else:
                l1, ce = F.l1_loss(fake_B, real_B) * p.lambda_L1, zero
            g_loss = adv + l1 + ce
        ctx.update(g_loss, self.state.optimizers["G"])
        set_requires_grad([self.state.nets["D"]], True)
        values = torch.stack([g_loss, adv, l1, ce, torch.stack(d_losses).mean()]).tolist()
        return dict(zip(self.losses, values, strict=True))

    def temperature(self) -> float:
        """The Gumbel-softmax temperature at the current step: output.temperature.start at step 1, end at the last."""
        t = self.p.output.temperature
        return annealed_temperature((self.ctx.step - 1) / max(1, self.p.steps - 1), t.start, t.end)

    def _as_critic_sees(self, output: torch.Tensor) -> torch.Tensor:
        """G's image, or for label maps a relaxed one-hot sample of its logits."""
        out = self.p.output
        if out.kind != "categorical":
            return output
        return relaxed_one_hot(output, self.temperature(), out.hard, noise=out.relaxation == "gumbel")

    def _condition(self, real_A: torch.Tensor) -> torch.Tensor:
        return one_hot_map(real_A, self.p.input.classes) if self.p.input.kind == "categorical" else real_A

    def _target(self, real_B: torch.Tensor) -> torch.Tensor:
        return one_hot_map(real_B, self.p.output.classes) if self.p.output.kind == "categorical" else real_B

    def _critic_step(self, condition, real_B, fake_B) -> torch.Tensor:
        ctx = self.ctx
        with ctx.autocast():
            # The critic sees (A, B) pairs; the penalty's critic has the same condition as the scores it regularises.
            loss = critic_loss(ctx.objective, lambda x: self.D(torch.cat([condition, x], 1)), real_B, fake_B)
        ctx.update_critics(loss, self.state.optimizers["D"], self.state.nets["D"])
        return loss.detach()

    @torch.no_grad()
    def sample_columns(self) -> dict[str, torch.Tensor]:
        """real A | fake B | real B (the true pair); label maps in their palette's colours."""
        with self.ctx.autocast():
            fake_B = self.G(self.fixed["A"])
        if self.p.output.kind == "categorical":
            fake_B = fake_B.argmax(1)
        columns = {"real A": self.fixed["A"], "fake B": fake_B, "real B": self.fixed["B"]}
        return {name: self._visible(images) for name, images in columns.items()}

    def _visible(self, images: torch.Tensor) -> torch.Tensor:
        """Images as they are; (N, H, W) label maps as palette colours in the model range."""
        return images.float() if images.dim() == 4 else label_maps_in_model_range(images, self.palette)
