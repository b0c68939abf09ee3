"""Loading a LightningCLI config (the Lightning layer): parse and validate once, instantiate on demand.

:class:`ConfigCLI` is a ``LightningCLI`` that never runs anything itself: it parses ``model``/``data``/
``trainer`` (and, for tuning, the ``study:`` and ``dropout:`` sections), instantiates fresh objects when asked
(each tuning trial gets its own model, datamodule and trainer) and turns a class that refuses its arguments
into a :class:`ConfigError` the CLI prints in one line.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lightning_dropout.errors import ConfigError, closest, summarize

__all__ = ["ConfigCLI", "ConfigError", "load_config", "quiet_lightning"]


def _nearest_class(path: str) -> str:
    """``"; nearest: [...]"`` with the classes of ``path``'s module closest to its last part, when the module
    imports."""
    module_name, _, name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception:
        return ""
    classes = [n for n in dir(module) if not n.startswith("_") and inspect.isclass(getattr(module, n))]
    return f"; nearest: {closest(name, classes)}" if classes else ""


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Raise Lightning's loggers to WARNING for the block ("Seed set to", "GPU available" noise)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class ConfigCLI(LightningCLI):
    """LightningCLI that parses only; see the module docstring.

    Extra top-level keys: ``ckpt_path``, ``plan`` (a dropout plan YAML applied with ``DropoutInjector``), and
    the tuner's ``study`` (:class:`~lightning_dropout.tune.config.StudyConfig`) and ``dropout``
    (:class:`~lightning_dropout.tune.config.DropoutSpace`), so one file serves every command.
    """

    def __init__(self, args: list[str], instantiate: bool = True, save_config: bool = True) -> None:
        self._skip_instantiation = not instantiate
        self.extra_callbacks: list[Callback] = []
        self.extra_trainer_kwargs: dict[str, Any] = {}
        super().__init__(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=False,
            save_config_callback=SaveConfigCallback if save_config else None,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="checkpoint to resume (fit) or evaluate (validate, test, predict)",
        )
        parser.add_argument(
            "--plan",
            type=str | None,
            default=None,
            help="a dropout plan YAML (from `lightning-dropout best`) to apply",
        )
        # The tuner's sections are always known (and validated), so one file serves tune, fit and describe.
        from lightning_dropout.tune.config import DropoutSpace, StudyConfig

        parser.add_class_arguments(StudyConfig, "study", help="the Optuna study (tune)")
        parser.add_class_arguments(
            DropoutSpace, "dropout", help="where dropout may go and what to search (tune)"
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except Exception as err:  # jsonargparse ArgumentError: name the nearest known key for an unknown one
            message = " ".join(str(err).split())
            files = [a for i, a in enumerate(args or []) if i > 0 and args[i - 1] in ("--config", "-c")]
            where = f"{files[-1]}: " if files else ""
            missing = re.search(
                r'Parser key "([\w.]+)":.*?Problem with given class_path \'([^\']+)\': (.+?)(?: - |$)',
                message,
            )
            if type(err).__name__ == "ArgumentError" and missing is not None:
                key, path, reason = missing.groups()
                raise ConfigError(
                    f"{where}`{key}.class_path` must name an importable class, but {path!r} is not: "
                    f"{reason.strip().rstrip('.')}{_nearest_class(path)}."
                ) from None
            group = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message)
            found = re.search(r"(?:unrecognized arguments: --|[Kk]ey ')([A-Za-z_][\w.]*)", message)
            if type(err).__name__ != "ArgumentError" or (group is None and found is None):
                raise
            key = f"{group.group(1)}.{group.group(2)}" if group else found.group(1)  # type: ignore[union-attr]
            keys = [a.dest for a in parser._actions if isinstance(getattr(a, "dest", None), str)]
            raise ConfigError(
                f"{where}`{key}` must be a known key, but it is not; nearest: {closest(key, keys)}."
            ) from None

    def instantiate_classes(self) -> None:
        if self._skip_instantiation:  # LightningCLI.__init__ calls this; `fresh()` instantiates later
            self._skip_instantiation = False
            return
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:  # DropoutConfigError included
            raise ConfigError(self._where(str(err)) + summarize(str(err))) from err

    def _where(self, message: str) -> str:
        """``"<file>: <key>: "`` for an error raised while building a class of the config."""
        files = [str(p) for p in (self.config.get("config") or []) if p is not None]
        prefix = f"{files[-1]}: " if files else ""
        found = re.search(r"class_path='([^']+)'", message)
        if found is None:
            return prefix
        for key in ("model", "data"):
            if getattr(self.config.get(key), "class_path", None) == found.group(1):
                return f"{prefix}{key}.init_args: "
        callbacks = (self.config.get("trainer") or {}).get("callbacks") or []
        for i, callback in enumerate(callbacks if isinstance(callbacks, list) else [callbacks]):
            if getattr(callback, "class_path", None) == found.group(1):
                return f"{prefix}trainer.callbacks[{i}].init_args: "
        return f"{prefix}{found.group(1)}: "

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> pl.Trainer:
        config = {**config, **self.extra_trainer_kwargs}
        return super()._instantiate_trainer(config, [*callbacks, *self.extra_callbacks])

    def fresh(self, callbacks: list[Callback] | None = None, **trainer_kwargs: Any) -> ConfigCLI:
        """Instantiate new model, datamodule and trainer (with extra callbacks and trainer arguments)."""
        self.extra_callbacks = list(callbacks or [])
        self.extra_trainer_kwargs = trainer_kwargs
        with quiet_lightning():
            self.instantiate_classes()
        return self


def load_config(args: list[str], instantiate: bool = True, save_config: bool = True) -> ConfigCLI:
    """Parse (and validate) a config given as CLI arguments (``["--config", "x.yaml", overrides...]``)."""
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both argv and args
    try:
        with quiet_lightning():
            return ConfigCLI(args, instantiate=instantiate, save_config=save_config)
    finally:
        sys.argv = argv
