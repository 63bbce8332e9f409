"""The one exception type for a user's mistake: the CLI prints its message on one line, without a traceback."""


class UserError(Exception):
    """Bad params, a missing file or folder, an impossible request: something the user can fix."""


class TrainingDiverged(UserError):
    """A loss became NaN or infinite; the last good checkpoint is kept (the CLI exits 1, not 2)."""


class InferenceError(RuntimeError):
    """ONNX Runtime refused a batch (e.g. an image too small for the network's padding); other batches go on."""
