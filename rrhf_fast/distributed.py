"""Several processes under torchrun: the process group, the wrapped model (DDP, or FSDP2 with --fsdp), sharded
checkpoints, and the few collectives the training loop needs. With no torchrun every function here is a plain
single-process no-op, so rrhf_fast.train has one loop for both.

    torchrun --nproc_per_node 4 -m rrhf_fast.train --model M --data D ...                 # DDP
    torchrun --nproc_per_node 4 -m rrhf_fast.train --model M --data D --fsdp --bf16 ...   # FSDP2 (CUDA or CPU)
    torchrun --nproc_per_node 4 -m rrhf_fast.train ... --fsdp --lora-r 16                  # LoRA, base sharded

The loss head runs inside the wrapped module. `ModelLoss.forward(batch)` is rrhf_fast.checked.model_loss: the
model body and the fused loss, which reads the LM head's weight directly instead of calling the head. Wrapping
ModelLoss (not the Hugging Face model) is what keeps that weight right: DDP's gradient hooks and FSDP2's root
unshard both act around the wrapped module's forward, so under FSDP2 the fused kernel sees the full, unsharded
head weight, and a head tied to the input embeddings collects the gradients of both uses before they are
reduced. FSDP2 shards one unit per decoder layer (the classes the model lists in `_no_split_modules`) plus the
root, ModelLoss, which holds the embeddings, the final norm and the head.

FSDP2 with bf16 (wrap(..., bf16=True)): the sharded master weights stay float32 and so does the optimizer; each
unit gathers its parameters cast to bfloat16 for its forward and backward, and reduce-scatters the gradients in
float32 (MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)). The loss head is then fed bf16
hidden states and the bf16 head weight the root gathered. cpu_offload=True keeps the shards, their gradients and
the optimizer step in host memory (CPUOffloadPolicy): the GPU holds only the gathered units in flight.

Loading once: under FSDP2 only rank 0 needs the weights. The other ranks may build the model on the meta device
(no memory), `wrap` shards every rank's model, allocates the local shards and broadcasts rank 0's values into
them (set_model_state_dict with broadcast_from_rank0), so a node of N processes holds one full copy, not N.

Checkpoints under FSDP2 (save_checkpoint / load_checkpoint) go through torch.distributed.checkpoint: every rank
writes its own shard of the trained weights and of the optimizer state, nothing is gathered, and the directory
appears only when every rank has finished (written under a temporary name, renamed by rank 0). DCP can reshard
on load, but the trainer's data position counts global micro-batches of --batch-size x processes, so it resumes
at the same world size only. The final weights (full_model_state) are gathered onto rank 0's CPU one tensor at a
time and saved as Hugging Face safetensors.

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
import shutil
import sys
import traceback
from dataclasses import dataclass

import torch

from rrhf_fast.checked import model_loss


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
            raise ValueError(
                "--fsdp shards the model over the processes of a torchrun job: launch with "
                "torchrun --nproc_per_node N -m rrhf_fast.train ... --fsdp (N = 1 works too)"
            )
        return World(device=wanted)
    rank, size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if wanted.type == "cuda":
        if wanted.index is not None:
            raise ValueError(f"--device {device}: under torchrun each process uses the GPU of its local rank; pass --device cuda or auto")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): lower --nproc_per_node")
        wanted = torch.device("cuda", local_rank)
        torch.cuda.set_device(wanted)
    timeout = datetime.timedelta(seconds=timeout_s)
    if wanted.type == "cuda":  # device_id: bind the NCCL communicator to this GPU at once
        torch.distributed.init_process_group("nccl", timeout=timeout, device_id=wanted)
    else:
        torch.distributed.init_process_group("gloo", timeout=timeout)
    return World(rank=rank, local_rank=local_rank, size=size, device=wanted, fsdp=fsdp)


# ----------------------------------------------------------------------------------------------------------
# The wrapped model


class ModelLoss(torch.nn.Module):
    """forward(batch) = rrhf_fast.checked.model_loss(model, batch, ...): the module that DDP or FSDP2 wraps.

    run(fn) calls fn(); under FSDP2 it is registered as a forward method of the root, so it runs inside the
    root's forward hooks: the root's parameters (embeddings, final norm, LM head) are gathered around it, as
    evaluation and generation through the Hugging Face model need, and each decoder layer gathers its own.
    """

    def __init__(self, model, *, mode: str, loss_options: dict):
        super().__init__()
        self.model = model
        self.mode = mode
        self.loss_options = loss_options

    def forward(self, batch):
        return model_loss(self.model, batch, mode=self.mode, **self.loss_options)

    def run(self, fn):
        return fn()


def _fully_shard():
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError:
        raise ValueError(f"--fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6); this is torch {torch.__version__}") from None
    return fully_shard, register_fsdp_forward_method, MixedPrecisionPolicy, CPUOffloadPolicy


def wrap(model, world: World, *, mode: str, loss_options: dict, bf16: bool = False, cpu_offload: bool = False) -> torch.nn.Module:
    """The module the training loop calls: ModelLoss around `model`, wrapped for the world it runs in.

    Without torchrun: ModelLoss on world.device. DDP: the model is moved to the device first and rank 0's weights
    are broadcast to the others. FSDP2: every unit is sharded where the model was loaded (CPU, or the meta device
    on ranks other than 0), then each rank allocates its shards on world.device and receives rank 0's values, so
    a GPU never holds more than its shards at set-up and only rank 0 needs to have read the weights. bf16 and
    cpu_offload apply to FSDP2 only (under DDP --bf16 is autocast, which the loop sets up). The optimizer must be
    built after this: FSDP2 replaces the parameters with sharded DTensors.
    """
    if cpu_offload and not world.fsdp:
        raise ValueError("--cpu-offload offloads FSDP2's shards to host memory: pass --fsdp too")
    if not world.fsdp:
        model.to(world.device)
    module = ModelLoss(model, mode=mode, loss_options=loss_options)
    if not world.distributed:
        return module
    if not world.fsdp:
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    fully_shard, register_fsdp_forward_method, MixedPrecisionPolicy, CPUOffloadPolicy = _fully_shard()
    # rank 0's full weights, read before sharding replaces them: the values broadcast to every rank below
    full_state = model.state_dict() if world.is_main else {}
    options = {}
    if bf16:
        # cast_forward_inputs=False: the batch's float fields (rewards) keep their precision; the units' inputs
        # are bf16 anyway, since the bf16 embeddings start the residual stream.
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=world.device.type == "cuda")
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers and world.is_main:
        print(f"rrhf_fast.train: warning: {type(model).__name__} names no decoder layer class (_no_split_modules); "
              "--fsdp shards it as one unit", file=sys.stderr)  # fmt: skip
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(module, **options)
    register_fsdp_forward_method(module, "run")
    _receive_rank0_state(module, model, full_state, world, cpu_offload)
    # transformers' generate() then keeps every rank decoding until all have finished (synced_gpus): an FSDP2
    # forward is a collective, so a rank that stopped early would leave the others waiting.
    model._is_fsdp_managed_module = True
    return module


def probe_on_rank0(model, batch, world: World, *, mode: str):
    """Under FSDP2, before wrap: rank 0 runs rrhf_fast.probe's exactness check on its real weights (the other ranks
    may hold a meta model, and the check's per-parameter gradients cannot be taken through shards), and every rank
    caches rank 0's verdict for its model, so model_loss runs the same path everywhere (the verdict does not depend
    on the dtype, so it holds for the bf16 compute of wrap(..., bf16=True) too). A ValueError of the check (an
    explicit mode that fails) is raised on every rank. Returns rank 0's Plan; a no-op (None) without FSDP2, where
    model_loss checks on first use."""
    if not world.fsdp:
        return None
    from rrhf_fast import probe

    verdict = None
    if world.is_main:
        try:
            verdict = probe.plan(model, batch.to(next(model.parameters()).device), mode)
        except ValueError as err:
            verdict = err
    box = [verdict]
    torch.distributed.broadcast_object_list(box, src=0)
    verdict = box[0]
    if isinstance(verdict, ValueError):
        raise verdict
    if not world.is_main:
        probe.adopt(model, verdict, mode, batch)
    return verdict


def _receive_rank0_state(module, model, full_state: dict, world: World, cpu_offload: bool) -> None:
    """Fill every rank's shards with rank 0's values, after allocating them (on its device, or in host memory
    under CPU offload) where the model was built on the meta device; the buffers the state dict leaves out
    (rotary frequencies) are broadcast as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        if world.is_main:
            raise ValueError("rank 0 reads the weights every rank receives: build the model on the meta device on the other ranks only")
        module.to_empty(device="cpu" if cpu_offload else world.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)
    saved = set(model.state_dict().keys())
    for name, buffer in model.named_buffers():
        if name not in saved:
            if buffer.device != world.device:  # a non-persistent buffer follows the compute device
                buffer.data = buffer.data.to(world.device)
            torch.distributed.broadcast(buffer.data, src=0)


