"""Engines for frozen network passes: the same function, computed by the fastest library at hand.

Most of a cold run is frozen forward passes (features, tune-top's bottom
activations, prediction), and eager PyTorch runs them far below what a CPU can
do: EfficientNet-Lite0 pooled features at batch 16 on 2 threads measured 64 img/s
fp32 / 157 bf16 with torch and 252 / 544 with OpenVINO on one AVX512-BF16 CPU
(bench/results/speed.json has this machine's figures). So every frozen pass goes
through :func:`compile_frozen`, which hands the module to one of:

- ``torch``: any device; the only engine for training, CUDA and MPS;
- ``openvino``: the CPU (x86 and ARM), traced from the torch module once per run;
- ``onnxruntime``: the CPU, through an in-memory ONNX graph (fp32 only).

``auto`` picks OpenVINO on a CPU where it loads, else torch. The engine and the
precision are part of the feature-cache key (features of two engines differ in
their last bits, and more in bf16) and are stored with the model, so prediction
computes features the way training did.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import itertools
import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import SettingError, literal
from .files import atomic_write_bytes
from .remote import default_cache_dir
from .runtime import compile_openvino, import_openvino, openvino_core

log = logging.getLogger("florist")

#: The values of ``--engine``.
ENGINES = ("auto", "openvino", "onnxruntime", "torch")
#: Engines that run on the CPU only.
CPU_ENGINES = ("openvino", "onnxruntime")
#: ONNX opset of traced graphs (the engine's and ``florist export``'s).
OPSET = 17


@functools.cache
def engine_problem(name: str) -> str | None:
    """Why engine ``name`` cannot run on this machine, or None when it can (checked once per process)."""
    if name == "torch":
        return None
    try:
        if name == "openvino":
            if "CPU" not in openvino_core().available_devices:
                return "OpenVINO sees no CPU device"
        elif name == "onnxruntime":
            import onnxruntime  # noqa: F401
        else:
            return f"unknown engine {name!r}"
    except Exception as e:  # a missing package, or a native library that fails to load
        return f"{name} does not load ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return None


def resolve_engine(name: str, device: torch.device) -> str:
    """The engine a run uses for ``--engine name`` on ``device``.

    ``auto`` is OpenVINO on a CPU when it loads (else torch, with one warning if it is
    installed but broken) and torch on an accelerator.

    Raises:
        SettingError: an unknown engine, a CPU engine with an accelerator, or one that does not load.
    """
    if name not in ENGINES:
        raise SettingError(f"{{engine}} must be one of {', '.join(ENGINES)}, got {literal(name)}")
    if name == "auto":
        if device.type != "cpu":
            return "torch"
        problem = engine_problem("openvino")
        if problem and "No module named" not in problem:
            log.warning("%s; computing with torch instead", problem)
        return "torch" if problem else "openvino"
    if name in CPU_ENGINES and device.type != "cpu":
        raise SettingError(f"{{engine}} {literal(name)} runs on the CPU only; use {{engine:torch}} on {device.type}")
    problem = engine_problem(name)
    if problem:
        raise SettingError(f"{{engine}} {literal(name)} cannot run here: {problem}")
    return name


def usable_engine(name: str) -> str:
    """``name`` if it runs here, else torch with one warning: for models trained on another machine."""
    problem = engine_problem(name)
    if problem is None:
        return name
    log.warning("this model's features were computed with %s, which cannot run here (%s); using torch", name, problem)
    return "torch"


def supports_bf16(engine: str) -> bool:
    """Whether ``engine`` can compute in bfloat16 (ONNX Runtime's CPU provider cannot)."""
    return engine != "onnxruntime"


class FrozenNet:
    """A frozen module compiled for one engine: CPU or device tensors in, float32 numpy out.

    Attributes:
        engine: which engine runs it.
        device: where inputs should be before the call (the CPU for OpenVINO and ONNX Runtime).
    """

    engine: str
    device: torch.device

    def __call__(self, *inputs: torch.Tensor) -> np.ndarray:
        raise NotImplementedError


class _TorchNet(FrozenNet):
    engine = "torch"

    def __init__(self, module: nn.Module, bf16: bool, device: torch.device):
        self.module, self.bf16, self.device = module, bf16, device

    @torch.inference_mode()
    def __call__(self, *inputs: torch.Tensor) -> np.ndarray:
        xs = [x.to(self.device).contiguous(memory_format=torch.channels_last) for x in inputs]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.module(*xs).float().cpu().numpy()


class _OpenVINONet(FrozenNet):
    """OpenVINO's CPU plugin, on torch's thread budget."""

    engine = "openvino"
    device = torch.device("cpu")

    def __init__(self, module: nn.Module, example: Sequence[torch.Tensor], bf16: bool):
        self.run = compile_openvino(openvino_model(module, example), bf16, torch.get_num_threads())

    def __call__(self, *inputs: torch.Tensor) -> np.ndarray:
        return self.run([x.detach().cpu().numpy() for x in inputs])


#: Largest relative difference between torch and a cached OpenVINO model on the example input.
CACHED_IR_TOLERANCE = 1e-3


def openvino_model(module: nn.Module, example: Sequence[torch.Tensor]) -> Any:
    """``module`` as an ``openvino.Model`` with a dynamic batch axis, converted once per machine.

    Tracing EfficientNet-Lite0 into OpenVINO takes about 5 s, longer than a warm
    prediction, so the converted model is kept in florist's cache under a hash of
    the architecture, the weights, the input shapes and the OpenVINO version. A
    cached model is used only if it computes what torch computes on the example.
    """
    ov = import_openvino()

    from .backbones import state_id

    shapes = [[-1, *x.shape[1:], str(x.dtype)] for x in example]
    payload = [ov.__version__, type(module).__name__, repr(module), shapes, state_id(module.state_dict())]
    path = default_cache_dir() / "openvino" / f"{hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:24]}.xml"
    cached = _read_ir(path, module, example)
    if cached is not None:
        return cached
    model = convert_openvino(module, example)
    _write_ir(model, path)
    return model


def convert_openvino(module: nn.Module, example: Sequence[torch.Tensor]) -> Any:
    """Trace ``module`` into an ``openvino.Model`` whose inputs have a dynamic batch axis."""
    ov = import_openvino()

    shapes = [[-1, *x.shape[1:]] for x in example]
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the tracer's notes on timm's Python-level branches
        return ov.convert_model(module, example_input=tuple(example), input=shapes)


def _read_ir(path: Path, module: nn.Module, example: Sequence[torch.Tensor]) -> Any | None:
    """The cached model at ``path`` if it is there, loads, and agrees with ``module``; else None."""
    if not (path.is_file() and path.with_suffix(".bin").is_file()):
        return None
    try:
        model = openvino_core().read_model(str(path))
        got = compile_openvino(model, bf16=False)([x.numpy() for x in example])
    except Exception:  # damaged or from another OpenVINO: convert again
        return None
    with torch.inference_mode():
        expected = module(*example).float().numpy()
    scale = max(float(np.abs(expected).max()), 1e-6)
    return model if got.shape == expected.shape and np.abs(got - expected).max() <= CACHED_IR_TOLERANCE * scale else None


def _write_ir(model: Any, path: Path) -> None:
    """Save ``model`` as ``path`` (.xml) and its .bin, each atomically (the .xml last); a read-only cache is skipped."""
    ov = import_openvino()

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
            staged = Path(tmp, "model.xml")
            ov.save_model(model, str(staged), compress_to_fp16=False)
            atomic_write_bytes(path.with_suffix(".bin"), staged.with_suffix(".bin").read_bytes())
            atomic_write_bytes(path, staged.read_bytes())
    except OSError as e:
        log.debug("cannot cache the OpenVINO model in %s: %s", path.parent, e)


class _OnnxRuntimeNet(FrozenNet):
    engine = "onnxruntime"
    device = torch.device("cpu")

    def __init__(self, module: nn.Module, example: Sequence[torch.Tensor]):
        import onnxruntime as ort

        names = [f"input{i}" for i in range(len(example))]
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        data = trace_onnx(module, tuple(example), names, "output")
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.names = names

    def __call__(self, *inputs: torch.Tensor) -> np.ndarray:
        feed = {n: np.ascontiguousarray(x.detach().cpu().numpy()) for n, x in zip(self.names, inputs)}
        return self.session.run(None, feed)[0].astype(np.float32, copy=False)


def compile_frozen(
    module: nn.Module,
    example: Sequence[torch.Tensor],
    engine: str,
    *,
    bf16: bool = False,
) -> FrozenNet:
    """``module`` (in eval mode, weights frozen) ready to run on ``engine``.

    Args:
        example: one input tensor per argument of ``module.forward``; their batch size is free.
        engine: ``torch``, ``openvino`` or ``onnxruntime`` (see :func:`resolve_engine`).
        bf16: compute in bfloat16 (torch autocast, OpenVINO's precision hint).

    The torch engine computes where ``module``'s tensors are; the others on the CPU.
    """
    if engine == "torch":
        first = next(itertools.chain(module.parameters(), module.buffers()), None)
        return _TorchNet(module, bf16, first.device if first is not None else torch.device("cpu"))
    example = [x.detach().cpu() for x in example]
    if engine == "openvino":
        return _OpenVINONet(module, example, bf16)
    if engine == "onnxruntime":
        return _OnnxRuntimeNet(module, example)
    raise SettingError(f"{{engine}} must be one of {', '.join(ENGINES[1:])}, got {literal(engine)}")


def weights_token(module: nn.Module) -> tuple[int, ...]:
    """Changes whenever a tensor of ``module`` is modified in place (loading weights, an optimiser step).

    A compiled copy of ``module`` is reused only while its token is unchanged.
    """
    return tuple(t._version for t in itertools.chain(module.parameters(), module.buffers()))


def trace_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], names: Sequence[str], output: str) -> bytes:
    """``module`` traced to an ONNX graph with a dynamic batch axis on every input and the output."""
    buffer = io.BytesIO()
    # The TorchScript-based exporter: deprecated upstream but shipped by every torch florist supports,
    # it needs no extra package (dynamo=True needs onnxscript) and exports EfficientNet-Lite 6x faster
    # here, with the same parity. Torch before 2.5 has no `dynamo` argument and uses it anyway.
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            example,
            buffer,
            **legacy,
            opset_version=OPSET,
            input_names=list(names),
            output_names=[output],
            dynamic_axes={name: {0: "batch"} for name in [*names, output]},
        )
    return buffer.getvalue()
