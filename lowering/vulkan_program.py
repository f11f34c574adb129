"""A compiled graph as a Vulkan device runs it, and the runner: no TVM needed.

`lowering/vulkan.py` compiles a graph with TVM and interprets its Relax
functions once, recording what a run does: the buffers (sizes), the constants
written into some of them, the buffers that receive the graph's inputs, every
compute dispatch in order (its WGSL kernel, the buffer ranges it binds, its
uniform's bytes, its workgroup counts) and where the outputs are. That
`Program` is plain data: `save` writes it to a `.npz` file and `load` reads it
back on a machine with wgpu and a Vulkan driver and no TVM (a GPU server).

`Runner` makes the program's buffers, pipelines and bind groups once; a call
writes the inputs, encodes every dispatch into command buffers, submits them
and reads the outputs back.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from dnir.errors import BackendError

MAX_WORKGROUPS = 65535
_SUBMIT_EVERY = 512   # dispatches per command buffer
# Storage-buffer ranges start at multiples of this: WebGPU's default limit, which every
# Vulkan driver meets, so a program recorded on one machine binds on another.
PORTABLE_OFFSET_ALIGNMENT = 256


def _device():
    """(wgpu, adapter, device) of the first Vulkan adapter, a GPU before a CPU one, made once."""
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    try:
        import wgpu
    except ImportError as e:  # pragma: no cover - depends on the install
        raise BackendError("the vulkan target needs the wgpu package (pip install wgpu)") from e
    global _DEVICE
    if _DEVICE is None:
        adapters = [a for a in wgpu.gpu.enumerate_adapters_sync() if a.info.get("backend_type") == "Vulkan"]
        if not adapters:
            raise BackendError("no Vulkan adapter found: install a Vulkan driver (on a machine without a GPU, "
                               "Mesa's lavapipe: apt-get install mesa-vulkan-drivers)")
        adapters.sort(key=lambda a: a.info.get("adapter_type") == "CPU")
        adapter = adapters[0]
        limits = {k: adapter.limits[k] for k in ("max-storage-buffer-binding-size", "max-buffer-size",
                                                 "max-storage-buffers-per-shader-stage",
                                                 "min-storage-buffer-offset-alignment",
                                                 "max-compute-workgroup-storage-size")}
        # shader-f16 where the adapter has it (lavapipe and NVIDIA's driver do): f16 storage and arithmetic
        features = [f for f in ("shader-f16",) if f in adapter.features]
        _DEVICE = (wgpu, adapter, adapter.request_device_sync(required_limits=limits, required_features=features))
    return _DEVICE


_DEVICE = None


def shared_bytes() -> int:
    """Workgroup (shared) memory one thread block may use: the Vulkan device's, or
    $DNIR_VULKAN_SHARED_BYTES where programs are recorded for another device (the GPU
    machine's NVIDIA driver allows 49152 bytes; lavapipe 32768, too few for the fused
    delta-rule kernels at K = V = 128)."""
    override = os.environ.get("DNIR_VULKAN_SHARED_BYTES")
    return int(override) if override else _device()[2].limits["max-compute-workgroup-storage-size"]


def adapter_info() -> dict:
    """The Vulkan adapter the runner uses (raises BackendError when there is none)."""
    return dict(_device()[1].info)


def has_f16() -> bool:
    """Whether the device was opened with shader-f16 (WGSL's f16 type)."""
    return "shader-f16" in _device()[2].features


def offset_alignment() -> int:
    return max(PORTABLE_OFFSET_ALIGNMENT, _device()[2].limits["min-storage-buffer-offset-alignment"])


@dataclass
class Dispatch:
    kernel: str
    bindings: list      # (buffer, offset, size) per storage binding, in binding order
    uniform: bytes      # the uniform struct: the kernel's scalar arguments, then packGridDimX
    groups: tuple       # workgroups (x, y, z), x already folded into z past MAX_WORKGROUPS


@dataclass
class Program:
    wgsl: dict = field(default_factory=dict)          # kernel name -> WGSL source
    buffers: list = field(default_factory=list)       # bytes of each buffer, by index
    consts: dict = field(default_factory=dict)        # buffer -> the array written into it once
    inputs: list = field(default_factory=list)        # (buffer, shape, dtype) per graph input
    outputs: list = field(default_factory=list)       # (buffer, offset, shape, dtype) per graph output
    dispatches: list = field(default_factory=list)

    def buffer(self, size: int) -> int:
        self.buffers.append(_round4(size))
        return len(self.buffers) - 1

    def save(self, path) -> None:
        """One .npz: the constants as arrays, everything else as one JSON string."""
        meta = {"wgsl": self.wgsl, "buffers": self.buffers, "inputs": self.inputs, "outputs": self.outputs,
                "dispatches": [[d.kernel, d.bindings, d.uniform.hex(), list(d.groups)] for d in self.dispatches]}
        np.savez_compressed(path, program=np.array(json.dumps(meta)),
                            **{f"const_{i}": a for i, a in self.consts.items()})

    @classmethod
    def load(cls, path) -> "Program":
        with np.load(path) as data:
            meta = json.loads(str(data["program"]))
            consts = {int(k.removeprefix("const_")): data[k] for k in data.files if k.startswith("const_")}
        return cls(meta["wgsl"], meta["buffers"], consts, [tuple(x) for x in meta["inputs"]],
                   [tuple(x) for x in meta["outputs"]],
                   [Dispatch(k, [tuple(b) for b in bind], bytes.fromhex(u), tuple(g))
                    for k, bind, u, g in meta["dispatches"]])


def _round4(n: int) -> int:
    return max(4, -(-n // 4) * 4)


class Runner:
    """A Program on the Vulkan device: buffers, pipelines and bind groups made once, here."""

    def __init__(self, program: Program):
        self.wgpu, _, self.device = _device()
        limit = self.device.limits["max-buffer-size"]
        too_big = [size for size in program.buffers if size > limit]
        if too_big:
            raise BackendError(f"vulkan: the program needs a buffer of {max(too_big)} bytes, more than the "
                               f"device's max-buffer-size {limit}; run a smaller graph")
        usage = self.wgpu.BufferUsage
        self.program = program
        self.buffers = [self.device.create_buffer(size=size, usage=usage.STORAGE | usage.COPY_SRC | usage.COPY_DST)
                        for size in program.buffers]
        for index, array in program.consts.items():
            self._write(index, array)
        self._pipelines = {}
        self._uniforms = {}
        self.steps = [self._step(d) for d in program.dispatches]

    def _write(self, index: int, array: np.ndarray):
        if array.nbytes:
            data = np.ascontiguousarray(array).tobytes()
            # copies are whole 4-byte words (an odd count of f16 values is not); buffers are rounded up
            self.device.queue.write_buffer(self.buffers[index], 0, data + bytes(_round4(len(data)) - len(data)))

    def _pipeline(self, kernel: str):
        if kernel not in self._pipelines:
            import re
            # Every binding read_write: WebGPU tracks usage per buffer, and a dispatch may read one
            # range of a buffer and write another.
            wgsl = self.program.wgsl[kernel].replace("var<storage, read>", "var<storage, read_write>")
            entries = [{"binding": int(i), "visibility": self.wgpu.ShaderStage.COMPUTE,
                        "buffer": {"type": "storage"}}
                       for i in re.findall(r"@binding\((\d+)\) var<storage", wgsl)]
            uniform = int(re.search(r"@binding\((\d+)\) var<uniform>", wgsl).group(1))
            entries.append({"binding": uniform, "visibility": self.wgpu.ShaderStage.COMPUTE,
                            "buffer": {"type": "uniform"}})
            layout = self.device.create_bind_group_layout(entries=entries)
            pipe = self.device.create_compute_pipeline(
                layout=self.device.create_pipeline_layout(bind_group_layouts=[layout]),
                compute={"module": self.device.create_shader_module(code=wgsl), "entry_point": kernel})
            self._pipelines[kernel] = (pipe, layout, uniform)
        return self._pipelines[kernel]

    def _uniform(self, data: bytes):
        if data not in self._uniforms:
            padded = data + bytes(-len(data) % 16)
            buf = self.device.create_buffer(size=len(padded), usage=self.wgpu.BufferUsage.UNIFORM
                                            | self.wgpu.BufferUsage.COPY_DST)
            self.device.queue.write_buffer(buf, 0, padded)
            self._uniforms[data] = buf
        return self._uniforms[data]

    def _step(self, d: Dispatch):
        pipe, layout, uniform_binding = self._pipeline(d.kernel)
        entries = [{"binding": i, "resource": {"buffer": self.buffers[b], "offset": off, "size": size}}
                   for i, (b, off, size) in enumerate(d.bindings)]
        uniform = self._uniform(d.uniform)
        entries.append({"binding": uniform_binding, "resource": {"buffer": uniform, "offset": 0,
                                                                 "size": uniform.size}})
        return pipe, self.device.create_bind_group(layout=layout, entries=entries), d.groups

    def submit(self):
        """Encode and submit every dispatch, in command buffers of at most _SUBMIT_EVERY."""
        for start in range(0, len(self.steps), _SUBMIT_EVERY):
            encoder = self.device.create_command_encoder()
            for pipe, group, groups in self.steps[start:start + _SUBMIT_EVERY]:
                cpass = encoder.begin_compute_pass()
                cpass.set_pipeline(pipe)
                cpass.set_bind_group(0, group)
                cpass.dispatch_workgroups(*groups)
                cpass.end()
            self.device.queue.submit([encoder.finish()])

    def __call__(self, arrays) -> list[np.ndarray]:
        if len(arrays) != len(self.program.inputs):
            raise BackendError(f"vulkan: the program takes {len(self.program.inputs)} inputs, got {len(arrays)}")
        for (index, shape, dtype), a in zip(self.program.inputs, arrays):
            a = np.asarray(a)
            if list(a.shape) != list(shape):
                raise BackendError(f"vulkan: an input has shape {list(a.shape)}; the program expects {list(shape)}")
            self._write(index, a.astype(dtype, copy=False))
        self.submit()
        return [self.read(*out) for out in self.program.outputs]

    def read(self, index: int, offset: int, shape, dtype: str) -> np.ndarray:
        count = math.prod(shape)
        data = self.device.queue.read_buffer(self.buffers[index], offset, _round4(count * np.dtype(dtype).itemsize))
        return np.frombuffer(data, dtype=dtype, count=count).reshape(shape).copy()

    def time(self, runs: int = 10) -> float:
        """Milliseconds per run of the dispatches alone (inputs as they are), after one warm-up:
        `runs` submissions back to back, then one small read that waits for all of them."""
        self.submit()
        self._wait()
        start = time.perf_counter()
        for _ in range(runs):
            self.submit()
        self._wait()
        return (time.perf_counter() - start) * 1e3 / runs

    def _wait(self):
        if self.buffers:
            self.device.queue.read_buffer(self.buffers[0], 0, 4)
