"""A LightningDataModule for MNIST-1D, generated locally and cached on disk.

MNIST-1D (Greydanus 2020, "Scaling down deep learning") is a procedurally generated, 1-D analogue of MNIST:
every example is a sequence of 40 floats drawn from one of 10 digit templates, then padded, translated,
scaled, sheared and made noisy. It is small enough to train on a CPU in seconds, yet models still separate
clearly on it (MLPs overfit, CNNs and GRUs generalise better), which makes it a good test bed for
regularisers such as dropout.

The data is generated with the ``mnist1d`` package's ``make_dataset`` (never downloaded) and written to an
``.npz`` file keyed by the generation arguments, so later runs and the other ranks of a distributed job just
load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from typing_extensions import override

from lightning_dropout.data.resumable import ResumableLoader
from lightning_dropout.errors import DropoutConfigError, check_int

__all__ = ["CACHE_ENV_VAR", "EpochShuffle", "MNIST1DDataModule", "default_cache_dir"]

CACHE_ENV_VAR = "LIGHTNING_DROPOUT_CACHE"
"""Environment variable naming lightning-dropout's cache root (default ``~/.cache/lightning_dropout``)."""

_CACHE_FORMAT = 1  # bump when the layout of the cached .npz changes
_ARRAY_KEYS = ("x", "y", "x_test", "y_test")


