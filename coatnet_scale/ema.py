"""The EMA of the weights and BatchNorm statistics: reading it where it lives, and swapping it
into the model for evaluation.

The weights' EMA is optimizer state (`coatnet_scale.optim.MasterWeightEma`): the EMA of the fp32
master weights, partitioned like Adam's moments. Where a rank reads its part depends on how
DeepSpeed holds the optimizer (`ema_layout`):

- "whole": fp32 ZeRO-0, the engine steps our optimizer on the model's own parameters;
- "copies": bf16/fp16 ZeRO-0 (DeepSpeed's FP16_UnfusedOptimizer): every rank steps a whole fp32
  copy of each parameter (`fp32_groups`, parallel to the model's `fp16_groups`);
- "fragments": ZeRO-1/2 (bf16 ZeRO-1 through DeepSpeed's BF16_Optimizer): each rank steps one
  flat fp32 partition per parameter group, and a model parameter maps to a fragment of it
  (`param._hp_mapping`: where the fragment sits in the parameter and in the partition);
- "zero3": each rank steps the flat fp32 partitions of its ZeRO-3 sub-groups; DeepSpeed's
  `safe_get_local_optimizer_state` reads a parameter's local part.

The BatchNorm statistics are buffers, replicated on every rank: their EMA (`BufferEma`) is a full
copy on each rank, saved by rank 0 (averaged like the weights, as timm's ModelEmaV3 does: EMA
weights evaluated with the live model's statistics would pair weights with statistics of other
weights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_local_optimizer_state

from coatnet_scale.optim import EMA_KEY


class BufferEma:
    """fp32 shadow copies of a model's floating-point buffers (BatchNorm running statistics; not
    num_batches_tracked), on the rank's device."""

    def __init__(self, model: torch.nn.Module, decay: float, device: torch.device) -> None:
        self.decay = decay
        self.device = device
        self.reset(model)

    def reset(self, model: torch.nn.Module) -> None:
        """Start the averages at the model's current statistics."""
        self.shadow = {
            n: b.detach().to(device=self.device, dtype=torch.float32, copy=True)
            for n, b in _float_buffers(model)
        }

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, buffer in _float_buffers(model):
            self.shadow[name].lerp_(buffer.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: torch.nn.Module) -> None:
        """Exchange the model's statistics with the EMA's (call twice to restore)."""
        for name, buffer in _float_buffers(model):
            current = buffer.detach().float().clone()
            buffer.copy_(self.shadow[name].to(buffer.dtype))
            self.shadow[name] = current

    def load(self, saved: Mapping[str, torch.Tensor]) -> None:
        """Take saved statistics (read on the CPU) onto the rank's device; names the file lacks
        keep their current values (the EMA of those starts now)."""
        self.shadow = {  # a copy: `update` works in place, and `saved` may be kept (a snapshot)
            name: saved[name].to(device=self.device, dtype=torch.float32, copy=True)
            if name in saved
            else current
            for name, current in self.shadow.items()
        }


def _float_buffers(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    return ((n, b) for n, b in model.named_buffers() if b.is_floating_point())


def ema_layout(engine) -> str:
    """ "whole", "copies", "fragments" or "zero3": see the module docstring."""
    param = next(engine.module.parameters())
    if hasattr(param, "ds_id"):
        return "zero3"
    if hasattr(param, "_hp_mapping"):
        return "fragments"
    if hasattr(engine.optimizer, "fp32_groups"):
        return "copies"
    return "whole"


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed steps (inside its ZeRO / BF16 wrapper, if any)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def ema_started(engine) -> bool:
    """Whether the weights' EMA exists yet (it starts at the first applied step). The same on
    every rank: every rank steps its partition of every group together."""
    return any(EMA_KEY in state for state in _base_optimizer(engine).state.values())


def full_emas(engine) -> Iterator[tuple[str, torch.Tensor]]:
    """Each parameter's whole fp32 EMA by name, one at a time (not ZeRO-3). A collective in the
    "fragments" layout, where all ranks iterate together: every rank contributes its fragment
    (zeros elsewhere) to an all-reduce, as DeepSpeed's `get_full_hp_param` does; the fragment is
    located afresh, since DeepSpeed's cached views of optimizer state go stale when a checkpoint
    load replaces the state tensors. A parameter never stepped (no gradient yet) is its own EMA."""
    optimizer = _base_optimizer(engine)
    layout = ema_layout(engine)
    masters = {}
    if layout == "copies":
        wrapper = engine.optimizer
        for low, high in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True):
            masters.update({id(p): master for p, master in zip(low, high, strict=True)})
    for name, param in engine.module.named_parameters():
        if layout != "fragments":
            master = masters.get(id(param), param)
            yield name, optimizer.state.get(master, {}).get(EMA_KEY, master.detach().float())
            continue
        full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
        mapping = param._hp_mapping
        if mapping is not None:
            flat = optimizer.param_groups[mapping.param_group_index]["params"][0]
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            fragment = optimizer.state[flat][EMA_KEY].narrow(0, hp.start, hp.numel)
            full.narrow(0, lp.start, lp.numel).copy_(fragment)
        dist.all_reduce(full, group=param._dp_group)
        yield name, full.view_as(param)


@contextmanager
def ema_applied(engine, buffers: BufferEma) -> Iterator[None]:
    """The model holds the EMA weights and statistics inside the block, its own outside (all
    ranks; for evaluation). Before the EMA's first step the weights stand for their own EMA.

    One parameter at a time (no second copy of the model in fp32); the model's own weights are
    kept aside in their own dtype (ZeRO-3: each rank's partitions only). ZeRO-3: each rank writes
    its EMA partition into the parameter's partition (`ds_tensor`); parameters DeepSpeed keeps
    gathered (persistent ones) are released first and gathered again afterwards, as DeepSpeed
    does around an optimizer step, so the forward sees the EMA."""
    model = engine.module
    zero3 = ema_layout(engine) == "zero3"
    params = list(model.parameters())
    started = ema_started(engine)
    with torch.no_grad():
        if zero3:
            held = [p.ds_tensor.detach().clone() for p in params]
            write = _zero3_writer(params)
            if started:
                write(safe_get_local_optimizer_state(p, EMA_KEY) for p in params)
        else:
            held = [p.detach().clone() for p in params]

            def write(values: Iterable[torch.Tensor]) -> None:
                for p, value in zip(params, values, strict=True):
                    p.copy_(value)

            if started:
                write(ema for _, ema in full_emas(engine))
        buffers.swap(model)
    try:
        yield
    finally:
        with torch.no_grad():
            buffers.swap(model)
            if started:
                write(held)


def _zero3_writer(params: list[torch.nn.Parameter]) -> Callable[[Iterable[torch.Tensor]], None]:
    """Writing ZeRO-3 partitions: release what is gathered, write each `ds_tensor`, gather again
    what was gathered at the start (DeepSpeed's persistent parameters)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gathered = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]

    def write(values: Iterable[torch.Tensor]) -> None:
        now = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
        if now:
            now[0].partition(param_list=now)
        for p, value in zip(params, values, strict=True):
            p.ds_tensor.data.copy_(value)
        if gathered:
            gathered[0].all_gather(param_list=gathered)

    return write


def whole_ema_weights(engine) -> dict[str, torch.Tensor]:
    """The EMA weights by name where each rank holds them whole (ZeRO-0), for rank 0
    to save next to the statistics; elsewhere (partitioned) an empty dict: the checkpoint's
    optimizer files hold them."""
    if ema_layout(engine) not in ("whole", "copies") or not ema_started(engine):
        return {}
    return dict(full_emas(engine))
