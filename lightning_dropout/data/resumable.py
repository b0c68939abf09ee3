"""A DataLoader that resumes in the middle of an epoch where it stopped (Lightning's stateful-loader interface).

Lightning saves ``state_dict()`` of every training loader that has one in each checkpoint and hands it back to
``load_state_dict()`` on resume; it then expects the loader to yield the epoch's *remaining* batches. A plain
DataLoader restarts the epoch from its first batch instead, so a fit resumed from a mid-epoch checkpoint
(``ModelCheckpoint(every_n_train_steps=...)``, or one saved at a mid-epoch validation) trains on other batches
than the uninterrupted fit did.

:class:`ResumableLoader` counts the batches it has served in the current epoch and, after a resume, skips the
batches the checkpoint had already trained on. That replays the uninterrupted order only when the order is a
function of the epoch alone, so its sampler must have ``set_epoch`` and seed itself from the epoch (like
:class:`~lightning_dropout.data.mnist1d.EpochShuffle`, a ``SequentialSampler``, or the ``DistributedSampler``
Lightning puts in under DDP).

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> loader = ResumableLoader(TensorDataset(torch.arange(6)), batch_size=2)
    >>> first = next(iter(loader))[0].tolist()
    >>> state = loader.state_dict()
    >>> state
    {'epoch': None, 'batches': 1}
    >>> loader.load_state_dict(state)
    >>> [batch[0].tolist() for batch in loader]  # the epoch's remaining batches
    [[2, 3], [4, 5]]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from lightning_dropout.errors import DropoutConfigError

__all__ = ["ResumableLoader"]


class ResumableLoader(DataLoader[Any]):
    """A DataLoader whose position in the epoch is saved in Lightning's checkpoints and restored on resume.

    Lightning needs the batch count of a sized loader without pre-fetching, so the batches served are the batches
    trained. Takes exactly DataLoader's arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0  # batches of the current epoch handed out so far
        self._resume: tuple[int | None, int] | None = None  # (epoch, batches) to skip at the next iteration

    def _epoch(self) -> int | None:
        epoch = getattr(self.sampler, "epoch", None)
        return int(epoch) if isinstance(epoch, int) else None

    def state_dict(self) -> dict[str, Any]:
        """The epoch of the sampler (``None`` without one) and the batches served in it."""
        return {"epoch": self._epoch(), "batches": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Skip the ``batches`` already trained when the next iteration is of the saved ``epoch``."""
        batches = state.get("batches") if isinstance(state, dict) else None
        if not isinstance(batches, int) or isinstance(batches, bool) or batches < 0:
            raise DropoutConfigError(
                "a ResumableLoader state must be {'epoch': int | None, 'batches': int >= 0}, but got "
                f"{state!r}; was the checkpoint saved with another training loader?"
            )
        self._resume = (state.get("epoch"), batches)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # a generator: the body runs at the first batch, after Lightning has called the sampler's set_epoch
        skip = 0
        if self._resume is not None:
            epoch, batches = self._resume
            self._resume = None
            if epoch == self._epoch():  # a checkpoint of an epoch's end resumes at the next epoch: no skip
                skip = batches
        self._served = 0
        batches_iter = super().__iter__()
        for _ in range(skip):
            if next(batches_iter, None) is None:
                return
            self._served += 1
        for batch in batches_iter:
            self._served += 1
            yield batch
