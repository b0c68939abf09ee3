"""Loading a LightningCLI config (the Lightning layer): parse and validate once, instantiate on demand.

:class:`ConfigCLI` is a ``LightningCLI`` that never runs anything itself: it parses ``model``/``data``/
``trainer`` (and, for tuning, the ``study:`` and ``dropout:`` sections), instantiates fresh objects when asked
(each tuning trial gets its own model, datamodule and trainer) and turns a class that refuses its arguments
into a :class:`DropoutConfigError` the CLI prints in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from typing_extensions import override

from lightning_dropout._yaml import load_yaml
from lightning_dropout.errors import DropoutConfigError, closest, summarize
from lightning_dropout.redaction import redact_value

log = logging.getLogger(__name__)

__all__ = [
    "ConfigCLI",
    "check_config_file",
    "explain_parse_error",
    "load_config",
    "quiet_lightning",
]


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


def _import_hint(reason: str) -> str:
    """How to make a module that did not import importable, for ``No module named 'x'``: the folder searched
    and the three usual fixes."""
    missing = re.search(r"No module named '([\w.]+)'", reason)
    if missing is None:
        return ""
    top = missing.group(1).split(".")[0]
    return (
        f"; `{top}` is neither in the current folder ({os.getcwd()}) nor installed: run from the folder that "
        f"holds {top}.py (or the package {top}/), add that folder to PYTHONPATH "
        f"(PYTHONPATH=/path/to/folder lightning-dropout ...), or install its package (pip install -e .)"
    )


_MAPPING_SECTIONS = ("trainer", "study", "dropout")  # sections that hold keys (model and data name a class)


def check_config_file(path: str) -> None:
    """Refuse, in one line naming ``path``, a config file that is not UTF-8 text, not valid YAML, empty, not a
    mapping, or that repeats a key. A missing file is left to the parser (it says so)."""
    file = Path(path)
    if not file.is_file():
        return
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DropoutConfigError(
            f"{path}: a config must be UTF-8 YAML text, but byte {err.object[err.start]:#04x} at offset "
            f"{err.start} is not UTF-8 (a binary file?)."
        ) from None
    except OSError as err:
        raise DropoutConfigError(
            f"{path}: a config must be a readable file, but reading it failed: {err.strerror}."
        ) from None
    try:
        data = load_yaml(text)  # the safe loader, strict on repeated keys and alias bombs
    except DropoutConfigError as err:
        raise DropoutConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise DropoutConfigError(
            f"{path}: a config must be valid YAML, but it is not: {problem}{at}."
        ) from None
    if data is None:
        raise DropoutConfigError(
            f"{path}: a config must be a YAML mapping of sections (model, data, trainer, ...), but the file is "
            "empty."
        )
    if not isinstance(data, dict):
        raise DropoutConfigError(
            f"{path}: a config must be a YAML mapping of sections (model, data, trainer, ...), but it holds a "
            f"{type(data).__name__}: {str(data)[:80]!r}."
        )
    for section in _MAPPING_SECTIONS:
        if section in data and not isinstance(data[section], dict):
            value = "null" if data[section] is None else repr(data[section])[:60]
            raise DropoutConfigError(
                f"{path}: `{section}` must be a mapping of its keys (or be left out for the defaults), but got "
                f"{section}: {value}."
            )
    _check_class_keys(path, data, "")


_CLASS_KEYS = ("class_path", "init_args", "dict_kwargs")  # what jsonargparse reads beside a class_path


def _check_class_keys(path: str, node: Any, where: str) -> None:
    """Refuse a key beside ``class_path`` that jsonargparse does not read (``init_arg``: jsonargparse reports the
    whole mapping as "must be LightningModule or None")."""
    if isinstance(node, dict):
        if "class_path" in node:
            unknown = [k for k in node if k not in _CLASS_KEYS]
            if unknown:
                key = unknown[0]
                raise DropoutConfigError(
                    f"{path}: `{where}{key}` must be one of {list(_CLASS_KEYS)} beside `class_path`, but got "
                    f"{key!r}; nearest: {closest(str(key), _CLASS_KEYS)}."
                )
        for key, value in node.items():
            _check_class_keys(path, value, f"{where}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_class_keys(path, value, f"{where}{i}.")


def _class_params(path: str) -> list[str]:
    """The ``__init__`` parameter names of the class at ``path`` (``[]`` when it does not import)."""
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        params = inspect.signature(cls).parameters.values()
    except Exception:
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _is_dataclass(path: str) -> bool:
    module_name, _, name = path.rpartition(".")
    try:
        return dataclasses.is_dataclass(getattr(importlib.import_module(module_name), name))
    except Exception:
        return False


def _type_names(subtypes: str) -> str:
    """``[<class 'int'>, <class 'NoneType'>]`` -> ``int or None``."""
    text = re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", subtypes.strip()[1:-1])
    text = re.sub(r"typing\.Literal\[([^\]]*)\]", r"one of [\1]", text).replace("NoneType", "None")
    parts = [p.strip() for p in re.split(r",\s*(?![^\[]*\])", text) if p.strip()]
    return " or ".join(dict.fromkeys(parts))


_TOKEN = re.compile(
    r'Parser key "(?P<key>[^"]+)":'
    r"|Problem with given class_path '(?P<cls>[^']+)':(?=\s*(?P<reason>.*?)(?: - |$))"
    r"|Option '(?P<option>[^']+)' is not accepted"
    r"|Group '(?P<group>[\w.]+)' does not accept option '(?P<goption>[\w.]+)'"
    r"|Expected a <class '(?P<expected>[\w.]+)'>\. Got value: (?P<got>.*?)(?= - |$)"
    r"|Subtypes: (?P<subtypes>\[.*?\]) Errors:"
    r"|Given value: (?P<given>.*?)(?= - |$)"
    r"|(?:unrecognized arguments: --|[Kk]ey ')(?P<unknown>[A-Za-z_][\w.]*)"
    r"|the following arguments are required: (?P<required>[\w., ]+)"
)


def explain_parse_error(message: str, keys: list[str]) -> str:
    """One house-style sentence for a jsonargparse error: the full key path (``model.init_args.hidden``), the
    value and the expected type, or the nearest known key or argument; ``keys`` are the parser's keys."""
    flat = " ".join(str(message).split())
    path: list[str] = []
    cls: str | None = None
    subtypes: str | None = None
    for token in _TOKEN.finditer(flat):
        if token.group("key") is not None:
            path.append(token.group("key"))
        elif token.group("cls") is not None:
            reason = (token.group("reason") or "").strip()
            if reason and not reason.startswith(("Parser key", "Option", "Does not validate", "Group")):
                key = ".".join(path) or "class_path"
                nearest = _nearest_class(token.group("cls"))
                return (
                    f"`{key}.class_path` must name an importable class, but {token.group('cls')!r} is not: "
                    f"{reason.rstrip('.')}{nearest}{_import_hint(reason)}."
                )
            cls = token.group("cls")
            if not _is_dataclass(
                cls
            ):  # a dataclass item (a rule, a search group) is written without init_args
                path.append("init_args")
        elif token.group("option") is not None or token.group("goption") is not None:
            option = token.group("option") or f"{token.group('group')}.{token.group('goption')}"
            if cls is None:  # a key of the config itself
                return _unknown_key(".".join([*path, option]), keys)
            params = _class_params(cls)
            key = ".".join([*path, option])
            return (
                f"`{key}` must be an argument of {cls.rpartition('.')[2]}, but it is not; nearest: "
                f"{closest(option, params)}; choices: {params}."
            )
        elif token.group("expected") is not None:
            want = _type_names(f"<class '{token.group('expected')}'>")
            return f"`{'.'.join(path)}` must be {want}, but got {token.group('got').strip()!r}."
        elif token.group("subtypes") is not None:  # the innermost union is the one that failed
            subtypes = token.group("subtypes")
        elif token.group("given") is not None and subtypes is not None:
            return f"`{'.'.join(path)}` must be {_type_names(subtypes)}, but got {token.group('given').strip()!r}."
        elif token.group("unknown") is not None:
            return _unknown_key(token.group("unknown"), keys)
        elif token.group("required") is not None:
            missing = [k.strip() for k in token.group("required").split(",")]
            return (
                f"the config must give {missing} (a config file: `lightning-dropout COMMAND CONFIG.yaml`), but "
                "got none of them."
            )
    return summarize(flat)


