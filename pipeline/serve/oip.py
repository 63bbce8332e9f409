"""The Open Inference Protocol v2 (KServe, Triton, MLServer): request parsing and response building.

Spec: https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol. A model of this
pipeline has one input `image`, UINT8 [N, H, W, 3] RGB, and one output `translated` of the same type and shape;
label maps are UINT8 [N, H, W] class indices instead (a label-map model's output is then named `labels`).
Tensors come as JSON `data` (flat in row-major order, or nested) or through the binary tensor extension: the
body is the JSON header (`Inference-Header-Content-Length` bytes long) followed by each binary tensor's bytes,
in input order, `binary_data_size` long. Outputs are binary when the output asks for `binary_data` or the
request for `binary_data_output`. The HTTP routes are in `http.py`; this module holds no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from transfigure.pipeline.export import model_card as card

VERSION = "1"
PLATFORM = "onnxruntime_onnx"
DATATYPE = "UINT8"
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]


# The infer request's body for the OpenAPI document (the JSON header; with binary tensors, octet-stream).
INFER_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "inputs": {"type": "array", "items": {"type": "object"}},
                    "outputs": {"type": "array", "items": {"type": "object"}},
                    "parameters": {"type": "object"},
                },
            }
        },
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


class ProtocolError(ValueError):
    """A request that does not follow the protocol or the model's signature (HTTP 400)."""


@dataclass
class InferRequest:
    images: np.ndarray  # (N, H, W, 3) uint8, or (N, H, W) classes
    id: str | None
    binary_output: bool


@dataclass(frozen=True)
class Signature:
    """What the served model takes and gives: RGB images, or label maps of class indices."""

    labels_in: bool = False
    labels_out: bool = False

    @property
    def output_name(self) -> str:
        return card.LABELS_OUTPUT if self.labels_out else card.IMAGE_OUTPUT


def _shape(labels: bool) -> list[int]:
    return [-1, -1, -1] if labels else [-1, -1, -1, 3]


def server_metadata(version: str) -> dict:
    return {"name": "transfigure", "version": version, "extensions": EXTENSIONS}


def model_metadata(name: str, signature: Signature = Signature()) -> dict:
    return {
        "name": name,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": card.IMAGE_INPUT, "datatype": DATATYPE, "shape": _shape(signature.labels_in)}],
        "outputs": [{"name": signature.output_name, "datatype": DATATYPE, "shape": _shape(signature.labels_out)}],
    }


def parse_infer_request(body: bytes, header_length: str | None, signature: Signature = Signature()) -> InferRequest:
    """The images of an infer request; ProtocolError says what is wrong with it."""
    try:
        length = len(body) if header_length is None else int(header_length)
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH} must be a number of bytes, got {header_length!r}") from None
    if not 0 < length <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} is {length}, but the body has {len(body)} bytes")
    try:
        request = json.loads(body[:length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the inference header is not JSON ({exc})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ProtocolError("the request must be a JSON object with a list `inputs`")
    inputs = request["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict) or inputs[0].get("name") != card.IMAGE_INPUT:
        names = [item.get("name") for item in inputs if isinstance(item, dict)]
        raise ProtocolError(f"expected exactly one input named {card.IMAGE_INPUT!r}, got {names}")
    images = _tensor(inputs[0], body[length:], signature.labels_in)
    binary = _binary_output(request, signature.output_name)
    request_id = request.get("id")
    return InferRequest(images, str(request_id) if request_id is not None else None, binary)


def infer_response(
    model_name: str, request_id: str | None, outputs: np.ndarray, binary: bool, signature: Signature = Signature()
) -> tuple[bytes, dict]:
    """The response body and its extra headers, for `outputs` (N, H, W, 3) uint8 (label maps: (N, H, W))."""
    tensor: dict = {"name": signature.output_name, "datatype": DATATYPE, "shape": list(outputs.shape)}
    if binary:
        tensor["parameters"] = {"binary_data_size": outputs.nbytes}
    else:
        tensor["data"] = outputs.reshape(-1).tolist()
    response = {"model_name": model_name, "model_version": VERSION, "outputs": [tensor]}
    if request_id is not None:
        response["id"] = request_id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return header + np.ascontiguousarray(outputs).tobytes(), headers


def _tensor(spec: dict, binary: bytes, labels: bool) -> np.ndarray:
    if spec.get("datatype") != DATATYPE:
        raise ProtocolError(f"input {card.IMAGE_INPUT!r} must be {DATATYPE}, got {spec.get('datatype')!r}")
    shape = spec.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != (3 if labels else 4)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        or (not labels and shape[3] != 3)
    ):
        wanted = "[N, H, W] (a label map's classes)" if labels else "[N, H, W, 3] (RGB)"
        raise ProtocolError(f"input {card.IMAGE_INPUT!r} must have shape {wanted}, got {shape!r}")
    count = int(np.prod(shape))
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count or len(binary) != count:
            raise ProtocolError(
                f"input {card.IMAGE_INPUT!r} of shape {shape} needs {count} bytes; "
                f"binary_data_size is {size} and {len(binary)} bytes follow the header"
            )
        return np.frombuffer(binary, np.uint8).reshape(shape)
    if binary:
        raise ProtocolError(f"{len(binary)} bytes follow the header, but no input has binary_data_size")
    try:
        values = np.asarray(spec.get("data"), dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise ProtocolError(f"input {card.IMAGE_INPUT!r}: `data` must be a list of integers") from None
    if values.size != count:
        raise ProtocolError(f"input {card.IMAGE_INPUT!r} of shape {shape} needs {count} values, got {values.size}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ProtocolError(f"input {card.IMAGE_INPUT!r}: UINT8 values must be in 0..255")
    return values.astype(np.uint8).reshape(shape)


def _binary_output(request: dict, output_name: str) -> bool:
    default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    outputs = request.get("outputs") or []
    if not isinstance(outputs, list):
        raise ProtocolError("`outputs` must be a list")
    binary = default
    for output in outputs:
        if not isinstance(output, dict) or output.get("name") != output_name:
            raise ProtocolError(f"the model has one output, {output_name!r}; asked for {output!r}")
        binary = bool((output.get("parameters") or {}).get("binary_data", default))
    return binary
