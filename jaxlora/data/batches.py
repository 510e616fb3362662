"""Examples -> fixed-shape batches: `Split`, the tokenized examples of a split.

Stage 4 of `jaxlora.data`, the lowest beside `config` (it needs only numpy and
`jaxlora.runtime.Hosting`). Guarantees: every batch has exactly `batch_size`
rows (padding rows weigh 0), so every example counts exactly once and the
jitted step sees few shapes (one per length bucket); the examples are dealt to
the rows of the batches like cards (`slot_order`, `slot_examples`), so a
process that feeds some rows holds only their examples (`held_examples`); with
`packing`, each row's examples are packed into rows of their own (`pack`); the
batch order is a pure function of (seed, epoch, start), the same on any device
layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from jaxlora.runtime import Hosting

# The batch order `Split.batches` gives, named in the statistics so that a run
# made with another one is not resumed in an order it did not start with.
ORDER = "examples dealt to batch rows"


def slot_order(size: int, sizes: np.ndarray | None) -> np.ndarray:
    """The examples (0..size-1) in the order they are dealt to the rows of the
    batches: stored order, or by `sizes` (a length every process knows,
    shortest first, ties in stored order) so that every row gets the same mix
    of lengths."""
    return np.arange(size) if sizes is None else np.argsort(sizes, kind="stable")


def slot_examples(order: np.ndarray, rows: int, slot: int) -> np.ndarray:
    """The examples of `slot`, the `slot`-th row of every batch of `rows`:
    every `rows`-th example of `order` (`slot_order`) from `slot` on."""
    return order[slot::rows]


def held_examples(order: np.ndarray, hosting: Hosting) -> np.ndarray:
    """The examples a process reads and tokenizes: those of its rows, sorted."""
    return np.sort(np.concatenate([slot_examples(order, hosting.rows, r)
                                   for r in hosting.held_rows] or [np.zeros(0, np.int64)]))


@dataclass
class _Deal:
    """One batch size's deal: the units a batch row is filled from (the
    examples, or rows packed out of them), per held slot, and every slot's count."""

    arrays: dict[str, np.ndarray]  # the units' token arrays
    slots: dict[int, np.ndarray]  # held slot -> its units (indices into `arrays`), in order
    counts: np.ndarray  # (rows,) units of every slot, held or not
    lengths: np.ndarray  # real tokens of each unit


TOKEN_ARRAYS = ("input_ids", "attention_mask", "loss_mask", "segment_ids", "positions")


