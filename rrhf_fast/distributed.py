"""Several processes under torchrun: the process group, the wrapped model (DDP, or FSDP2 with --fsdp), and the
few collectives the training loop needs. With no torchrun every function here is a plain single-process no-op,
so rrhf_fast.train has one loop for both.

    torchrun --nproc_per_node 4 -m rrhf_fast.train --model M --data D ...          # DDP
    torchrun --nproc_per_node 4 -m rrhf_fast.train --model M --data D --fsdp ...   # FSDP2, CUDA only

The loss head runs inside the wrapped module. `ModelLoss.forward(batch)` is rrhf_fast.prefix.model_loss: the
model body and the fused loss, which reads the LM head's weight directly instead of calling the head. Wrapping
ModelLoss (not the Hugging Face model) is what keeps that weight right: DDP's gradient hooks and FSDP2's root
unshard both act around the wrapped module's forward, so under FSDP2 the fused kernel sees the full, unsharded
head weight, and a head tied to the input embeddings collects the gradients of both uses before they are
reduced. FSDP2 shards one unit per decoder layer (the classes the model lists in `_no_split_modules`) plus the
root, ModelLoss, which holds the embeddings, the final norm and the head.

Exactness: each rank runs --batch-size queries a micro-batch, so a step sees batch x grad-accum x world-size
queries. The RRHF loss is a mean over the groups of a micro-batch and DDP (and FSDP2) average the gradients over
ranks, so when every rank has the same number of groups the averaged gradient is the gradient of the mean over
all of them: the update one process makes with --batch-size multiplied by the world size, up to the order of
the floating-point sums. rrhf_fast.train deals whole global micro-batches for that reason (see its
batch_indices).

Failure: a rank that raises ends its own process at once with a non-zero status (exit_status), and torchrun
then stops the others; a rank that hangs makes the others' collectives time out after --ddp-timeout seconds.
"""

import contextlib
import datetime
import os
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from rrhf_fast.cli import InputError
from rrhf_fast.prefix import model_loss

# Test-only fault injection: "<rank>:<step>:crash" raises on that rank at the start of that step, "...:hang"
# sleeps there instead; tests/test_distributed.py uses it to check that one failing rank ends the job.
TEST_FAULT_ENV = "RRHF_FAST_TEST_FAULT"


@dataclass
class World:
    """This process's place in the job: rank 0 of 1 without torchrun."""

    rank: int = 0
    local_rank: int = 0  # rank on this machine: the index of its GPU
    size: int = 1
    device: torch.device = torch.device("cpu")
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, evaluates and writes files."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0: one per machine, for files every rank of the machine reads."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str, *, fsdp: bool, timeout_s: float) -> World:
    """The World of this process; under torchrun, also the process group (NCCL on CUDA, gloo on CPU).

    device is the --device flag: "auto" takes CUDA when there is one. Under torchrun every process takes the GPU
    of its local rank, so an explicit index (cuda:1) is refused rather than shared by all ranks.
    """
    wanted = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if not launched_by_torchrun():
        if fsdp:
            raise InputError(
                "--fsdp shards the model over the processes of a torchrun job: launch with "
                "torchrun --nproc_per_node N -m rrhf_fast.train ... --fsdp (N = 1 works too)"
            )
        return World(device=wanted)
    rank, size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if wanted.type == "cuda":
        if wanted.index is not None:
            raise InputError(f"--device {device}: under torchrun each process uses the GPU of its local rank; pass --device cuda or auto")
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): lower --nproc_per_node")
        wanted = torch.device("cuda", local_rank)
        torch.cuda.set_device(wanted)
    if fsdp and wanted.type != "cuda":
        raise InputError(f"--fsdp shards the model over GPUs and needs CUDA (the device is {wanted}); on CPU run without --fsdp (DDP)")
    timeout = datetime.timedelta(seconds=timeout_s)
    if wanted.type == "cuda":  # device_id: bind the NCCL communicator to this GPU at once
        torch.distributed.init_process_group("nccl", timeout=timeout, device_id=wanted)
    else:
        torch.distributed.init_process_group("gloo", timeout=timeout)
    return World(rank=rank, local_rank=local_rank, size=size, device=wanted, fsdp=fsdp)


# ----------------------------------------------------------------------------------------------------------
# The wrapped model


class ModelLoss(torch.nn.Module):
    """forward(batch) = rrhf_fast.prefix.model_loss(model, batch, ...): the module that DDP or FSDP2 wraps.

    forward(run=fn) calls fn() instead, inside the same forward hooks: under FSDP2 that is how evaluation and
    generation reach the full model, since only the root's forward gathers the root's parameters (embeddings,
    final norm, LM head); each decoder layer gathers its own when it runs.
    """

    def __init__(self, model, *, mode: str, loss_options: dict):
        super().__init__()
        self.model = model
        self.mode = mode
        self.loss_options = loss_options

    def forward(self, batch=None, run=None):
        if run is not None:
            return run()
        return model_loss(self.model, batch, mode=self.mode, **self.loss_options)


