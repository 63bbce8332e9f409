"""bf16 on the CPU through OpenVINO, the optional extra `transfigure[openvino]`. It reads the same .onnx file and
computes in bfloat16 where the CPU has AMX or AVX-512 BF16. A second runtime because ONNX Runtime has no bf16
convolutions on x86 CPUs (docs/BENCHMARKS.md, "CPU precision")."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transfigure.pipeline.errors import UserError


def installed() -> bool:
    from importlib.util import find_spec

    return find_spec("openvino") is not None


class OpenVinoBf16:
    """The model compiled for OpenVINO's CPU plugin with a bf16 precision hint; called like the ORT session's run.

    `computes_in` is what the plugin really chose: f32 on a CPU without bf16 instructions."""

    def __init__(self, model_path: Path, threads: int):
        if not installed():
            raise UserError("--precision bf16 needs OpenVINO: pip install 'transfigure[openvino]'")
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": threads}
        try:
            self.compiled = ov.Core().compile_model(str(model_path), "CPU", config)
        except RuntimeError as exc:
            raise UserError(f"OpenVINO cannot load {Path(model_path).name}: {str(exc).splitlines()[0]}") from exc
        self.computes_in = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.compiled(x)[0]