@dataclass(frozen=True, eq=False)
class Split:
    """Tokenized examples, right-padded to a common length T.

    input_ids, attention_mask: (N, T) int32; labels: (N,) int32 class ids;
    buckets: shorter lengths a batch is cut to when all its examples fit.

    Batches are laid out by row: the examples are dealt to the rows of the
    batches like cards, row r of a batch of B rows taking every B-th example
    from the r-th on (of the stored order; with buckets of the order by
    `sizes`, so that every row gets the same mix of lengths). A process that
    feeds some rows of each batch (a host of a pod) so reads and holds only
    their examples: `index` then numbers the examples held here within the
    whole split of `size`, and `hosting` says which rows they fill.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    buckets: tuple[int, ...] = ()
    loss_mask: np.ndarray | None = None  # causal-lm: (N, T), 1 where a token is a target
    segment_ids: np.ndarray | None = None  # packed rows: (N, T), example number within a row
    positions: np.ndarray | None = None  # packed rows: (N, T), position within its example
    packing: bool = False  # pack each row's examples (causal-lm training)
    index: np.ndarray | None = None  # the held examples' numbers in the split (None: all)
    size: int | None = None  # examples in the whole split (None: those held)
    hosting: Hosting | None = None  # the batch size the held examples are for, and the rows
    # With buckets: a length of every example of the whole split, the same on
    # every process (the text's characters); None: the tokens, all held here.
    sizes: np.ndarray | None = None
    _deals: dict = field(default_factory=dict, init=False, repr=False)  # batch size -> _Deal

    def __post_init__(self) -> None:
        if (self.input_ids.ndim != 2 or self.attention_mask.shape != self.input_ids.shape
                or self.labels.shape != self.input_ids.shape[:1]
                or (self.loss_mask is not None and self.loss_mask.shape != self.input_ids.shape)):
            raise ValueError(f"inconsistent shapes: input_ids {self.input_ids.shape}, "
                             f"attention_mask {self.attention_mask.shape}, "
                             f"labels {self.labels.shape}")

    def __len__(self) -> int:
        """Examples in the whole split (on every process alike)."""
        return len(self.labels) if self.size is None else self.size

    @property
    def held(self) -> int:
        """Examples this process holds."""
        return len(self.labels)

    def order(self) -> np.ndarray:
        """The examples in the order they are dealt to the rows (`slot_order`)."""
        if not self.buckets:
            return slot_order(len(self), None)
        if self.sizes is None and self.index is not None:
            raise ValueError("a split held in part needs the sizes of all its examples")
        return slot_order(len(self), self.attention_mask.sum(axis=1)
                          if self.sizes is None else self.sizes)

    def num_batches(self, batch_size: int) -> int:
        """Batches per pass, the last ones possibly partial."""
        return int(self._deal(batch_size).counts.max())

    def batches(self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the examples in batches of exactly `batch_size` rows.

        Keys: input_ids, attention_mask (batch_size, L) int32; labels
        (batch_size,) int32; weights (batch_size,) float32, 1 for an example and
        0 for the padding rows that fill a row that has run out. L is the
        smallest bucket that holds every example of the batch, else T.

        Each row of the batches takes its own units (examples, or rows packed
        from them), without `shuffle` in the order they were dealt (with
        buckets, sorted by length), with `shuffle` in an order drawn from
        (seed, epoch, row): a row never trades examples with another, only
        their order changes. With buckets, training rows take their units
        bucket by bucket (randomly within a bucket), every row alike, and the
        batches are shuffled by (seed, epoch): as every row got the same mix
        of lengths, most batches hold examples of one bucket (rows whose
        bucket counts differ mix two where they change). Rows this process
        does not feed stay zero. `start` skips that many batches, to resume
        mid-epoch. The order depends on neither the devices nor the processes:
        every layout trains on the same batches.
        """
        deal = self._deal(batch_size)
        steps = self.num_batches(batch_size)
        if not 0 <= start <= steps:
            raise ValueError(f"start {start} is outside 0..{steps}")
        edges = np.array(list(self.buckets) + [self.input_ids.shape[1]])
        units = np.full((steps, batch_size), -1)  # unit of each held row of each batch
        for r, slot in deal.slots.items():
            if shuffle:
                slot = slot[np.random.default_rng([seed, epoch, 1 + r]).permutation(len(slot))]
            if self.buckets:  # by bucket when training, by length when evaluating
                key = np.searchsorted(edges, deal.lengths[slot]) if shuffle else \
                    deal.lengths[slot]
                slot = slot[np.argsort(key, kind="stable")]
            units[:len(slot), r] = slot
        order = np.arange(steps)
        if shuffle and self.buckets:
            order = np.random.default_rng([seed, epoch]).permutation(steps)
        units = units[order]
        real = order[:, None] < deal.counts[None, :]  # every row's, held or not
        widths = self._widths(units, deal, edges)
        for k in range(start, steps):
            width, take = widths[k], units[k] >= 0
            batch = {name: np.zeros((batch_size, width), np.int32)
                     for name in TOKEN_ARRAYS if name in deal.arrays}
            for name, values in batch.items():
                values[take] = deal.arrays[name][units[k][take], :width]
            # One visible token in a padding row, so no attention row is fully masked.
            batch["attention_mask"][~real[k], 0] = 1
            batch["labels"] = np.zeros(batch_size, np.int32)
            batch["labels"][take] = deal.arrays["labels"][units[k][take]]
            batch["weights"] = real[k].astype(np.float32)
            yield batch

    def _widths(self, units: np.ndarray, deal: _Deal, edges: np.ndarray) -> np.ndarray:
        """Each batch's width: the smallest bucket holding its longest example
        (over the rows of every process), else T."""
        if not self.buckets:
            return np.full(len(units), edges[-1])
        lengths = np.append(deal.lengths, 0)  # unit -1: no example
        longest = lengths[units].max(axis=1, initial=0)
        longest = self._hosting(units.shape[1]).combine(longest, np.max)
        return edges[np.searchsorted(edges, longest)]

    def _hosting(self, batch_size: int) -> Hosting:
        if self.hosting is None:
            return Hosting(batch_size)
        if self.hosting.rows != batch_size:
            raise ValueError(f"this process holds the examples of batches of "
                             f"{self.hosting.rows} rows, not {batch_size}")
        return self.hosting

    def _deal(self, batch_size: int) -> _Deal:
        """The units of each held row of batches of `batch_size`, made once."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if batch_size in self._deals:
            return self._deals[batch_size]
        hosting = self._hosting(batch_size)
        index = np.arange(self.held) if self.index is None else self.index
        arrays = {name: getattr(self, name) for name in TOKEN_ARRAYS + ("labels",)
                  if getattr(self, name) is not None}
        order = self.order()
        slots = {}
        for r in hosting.held_rows:
            members = slot_examples(order, batch_size, r)
            local = np.searchsorted(index, members)
            if (local >= len(index)).any() or not np.array_equal(index[local], members):
                raise ValueError(f"row {r} of a batch needs examples this process lacks")
            slots[r] = local
        counts = np.array([len(slot_examples(order, batch_size, r)) for r in range(batch_size)])
        if self.packing:
            arrays, slots = _pack_slots(arrays, slots)
            mine = np.full(batch_size, -1)
            for r, slot in slots.items():
                mine[r] = len(slot)
            counts = hosting.combine(mine, np.max)
        lengths = arrays["attention_mask"].sum(axis=1)
        self._deals[batch_size] = _Deal(arrays, slots, counts, lengths)
        return self._deals[batch_size]

    def head(self, n: int) -> Split:
        """The first `n` examples of a split this process holds whole."""
        if self.index is not None:
            raise ValueError("this process holds only part of the split")
        return Split(**{name: getattr(self, name)[:n] for name in TOKEN_ARRAYS + ("labels",)
                        if getattr(self, name) is not None}, buckets=self.buckets)


def _pack_slots(arrays: dict[str, np.ndarray], slots: dict[int, np.ndarray]
                ) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray]]:
    """Each row's examples packed, in their order, into packed rows of its own:
    the packed rows' arrays, and each row's packed rows (indices into them)."""
    names = ("input_ids", "attention_mask", "loss_mask")
    parts = [_pack_arrays({name: arrays[name][slot] for name in names})
             for slot in slots.values()] or [_pack_arrays({n: arrays[n][:0] for n in names})]
    starts = np.cumsum([0] + [len(part["labels"]) for part in parts])
    packed = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    return packed, {r: np.arange(starts[i], starts[i + 1]) for i, r in enumerate(slots)}


def pack(split: Split) -> Split:
    """Causal-lm examples packed greedily, in order, into rows of the same width:
    each row holds whole examples one after another; `segment_ids` numbers them
    (1, 2, ...; 0 is padding) so that attention stays within an example and no
    target crosses into the next, and `positions` restart at 0 for each."""
    return Split(buckets=split.buckets, **_pack_arrays(
        {name: getattr(split, name) for name in ("input_ids", "attention_mask", "loss_mask")}))


def _pack_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`pack` on arrays: input_ids, attention_mask, loss_mask in; the packed
    rows' token arrays, segment_ids, positions and (zero) labels out."""
    width = arrays["input_ids"].shape[1]
    lengths = arrays["attention_mask"].sum(axis=1)
    rows: list[list[int]] = []
    used = width
    for i, n in enumerate(lengths):
        if used + n > width:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += int(n)
    shape = (len(rows), width)
    out = {name: np.zeros(shape, np.int32) for name in TOKEN_ARRAYS}
    for r, members in enumerate(rows):
        at = 0
        for segment, i in enumerate(members, start=1):
            n = int(lengths[i])
            out["input_ids"][r, at:at + n] = arrays["input_ids"][i, :n]
            out["attention_mask"][r, at:at + n] = 1
            out["loss_mask"][r, at:at + n] = arrays["loss_mask"][i, :n]
            out["segment_ids"][r, at:at + n] = segment
            out["positions"][r, at:at + n] = np.arange(n)
            at += n
    out["labels"] = np.zeros(len(rows), np.int32)
    return out
