"""`doctor`: what this machine can run: versions, devices and the ONNX Runtime providers that really load."""

from __future__ import annotations

import platform
import re
from importlib import metadata

from transfigure.pipeline import threads
from transfigure.pipeline.serve import openvino_bf16, precision

# ONNX Runtime's own error texts carry terminal colour codes; a report that is piped or pasted must not.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _onnxruntime() -> str:
    """Its version and which build: `onnxruntime` and `onnxruntime-gpu` install the same module."""
    for distribution in ("onnxruntime-gpu", "onnxruntime"):
        version = _version(distribution)
        if version != "not installed":
            return f"{version} ({distribution})"
    return "not installed"


def provider_status() -> dict[str, str]:
    """Each available provider, tried by creating a session on a one-node model: 'ok' or why it failed."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    data = model.SerializeToString()
    onnx.checker.check_model(model)
    status = {}
    for provider in ort.get_available_providers():
        try:
            session = ort.InferenceSession(data, providers=[provider])
            loaded = session.get_providers()[0]
            status[provider] = "ok" if loaded == provider else f"fell back to {loaded}"
        except Exception as exc:  # the provider's own error says why (missing CUDA/TensorRT libraries)
            status[provider] = f"fails: {_ANSI.sub('', str(exc)).splitlines()[0][:200]}"
    return status


def report(console) -> None:
    import torch

    console.print(f"python {platform.python_version()} on {platform.platform()}")
    for package in ("transfigure", "torch", "torchvision", "onnx", "mlflow", "dvc", "ray"):
        console.print(f"{package}: {_version(package)}")
    console.print(f"onnxruntime: {_onnxruntime()}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            console.print(
                f"cuda:{index}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
            )
    else:
        console.print(f"cuda: not available (torch built for CUDA {torch.version.cuda}); training runs on the CPU")
    for line in threads.describe():
        console.print(line)
    console.print(f"torch intra-op threads now: {torch.get_num_threads()}")
    backends = {name: getattr(torch.distributed, f"is_{name}_available")() for name in ("gloo", "nccl")}
    console.print("torchrun backends: " + ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in backends.items()))
    for provider, status in provider_status().items():
        console.print(f"onnxruntime {provider}: {status}")
    console.print(precision.machine_summary(precision.cpu_flags(), openvino_bf16.installed()))
