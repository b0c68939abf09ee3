"""From a study's winner to a trained model, with the user's own model imported from the current folder: the
command `tune` prints, the searched values beside the plan, `best --config-out` with a relative plan path,
`fit` that tests only a model with a test step; and no checkpoint per trial unless the config asks for one."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import yaml
from studies import BASE, tune, write_config

from lightning_dropout.cli import main
from lightning_dropout.config import load_config
from lightning_dropout.tune.config import CONFIG_SECTIONS
from lightning_dropout.tune.retrain import apply_values, values_path

pytestmark = pytest.mark.usefixtures("one_thread")

# a user's model, next to their config: no test_step (most models have none); records the lr it trains with
MYMODELS = """
import lightning as L
import torch
from torch import nn


class MyNet(L.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.linear1 = nn.Linear(40, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)
        self.example_input_array = torch.zeros(2, 40)

    def forward(self, x):
        return self.head(torch.relu(self.linear2(torch.relu(self.linear1(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("val_loss", nn.functional.cross_entropy(out, y))
        self.log("val_acc", (out.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        with open("lr_seen.txt", "a") as f:
            f.write(f"{self.hparams.lr!r}\\n")
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
"""


@pytest.fixture
def own_folder(tmp_path, monkeypatch):
    """``tmp_path`` as the user's folder: ``mymodels.py`` in it, the current folder, and not importable except
    through the CLI (no ``''`` on ``sys.path``, as with the installed ``lightning-dropout`` script)."""
    (tmp_path / "mymodels.py").write_text(MYMODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.setenv("PYTHONPATH", "")  # restored after the test: the CLI adds the current folder to it
    yield tmp_path
    sys.modules.pop("mymodels", None)


def _lrs(folder: Path) -> list[float]:
    path = folder / "lr_seen.txt"
    lrs = [float(line) for line in path.read_text().splitlines()] if path.exists() else []
    path.unlink(missing_ok=True)
    return lrs


def _study_config(folder: Path) -> Path:
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    config["model"] = {"class_path": "mymodels.MyNet", "init_args": {"hidden": 16}}
    config["study"] = {**BASE["study"], "n_trials": 2}
    config["search"] = {"model.init_args.lr": {"low": 1e-3, "high": 1e-1, "log": True}}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_own_model_from_tune_to_the_trained_winner(own_folder, data_dir, capsys):
    _study_config(own_folder)
    cache = f"--data.init_args.cache_dir={data_dir}"
    assert main(["tune", "study.yaml", cache]) == 0
    out = capsys.readouterr().out
    _lrs(own_folder)

    # the searched values are written beside the plan, as a config fragment, and printed
    plan = Path("runs/s/best_plan.yaml")
    from lightning_dropout.tune import open_study
    from lightning_dropout.tune.records import winner_trial

    winner_lr = winner_trial(open_study("s", "sqlite:///runs/s/study.db")).user_attrs["search"][
        "model.init_args.lr"
    ]
    assert values_path(plan) == Path("runs/s/best_values.yaml")
    assert yaml.safe_load(Path("runs/s/best_values.yaml").read_text()) == {
        "model": {"init_args": {"lr": winner_lr}}
    }
    assert f"searched values of the winner: model.init_args.lr={winner_lr!r}" in out

    # the last line is the command that trains the winner, with the config as given
    last = out.strip().splitlines()[-1]
    assert last == f"train the winner: lightning-dropout fit study.yaml {cache} --plan runs/s/best_plan.yaml"

    # it runs: the winner's lr applied (and said), validation reported, test skipped in one line (no test_step)
    assert main(shlex.split(last.partition(": ")[2])[1:]) == 0
    captured = capsys.readouterr()
    assert _lrs(own_folder) == [winner_lr]
    assert (
        f"model.init_args.lr={winner_lr!r} (the winner's searched value, from runs/s/best_values.yaml)"
        in (captured.err)
    )
    assert "test skipped after fit: the model defines no test_step" in captured.err
    assert "val_acc" in captured.out and "test_acc" not in captured.out

    # `best` prints the values; `--config-out` writes the plan path relative to the config itself
    assert main(["best", "study.yaml", "--config-out", "out/winner.yaml"]) == 0
    printed = capsys.readouterr().out
    assert f"# searched value of the winner: model.init_args.lr: {winner_lr!r}" in printed
    written = yaml.safe_load(Path("out/winner.yaml").read_text())
    assert written["plan"] == "winner_plan.yaml" and Path("out/winner_plan.yaml").is_file()

    # `fit out/winner.yaml`: its plan is found beside it (not in the current folder), its values are its own
    assert main(["fit", "out/winner.yaml", "--trainer.logger=false"]) == 0
    assert _lrs(own_folder) == [winner_lr]
    assert "test skipped after fit" in capsys.readouterr().err


def test_the_command_line_beats_the_winners_values_and_a_foreign_config_is_refused(
    own_folder, capsys, monkeypatch
):
    study = _study_config(own_folder)
    monkeypatch.syspath_prepend(str(own_folder))  # load_config here, without the CLI
    plan = own_folder / "runs" / "best_plan.yaml"
    plan.parent.mkdir()
    plan.write_text("sites: []\n")
    values_path(plan).write_text(yaml.safe_dump({"model": {"init_args": {"lr": 0.02}}}))
    cli = load_config(["--config", str(study)], instantiate=False, sections=CONFIG_SECTIONS)
    assert apply_values(plan, cli.config, []) == (values_path(plan), {"model.init_args.lr": 0.02}, {})
    given = ["--model.init_args.lr=0.5"]
    assert apply_values(plan, cli.config, given) == (values_path(plan), {}, {"model.init_args.lr": 0.02})

    # a value the config has no key for: this is not the config the study tuned
    values_path(plan).write_text(yaml.safe_dump({"model": {"init_args": {"dropout_rate": 0.3}}}))
    assert main(["fit", str(study), "--plan", str(plan)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model.init_args.dropout_rate" in lines[0]
    assert f"lightning-dropout fit STUDY_CONFIG.yaml --plan {plan}" in lines[0]


def test_trials_save_no_checkpoint_unless_the_config_asks(tmp_path, data_dir):
    # Lightning's default (enable_checkpointing unset) would save a .ckpt per trial under its logger
    config = write_config(tmp_path, trainer={"enable_checkpointing": None}, study={"n_trials": 1})
    assert tune(config, tmp_path, data_dir) == 0
    assert (tmp_path / "runs" / "s" / "trials" / "trial_0000").is_dir()
    assert not list(tmp_path.rglob("*.ckpt"))

    checkpoint = '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}]'
    config = write_config(
        tmp_path, trainer={"enable_checkpointing": None}, study={"n_trials": 1, "name": "c"}
    )
    assert tune(config, tmp_path, data_dir, f"--trainer.callbacks={checkpoint}") == 0
    saved = list(tmp_path.rglob("*.ckpt"))
    assert saved and all((tmp_path / "runs" / "c") in p.parents for p in saved)
