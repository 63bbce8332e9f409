"""Translating an image larger than the tile size, one tile at a time, so memory follows the tile, not the image.

Two ways, chosen by the model (docs/TILING.md says why):
- `StatisticsTiles`, for instance-norm translators exported with their statistics and tile graphs
  (models/thumbnail_norm.py): the statistics of every instance-norm layer come once from a thumbnail of the
  whole image, and each tile is run with `context` pixels of the image around it (the network's receptive
  field) and cropped back, so it equals that region of the whole image's output up to the thumbnail's
  approximation; with the thumbnail at full size, up to float rounding. Tiles do not blend; none is needed.
- `ramped_tiles`, for every other model (batch norm's statistics are fixed, so tiles agree already): tiles
  overlap by an eighth and cross-fade over linear ramps, which hides the borders where a tile lacks context.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from transfigure.pipeline.export import model_card as card
from transfigure.pipeline.pixels import pad_to_multiple, to_model_range, to_pixels

# (N, H, W, 3) uint8 -> (N, H, W, 3) float32 in [-1, 1]: the engine's padded forward, through some session.
Forward = Callable[[np.ndarray], np.ndarray]
# (session, feed, what it computes) -> its first output: the engine's run, which keeps the deadline and words errors.
RunSession = Callable[[object, dict, str], np.ndarray]


def tile_side(tile: int, multiple: int) -> int:
    return max(multiple, tile // multiple * multiple)


def ramped_tiles(image: np.ndarray, tile: int, multiple: int, batch_size: int, forward: Forward) -> np.ndarray:
    """Overlapping tiles of `tile` (rounded down to the multiple), blended: uint8 (H, W, 3). The blend is summed in
    float32 over one row of tiles at a time, so memory follows the tile's height, not the image's."""
    height, width = image.shape[:2]
    size = tile_side(tile, multiple)
    overlap = max(1, size // 8)
    tile_h, tile_w = min(size, height), min(size, width)
    window = np.outer(_ramp(tile_h, overlap), _ramp(tile_w, overlap))[:, :, None]
    rows, columns = _starts(height, tile_h, overlap), _starts(width, tile_w, overlap)
    output = np.empty((height, width, 3), np.uint8)
    # The rows from the current row of tiles down to its bottom; the next row starts inside it (the overlap).
    total = np.zeros((tile_h, width, 3), np.float32)
    weight = np.zeros((tile_h, width, 1), np.float32)
    for index, y in enumerate(rows):
        for first in range(0, len(columns), batch_size):
            chunk = columns[first : first + batch_size]
            outputs = forward(np.stack([image[y : y + tile_h, x : x + tile_w] for x in chunk]))
            for x, result in zip(chunk, outputs, strict=True):
                total[:, x : x + tile_w] += result * window
                weight[:, x : x + tile_w] += window
        done = rows[index + 1] - y if index + 1 < len(rows) else tile_h  # no later tile reaches these rows
        output[y : y + done] = to_pixels(total[:done] / weight[:done])
        total[: tile_h - done], weight[: tile_h - done] = total[done:], weight[done:]
        total[tile_h - done :], weight[tile_h - done :] = 0, 0
    return output


class StatisticsTiles:
    """The statistics and tile graphs beside an instance-norm model, checked to come from the same export."""

    def __init__(self, statistics_session, tile_session, context: int):
        self.statistics_session, self.tile_session, self.context = statistics_session, tile_session, context

    @classmethod
    def beside(
        cls, model_path: Path, card_of_model: card.ModelCard, open_session
    ) -> tuple[StatisticsTiles | None, str]:
        """The companions of `model_path`, or None and why not; `open_session(path)` gives an ORT session."""
        paths = [card.companion_path(model_path, card.STATISTICS), card.companion_path(model_path, card.TILE)]
        if not all(path.is_file() for path in paths):
            return None, f"no {paths[0].name} and {paths[1].name} beside the model (export it again)"
        sessions = [open_session(path) for path in paths]
        cards = [card.ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map) for session in sessions]
        expected = (card.THUMBNAIL_STATISTICS, card.STATISTICS_TILE)
        for path, companion, kind in zip(paths, cards, expected, strict=True):
            stale = card_of_model.differing(companion, also=("multiple",))
            if companion.kind != kind or stale or companion.context is None:
                return None, f"{path.name} does not belong to this model ({', '.join(stale) or 'kind'} differ)"
        return cls(*sessions, cards[1].context), "thumbnail statistics"

    def probe_statistics(self, side: int) -> np.ndarray:
        """The statistics of a grey side x side image (side a multiple of the model's): what memory.py measures."""
        return self.statistics_session.run(None, {card.IMAGE_INPUT: np.zeros((1, 3, side, side), np.float32)})[0]

    def probe_tile(self, side: int, statistics: np.ndarray) -> None:
        """A grey side x side tile through the tile graph with given statistics: what memory.py measures."""
        feed = {card.IMAGE_INPUT: np.zeros((1, 3, side, side), np.float32), card.STATISTICS: statistics}
        self.tile_session.run(None, feed)

    def statistics(
        self, image: np.ndarray, thumbnail: int, multiple: int, smallest: int, run_session: RunSession
    ) -> np.ndarray:
        """(1, width) statistics of the image's thumbnail (the image itself when it fits in `thumbnail`)."""
        small = thumbnail_of(image, thumbnail, multiple, smallest)
        x = np.ascontiguousarray(to_model_range(small.transpose(2, 0, 1)[None]))
        return run_session(self.statistics_session, {card.IMAGE_INPUT: x}, "a thumbnail's statistics")

    def translate(
        self,
        image: np.ndarray,
        tile: int,
        multiple: int,
        batch_size: int,
        thumbnail: int,
        smallest: int,
        padded_forward,
        run_session: RunSession,
    ) -> np.ndarray:
        """uint8 (H, W, 3), tile by tile: each core tile of `tile` px runs with up to `context` px of
        the image around it (origins stay multiples of the model's multiple, so strides line up with the whole
        image's) and only its core is kept. `padded_forward(batch, run)` is the engine's pad-run-crop,
        `run_session(session, feed, what)` its guarded run of one session (deadline, errors)."""
        height, width = image.shape[:2]
        size, context = tile_side(tile, multiple), self.context
        statistics = self.statistics(image, thumbnail, multiple, smallest, run_session)
        output = np.empty((height, width, 3), np.uint8)
        by_shape: dict[tuple[int, int], list[tuple[int, int, int, int]]] = defaultdict(list)
        for y in range(0, height, size):
            for x in range(0, width, size):
                top, left = max(0, y - context), max(0, x - context)
                bottom, right = min(height, y + size + context), min(width, x + size + context)
                by_shape[(bottom - top, right - left)].append((y, x, top, left))

        def run(batch: np.ndarray) -> np.ndarray:
            feed = {card.IMAGE_INPUT: batch, card.STATISTICS: np.repeat(statistics, len(batch), axis=0)}
            return run_session(self.tile_session, feed, f"{len(batch)} tiles")

        for (crop_h, crop_w), boxes in by_shape.items():
            for first in range(0, len(boxes), batch_size):
                chunk = boxes[first : first + batch_size]
                crops = np.stack([image[top : top + crop_h, left : left + crop_w] for _, _, top, left in chunk])
                for (y, x, top, left), result in zip(chunk, padded_forward(crops, run), strict=True):
                    core_h, core_w = min(size, height - y), min(size, width - x)
                    core = result[y - top : y - top + core_h, x - left : x - left + core_w]
                    output[y : y + core_h, x : x + core_w] = to_pixels(core)
        return output


def thumbnail_of(image: np.ndarray, longest: int, multiple: int, smallest: int = 1) -> np.ndarray:
    """The image scaled so its longer side is at most `longest`, each side a multiple of `multiple` and at least
    `smallest` (the network's minimum; a long thin image keeps that much of its short side), area-averaged
    (Pillow's BOX: every pixel counts once in the statistics). An image that fits is the image itself,
    reflect-padded to the multiple as the engine pads a whole image, so its statistics are exactly the whole's."""
    from PIL import Image

    height, width = image.shape[:2]
    if max(height, width) <= longest:
        return pad_to_multiple(image, multiple)
    scale = longest / max(height, width)
    least = multiple * -(-max(smallest, multiple) // multiple)
    size = [max(least, round(side * scale / multiple) * multiple) for side in (width, height)]
    return np.asarray(Image.fromarray(image).resize(tuple(size), Image.Resampling.BOX))


def _ramp(length: int, overlap: int) -> np.ndarray:
    """1 in the middle, falling linearly to 0.5/overlap at both ends: never 0, so every pixel has weight."""
    rise = np.minimum(1.0, (np.arange(length, dtype=np.float32) + 0.5) / overlap)
    return np.minimum(rise, rise[::-1])


def _starts(length: int, size: int, overlap: int) -> list[int]:
    """Tile origins covering [0, length) with tiles of `size` overlapping by at least `overlap`."""
    if length <= size:
        return [0]
    return [*range(0, length - size, size - overlap), length - size]
