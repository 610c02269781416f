"""Convolutions run with cuDNN execution plans chosen by measurement (``speed.conv_plans``; CUDA inference).

PyTorch asks cuDNN's heuristics for a convolution kernel; ``cudnn.benchmark`` times only the configurations those
heuristics list. cuDNN has more: its Hopper implicit-GEMM engine takes a kernel configuration knob over ~60 kernels
(tile shapes, cluster shapes) and a split-K knob. ``bench/cudnn_knobs.py`` times every setting for each convolution
shape of a U-Net call and writes the winners to a plans file; with ``speed.conv_plans=FILE`` each plain
``nn.Conv2d`` whose (input, weight, stride, padding, dtype) has a plan runs it through the ``nvidia-cudnn-frontend``
package (``pip install '.[cudnn-plans]'``); every other call stays ``F.conv2d``.

Measured on one H200 (BENCHMARKS.md, twelfth session; the SD 1.5 CFG batch, the bundled
``bench/plans/h200_cudnn91900_sd15_b2.json``): alone, the 64x64-level 320 -> 320 3x3 convolution 34.2 -> 31.1 us,
640 -> 640 101.7 -> 87.3 us, the 8x8 level's 23.4 -> 19.5 us (cuDNN's split-K): 0.22 of the call's 2.2 ms of
convolutions; in the compiled CFG step 5.70 -> 5.60 ms (5.54 ms with FA4). The pip package is pinned to 1.16.0 in
the ``cudnn-plans`` extra, the version measured.

A plan file (JSON) is tied to the GPU and the cuDNN version it was measured with (kernel configuration numbers are
cuDNN's own); loading it elsewhere is an error that says so. Format::

    {"format": "ldm-conv-plans/1", "gpu": "NVIDIA H200", "cudnn": 91900,
     "plans": [{"input": [2, 320, 64, 64], "weight": [320, 320, 3, 3], "stride": 1, "padding": 1,
                "dtype": "bfloat16", "engine": 72, "knobs": {"SPLIT_K_SLC": 1, "KERNEL_CFG": 54},
                "us": 31.1, "conv2d_us": 34.2}]}

The op (``ldm::conv2d_planned``) is opaque to torch.compile (a fake implementation gives the NHWC output's shape)
and is captured by CUDA graphs like any kernel launch. Without gradients only: where gradients flow the module is
``nn.Conv2d`` itself.
"""
from __future__ import annotations

import functools
import json
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMAT = "ldm-conv-plans/1"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PLANNED_DEVICES = ("cuda",)  # where PlannedConv2d looks for a plan (tests widen it)
PlanKey = tuple  # (input shape, weight shape, stride, padding, torch dtype)


def plan_key(x_shape, w_shape, stride: int, padding: int, dtype: torch.dtype) -> PlanKey:
    return tuple(int(v) for v in x_shape), tuple(int(v) for v in w_shape), int(stride), int(padding), dtype


def _int_list(value, where: str, n: int) -> list[int]:
    if not isinstance(value, list) or len(value) != n or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"{where}: expected a list of {n} positive integers, got {value!r}")
    return value


