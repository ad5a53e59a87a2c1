"""What each accelerate engine needs beyond the training loop: the ``Accelerator`` itself, FSDP2 and DeepSpeed on CPU
processes, DeepSpeed's batch sizes, and checkpoints whose weights and optimizer state are whole on the main process
whichever engine split them.

Where the trained state lives:

- one process, or DDP: weights, gradients and optimizer state whole on every process (checkpoints hold the torch
  optimizer's own ``state_dict``);
- FSDP2: all three sharded across the processes (DTensors);
- DeepSpeed ZeRO-1/2: weights whole on every process; the optimizer state (ZeRO-1) and the gradients (ZeRO-2) are
  partitioned, and the optimizer keeps fp32 master copies of the weights.

Under FSDP and DeepSpeed a checkpoint gathers the shards, keys the optimizer state by parameter name (the layout of
``torch.distributed.checkpoint``'s full optimizer state dict) and is written once; a resumed run splits it again, on
any number of processes.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from distillmt.errors import DistillmtError

log = logging.getLogger("distillmt.engines")


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's or a `taskset`'s share)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# oneDNN (bf16 matmuls on a CPU) builds a kernel for each new matmul shape and keeps 1,024 of them by default;
# training on variable-length batches meets more shapes than that (every layer, forward and backward, at every
# batch length), and a cache that evicts rebuilds kernels all the time (docs/benchmarks/default-run-cpu.md)
ONEDNN_CACHE_CAPACITY = 16384


def configure_cpu(threads: int = 0) -> None:
    """PyTorch's CPU threads for this process (``threads``, or 0: the cores it may use) and a oneDNN kernel cache
    large enough for training on variable-length batches, unless ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` is set. Call it
    before the first matmul: oneDNN reads its cache capacity once."""
    import os

    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
    torch.set_num_threads(threads or available_cores())


CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_int8")  # what decides bf16 and int8 speed on a CPU


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and flags from ``/proc/cpuinfo`` (not Linux: the platform's name, no flags)."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):  # x86, arm64
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, flags


def cpu_name() -> str:
    """The CPU model with the flags that decide its bf16/int8 speed, e.g. ``AMD EPYC (avx512_bf16)``: timings and
    rounding differ between kinds of CPU, so every figure names it."""
    model, flags = _cpuinfo()
    present = [f for f in CPU_FLAGS if f in flags]
    return f"{model} ({', '.join(present)})" if present else model


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 avx512_bf16 or AMX, arm64 bf16); elsewhere bf16 matmuls are
    emulated, slower than fp32. A CPU whose flags cannot be read counts as having it (the earlier default)."""
    _, flags = _cpuinfo()
    return not flags or bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def process_group(device: str) -> tuple[bool, str | None]:
    """``(cpu, backend)`` for accelerate's process state: on the CPU where ``device`` says so or no GPU answers.
    accelerate leaves a DeepSpeed launch aside when told cpu=True, and without a GPU it finds no process-group backend
    (it then counts one process while DeepSpeed's group has them all); DeepSpeed itself runs on CPU processes (its
    CPU accelerator, which it picks where no GPU answers), so such a launch gets cpu=False and gloo."""
    from accelerate.utils import parse_flag_from_env

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if cpu and parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return False, "gloo"
    return cpu, None


def engine_name() -> str:
    """The engine a launch asked for, from the environment ``accelerate launch`` sets."""
    import os

    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):  # the stage, unless a DeepSpeed config file holds it
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return f"DeepSpeed ZeRO-{stage}" if stage else "DeepSpeed"
    return "FSDP" if parse_flag_from_env("ACCELERATE_USE_FSDP") else "DDP"


def make_accelerator(device: str, mixed_precision: str) -> Any:
    """The ``Accelerator`` of one training stage: on the CPU where ``device`` says so or no GPU answers, bf16 by
    default where the GPU has it; FSDP and DeepSpeed launches are honoured on CPU processes too, and engine settings the
    checkpoints cannot handle are refused (:func:`check_engine`)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    cpu, backend = process_group(device)
    if mixed_precision == "auto":
        mixed_precision = "bf16" if (torch.cuda.is_available() and not cpu and torch.cuda.is_bf16_supported()) else "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision:
        # accelerate keeps one precision per process and refuses another; the stages of one run may differ (a bf16
        # teacher, fp32 students). Only the precision part is reset: the process group (PartialState) stays.
        AcceleratorState._reset_state(reset_partial_state=False)
    handlers = [InitProcessGroupKwargs(backend=backend)] if backend else []
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=handlers)
    _fsdp_on_cpu(accelerator)
    check_engine(accelerator)
    return accelerator


def leave_process_group() -> None:
    """End a multi-process run cleanly: wait for every process, then close the process group. Left to the
    interpreter's exit, gloo's threads were torn down while a peer still wrote its files, and one process in a few
    aborted ("terminate called without an active exception"), failing the launch after the work was done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _fsdp_on_cpu(accelerator: Any) -> None:
    """accelerate takes an FSDP launch (``ACCELERATE_USE_FSDP``, set by ``accelerate launch`` from an FSDP config) only
    on GPU-like devices and falls back to plain data parallel on CPU processes; FSDP2 runs on CPUs with gloo, so the
    launch is honoured there too, with the plugin accelerate would have built from the same environment."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env

    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        plugin = FullyShardedDataParallelPlugin()
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin


def deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def check_engine(accelerator: Any) -> None:
    """Refuse the engine settings whose sharding the checkpoints do not handle, before anything trains."""
    from accelerate.utils import DistributedType

    if deepspeed(accelerator):
        plugin = accelerator.state.deepspeed_plugin
        if plugin.zero_stage not in (1, 2):
            raise DistillmtError(
                f"DeepSpeed ZeRO stage {plugin.zero_stage} is not supported: set zero_stage: 2 (or 1) in the "
                "accelerate config, or shard the weights too with FSDP (configs/accelerate/fsdp.yaml)"
            )
        offload = {plugin.offload_optimizer_device, plugin.offload_param_device} - {"none", None}
        if offload:
            raise DistillmtError(
                f"DeepSpeed offload ({', '.join(sorted(offload))}) is not supported: set offload_optimizer_device "
                "and offload_param_device to none in the accelerate config"
            )
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise DistillmtError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config")


def configure_deepspeed(accelerator: Any, *, batch_size: int, grad_accum: int, max_grad_norm: float) -> None:
    """Give DeepSpeed the stage's own batch sizes and clipping (distillmt's settings win over the accelerate
    config's, which is shared by every stage of a run): each process takes every P-th example of a micro-batch, and
    the engine clips the gradients itself, before its step."""
    if not deepspeed(accelerator):
        return
    n = accelerator.num_processes
    micro = math.ceil(batch_size / n)
    accelerator.state.deepspeed_plugin.deepspeed_config.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=grad_accum,
        train_batch_size=micro * grad_accum * n,
        gradient_clipping=max_grad_norm,
    )
    accelerator.gradient_accumulation_steps = grad_accum  # what accelerate compares the config's with


def backward(accelerator: Any, loss: torch.Tensor, last: bool) -> None:
    """``accelerator.backward`` on one micro-batch of a window (``last``: the window's last). DeepSpeed's engine
    steps the optimizer inside it at the window's end, which it is told here; it would also divide the loss by its
    accumulation steps, which the loop's normalisation by the window's target tokens already covers."""
    if deepspeed(accelerator):
        accelerator.gradient_state._set_sync_gradients(last)
        accelerator.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def same_start(model: Any, accelerator: Any) -> None:
    """Under FSDP every process keeps its own slice of its own copy of the weights, where DDP and DeepSpeed broadcast
    the main process's when they wrap the model: the trained parameters (an adapter initialised without a seed, say)
    are made the main process's first. Frozen ones come from the same files."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and accelerator.num_processes > 1:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    torch.distributed.broadcast(p.data, src=0)


def sharded(model: Any) -> bool:
    """Whether the parameters are split across the processes (FSDP2's DTensors) instead of whole on each."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _zero_partitioned(model: Any) -> bool:
    """Whether DeepSpeed ZeRO-1/2 holds the trained parameters' fp32 masters and optimizer state in partitions
    (its optimizer links each parameter to its fragment of them)."""
    return any(hasattr(p, "_hp_mapping") for p in model.parameters() if p.requires_grad)


def gathered(model: Any) -> bool:
    """Whether a checkpoint of ``model`` gathers its trained state from the processes' shards (FSDP, DeepSpeed)."""
    return sharded(model) or _zero_partitioned(model)


def reshard(model: Any) -> None:
    """Put FSDP2's sharded parameters back in place: a forward without backward (the validation loss) leaves the root
    module's own parameters gathered, which the optimizer and the state-dict helpers do not know."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _whole(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value on this process: an FSDP2 shard is gathered (every process must take part)."""
    from torch.distributed.tensor import DTensor

    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous()


def full_state_dict(model: Any) -> dict[str, torch.Tensor] | None:
    """The whole weights of a model trained under FSDP, gathered from the processes' shards onto the main process
    (every process must call it; the others get an empty dict), for ``save_pretrained(state_dict=...)``; None for a
    model whose parameters are whole on each process (it saves itself)."""
    if not sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # one name per tied parameter (the output layer tied to the embeddings), as save_pretrained writes on its own
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k not in aliases}


def trained_state(model: Any, optimizer: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained parameters (by name, whole, on the CPU) and the optimizer state for a checkpoint. Under FSDP and
    DeepSpeed every process must call it (they gather the shards); the optimizer state is then keyed by parameter
    name. ``model``: the unwrapped model; ``optimizer``: as prepared by accelerate."""
    if _zero_partitioned(model):
        return _zero_state(model, optimizer)
    trainable = {n: _whole(p) for n, p in model.named_parameters() if p.requires_grad}
    if not sharded(model):
        return trainable, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return trainable, get_optimizer_state_dict(model, optimizer, options=options)


def load_trained_state(model: Any, optimizer: Any, trainable: dict[str, torch.Tensor], opt_state: dict) -> None:
    """Apply a checkpoint's trained parameters and optimizer state (as :func:`trained_state` returns them); under
    FSDP and DeepSpeed each process keeps its share of the whole values."""
    # checkpoints written before empty parameter groups were left out have one (a LoRA adapter's, without weight decay)
    opt_state = {**opt_state, "param_groups": [g for g in opt_state["param_groups"] if g["params"]]}
    if _zero_partitioned(model):
        _load_zero_state(model, optimizer, trainable, opt_state)
    elif sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(model, trainable, options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(model, optimizer, opt_state, options=StateDictOptions(full_state_dict=True))
    else:
        _copy_weights(model, trainable)
        optimizer.load_state_dict(opt_state)


@torch.no_grad()
def _copy_weights(model: Any, trainable: dict[str, torch.Tensor]) -> None:
    """The checkpoint's values into the model's parameters, in their device and dtype."""
    params = dict(model.named_parameters())
    for n, t in trainable.items():
        params[n].copy_(t.to(params[n].device, params[n].dtype))


def _zero_parts(optimizer: Any) -> tuple[Any, Any]:
    """DeepSpeed's ZeRO optimizer (inside accelerate's wrapper) and the torch optimizer it steps on its partitions."""
    zero = getattr(optimizer, "optimizer", optimizer)
    return zero, zero.optimizer


def _zero_state(model: Any, optimizer: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """ZeRO-1/2: every parameter's fp32 master and optimizer state, each assembled from the processes' partitions
    (DeepSpeed's ``safe_get_full_*``, collectives), keyed by name per parameter group."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero, base = _zero_parts(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    flat = [base.state.get(g["params"][0], {}) for g in base.param_groups]  # {} before the first step
    _link_zero_state(zero)
    trainable, state, groups = {}, {}, []
    for i, group in enumerate(base.param_groups):
        elementwise = [k for k, v in flat[i].items() if torch.is_tensor(v) and v.dim() > 0]
        shared = {k: v.detach().cpu() for k, v in flat[i].items() if k not in elementwise}  # the step count
        for p in zero.bit16_groups[i]:
            n = names[id(p)]
            trainable[n] = safe_get_full_fp32_param(p).cpu()
            if flat[i]:
                # a step count of its own per parameter: torch's optimizers add to it in place
                state[n] = {k: v.clone() for k, v in shared.items()}
                state[n].update({k: safe_get_full_optimizer_state(p, k).cpu() for k in elementwise})
        groups.append(
            {
                **{k: v for k, v in group.items() if k != "params"},
                "params": [names[id(p)] for p in zero.bit16_groups[i]],
            }
        )
    return trainable, {"state": state, "param_groups": groups}


def _load_zero_state(model: Any, optimizer: Any, trainable: dict[str, torch.Tensor], opt_state: dict) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero, base = _zero_parts(optimizer)
    params = dict(model.named_parameters())
    _copy_weights(model, trainable)  # the copy the forward uses
    for n, t in trainable.items():
        safe_set_full_fp32_param(params[n], t.to(params[n].device))  # this process's part of the master
    for group, saved in zip(base.param_groups, opt_state["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})  # the learning rate where it stopped
    if not opt_state["state"]:  # written before the first step
        return
    # The torch optimizer creates its state at its first step; create it now, of the partitions' shape, and let
    # DeepSpeed link each parameter's fragment to it before filling that in.
    for group, saved in zip(base.param_groups, opt_state["param_groups"], strict=True):
        first = opt_state["state"][saved["params"][0]]
        for part in group["params"]:
            base.state[part] = {k: v.clone() if v.dim() == 0 else torch.zeros_like(part) for k, v in first.items()}
    _link_zero_state(zero)
    for n, values in opt_state["state"].items():
        for k, v in values.items():
            if v.dim() > 0:
                safe_set_full_optimizer_state(params[n], v.to(params[n].device), k)


def _link_zero_state(zero: Any) -> None:
    """Point each parameter's DeepSpeed fragment at the optimizer state of its partition. DeepSpeed links them once,
    after its first step of the first parameter group, when the other groups' state does not exist yet (here the
    group without weight decay), and their fragments then stay empty: they are linked again, all groups at once."""
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