def run_on_full_model(module: torch.nn.Module, world: World, fn):
    """fn() where it can see the whole model: evaluation and generation through the Hugging Face model.

    Without torchrun, and under DDP, rank 0 runs it alone (each rank holds the whole model) while the others wait
    at a barrier; they get None. Under FSDP2 the weights are spread over the ranks, so every rank runs fn() on
    the same data, inside the root's forward hooks (ModelLoss.run), and every rank gets the result. (The root's
    unshard() alone is not enough: evaluation may come before the first forward, and a decoder layer that ran
    first would make itself the root.)
    """
    if world.fsdp:
        return module.run(fn)
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


def _full_state_options(trained_only: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Gathered onto rank 0's CPU one tensor at a time: no GPU ever holds the whole model.
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only)


def full_model_state(model, world: World, *, trained_only: bool = False) -> dict | None:
    """Under FSDP2 the full state dict of the Hugging Face model on rank 0 ({} on the others; every rank must
    call it); otherwise None, and save_pretrained reads the model's own weights. trained_only: the parameters
    that require grad alone (a LoRA model's adapter, for rrhf_fast.lora.save_adapter(..., state_dict=...))."""
    if not world.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_state_options(trained_only))


# ----------------------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint)

SHARDED_STATE = "sharded"  # the DCP directory inside a checkpoint: one file a rank and the .metadata index