def load_plans(path: str | Path) -> tuple[dict, dict[PlanKey, tuple[int, dict[str, int]]]]:
    """(header {gpu, cudnn}, {plan key: (engine, knobs)}) from a plans file; ValueError naming the file and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (write one with bench/cudnn_knobs.py "
                         "--write-plans)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: format: expected {FORMAT!r}, got {got!r}")
    if not isinstance(data.get("gpu"), str) or not isinstance(data.get("cudnn"), int):
        raise ValueError(f"{path}: gpu (a name) and cudnn (an integer version) are required: the kernel "
                         "configurations are cuDNN's own numbers for that GPU")  # fmt: skip
    plans = data.get("plans")
    if not isinstance(plans, list):
        raise ValueError(f"{path}: plans: expected a list, got {type(plans).__name__}")
    table = {}
    for i, p in enumerate(plans):
        where = f"{path}: plans[{i}]"
        if not isinstance(p, dict):
            raise ValueError(f"{where}: expected an object, got {type(p).__name__}")
        for field in ("input", "weight", "stride", "padding", "dtype", "engine", "knobs"):
            if field not in p:
                raise ValueError(f"{where}: missing {field!r}")
        xs = _int_list(p["input"], f"{where}.input", 4)
        ws = _int_list(p["weight"], f"{where}.weight", 4)
        if xs[1] != ws[1]:
            raise ValueError(f"{where}: input channels {xs[1]} != weight's {ws[1]}")
        for field in ("stride", "padding", "engine"):
            if not isinstance(p[field], int) or p[field] < (1 if field == "stride" else 0):
                raise ValueError(f"{where}.{field}: expected an integer >= {1 if field == 'stride' else 0}, "
                                 f"got {p[field]!r}")  # fmt: skip
        if p["dtype"] not in DTYPES:
            raise ValueError(f"{where}.dtype: expected one of {', '.join(DTYPES)}, got {p['dtype']!r}")
        knobs = p["knobs"]
        if not isinstance(knobs, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in knobs.items()):
            raise ValueError(f"{where}.knobs: expected {{knob name: integer}}, got {knobs!r}")
        table[plan_key(xs, ws, p["stride"], p["padding"], DTYPES[p["dtype"]])] = (p["engine"], dict(knobs))
    return {"gpu": data["gpu"], "cudnn": data["cudnn"]}, table


def write_plans(path: str | Path, gpu: str, cudnn_version: int, plans: list[dict]) -> int:
    """Write a plans file (the format above), atomically: a crash leaves the old file or none, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "gpu": gpu, "cudnn": cudnn_version, "plans": plans}, indent=1))
    tmp.replace(path)
    return len(load_plans(path)[1])  # what was written reads back


@functools.cache
def frontend_import_error() -> str | None:
    """None if the ``cudnn`` module of nvidia-cudnn-frontend imports, else why not (once per process)."""
    try:
        import cudnn  # noqa: F401
    except Exception as e:  # not installed, or it finds no cuDNN library
        return f"{type(e).__name__}: {e}"
    return None


def require_plans(path: str | Path, device: torch.device) -> dict:
    """The plan table for ``device``, checked eagerly (before any heavy work): the file, the package, the GPU and
    the cuDNN version it was measured with. RuntimeError / ValueError naming what is wrong."""
    try:
        header, table = load_plans(path)
    except ValueError as e:
        raise ValueError(f"speed.conv_plans: {e}") from None
    if torch.device(device).type != "cuda":
        raise ValueError(f"speed.conv_plans: cuDNN plans need a CUDA device, the U-Net is on {device}")
    error = frontend_import_error()
    if error is not None:
        raise RuntimeError(f"speed.conv_plans: the nvidia-cudnn-frontend package does not import ({error}); pip "
                           "install nvidia-cudnn-frontend==1.16.0, or leave speed.conv_plans unset")  # fmt: skip
    gpu, version = torch.cuda.get_device_name(device), torch.backends.cudnn.version()
    if header["gpu"] != gpu or header["cudnn"] != version:
        raise ValueError(f"speed.conv_plans: {path} was measured on {header['gpu']} with cuDNN {header['cudnn']}; "
                         f"this is {gpu} with cuDNN {version}: measure again with bench/cudnn_knobs.py "
                         "--write-plans")  # fmt: skip
    return table


# ------------------------------------------------------------------------------------------------ the op
_local = threading.local()  # cuDNN handles must not be shared across threads: one per (thread, device)


def _handle(device: int):
    import cudnn  # noqa: PLC0415

    handles = getattr(_local, "handles", None)
    if handles is None:
        handles = _local.handles = {}
    if device not in handles:
        with torch.cuda.device(device):
            handles[device] = cudnn.create_handle()
    return handles[device]


