"""Per-row random streams: a row's randomness does not depend on which other rows draw.

``RowStreams(seed, n_rows)`` gives row ``r`` its own counter-based stream of uniforms: the
``k``-th uniform row ``r`` draws is

    U(seed, salt, r, k) = ⌊h / 2^11⌋ · 2^{−53},     h = mix(mix(mix(seed ⊕ salt′) + r) + k)

with ``mix`` the SplitMix64 finaliser (a bijection of 64-bit words with full avalanche), computed
on int64 tensors on the rows' device (no host sync).  ``k`` counts the row's own draws, so a row
draws the same tokens whether the other rows are live, compacted away, or in another batch: with
one seed, ``Plain`` and ``Reweight`` (SMC with ``q = p``, no resampling) draw the same rows, and
SMC's draws do not change when it computes on the live rows only.  Copies made by resampling sit
in other rows, so they draw independent futures.

Group-level draws (resampling, MH's choices of a position and of acceptance) use
``streams.generator``, a ``torch.Generator`` seeded from the same seed.  ``split(n)`` gives a
child with its own salt (a forked state's rows: look-ahead rollouts), deterministic in the order
of the calls.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """A 64-bit word as the int64 with the same bits."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_C1 = _signed(0xBF58476D1CE4E5B9)
_C2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _C1
    x = (x ^ _shr(x, 27)) * _C2
    return x ^ _shr(x, 31)


class RowStreams:
    """Counter-based uniforms per row (module docstring) and a ``torch.Generator`` for the rest."""

    def __init__(self, seed: int | None, n_rows: int, device: torch.device | str = "cpu", salt: int = 0) -> None:
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen, device=gen.device))
        else:
            gen.manual_seed(int(seed))
        self.seed, self.salt, self.device = int(seed), int(salt), torch.device(device)
        self.generator = gen
        self.counters = torch.zeros(n_rows, dtype=torch.long, device=self.device)
        self._key = int(mix(torch.tensor([_signed(self.seed) ^ _signed(self.salt * 0x632BE59BD9B4E019)]))[0])
        self._splits = 0

    @property
    def n_rows(self) -> int:
        return len(self.counters)

    def uniform(self, rows: torch.Tensor | None = None, draws: torch.Tensor | None = None,
                n_rows: int | None = None) -> torch.Tensor:
        """``(n,)`` float64 uniforms in ``[0, 1)``: the next one of each row in ``rows`` (all rows
        when None), on the streams' device.  Only the rows where ``draws`` (bool, ``(n,)``) is true
        advance their counter (the others get a value that their next draw will repeat).
        ``n_rows``: the decoding state's rows now (a state may grow: MH's proposal rows); new rows
        start their streams at 0."""
        if n_rows is not None and n_rows > self.n_rows:
            grow = torch.zeros(n_rows - self.n_rows, dtype=torch.long, device=self.device)
            self.counters = torch.cat([self.counters, grow])
        n = self.n_rows if n_rows is None else n_rows       # rows None: the state's first n rows
        r = torch.arange(n, device=self.device) if rows is None else rows.to(self.device).long()
        k = self.counters[:n] if rows is None else self.counters.index_select(0, r)
        h = mix(mix(r + self._key) + k)
        step = torch.ones_like(k) if draws is None else draws.to(self.device).long()
        if rows is None:
            self.counters[:n] += step
        else:
            self.counters.index_add_(0, r, step)
        return _shr(h, 11).double() * (2.0 ** -53)

    def split(self, n_rows: int) -> "RowStreams":
        """Streams for ``n_rows`` rows of a forked state, with their own salt (the ``i``-th split of
        these streams has salt ``(salt, i)``), and a generator seeded from it."""
        self._splits += 1
        child_seed = int(_shr(mix(torch.tensor([self._key + self._splits])), 2)[0])
        return RowStreams(child_seed, n_rows, self.device, salt=self.salt + 1)

    def __repr__(self) -> str:
        return f"RowStreams(seed={self.seed}, rows={self.n_rows}, salt={self.salt})"


def torch_generator(generator: "torch.Generator | RowStreams | None") -> torch.Generator | None:
    """The ``torch.Generator`` for group-level draws of ``generator`` (itself, or a streams' own)."""
    return generator.generator if isinstance(generator, RowStreams) else generator


__all__ = ["RowStreams", "mix", "torch_generator"]
