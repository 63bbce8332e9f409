"""pix2pix for label maps: photo -> labels with a Gumbel-softmax critic input (pix2pix.py has the training).

A preset of the pix2pix recipe with its own params section, so the default pipeline trains, evaluates and
exports both: the same step, networks and exports, with defaults for the built-in digits_labels (ink digit ->
its label map, K = 11). For labels -> photo, point it at a dataset whose label maps are in A and set
`input: {kind: categorical, classes: K}` and `output: {kind: rgb}`.
"""

from __future__ import annotations

from pipeline.train.recipes.base import register
from pipeline.train.recipes.pix2pix import OutputParams, Pix2Pix, Pix2PixParams


class Pix2PixLabelsParams(Pix2PixParams):
    dataset: str = "digits_labels"
    output: OutputParams = OutputParams(kind="categorical", classes=11)


@register
class Pix2PixLabels(Pix2Pix):
    name = "pix2pix_labels"
    Params = Pix2PixLabelsParams