_plans: dict[tuple, tuple] = {}  # (shapes, strides, dtype, stride, padding, engine, knobs, device, thread) -> graph


def _built(x: Tensor, w: Tensor, y: Tensor, stride: int, padding: int, engine: int, knobs: str):
    """The cuDNN graph with one execution plan, (engine, knobs), built once per shape: (graph, X, W, Y, workspace,
    handle); None where it did not build (warned once, then F.conv2d: a plan is a speed-up, never a failure)."""
    key = (x.shape, x.stride(), w.shape, w.stride(), x.dtype, stride, padding, engine, knobs, x.device.index,
           threading.get_ident())  # a plan runs on the handle it was built with: one per thread
    if key not in _plans:
        try:
            _plans[key] = _build(x, w, y, stride, padding, engine, knobs)
        except Exception as e:  # noqa: BLE001 - the package, the library or the plan itself
            _plans[key] = None
            warnings.warn(f"speed.conv_plans: the cuDNN plan (engine {engine}, {knobs}) for input {tuple(x.shape)}, "
                          f"weight {tuple(w.shape)}, stride {stride} did not build ({type(e).__name__}: {e}); "
                          "that convolution runs F.conv2d", RuntimeWarning, stacklevel=2)  # fmt: skip
    return _plans[key]


def conv_graph(handle, x: Tensor, w: Tensor, y: Tensor, stride: int, padding: int) -> tuple:
    """The cuDNN operation graph of F.conv2d(x, w) into y (fp32 accumulation, the tensors' own layouts), built up to
    its engines: (graph, X, W, Y). Also bench/cudnn_knobs.py's, which times every engine and knob setting on it."""
    import cudnn  # noqa: PLC0415

    dt = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF,
          torch.float32: cudnn.data_type.FLOAT}[x.dtype]  # fmt: skip
    g = cudnn.pygraph(io_data_type=dt, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT, handle=handle)  # fmt: skip
    X = g.tensor(name="X", dim=list(x.shape), stride=list(x.stride()), data_type=dt)
    W = g.tensor(name="W", dim=list(w.shape), stride=list(w.stride()), data_type=dt)
    Y = g.conv_fprop(image=X, weight=W, padding=[padding] * 2, stride=[stride] * 2, dilation=[1, 1],
                     compute_data_type=cudnn.data_type.FLOAT, name="conv")  # fmt: skip
    Y.set_output(True).set_data_type(dt).set_dim(list(y.shape)).set_stride(list(y.stride()))
    g.validate()
    g.build_operation_graph()
    return g, X, W, Y


def _build(x: Tensor, w: Tensor, y: Tensor, stride: int, padding: int, engine: int, knobs: str) -> tuple:
    import cudnn  # noqa: PLC0415

    handle = _handle(x.device.index)
    g, X, W, Y = conv_graph(handle, x, w, y, stride, padding)
    setting = {}
    for item in filter(None, knobs.split(",")):
        name, _, value = item.partition("=")
        setting[getattr(cudnn.knob_type, name)] = int(value)
    g.create_execution_plan(engine, setting)
    g.build_plan_at_index(0)
    return g, X, W, Y, g.get_workspace_size_plan_at_index(0), handle


def _out_shape(x: Tensor, w: Tensor, stride: int, padding: int) -> tuple[int, int, int, int]:
    N, _, H, W_ = x.shape
    k = w.shape[-1]
    return N, w.shape[0], (H + 2 * padding - k) // stride + 1, (W_ + 2 * padding - k) // stride + 1