def _unknown_key(key: str, keys: list[str]) -> str:
    """An unknown key: the nearest section when its first part is unknown, else the nearest full keys."""
    sections = sorted({k.split(".")[0] for k in keys if k and not k.startswith("_")})
    head = key.split(".")[0]
    if head not in sections:
        return (
            f"`{key}` must be a known key, but `{head}` is not a section; nearest: {closest(head, sections)}."
        )
    return f"`{key}` must be a known key, but it is not; nearest: {closest(key, keys)}."


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


class RedactedSaveConfig(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback`` writing the run's ``config.yaml`` with every password in it (a
    storage URL's) replaced by ``***``."""

    def __init__(self, parser: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(parser, redact_value(config), *args, **kwargs)


Section = tuple[Any, str]
"""An extra top-level section of a config and its help: a dataclass whose fields it holds, or the type of the
one value it holds (e.g. ``dict[str, Any]``)."""


MAX_DEVICES = 1024  # devices of one trainer on one machine: far above any GPU count or sensible CPU processes


class ConfigCLI(LightningCLI):
    """LightningCLI that parses only; see the module docstring.

    Extra top-level keys: ``ckpt_path``, ``plan`` (a dropout plan YAML applied with ``DropoutInjector``), and
    the ``sections`` the caller names (the CLI and the tuner pass the tuner's ``study`` and ``dropout``, see
    :data:`lightning_dropout.tune.config.CONFIG_SECTIONS`, so one file serves every command): this layer does
    not know them.
    """

    def __init__(
        self,
        args: list[str],
        instantiate: bool = True,
        save_config: bool = True,
        sections: Mapping[str, Section] | None = None,
    ) -> None:
        self.sections = dict(sections or {})  # read by add_arguments_to_parser, during LightningCLI.__init__
        self._skip_instantiation = not instantiate
        self.extra_callbacks: list[Callback] = []
        self.replaced_callbacks: tuple[type[Callback], ...] = ()
        self.extra_trainer_kwargs: dict[str, Any] = {}
        super().__init__(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=False,
            save_config_callback=RedactedSaveConfig if save_config else None,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
        )

    @override
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
        for key, (kind, help_) in self.sections.items():
            if dataclasses.is_dataclass(kind):  # a section of named fields
                parser.add_class_arguments(kind, key, help=help_)
            else:  # a section holding one value of that type (e.g. a mapping)
                parser.add_argument(f"--{key}", type=kind, default=None, help=help_)

    @override
    def parse_arguments(self, parser: Any, args: Any) -> None:
        files = [a for i, a in enumerate(args or []) if i > 0 and args[i - 1] in ("--config", "-c")]
        for path in files:
            check_config_file(path)
        try:
            super().parse_arguments(parser, args)
        except Exception as err:  # jsonargparse ArgumentError: one line with the key, the value, the choices
            if type(err).__name__ != "ArgumentError":
                raise
            where = f"{files[-1]}: " if files else ""
            keys = [a.dest for a in parser._actions if isinstance(getattr(a, "dest", None), str)]
            raise DropoutConfigError(where + explain_parse_error(str(err), keys)) from None

    @override
    def instantiate_classes(self) -> None:
        if self._skip_instantiation:  # LightningCLI.__init__ calls this; `fresh()` instantiates later
            self._skip_instantiation = False
            return
        self._check_devices()
        try:
            super().instantiate_classes()
        except ModuleNotFoundError as err:  # an accelerator or strategy's package is missing (tpu: torch_xla)
            raise DropoutConfigError(
                f"{self._where(str(err))}the trainer's accelerator or strategy needs a package that is not "
                f"installed: {summarize(str(err))}"
            ) from err
        except (ValueError, TypeError) as err:  # DropoutConfigError included
            raise DropoutConfigError(self._where(str(err)) + summarize(str(err))) from err
        except MisconfigurationException as err:  # Lightning refusing a trainer argument
            raise DropoutConfigError(self._where(str(err)) + "trainer: " + summarize(str(err))) from err
        except RuntimeError as err:  # two stateful callbacks of one type with the same state key
            found = re.search(r"more than one stateful callback of type `(\w+)`", str(err))
            if found is None:
                raise
            raise DropoutConfigError(
                f"{self._where('')}`trainer.callbacks` must give each {found.group(1)} its own state key (a "
                f"DropoutInjector: a distinct `name`), but several share one, so their checkpoint states would "
                "collide."
            ) from err

    def _check_devices(self) -> None:
        """Refuse a device count no machine has before Lightning acts on it (a million CPU processes hang; a
        count past the word size raises ``OverflowError``)."""
        devices = (self.config.get("trainer") or {}).get("devices")
        count = devices if isinstance(devices, int) and not isinstance(devices, bool) else None
        if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
            count = int(devices)
        if count is not None and count > MAX_DEVICES:
            raise DropoutConfigError(
                f"{self._where('')}`trainer.devices` must be at most {MAX_DEVICES:,} (or -1: all, or 'auto'), "
                f"but got devices={count}."
            )

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

    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> pl.Trainer:
        config = {**config, **self.extra_trainer_kwargs}
        given = config.get("callbacks")
        if self.replaced_callbacks and given:
            given = given if isinstance(given, list) else [given]
            config["callbacks"] = [c for c in given if not isinstance(c, self.replaced_callbacks)]
            for callback in given:
                if isinstance(callback, self.replaced_callbacks):
                    log.info("replacing the config's %r in trainer.callbacks", callback)
        return super()._instantiate_trainer(config, [*callbacks, *self.extra_callbacks])

    def asks_for_checkpoints(self) -> bool:
        """Whether the config asks for Lightning checkpoints: ``trainer.enable_checkpointing: true``, or a
        ``ModelCheckpoint`` (or subclass) in ``trainer.callbacks``. Lightning's default (``null``) saves one per
        run; a study's trials and re-runs pass this as ``enable_checkpointing`` instead, so they save none
        unless asked."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        trainer = self.config.get("trainer") or {}
        if trainer.get("enable_checkpointing") is True:
            return True
        callbacks = trainer.get("callbacks") or []
        for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
            if isinstance(callback, ModelCheckpoint):
                return True
            module, _, name = str(getattr(callback, "class_path", "")).rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), name) if module else None
            except (ImportError, AttributeError):
                continue
            if isinstance(cls, type) and issubclass(cls, ModelCheckpoint):
                return True
        return False

    def fresh(
        self,
        callbacks: list[Callback] | None = None,
        replacing: tuple[type[Callback], ...] = (),
        values: Mapping[str, Any] | None = None,
        **trainer_kwargs: Any,
    ) -> ConfigCLI:
        """Instantiate new model, datamodule and trainer (with extra callbacks and trainer arguments), with
        ``values`` (dotted config keys, e.g. ``model.init_args.lr``) set in the config for this instantiation
        only; the config's own ``trainer.callbacks`` of the ``replacing`` types are left out (``fit --plan``
        replaces the config's DropoutInjector)."""
        self.extra_callbacks = list(callbacks or [])
        self.replaced_callbacks = replacing
        self.extra_trainer_kwargs = trainer_kwargs
        parsed = self.config
        if values:
            self.config = parsed.clone()
            for key, value in values.items():
                self.config[key] = value
            # LightningCLI caches the config's dump, which its instantiator hands to `save_hyperparameters`:
            # the parsed config's dump would give the module the wrong `hparams` (kept otherwise: one dump)
            self.__dict__.pop("config_dump", None)
        try:
            with quiet_lightning():
                self.instantiate_classes()
        finally:
            self.config = parsed
            if values:  # that dump was of this instantiation's values
                self.__dict__.pop("config_dump", None)
        return self


def load_config(
    args: list[str],
    instantiate: bool = True,
    save_config: bool = True,
    sections: Mapping[str, Section] | None = None,
) -> ConfigCLI:
    """Parse (and validate) a config given as CLI arguments (``["--config", "x.yaml", overrides...]``), with
    the extra top-level ``sections`` (key -> (class, help)) besides ``model``, ``data`` and ``trainer``."""
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both argv and args
    try:
        with quiet_lightning():
            return ConfigCLI(args, instantiate=instantiate, save_config=save_config, sections=sections)
    finally:
        sys.argv = argv