def wrap(model, world: World, *, mode: str, loss_options: dict) -> torch.nn.Module:
    """The module the training loop calls: ModelLoss around `model`, wrapped for the world it runs in.

    Without torchrun: ModelLoss on world.device. DDP: the model is moved to the device first and rank 0's weights
    are broadcast to the others. FSDP2: the model stays where it was loaded (CPU) and fully_shard moves each unit
    to the GPU as it shards it, so a GPU never holds more than one unit unsharded at set-up. The optimizer must be
    built after this: FSDP2 replaces the parameters with sharded DTensors.
    """
    if not world.fsdp:
        model.to(world.device)
    module = ModelLoss(model, mode=mode, loss_options=loss_options)
    if not world.distributed:
        return module
    if not world.fsdp:
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise InputError(f"--fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6); this is torch {torch.__version__}") from None
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers and world.is_main:
        print(f"rrhf_fast.train: warning: {type(model).__name__} names no decoder layer class (_no_split_modules); "
              "--fsdp shards it as one unit", file=sys.stderr)  # fmt: skip
    for layer in layers:
        fully_shard(layer)
    fully_shard(module)
    # transformers' generate() then keeps every rank decoding until all have finished (synced_gpus): an FSDP2
    # forward is a collective, so a rank that stopped early would leave the others waiting.
    model._is_fsdp_managed_module = True
    return module


def run_on_full_model(module: torch.nn.Module, world: World, fn):
    """fn() where it can see the whole model: evaluation and generation through the Hugging Face model.

    Without torchrun, and under DDP, rank 0 runs it alone (each rank holds the whole model) while the others wait
    at a barrier; they get None. Under FSDP2 the weights are spread over the ranks, so every rank runs fn()
    inside the root's forward, on the same data, and every rank gets the result.
    """
    if world.fsdp:
        return module(run=fn)
    result = fn() if world.is_main else None
    barrier(world)
    return result


def gradient_sync(module: torch.nn.Module, world: World, sync: bool):
    """A context for one micro-batch's forward and backward: under DDP, sync=False skips the gradient all-reduce
    (the gradients add up locally and the last micro-batch of the step reduces their sum). FSDP2 reduce-scatters
    every micro-batch, which keeps only sharded gradients between micro-batches."""
    if sync or world.fsdp or not world.distributed:
        return contextlib.nullcontext()
    return module.no_sync()


# ----------------------------------------------------------------------------------------------------------
# Collectives for the loop and the checkpoints


def barrier(world: World) -> None:
    if world.distributed:
        torch.distributed.barrier()


def sum_over_ranks(values: list[float], world: World) -> list[float]:
    """Each value summed over the ranks (float64, so that counts stay exact)."""
    if not world.distributed:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=world.device)
    torch.distributed.all_reduce(total)
    return total.tolist()


def gather_objects(obj, world: World) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others."""
    if not world.distributed:
        return [obj]
    objects = [None] * world.size if world.is_main else None
    torch.distributed.gather_object(obj, objects, dst=0)
    return objects


def clip_grad_norm(parameters, max_norm: float, world: World) -> float:
    """The global gradient norm, after clipping the gradients to max_norm (0: no clipping).

    Under DDP every rank holds the all-reduced gradients, so the local norm is the global one. Under FSDP2 each
    holds a shard: the norm is a DTensor whose full_tensor() sums the shards' squares over the ranks.
    """
    parameters = [p for p in parameters if p.grad is not None]
    if not world.fsdp:
        if max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        return float(torch.norm(torch.stack([p.grad.norm() for p in parameters])))
    from torch.distributed.tensor import DTensor

    total = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return float(total)


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Gathered onto rank 0's CPU one tensor at a time: no GPU ever holds the whole model.
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model, world: World) -> dict | None:
    """Under FSDP2 the full state dict of the Hugging Face model on rank 0 ({} on the others; every rank must
    call it); otherwise None, and save_pretrained reads the model's own weights."""
    if not world.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_state_options())


def optimizer_state(module: torch.nn.Module, optimizer, world: World) -> dict:
    """What optimizer.pt holds: optimizer.state_dict(), or under FSDP2 the full state gathered on rank 0 and
    keyed by parameter name (every rank must call it)."""
    if not world.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_full_state_options())


def load_optimizer_state(module: torch.nn.Module, optimizer, path: str, world: World) -> None:
    """Restore what optimizer_state saved. Under FSDP2 rank 0 reads the file and each rank receives its shard."""
    if not world.fsdp:
        optimizer.load_state_dict(torch.load(path, map_location=world.device))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(path, map_location="cpu") if world.is_main else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=options)


# ----------------------------------------------------------------------------------------------------------
# Ending the job


def exit_status(run) -> int:
    """run() -> its exit status; under torchrun a failure ends this process at once.

    Returning normally from a failed rank could hang: the interpreter's shutdown destroys the process group and
    may wait on peers that are themselves waiting for this rank. os._exit skips that, torchrun sees the non-zero
    status and stops the other ranks. An unexpected exception prints its traceback first (status 1).
    """
    try:
        status = run()
    except BaseException:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise
        traceback.print_exc()
        status = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if status != 0:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        torch.distributed.destroy_process_group()
    return status


def inject_test_fault(world: World, step: int) -> None:
    """The test-only fault of TEST_FAULT_ENV, when it names this rank and step."""
    spec = os.environ.get(TEST_FAULT_ENV)
    if not spec:
        return
    rank, at_step, kind = spec.split(":")
    if int(rank) != world.rank or int(at_step) != step:
        return
    if kind == "hang":
        time.sleep(3600)
    raise RuntimeError(f"{TEST_FAULT_ENV}: injected failure on rank {world.rank} at step {step}")
