"""--report-to: the scalars of metrics.jsonl also to TensorBoard and / or Weights & Biases, as HF Trainer's flag does.

Each metrics.jsonl row (`{"type": "train" | "eval" | "train_set", "step": s, name: number, ...}`) becomes one scalar
a number, tagged `<type>/<name>` at step s: train/loss, train/rank_loss, train/sft_loss, train/rank_acc, train/lr,
train/grad_norm, train/tokens_per_s, ..., eval/rank_acc, eval/reward, eval/exact (train_set/rank_acc instead of
eval/rank_acc when the run has no held-out set and measures the first training queries). A null (a NaN, such as the
accuracy of a batch without a pair) is left out, as metrics.jsonl leaves it unmeasured.

    tensorboard   event files in <output-dir>/runs/ (torch.utils.tensorboard.SummaryWriter): `tensorboard --logdir
                  <output-dir>/runs`. A resumed run discards what the interrupted one logged after its checkpoint
                  (purge_step), as metrics.jsonl is cut back to it; a fresh run starts the directory afresh.
    wandb         a wandb run in <output-dir>/wandb/, offline unless WANDB_MODE says otherwise (`wandb sync` uploads
                  it later); WANDB_PROJECT names the project (default rrhf_fast). The config is the run's config.

Both libraries are optional (`pip install "rrhf-fast[tensorboard]"`, `[wandb]`); asking for one that is not installed
is a ValueError naming the pip command, raised by `check` before anything runs. Only rank 0 reports.
"""

import importlib.util
import math
import os
import shutil

TARGETS = ("tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def targets(report_to: str) -> list[str]:
    """The libraries --report-to names: none -> [], all -> both, else the one."""
    if report_to == "none":
        return []
    if report_to == "all":
        return list(TARGETS)
    if report_to not in TARGETS:
        raise ValueError(f"--report-to must be none, all or one of {', '.join(TARGETS)}, got {report_to!r}")
    return [report_to]


def check(report_to: str) -> None:
    """A ValueError naming the pip command when a library --report-to names is not installed."""
    for name in targets(report_to):
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ValueError(f"--report-to {report_to} needs the {name} package, which is not installed: "
                             f'pip install {_PACKAGES[name]} (or pip install "rrhf-fast[{name}]")')  # fmt: skip


def scalars(row: dict) -> dict[str, float]:
    """The tagged scalars of a metrics.jsonl row: `<type>/<name>` -> value, for every finite number but the step."""
    kind = row["type"]
    return {
        f"{kind}/{name}": float(value)
        for name, value in row.items()
        if name not in ("type", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value)
    }  # fmt: skip


class TensorBoard:
    def __init__(self, output_dir: str, first_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = os.path.join(output_dir, "runs")
        if first_step is None:  # a fresh run: the event files of an earlier one would mix with its curves
            shutil.rmtree(log_dir, ignore_errors=True)
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=first_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # a few small records a logged step: cheap, and nothing is lost when a run dies

    def close(self) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, output_dir: str, config: dict):
        import wandb

        os.makedirs(output_dir, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "rrhf_fast"), dir=output_dir, config=config,
            mode=os.environ.get("WANDB_MODE", "offline"), settings=wandb.Settings(console="off", silent=True),
        )  # fmt: skip

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Reporter:
    """Where the rows of metrics.jsonl also go: `log(row)` for every row, `close()` at the end."""

    def __init__(self, sinks=()):
        self.sinks = list(sinks)

    def log(self, row: dict) -> None:
        values = scalars(row)
        for sink in self.sinks:
            sink.log(row["step"], values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def open_reporter(report_to: str, output_dir: str, *, config: dict, first_step: int | None = None) -> Reporter:
    """The Reporter of --report-to for a run writing into output_dir; first_step: the first step a resumed run logs
    (None: a fresh run)."""
    sinks = []
    for name in targets(report_to):
        sinks.append(TensorBoard(output_dir, first_step) if name == "tensorboard" else Wandb(output_dir, config))
    return Reporter(sinks)