def _sharded_state(module: torch.nn.Module, optimizer) -> dict:
    """{"model": ..., "optimizer": ...} of this rank's shards, keyed by parameter name; frozen parameters (a LoRA
    base model) are left out, since training never changes them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(module, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_state, "optimizer": optimizer_state}


def save_checkpoint(directory: str, module: torch.nn.Module, optimizer, world: World, write_rest=None) -> None:
    """Write the trained weights and the optimizer state into `directory`/sharded with DCP, every rank its own
    shard, then write_rest(tmp_dir) on rank 0 (scheduler, RNG states, trainer state: small files), and only then
    make `directory` appear. Every rank must call it.

    Everything goes into a temporary directory beside `directory` (.tmp-<name>), which rank 0 renames once every
    rank has finished: a job killed mid-write leaves that temporary directory and the previous checkpoint as they
    were. Several nodes need `directory` on a file system they all see (each rank writes its own file there)."""
    import torch.distributed.checkpoint as dcp

    parent, name = os.path.split(os.path.abspath(directory))
    tmp = os.path.join(parent, f".tmp-{name}")
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(world)
    dcp.save(_sharded_state(module, optimizer), checkpoint_id=os.path.join(tmp, SHARDED_STATE))
    if world.is_main and write_rest is not None:
        write_rest(tmp)
    barrier(world)  # every rank's shard is on disk, and rank 0's index and small files
    if world.is_main:
        if os.path.exists(directory):  # a re-run of the same step: swap, then drop the old one
            os.replace(directory, f"{tmp}-old")
            os.replace(tmp, directory)
            shutil.rmtree(f"{tmp}-old")
        else:
            os.replace(tmp, directory)
    barrier(world)


def load_checkpoint(directory: str, module: torch.nn.Module, optimizer, world: World) -> None:
    """Read what save_checkpoint wrote into the wrapped module and its optimizer: each rank reads the parts of
    the saved shards that make up its own (DCP reshards, so this works at any world size; see the module's
    docstring for why the trainer resumes at the same one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = os.path.join(directory, SHARDED_STATE)
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise ValueError(f"{directory}: no sharded state ({SHARDED_STATE}/.metadata); not a checkpoint written with --fsdp")
    state = _sharded_state(module, optimizer)
    dcp.load(state, checkpoint_id=path)  # raises when the checkpoint lacks a trained parameter of this model
    # strict=False: the frozen parameters (a LoRA base) are not in the state, and stay as they were loaded
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # fmt: skip


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
