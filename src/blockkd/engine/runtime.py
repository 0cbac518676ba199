"""Where and how the math runs: device, mixed precision, memory format, seeding, determinism, ranks.

Why one module: every choice here is process-wide (global torch flags, RNGs, the process group), so it
is made in one place, from the recipe's ``train`` section, and undone when a run ends (tests and
notebooks call ``train`` several times in one process).
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import gc
import hashlib
import os
import random
import signal
import threading
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from ..errors import BlockKDError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------- ranks
def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the variables torchrun sets; (0, 1, 0) for a plain run."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 writes files, logs and shows progress."""
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op for one process); metrics are reduced as sums, never means."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (decisions such as "resume from which checkpoint" must agree)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """``model`` (a distiller) under DDP, synchronising only what training changes.

    Gradients: DDP all-reduces only parameters that require them, so the frozen teacher's never are.
    Buffers: ``broadcast_buffers=False``. The buffers training changes are BatchNorm running statistics
    (in the zoo, torchvision and timm CNNs), which the training forward does not read; DDP's default would
    broadcast every buffer,
    the teacher's included, before each step. The trainer broadcasts rank 0's trained buffers once per
    epoch instead (``broadcast_tensors``), which ends in what the per-step broadcast would give: rank 0's
    running averages (with SyncBatchNorm every rank's are equal anyway).
    At construction DDP broadcasts rank 0's weights once, the teacher's included: every rank starts from
    the same student and uses the same teacher.
    ``find_unused_parameters``: some methods leave parameters unused in a step (blockkd-lite draws one
    connector per step).
    """
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
        find_unused_parameters=True)


def average_grads(params: list[torch.nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in place, as DDP does, for backward passes run outside its sync (DOT's two
    per step, under ``no_sync``). A parameter keeps no gradient (None) only where no rank has one: whether
    a gradient exists is part of DOT's update rule (a parameter with one kind of gradient only is plain SGD).
    One flat all-reduce per dtype (a no-op for one process)."""
    if not is_distributed() or not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=params[0].device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    grads: dict[torch.dtype, list[torch.Tensor]] = {}
    for p, has in zip(params, present.tolist()):
        if has:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.setdefault(p.grad.dtype, []).append(p.grad)
    for group in grads.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size()
        torch._foreach_copy_(group, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in group]), group)])


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's (a no-op for one process)."""
    if is_distributed():
        for t in tensors:
            dist.broadcast(t, src=0)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state_dict's names and bytes, in key order: equal digests mean identical weights."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes (nccl on CUDA, gloo otherwise); no-op for one process."""
    _, size, _ = dist_env()
    if size > 1 and not is_distributed():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL uses the current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def close_distributed() -> None:
    """Leave the process group. Why collect first: DDP and FSDP modules sit in reference cycles (their hooks)
    that can hold the group's pending work; freed only at the interpreter's exit, gloo's threads meet a
    half-finalised interpreter (CI once saw a rank abort, "terminate called without an active exception",
    after a run that had succeeded). Collected here, they go while everything is still alive."""
    gc.collect()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- device
@dataclasses.dataclass(frozen=True)
class Runtime:
    """The resolved ``train`` device settings every part of the loop reads."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision
    channels_last: bool

    @property
    def fp16(self) -> bool:
        """fp16 needs loss scaling (torch.amp.GradScaler); bf16 does not."""
        return self.amp_dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, x: Any) -> Any:
        """A batch in the memory format the model was converted to; a mapping of tensors (a tokenised text
        batch: ``input_ids``, ``attention_mask``) on the device as it is."""
        if isinstance(x, dict):
            return {k: v.to(self.device, non_blocking=True) for k, v in x.items()}
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def describe(self) -> str:
        amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        return f"device {self.device}, amp {amp}, channels_last {'on' if self.channels_last else 'off'}"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> the local rank's CUDA device when there is one, else the CPU."""
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist_env()[2] % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BlockKDError(f"train.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BlockKDError(f"train.device={name} but CUDA is not available here; use train.device=auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BlockKDError(f"train.device={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA where supported, else fp16 on CUDA; off elsewhere (CPU autocast is slow)."""
    amp = str(amp)
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "off":
        return None
    if amp not in AMP_DTYPES:
        raise BlockKDError(f"train.amp={amp!r}; choose from auto, off, bf16, fp16")
    if amp == "fp16" and device.type != "cuda":
        raise BlockKDError(f"train.amp=fp16 needs a CUDA device (this run uses {device}); use bf16 or off")
    return AMP_DTYPES[amp]


def resolve(device: str | torch.device | None = "auto", amp: str = "auto", channels_last: str | bool = "auto"
            ) -> Runtime:
    """The Runtime of a ``train`` section's device, amp and channels_last settings.

    channels_last ``auto`` is on for CUDA and CPU: on a CPU it made the distillation step 1.1-1.55x faster too
    (results/speed-cpu-layout.md); off elsewhere (MPS supports it unevenly)."""
    dev = resolve_device(device)
    cl = dev.type in ("cuda", "cpu") if channels_last in ("auto", None) else bool(channels_last)
    return Runtime(dev, resolve_amp(amp, dev), cl)


# ----------------------------------------------------------------------------------------- seeds
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices): model initialisation depends on it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def reproducibility(deterministic: bool) -> Iterator[None]:
    """Deterministic kernels (or cudnn autotuning) for the duration of a run, then the previous settings.

    Deterministic mode is what makes two runs with the same seed, or a resumed and an uninterrupted
    run, produce identical metrics and weights.
    """
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    """Every RNG state as JSON (no pickle): resuming restores them so the continued run is exact."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.array(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ----------------------------------------------------------------------------------------- signals, faults
@contextlib.contextmanager
def defer_sigint() -> Iterator[None]:
    """Hold back a Ctrl-C until the block is done, then deliver it: a checkpoint being written is finished
    (and ``last/`` and ``best/`` agree) before the run stops. Only the main thread can handle signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        signal.raise_signal(signal.SIGINT)