def default_cache_dir() -> Path:
    """Where MNIST-1D arrays are cached when no ``cache_dir`` is given.

    ``$LIGHTNING_DROPOUT_CACHE/mnist1d`` if the environment variable is set, else
    ``~/.cache/lightning_dropout/mnist1d``.
    """
    root = os.environ.get(CACHE_ENV_VAR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "lightning_dropout"
    return base / "mnist1d"


class EpochShuffle(RandomSampler):
    """A random permutation per epoch, a function of ``seed + epoch`` alone (Lightning calls ``set_epoch`` at
    every epoch start, as for ``DistributedSampler``): a run resumed at epoch ``k`` sees the order an
    uninterrupted run sees at epoch ``k``. Under DDP Lightning replaces it, as any ``RandomSampler``, with a
    ``DistributedSampler`` (which is seeded per epoch too)."""

    def __init__(self, data_source: Any, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from super().__iter__()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MNIST1DDataModule(L.LightningDataModule):
    """MNIST-1D (Greydanus 2020, "Scaling down deep learning") as a LightningDataModule.

    With the defaults the generator yields 5000 sequences of 40 points: 4000 for training and 1000 for
    testing, as in the paper. The validation set is carved out of the 4000 training sequences (a
    ``val_fraction`` share, chosen deterministically from ``seed``); the 1000 test sequences are only served
    by :meth:`test_dataloader`. Inputs are ``float32`` tensors of shape ``(B, 40)``, labels ``int64`` in
    ``[0, 10)``.

    :meth:`prepare_data` generates the arrays with ``mnist1d.data.make_dataset`` (no network access) and
    caches them as ``.npz`` in ``cache_dir``; the file name is derived from the generation arguments and it
    is written atomically, so concurrent processes cannot leave a torn file behind. :meth:`setup` loads it.

    Args:
        batch_size: Samples per batch for all loaders.
        val_fraction: Share of the training sequences held out for validation, ``0 <= val_fraction < 1``.
            ``0`` disables validation (:meth:`val_dataloader` returns ``[]``).
        seed: Seed of the data generator, of the train/validation split and of the training shuffle.
        num_workers: Worker processes per loader.
        cache_dir: Directory of the cached arrays. Defaults to :func:`default_cache_dir`
            (``~/.cache/lightning_dropout/mnist1d``, or ``$LIGHTNING_DROPOUT_CACHE/mnist1d``).
        num_samples: Sequences to generate in total (rounded down to a multiple of 10, one tenth per class).
        train_split: Share of the generated sequences used for training (and validation); the rest is the
            test set.

    Attributes:
        num_classes: Number of classes (10).
        input_length: Length of each sequence (40).
        train_dataset: Training :class:`~torch.utils.data.TensorDataset` (``None`` before :meth:`setup`).
        val_dataset: Validation dataset, ``None`` before :meth:`setup` or when ``val_fraction == 0``.
        test_dataset: Test dataset (``None`` before :meth:`setup`).

    Example:
        >>> import lightning as L
        >>> from lightning_dropout.data import MNIST1DDataModule
        >>> from lightning_dropout.zoo import MLP
        >>> dm = MNIST1DDataModule(batch_size=100, val_fraction=0.1, seed=0)
        >>> trainer = L.Trainer(max_epochs=5, accelerator="cpu")
        >>> trainer.fit(MLP(), datamodule=dm)  # doctest: +SKIP
        >>> trainer.test(datamodule=dm)  # doctest: +SKIP
    """

    num_classes: int = 10
    input_length: int = 40

    def __init__(
        self,
        batch_size: int = 100,
        val_fraction: float = 0.1,
        seed: int = 42,
        num_workers: int = 0,
        cache_dir: str | None = None,
        num_samples: int = 5000,
        train_split: float = 0.8,
    ) -> None:
        super().__init__()
        check_int(batch_size, "batch_size", 1)
        if not _is_real(val_fraction) or not 0.0 <= val_fraction < 1.0:
            raise DropoutConfigError(
                f"`val_fraction` must satisfy 0 <= val_fraction < 1, but got {val_fraction=}."
            )
        if not _is_int(seed):
            raise DropoutConfigError(f"`seed` must be an integer, but got {seed=}.")
        check_int(num_workers, "num_workers", 0)
        check_int(num_samples, "num_samples", 10)  # one sequence per class at least
        if not _is_real(train_split) or not 0.0 < train_split < 1.0:
            raise DropoutConfigError(
                f"`train_split` must satisfy 0 < train_split < 1, but got {train_split=}."
            )
        total = (num_samples // self.num_classes) * self.num_classes
        n_train = int(total * train_split)
        if not 0 < n_train < total:
            raise DropoutConfigError(
                f"`num_samples` and `train_split` must leave at least one training and one test sequence, "
                f"but got {num_samples=} and {train_split=} ({n_train} of {total} for training)."
            )
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.num_workers = num_workers
        self.num_samples = num_samples
        self.train_split = float(train_split)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    # ------------------------------------------------------------------ generation and cache

    def _generation_args(self) -> dict[str, Any]:
        """The full argument set handed to ``make_dataset`` (the package defaults plus ours)."""
        from mnist1d.data import get_dataset_args

        args = dict(get_dataset_args(as_dict=True))
        args.pop("url", None)  # only used for downloads, which we never do
        args.update(num_samples=self.num_samples, train_split=self.train_split, seed=self.seed)
        return args

    @property
    def cache_path(self) -> Path:
        """The ``.npz`` file holding the arrays for this module's generation arguments."""
        args = self._generation_args()
        try:
            from importlib.metadata import version

            pkg_version = version("mnist1d")
        except Exception:  # pragma: no cover - metadata missing in odd installs
            pkg_version = "unknown"
        key = json.dumps({"format": _CACHE_FORMAT, "mnist1d": pkg_version, "args": args}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"mnist1d_n{self.num_samples}_seed{self.seed}_{digest}.npz"

    @override
    def prepare_data(self) -> None:
        """Generate MNIST-1D locally and cache it, unless the cache file already exists."""
        path = self.cache_path
        if path.is_file():
            return
        arrays = self._generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(
                    handle, x=arrays["x"], y=arrays["y"], x_test=arrays["x_test"], y_test=arrays["y_test"]
                )
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _generate(self) -> dict[str, np.ndarray]:
        """Run ``mnist1d.data.make_dataset`` without disturbing the global NumPy / ``random`` state."""
        from mnist1d.data import make_dataset
        from mnist1d.utils import ObjectView

        args = ObjectView(self._generation_args())
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            data = make_dataset(args)  # seeds NumPy and `random` globally, hence the save / restore
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        return {key: np.asarray(data[key]) for key in _ARRAY_KEYS}

    def _load(self) -> dict[str, np.ndarray]:
        path = self.cache_path
        if not path.is_file():
            # `setup` without `prepare_data` (e.g. used outside a Trainer): generate now.
            self.prepare_data()
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in _ARRAY_KEYS if key not in npz.files]
            if missing:
                raise RuntimeError(
                    f"the MNIST-1D cache file {str(path)!r} lacks {missing}; delete it to rebuild."
                )
            return {key: npz[key] for key in _ARRAY_KEYS}

    # ------------------------------------------------------------------ datasets and loaders

    @override
    def setup(self, stage: str | None = None) -> None:
        """Load the cached arrays and build the train / validation / test datasets."""
        if self.train_dataset is not None:
            return
        arrays = self._load()
        x = torch.from_numpy(arrays["x"]).to(torch.float32)
        y = torch.from_numpy(arrays["y"]).to(torch.int64)
        x_test = torch.from_numpy(arrays["x_test"]).to(torch.float32)
        y_test = torch.from_numpy(arrays["y_test"]).to(torch.int64)

        # A positive fraction always holds out at least one sequence and always leaves one for training.
        n_val = min(len(y) - 1, max(1, round(len(y) * self.val_fraction))) if self.val_fraction > 0 else 0
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[:n_val], order[n_val:]
        self.train_dataset = TensorDataset(x[train_idx], y[train_idx])
        self.val_dataset = TensorDataset(x[val_idx], y[val_idx]) if n_val > 0 else None
        self.test_dataset = TensorDataset(x_test, y_test)

    def _loader(
        self,
        dataset: TensorDataset | None,
        name: str,
        kind: type[DataLoader[Any]] = DataLoader,
        **kwargs: Any,
    ) -> DataLoader[Any]:
        if dataset is None:
            raise RuntimeError(f"`{name}` is not built yet; call `prepare_data()` and `setup()` first.")
        return kind(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled training batches; the order of epoch ``e`` is a function of ``seed`` and ``e``
        (:class:`EpochShuffle`), so a resumed fit replays the uninterrupted order, from a mid-epoch checkpoint
        too (:class:`~lightning_dropout.data.resumable.ResumableLoader`). The loader has its own generator, so
        iterating it never draws from the global random state."""
        if self.train_dataset is None:
            return self._loader(None, "train_dataset")
        sampler = EpochShuffle(self.train_dataset, self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(
            self.train_dataset, "train_dataset", ResumableLoader, sampler=sampler, generator=generator
        )

    @override
    def val_dataloader(self) -> DataLoader[Any] | list[Any]:
        """Validation batches in a fixed order, or ``[]`` when ``val_fraction == 0``."""
        if self.val_fraction == 0:
            return []
        return self._loader(self.val_dataset, "val_dataset", shuffle=False, generator=torch.Generator())

    @override
    def test_dataloader(self) -> DataLoader[Any]:
        """The held-out test sequences (1000 with the defaults), in a fixed order."""
        return self._loader(self.test_dataset, "test_dataset", shuffle=False, generator=torch.Generator())
