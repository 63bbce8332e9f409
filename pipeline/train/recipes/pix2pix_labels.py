"""pix2pix for label maps: photo -> labels, by cross-entropy alone unless lambda_GAN adds a critic on a
Gumbel-softmax sample (pix2pix.py has the training; params.yaml the defaults that reach the bar).

A preset of the pix2pix recipe with its own params section, trained, evaluated and exported under its own name
(labels/dvc.yaml, outside the default pipeline for its time): the same step, networks and exports, with defaults
for the built-in digits_labels (ink digit -> its label map, K = 11). For labels -> photo, point it at a dataset
whose label maps are in A and set `input: {kind: categorical, classes: K}` and `output: {kind: rgb}`.
"""

from __future__ import annotations

from transfigure.pipeline.schema import NonNegativeFloat
from transfigure.pipeline.train.recipes.base import register
from transfigure.pipeline.train.recipes.pix2pix import OutputParams, Pix2Pix, Pix2PixParams


class Pix2PixLabelsParams(Pix2PixParams):
    dataset: str = "digits_labels"
    output: OutputParams = OutputParams(kind="categorical", classes=11)
    lambda_GAN: NonNegativeFloat = 0.0  # the adversarial term did not help (docs/BENCHMARKS.md, Label maps)


@register
class Pix2PixLabels(Pix2Pix):
    name = "pix2pix_labels"
    Params = Pix2PixLabelsParams
    tiny = (*Pix2Pix.tiny, "lambda_GAN=1")  # its default is cross-entropy alone; tiny runs take the critic's path too