@torch.library.custom_op("ldm::conv2d_planned", mutates_args=())
def conv2d_planned(x: Tensor, w: Tensor, stride: int, padding: int, engine: int, knobs: str) -> Tensor:
    """F.conv2d(x, w, stride=stride, padding=padding) (no bias) through cuDNN's ``engine`` with ``knobs``
    ("NAME=VALUE,..."); x (N, C, H, W), w (O, C, k, k), both made NHWC. Returns (N, O, H', W'), NHWC."""
    cl = torch.channels_last
    x, w = x.contiguous(memory_format=cl), w.contiguous(memory_format=cl)
    y = torch.empty(_out_shape(x, w, stride, padding), device=x.device, dtype=x.dtype, memory_format=cl)
    built = _built(x, w, y, stride, padding, engine, knobs)
    if built is None:
        return y.copy_(F.conv2d(x, w, stride=stride, padding=padding))
    import cudnn  # noqa: PLC0415

    g, X, W, Y, ws_bytes, handle = built
    workspace = torch.empty(ws_bytes, device=x.device, dtype=torch.uint8)
    cudnn.set_stream(handle, torch.cuda.current_stream(x.device).cuda_stream)  # the caller's (or capture's) stream
    g.execute_plan_at_index({X: x, W: w, Y: y}, workspace, 0, handle)
    return y


@conv2d_planned.register_fake
def _(x: Tensor, w: Tensor, stride: int, padding: int, engine: int, knobs: str) -> Tensor:
    return torch.empty(_out_shape(x, w, stride, padding), device=x.device, dtype=x.dtype,
                       memory_format=torch.channels_last)  # fmt: skip


# ------------------------------------------------------------------------------------------------ the module
class PlannedConv2d(nn.Conv2d):
    """nn.Conv2d that runs a measured cuDNN plan (``ldm::conv2d_planned``) where its table has one for the call and
    no gradient is wanted; otherwise nn.Conv2d itself. The table lives on the instance (``_conv_plans``)."""

    _conv_plans: dict = {}

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H', W')
        plan = None
        grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        dev = x.device.type
        if dev in PLANNED_DEVICES and not grad and not torch.is_autocast_enabled(dev) and x.dtype == self.weight.dtype:
            plan = self._conv_plans.get(plan_key(x.shape, self.weight.shape, self.stride[0], self.padding[0], x.dtype))
        if plan is None:
            return super().forward(x)
        engine, knobs = plan
        y = conv2d_planned(x, self.weight, self.stride[0], self.padding[0], engine, knobs)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def _plannable(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple) and m.groups == 1
            and m.dilation == (1, 1) and m.stride[0] == m.stride[1] and m.padding[0] == m.padding[1]
            and m.kernel_size[0] == m.kernel_size[1])  # fmt: skip


def set_conv_plans(module: nn.Module, table: dict | None) -> int:
    """Switch every plain, square nn.Conv2d of ``module`` to PlannedConv2d with ``table`` ({plan key: (engine,
    {knob: value})}, from ``load_plans``), or back (``table=None``); subclasses (LoRA's) are left alone. Returns
    how many were switched."""
    packed = None if table is None else {
        k: (engine, ",".join(f"{n}={v}" for n, v in knobs.items())) for k, (engine, knobs) in table.items()}
    n = 0
    for m in module.modules():
        if packed is not None and _plannable(m):
            m.__class__ = PlannedConv2d
            m._conv_plans = packed
            n += 1
        elif packed is None and type(m) is PlannedConv2d:
            m.__class__ = nn.Conv2d
            del m._conv_plans
            n += 1
    return n


def matching_convs(module: nn.Module, table: dict) -> int:
    """How many of ``module``'s PlannedConv2d have a plan for their weight (shape, stride, padding, dtype) at some
    input shape: 0 means the plans file was measured for another model or dtype, and every call runs F.conv2d."""
    weights = {k[1:] for k in table}  # plan keys without their input shape
    return sum(1 for m in module.modules() if type(m) is PlannedConv2d
               and plan_key((), m.weight.shape, m.stride[0], m.padding[0], m.weight.dtype)[1:] in weights)  # fmt: skip
