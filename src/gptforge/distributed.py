"""Everything about running as several processes (torchrun) lives here; the rest asks `is_main()`.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for every process it starts; a plain `python` or
`gptforge` run has none of them and is rank 0 of 1, with every helper below a no-op.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from .models import spec_for

# torch.distributed.checkpoint in one process (a sharded checkpoint saved or read without torchrun) is intended
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def rank() -> int:
    """This process's rank (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    """Number of processes in the run (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Whether this process prints, plots and writes files: rank 0."""
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def setup(device: torch.device) -> torch.device:
    """Join the process group (gloo on CPU, nccl on CUDA); returns this rank's device."""
    if not is_distributed():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if (store := _attempt_store()) is not None:
            dist.init_process_group(backend=backend, store=store, rank=rank(), world_size=world_size())
        else:
            dist.init_process_group(backend=backend)
    return device


def _attempt_store():
    """torchrun's agent store, its keys prefixed by this attempt, for a job torchrun restarted (--max-restarts):
    the agent keeps one store across attempts, so without the prefix a restarted rank may read the address a
    dead rank of the last attempt published under the same key, and fail to connect. None otherwise."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size(), is_master=False,
                          timeout=default_pg_timeout)
    return dist.PrefixStore(f"gptforge/attempt_{attempt}", store)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device, parallel: str, precision: str = "fp32") -> torch.nn.Module:
    """DistributedDataParallel (default) or FSDP2 (`fully_shard`) around the model; as is for one process.

    FSDP2 under precision bf16 (the resolved name, training.step.Precision) shards with a MixedPrecisionPolicy:
    each block's parameters are gathered in bf16 for forward and backward, gradients are reduced in fp32, and the
    sharded fp32 parameters stay the master weights the optimizer steps."""
    if not is_distributed():
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        policy = fsdp_policy(precision)
        for block in spec_for(model.cfg).blocks(model):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def fsdp_policy(precision: str):
    """FSDP2's MixedPrecisionPolicy for a precision: bf16 parameters in compute and fp32 gradient reduction under
    bf16; otherwise the parameters' own dtype throughout (fp16 keeps autocast and its GradScaler)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing: each of the spec's blocks recomputes its activations in backward instead of
    storing them, while it trains without a cache (evaluation and decoding run as before). Apply it before `wrap`."""
    for block in spec_for(model.cfg).blocks(model):
        block.forward = functools.partial(_checkpointed, block, block.forward)


def _checkpointed(block: torch.nn.Module, forward, x: torch.Tensor, *args, **kwargs):
    if args or not block.training:  # a cached step (layer cache, start position) or evaluation
        return forward(x, *args, **kwargs)
    return checkpoint(forward, x, **kwargs, use_reentrant=False)  # kwargs: the document mask


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, sync: bool):
    """Inside, backward() reduces gradients across ranks only when sync is True (the last micro-step)."""
    if sync or not is_distributed():
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def _is_fsdp(model: torch.nn.Module) -> bool:
    return is_distributed() and not hasattr(model, "module")


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 (FSDP: gathered from the shards; empty on other ranks)."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state dict, whole, on rank 0 (FSDP: gathered; empty on other ranks)."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, _parts(optimizer),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def _parts(optimizer: torch.optim.Optimizer):
    """The optimizers torch.distributed.checkpoint sees: a combined optimizer's parts (training.optim.Combined),
    saved as one state dict keyed by parameter name."""
    return getattr(optimizer, "parts", optimizer)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a whole optimizer state dict (as full_optimizer_state saves it) on every rank. The saved state brings
    the moments and step counts; the settings of each group (betas, weight decay, momentum) stay the optimizer's
    own, i.e. the resumed run's config, so a flag changed on --resume takes effect."""
    with _own_settings(optimizer):
        _load_optimizer_state(model, optimizer, state)


