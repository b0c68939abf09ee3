"""The ``lightning-dropout`` command line (the only module that reads argv).

Commands:

* ``fit | validate | test | predict --config CONFIG.yaml [overrides] [--ckpt_path CKPT]``: a LightningCLI
  run of that Trainer method. Put a ``DropoutInjector`` in ``trainer.callbacks`` (see ``configs/``); any
  existing LightningCLI config (``model``/``data``/``trainer`` with ``class_path``/``init_args``) works.
* ``describe --config CONFIG.yaml``: build the model, resolve the injector's rules and print every dropout
  site (module, variant, rate, the shape it sees) without training.
* ``variants``: list the registered variants.

User errors (a bad config, a rule that matches nothing) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from lightning_dropout.errors import DropoutConfigError

__all__ = ["main"]

_LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
_USAGE = (
    "usage: lightning-dropout {fit,validate,test,predict,describe,variants} [--config CONFIG.yaml] [overrides]\n"
    "  fit|validate|test|predict  run LightningCLI (put a DropoutInjector in trainer.callbacks)\n"
    "  describe                   print the dropout sites the config's DropoutInjector would create\n"
    "  variants                   list the dropout variants\n"
    "Run `lightning-dropout fit --help` for every LightningCLI option."
)


class _UserConfigError(Exception):
    """A class named in the config refused its arguments (raised while instantiating it)."""


_RULE_BROKEN = re.compile(r"`[^`]+` (must|needs|names) .*?but got .*?(?=\s+- |\s+Given value|$)")


def _fail(message: str) -> int:
    """Print one line on stderr: the house-style sentence buried in the message if there is one."""
    flat = " ".join(str(message).split())
    found = _RULE_BROKEN.search(flat)
    line = found.group(0) if found else flat
    sys.stderr.write(f"lightning-dropout: error: {line[:500]}\n")
    return 2


def _cli(args: list[str]) -> Any:
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    class _CLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument(
                "--ckpt_path",
                type=str | None,
                default=None,
                help="checkpoint to resume (fit) or evaluate (validate, test, predict)",
            )

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except DropoutConfigError:
                raise
            except (ValueError, TypeError) as err:
                raise _UserConfigError(" ".join(str(err).split())) from err

    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both argv and args
    with _quiet_lightning():  # "Seed set to", "GPU available": noise before a one-line config error
        try:
            return _CLI(
                pl.LightningModule,
                pl.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=args,
                run=False,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"exit_on_error": False},
            )
        finally:
            sys.argv = argv


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _describe(args: list[str]) -> int:
    from lightning_dropout.callback import DropoutInjector
    from lightning_dropout.inject import describe, format_sites

    cli = _cli(args)
    injectors = [c for c in cli.trainer.callbacks if isinstance(c, DropoutInjector)]
    if not injectors:
        return _fail(
            "the config must list a lightning_dropout.callback.DropoutInjector in trainer.callbacks, "
            "but it has none."
        )
    model = cli.model
    with _quiet_lightning():
        for injector in injectors:
            injector.inject(model)
    example = getattr(model, "example_input_array", None)
    sys.stdout.write(format_sites(describe(model, example)) + "\n")
    return 0


def _variants() -> int:
    from lightning_dropout.variants import VARIANTS

    width = max(map(len, VARIANTS))
    for name in sorted(VARIANTS):
        doc = (VARIANTS[name].__doc__ or "").strip().splitlines()[0]
        sys.stdout.write(f"{name.ljust(width)}  {doc}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-dropout`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(_USAGE + "\n")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    try:
        if command in _LIGHTNING_COMMANDS:
            cli = _cli(rest)
            getattr(cli.trainer, command)(
                cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path")
            )
            return 0
        if command == "describe":
            return _describe(rest)
        if command == "variants":
            return _variants()
    except (DropoutConfigError, _UserConfigError) as err:
        return _fail(str(err))
    except SystemExit as exit_:  # --help, or a parser that printed its own message
        return int(exit_.code or 0) if isinstance(exit_.code, int) or exit_.code is None else 2
    except Exception as err:
        if type(err).__name__ == "ArgumentError":  # jsonargparse, with exit_on_error=False
            return _fail(str(err))
        raise
    return _fail(
        f"the command must be one of {[*_LIGHTNING_COMMANDS, 'describe', 'variants']}, but got {command!r}."
    )


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
