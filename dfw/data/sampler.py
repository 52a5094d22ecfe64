"""The training order: an endless stream of block indices that is a pure function of the seed, entered at the
position of the current optimizer step, so a resumed run sees exactly the batches the uninterrupted run
saw."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Stream position k holds index perm_p[k % num_items] with p = k // num_items, where pass p's
    permutation is torch.randperm(num_items) drawn from torch.Generator().manual_seed(seed + p).

    Optimizer step s consumes stream positions [s * samples_per_step, (s + 1) * samples_per_step), with
    samples_per_step = batch_size * accumulate_grad_batches * world_size; rank r of world_size takes every
    world_size-th of them from offset r, so the ranks together cover the same stream as one device would.
    `current_step()` is read when iteration starts (Lightning restores a checkpoint's global step before
    it iterates the training loader), and `__len__` counts what is left for this rank until `max_steps`,
    or one pass over the data when there is no `max_steps`. With `positions=True` it yields the stream
    positions themselves, for a dataset that maps them to blocks with `index_at` (dfw.data.synthetic).
    """

    def __init__(
        self,
        num_items: int,  # training blocks
        seed: int,
        samples_per_step: int,  # samples that one optimizer step consumes, all ranks together
        current_step: Callable[[], int],  # the optimizer step training (re)starts from
        max_steps: int | None = None,  # the step training stops at; None: one pass per iteration
        rank: int = 0,
        world_size: int = 1,
        positions: bool = False,  # yield stream positions rather than block indices (for SyntheticMix)
    ) -> None:
        assert (
            num_items > 0
            and samples_per_step > 0
            and samples_per_step % world_size == 0
            and 0 <= rank < world_size
        )
        self.num_items = num_items
        self.seed = seed
        self.samples_per_step = samples_per_step
        self.current_step = current_step
        self.max_steps = max_steps
        self.rank = rank
        self.world_size = world_size
        self.positions = positions
        self._permutation: tuple[int, list[int]] = (-1, [])  # (pass, its permutation), the one last used

    def __len__(self) -> int:
        if self.max_steps is None:
            return self.num_items // self.world_size
        return max(0, self.max_steps - self.current_step()) * self.samples_per_step // self.world_size

    def __iter__(self) -> Iterator[int]:
        position = self.current_step() * self.samples_per_step + self.rank  # in the all-ranks stream
        for _ in range(len(self)):
            yield position if self.positions else self.index_at(position)
            position += self.world_size

    def index_at(self, position: int) -> int:
        """The block index at `position` of the stream."""
        pass_index, offset = divmod(position, self.num_items)
        if self._permutation[0] != pass_index:
            generator = torch.Generator().manual_seed(self.seed + pass_index)
            self._permutation = (pass_index, torch.randperm(self.num_items, generator=generator).tolist())
        return self._permutation[1][offset]