@contextlib.contextmanager
def _own_settings(optimizer: torch.optim.Optimizer):
    """Whatever is loaded inside, each param group keeps its own settings (the resumed run's config)."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    yield
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        group.update(own)


def _load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, _parts(optimizer), optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


# ----------------------------------------------------------------------------- sharded checkpoints (DCP)


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What a sharded checkpoint holds, as this rank has it: the model's parameters (FSDP2: DTensor shards; the
    raw parameters, so a padded vocabulary keeps its rows and a tied head is one tensor) and persistent buffers
    (a mixture of experts' routing biases), and the optimizer's state keyed by parameter name (its moments sharded
    as the parameters are)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    core = unwrap(model)
    if _is_fsdp(model):  # FSDP2 keeps the root's parameters unsharded after a forward without backward (evaluation)
        core.reshard()
    buffers = {f"{name}.{b}" if name else b: t for name, m in core.named_modules() for b, t in m._buffers.items()
               if t is not None and b not in m._non_persistent_buffers_set}
    return {"model": {**dict(core.named_parameters()), **buffers},
            "optimizer": get_optimizer_state_dict(core, _parts(optimizer), options=StateDictOptions())}


def checkpoint_group():
    """A gloo process group of its own for checkpoint writes that run beside training (--async-checkpoint):
    collectives of a background write never interleave with the training step's. None in one process."""
    return dist.new_group(backend="gloo") if is_distributed() else None


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path, background: bool = False,
                 group=None):
    """Every rank writes its own shards of the model and optimizer into `path` (torch.distributed.checkpoint),
    nothing gathered. background: the state is first copied to CPU memory, then written by a thread while
    training goes on; returns the Future to wait for (None when written already)."""
    import torch.distributed.checkpoint as dcp

    state = _sharded_state(model, optimizer)
    writer = dcp.FileSystemWriter(str(path), sync_files=True)
    alone = not is_distributed()
    if background:
        return dcp.async_save(state, storage_writer=writer, process_group=group, no_dist=alone)
    dcp.save(state, storage_writer=writer, process_group=group, no_dist=alone)
    return None


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path) -> None:
    """Load a sharded checkpoint written by any number of processes into this rank's model and optimizer
    (resharded by torch.distributed.checkpoint); each param group keeps its own settings."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = _sharded_state(model, optimizer)  # the shapes to read into (an unused optimizer gets its state made)
    with torch.no_grad():
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), no_dist=not is_distributed())  # in place
    with _own_settings(optimizer):
        set_optimizer_state_dict(unwrap(model), _parts(optimizer), state["optimizer"], options=StateDictOptions())


def whole_matrix(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for a function that needs the whole matrix (Muon's Newton–Schulz): under FSDP2 x is a DTensor
    sharded on dim 0, so every rank gathers it, computes fn on the whole, and keeps its own shard of the result."""
    if not is_distributed():
        return fn(x)
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(x, DTensor):  # DDP: every rank holds the whole matrix
        return fn(x)
    whole = fn(x.full_tensor())  # the same on every rank
    return distribute_tensor(whole, x.device_mesh, x.placements, src_data_rank=None)  # no communication


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of a few numbers over all ranks, in one all-reduce."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _to_numpy(obj):
    """Tensors inside lists/tuples/dicts -> ("tensor", ndarray), so they pickle without torch."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj.cpu().numpy())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    return obj


def _from_numpy(obj):
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str) and obj[0] == "tensor":
        return torch.from_numpy(obj[1])
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_numpy(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _from_numpy(v) for k, v in obj.items()}
    return obj


def gather(obj):
    """Every rank's obj (small: e.g. RNG states), as a list indexed by rank, on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    # tensors travel as numpy arrays: all_gather_object would unpickle them through torch.load
    dist.all_gather_object(out, _to_numpy(obj))
    return [_from_numpy(o) for o in out]


def from_main(make):
    """make() computed on rank 0 only, its (small, picklable) result handed to every rank."""
    if not is_distributed():
        return make()
    box = [make() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ----------------------------------------------------------------------------- torchrun restarts

ELASTIC_RUN = "elastic-run-id"  # in a run directory: the torchrun job (TORCHELASTIC_RUN_ID) that made it


def mark_run(run_dir) -> None:
    """Rank 0 of a new run under torchrun: note which job made run_dir, so that its restarts may continue it."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if job and is_main():
        (Path(run_dir) / ELASTIC_RUN).write_text(job + "\n")


def restarted(run_dir) -> bool:
    """Whether this process is torchrun's restart (--max-restarts) of the job that made run_dir: then `train
    --out run_dir` continues the run instead of refusing the directory it made itself."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        return False
    mark = Path(run_dir) / ELASTIC_RUN
    return mark.is_file() and mark.read_text().strip() == os.environ.get("TORCHELASTIC_RUN_ID")


def launch(nproc: int, args: list[str]) -> int:
    """Run `gptforge <args>` under torchrun with nproc processes on this machine; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "gptforge", *args]
    return subprocess.call(cmd)
