"""Faults for the tests under torchrun, made by patching functions (nothing in rrhf_fast knows about them).

    --crash-at RANK:STEP     that rank raises in the first forward of its optimizer step STEP (counted from 1 in
                             this process), so the others wait for it in that step's gradient reduction
    --hang-at RANK:STEP      that rank sleeps there instead, until the others' collective times out
    --kill-in-save RANK:STEP that rank's process ends (os._exit, as if killed) while DCP writes its shard of a
                             checkpoint after optimizer step STEP
and one observation:
    --record-dtypes PATH     rank 0 writes to PATH, after every optimizer step, the dtypes the last nn.Linear of
                             that step computed with (weight, input), the trained parameters' (their type: a
                             DTensor shard under FSDP2, and the fraction of each parameter this rank holds) and
                             Adam's moments'

Run as a script it launches the trainer's command with the faults installed:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/faults.py --crash-at 1:2 -- <train flags>
"""

import argparse
import os
import signal
import sys
import time

from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook


def add_fault_flags(parser: argparse.ArgumentParser) -> None:
    for flag in ("--crash-at", "--hang-at", "--kill-in-save"):
        parser.add_argument(flag, metavar="RANK:STEP")
    parser.add_argument("--record-dtypes", metavar="PATH")


def _hits(spec: str | None, rank: int) -> int | None:
    """The step of a RANK:STEP spec when it names this rank."""
    if spec is None:
        return None
    at_rank, step = (int(x) for x in spec.split(":"))
    return step if at_rank == rank else None


def install_faults(args, rank: int) -> None:
    """Patch what args' faults hit on this rank: global module-forward and optimizer-step hooks, DCP's writer."""
    if args.record_dtypes and rank == 0:
        _record_dtypes(args.record_dtypes)
    crash, hang, kill = (_hits(spec, rank) for spec in (args.crash_at, args.hang_at, args.kill_in_save))
    if crash is None and hang is None and kill is None:
        return
    steps = [0]  # optimizer steps taken in this process

    def count_step(optimizer, *_):
        steps[0] += 1

    def before_forward(module, inputs):
        if steps[0] + 1 == hang:
            # the trainer's SIGTERM handler would only note the launcher's SIGTERM and sleep on until its SIGKILL
            # (30 s later): the default action ends the hung process at once
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(3600)
        if steps[0] + 1 == crash:
            raise RuntimeError(f"patched failure on rank {rank} at step {crash}")

    register_optimizer_step_post_hook(count_step)
    if crash is not None or hang is not None:
        register_module_forward_pre_hook(before_forward)
    if kill is not None:
        from torch.distributed.checkpoint import FileSystemWriter

        write_data = FileSystemWriter.write_data

        def dying_write(self, plan, planner):
            if steps[0] == kill:
                os._exit(9)  # as a killed process: no clean-up, nothing flushed
            return write_data(self, plan, planner)

        FileSystemWriter.write_data = dying_write


def _record_dtypes(path: str) -> None:
    import json

    import torch

    seen = {}

    def linear_input(module, inputs):
        if isinstance(module, torch.nn.Linear) and inputs and isinstance(inputs[0], torch.Tensor):
            seen.update(compute_weight=str(module.weight.dtype), compute_input=str(inputs[0].dtype))

    def after_step(optimizer, *_):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        seen.update(param_dtypes=sorted({str(p.dtype) for p in params}), param_types=sorted({type(p).__name__ for p in params}),
                    local_fraction=sum(t.numel() for t in local) / sum(p.numel() for p in params),
                    moment_dtypes=sorted({str(s["exp_avg"].dtype) for s in optimizer.state.values()}))  # fmt: skip
        with open(path, "w") as f:
            json.dump(seen, f)

    register_module_forward_pre_hook(linear_input)
    register_optimizer_step_post_hook(after_step)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_fault_flags(parser)
    split = sys.argv.index("--")
    install_faults(parser.parse_args(sys.argv[1:split]), int(os.environ.get("RANK", 0)))
    from rrhf_fast import train

    sys.exit(train.cli(sys.argv[split + 1 :]))
