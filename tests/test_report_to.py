"""--report-to: TensorBoard event files and an offline wandb run hold the scalars of metrics.jsonl."""

import json
import os

import pytest

from rrhf_fast import report, train

TINY = [
    "--tiny-hidden-size", "32", "--tiny-layers", "1", "--task-train-size", "48", "--task-eval-size", "8",
    "--batch-size", "8", "--eval-batch-size", "8", "--log-every", "1", "--device", "cpu", "--eval-every", "2",
]  # fmt: skip


def metrics_rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]


def expected_scalars(out) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from metrics.jsonl, as report.scalars tags them."""
    expected = {}
    for row in metrics_rows(out):
        for tag, value in report.scalars(row).items():
            expected.setdefault(tag, {})[row["step"]] = value
    return expected


def tensorboard_scalars(log_dir) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as TensorBoard's own reader finds them in the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    found = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        found[tag] = {e.step: e.value for e in events}
        assert len(found[tag]) == len(events), f"{tag}: a step logged twice"
    return found


def assert_same_scalars(found, expected):
    assert set(found) == set(expected)
    for tag, values in expected.items():
        assert set(found[tag]) == set(values), tag
        for step, value in values.items():
            assert found[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)  # float32 in the file


def test_scalars_tag_every_finite_number():
    row = {"type": "train", "step": 3, "loss": 1.5, "rank_acc": None, "lr": 0.001, "grad_norm": float("nan"), "n": 2}
    assert report.scalars(row) == {"train/loss": 1.5, "train/lr": 0.001, "train/n": 2.0}


def test_tensorboard_event_files_hold_the_metrics_and_resume_purges(tmp_path, monkeypatch):
    """A 4-step run with --report-to tensorboard: TensorBoard's event reader finds exactly the numbers of
    metrics.jsonl (train/loss, train/rank_acc, eval/rank_acc, eval/reward, ...) at their steps. Interrupted
    after step 3 (checkpoint at 2) and resumed, the steps the interrupted run logged after its checkpoint are
    discarded: the event files then hold the resumed run's numbers, as metrics.jsonl does."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "o"
    argv = [*TINY, "--max-steps", "4", "--save-every", "2", "--report-to", "tensorboard", "--output-dir", str(out)]
    real = train.train_step

    def dies_in_step_4(setup, state, data):
        if state.step == 3:
            raise KeyboardInterrupt  # a run killed in step 4: its step-3 line is already written
        return real(setup, state, data)

    monkeypatch.setattr(train, "train_step", dies_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.cli(argv)
    monkeypatch.setattr(train, "train_step", real)
    assert 3 in tensorboard_scalars(out / "runs")["train/loss"]
    assert train.cli([*argv, "--resume"]) == 0
    expected = expected_scalars(out)
    assert {"train/loss", "train/rank_acc", "train/lr", "eval/rank_acc", "eval/reward"} <= set(expected)
    assert sorted(expected["train/loss"]) == [1, 2, 3, 4] and sorted(expected["eval/rank_acc"]) == [0, 2, 4]
    assert_same_scalars(tensorboard_scalars(out / "runs"), expected)


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    """--report-to wandb without network: an offline run under <output-dir>/wandb/ whose history (read back from
    the run's summary, its last value a tag) matches metrics.jsonl's last rows."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default is offline
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    out = tmp_path / "o"
    logged = []
    real_log = report.Wandb.log

    def spying_log(self, step, values):
        logged.append((step, dict(values)))
        return real_log(self, step, values)

    monkeypatch.setattr(report.Wandb, "log", spying_log)
    argv = [*TINY, "--max-steps", "2", "--save-every", "0", "--report-to", "wandb", "--output-dir", str(out)]
    assert train.cli(argv) == 0
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and any(f.endswith(".wandb") for f in os.listdir(out / "wandb" / runs[0]))
    assert logged == [(row["step"], report.scalars(row)) for row in metrics_rows(out)]
    assert wandb.run is None  # finished


def test_missing_library_is_exit_2_naming_pip(tmp_path, capsys, monkeypatch):
    real_find = report.importlib.util.find_spec
    monkeypatch.setattr(report.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find(name, *a))
    assert train.cli([*TINY, "--report-to", "all", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rrhf_fast.train: error: --report-to all needs the wandb package")
    assert "pip install wandb" in err[0]
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_other_ranks_report_nothing():
    """Rank 0 alone opens a reporter (train.main); the Setup default, used elsewhere, writes nowhere."""
    assert report.Reporter().sinks == []
    assert report.targets("none") == [] and report.targets("all") == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match="--report-to"):
        report.targets("mlflow")
