"""PatchNCE, the contrastive loss of CUT (Park et al., ECCV 2020; taesungp/contrastive-unpaired-translation).

A patch of the output should be closer to the input's patch at the same location than to the input's other
patches: each query (an output patch's feature) is scored against its positive key (the input patch at its
location) and the negatives (the input's other locations), and the loss is the cross-entropy of picking the
positive, at a temperature. Features come from the generator's own encoder at several layers, through a small
MLP head per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfigure.models.generators import ResnetBlock, ResnetGenerator

# The reference fills a query's own location among the negatives with -10 before the temperature: at the default
# 0.07 that is e^-143, so the location never counts as a negative.
_OWN_LOCATION_LOGIT = -10.0


def patch_nce_loss(
    query: Tensor, key: Tensor, batch_size: int, temperature: float = 0.07, negatives_from_batch: bool = False
) -> Tensor:
    """Per-patch PatchNCE cross-entropy, shape (batch_size * num_patches,).

    `query` and `key` are (batch_size * num_patches, dim), batch-major (image 0's patches first), L2-normalised
    features of the same patch locations in the output (query) and the input (key). Each query's positive is the
    key of its own location; the negatives are the other locations of the same image, or of the whole batch
    when `negatives_from_batch`. The keys are detached, as in the reference: only the query side learns.
    """
    key = key.detach()
    n, dim = query.shape
    positive = (query * key).sum(dim=1, keepdim=True)  # (n, 1)
    groups = 1 if negatives_from_batch else batch_size
    q, k = query.reshape(groups, -1, dim), key.reshape(groups, -1, dim)
    negatives = torch.bmm(q, k.transpose(1, 2))  # (groups, patches, patches)
    own = torch.eye(q.shape[1], dtype=torch.bool, device=query.device)[None]
    negatives = negatives.masked_fill(own, _OWN_LOCATION_LOGIT).reshape(n, -1)
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=query.device), reduction="none")


def default_feature_layers(generator: ResnetGenerator) -> tuple[int, ...]:
    """The paper's layers for the ResNet generator, in our (the CycleGAN reference's) layout: the input (after the
    stem's padding), the two downsampling convolutions, and the first and the middle residual block."""
    kinds = list(generator.model)
    downsampling = [i for i, layer in enumerate(kinds) if isinstance(layer, nn.Conv2d) and layer.stride == (2, 2)]
    blocks = [i for i, layer in enumerate(kinds) if isinstance(layer, ResnetBlock)]
    chosen = [0, *downsampling]
    if blocks:  # of nine blocks, the first and the fifth (the reference's 12 and 16)
        chosen += [blocks[0], blocks[len(blocks) // 2]]
    return tuple(dict.fromkeys(chosen))


def encoder_features(generator: ResnetGenerator, x: Tensor, layers: tuple[int, ...]) -> list[Tensor]:
    """The activations after each of `layers` (indices into generator.model), running only as far as the last."""
    features = []
    for index, layer in enumerate(generator.model):
        x = layer(x)
        if index in layers:
            features.append(x)
        if index >= max(layers):
            break
    return features


def translation_and_features(
    generator: ResnetGenerator, x: Tensor, layers: tuple[int, ...]
) -> tuple[Tensor, list[Tensor]]:
    """The generator's output and, from the same forward, encoder_features(generator, x, layers)."""
    features = encoder_features(generator, x, layers)
    # The decoder gets a copy: its first layer may work in place (ReLU), which the encode-only pass stops before.
    return generator.model[max(layers) + 1 :](features[-1].clone()), features


class PatchProjector(nn.Module):
    """One MLP head per feature layer (two linear layers, `width` wide, L2-normalised outputs) over patches sampled
    at the same locations for every image of a batch; the reference's PatchSampleF."""

    def __init__(self, channels: list[int], width: int = 256):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(c, width), nn.ReLU(inplace=True), nn.Linear(width, width)) for c in channels
        )

    def forward(
        self, features: list[Tensor], num_patches: int, locations: list[Tensor] | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per layer, (batch * patches, width) projections of `num_patches` locations (random unless
        `locations` are given: those of the input for the output), and the locations used."""
        projected, used = [], []
        for i, (feature, head) in enumerate(zip(features, self.heads, strict=True)):
            flat = feature.permute(0, 2, 3, 1).flatten(1, 2)  # (batch, H * W, channels)
            if locations is None:
                where = torch.randperm(flat.shape[1], device=flat.device)[: min(num_patches, flat.shape[1])]
            else:
                where = locations[i]
            projected.append(F.normalize(head(flat[:, where].flatten(0, 1)), dim=1))
            used.append(where)
        return projected, used
