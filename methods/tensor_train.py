"""Tensor-train (TT) matrices: the factorisation LoRETTA trains instead of dense matrices.

A weight-shaped matrix W (out x in) is reshaped into a d-way tensor whose modes are a
factorisation of ``out`` followed by one of ``in`` (576 x 576 -> 8 x 8 x 9 x 8 x 8 x 9), and that
tensor is stored as d cores G_i of shape (r_{i-1}, k_i, r_i) with r_0 = r_d = 1:

    W[o1..op, i1..iq] = G_1[:, o1, :] · G_2[:, o2, :] · ... · G_d[:, iq, :]

so it holds sum_i r_{i-1}·k_i·r_i numbers instead of out·in. The inner TT-ranks are the given rank
(LoRETTA: 5), capped where a full-rank train needs fewer (r_i <= k_1···k_i and <= k_{i+1}···k_d).
``tt_svd`` factorises a given tensor (Oseledets' TT-SVD): with uncapped ranks it reconstructs it
to float tolerance, which the tests use to check ``full()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from stages.core.errors import fail

import torch
from torch import nn

MAX_FACTOR = 16  # largest mode a factorisation picks by itself (4096 -> 16·16·16, LoRETTA's shapes)


# ----------------------------------------------------------------------------- factorisations

def _partitions(n: int, smallest: int = 2) -> Iterator[list[int]]:
    """Every way to write n as a non-decreasing product of factors >= ``smallest``."""
    yield [n]
    factor = smallest
    while factor * factor <= n:
        if n % factor == 0:
            for rest in _partitions(n // factor, factor):
                yield [factor] + rest
        factor += 1


def factorize(n: int, max_factor: int = MAX_FACTOR) -> list[int]:
    """A factorisation of n into as few factors <= ``max_factor`` as possible, the most balanced
    of those (smallest sum): 576 -> [8, 8, 9], 1536 -> [8, 12, 16], 192 -> [12, 16], 8 -> [8].
    A prime above ``max_factor`` stays one mode."""
    if not isinstance(n, int) or n < 1:
        fail(f"cannot factorise {n!r}: expected a positive integer")
    if n == 1:
        return [1]
    candidates = list(_partitions(n))
    fitting = [c for c in candidates if max(c) <= max_factor]
    if fitting:
        return min(fitting, key=lambda c: (len(c), sum(c)))
    return min(candidates, key=lambda c: (max(c), len(c), sum(c)))


def parse_shapes(entries: Sequence[str] | None) -> dict[int, list[int]]:
    """``["576:8x8x9", "1536:8x12x16"]`` (params.yaml / --tt_shapes) -> {576: [8, 8, 9], ...}."""
    shapes: dict[int, list[int]] = {}
    for entry in entries or []:
        dim, sep, factors = str(entry).partition(":")
        try:
            size, modes = int(dim), [int(k) for k in factors.split("x")]
        except ValueError:
            fail(f"--tt_shapes entry '{entry}' is not valid: expected DIM:K1xK2x... such as 576:8x8x9")
        if not sep or size < 1 or any(k < 1 for k in modes):
            fail(f"--tt_shapes entry '{entry}' is not valid: expected DIM:K1xK2x... of positive integers such as 576:8x8x9")
        if math.prod(modes) != size:
            fail(f"--tt_shapes entry '{entry}': {'x'.join(map(str, modes))} = {math.prod(modes)}, "
                 f"expected a factorisation of {size}")
        shapes[size] = modes
    return shapes


def factors_for(n: int, shapes: dict[int, list[int]] | None = None) -> list[int]:
    """The factorisation of dimension n: the one given for it, else ``factorize(n)``."""
    shapes = shapes or {}
    return list(shapes[n]) if n in shapes else factorize(n)


# ----------------------------------------------------------------------------- ranks and TT-SVD

def tt_ranks(modes: Sequence[int], rank: int | None) -> list[int]:
    """[1, r_1, ..., r_{d-1}, 1]: ``rank`` capped by what a full-rank train needs (None: uncapped)."""
    ranks = [1]
    for i in range(1, len(modes)):
        full = min(math.prod(modes[:i]), math.prod(modes[i:]))
        ranks.append(full if rank is None else min(rank, full))
    return ranks + [1]


def parameter_count(modes: Sequence[int], ranks: Sequence[int]) -> int:
    """sum_i r_{i-1}·k_i·r_i: what a TT with these modes and ranks stores."""
    return sum(ranks[i] * k * ranks[i + 1] for i, k in enumerate(modes))


def tt_svd(tensor: torch.Tensor, rank: int | None = None) -> list[torch.Tensor]:
    """TT cores of ``tensor`` by sequential truncated SVDs (Oseledets 2011), computed in float64:
    exact (to rounding) when ``rank`` is None or at least the tensor's TT-ranks."""
    modes = list(tensor.shape)
    ranks = tt_ranks(modes, rank)
    rest = tensor.detach().to(torch.float64).reshape(1, -1)
    cores = []
    for i, k in enumerate(modes[:-1]):
        matrix = rest.reshape(ranks[i] * k, -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        r = min(ranks[i + 1], s.numel())
        ranks[i + 1] = r
        cores.append(u[:, :r].reshape(ranks[i], k, r))
        rest = s[:r, None] * vh[:r]
    cores.append(rest.reshape(ranks[-2], modes[-1], 1))
    return [c.to(tensor.dtype) for c in cores]


def contract(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor (modes k_1..k_d) of a train of cores, contracted left to right."""
    out = cores[0].reshape(-1, cores[0].shape[-1])  # (k_1, r_1)
    for core in cores[1:]:
        r, k, r_next = core.shape
        out = (out @ core.reshape(r, k * r_next)).reshape(-1, r_next)
    return out.reshape([c.shape[1] for c in cores])


# ----------------------------------------------------------------------------- the module

class TTMatrix(nn.Module):
    """An out x in matrix held as TT cores over the modes out_factors + in_factors.

    Initialisation: every core N(0, s²) with s chosen so that the entries of ``full()`` have
    standard deviation ``std`` (an entry is a sum of r_1···r_{d-1} products of d core entries, so
    Var = r_1···r_{d-1}·s^{2d}); ``zero_last`` zeroes the last core, so the matrix starts at 0 while
    the other cores give that core a gradient (LoRA's B = 0)."""

    def __init__(self, out_features: int, in_features: int, out_factors: Sequence[int] | None = None,
                 in_factors: Sequence[int] | None = None, rank: int | None = 5, std: float = 0.02,
                 zero_last: bool = False, dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        self.out_features, self.in_features = int(out_features), int(in_features)
        self.out_factors = list(out_factors) if out_factors is not None else factorize(self.out_features)
        self.in_factors = list(in_factors) if in_factors is not None else factorize(self.in_features)
        for name, dim, factors in (("out", self.out_features, self.out_factors), ("in", self.in_features, self.in_factors)):
            if not factors or any(int(k) != k or k < 1 for k in factors) or math.prod(factors) != dim:
                fail(f"TT factorisation {'x'.join(map(str, factors)) or '(empty)'} of the {name} dimension "
                     f"multiplies to {math.prod(factors) if factors else 0}, expected {dim}")
        if rank is not None and rank < 1:
            fail(f"TT rank must be a positive integer, got {rank}")
        self.modes = self.out_factors + self.in_factors
        self.ranks = tt_ranks(self.modes, rank)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.ranks[i], k, self.ranks[i + 1], dtype=dtype, device=device))
            for i, k in enumerate(self.modes))
        self.reset_parameters(std, zero_last)

    @torch.no_grad()
    def reset_parameters(self, std: float, zero_last: bool = False) -> None:
        d = len(self.modes)
        inner = math.prod(self.ranks[1:-1])
        scale = (std * std / inner) ** (1.0 / (2 * d)) if std > 0 else 0.0
        for core in self.cores:
            core.normal_(0.0, scale) if scale > 0 else core.zero_()
        if zero_last:
            self.cores[-1].zero_()

    def full(self) -> torch.Tensor:
        """The dense out x in matrix."""
        return contract(list(self.cores)).reshape(self.out_features, self.in_features)

    def num_parameters(self) -> int:
        return parameter_count(self.modes, self.ranks)

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, out_factors: Sequence[int] | None = None,
                    in_factors: Sequence[int] | None = None, rank: int | None = None) -> TTMatrix:
        """The TT of a given dense matrix (TT-SVD); exact to rounding with ``rank=None``."""
        out_features, in_features = matrix.shape
        module = cls(out_features, in_features, out_factors, in_factors, rank=rank, dtype=matrix.dtype, device=matrix.device)
        cores = tt_svd(matrix.reshape(module.modes), rank)
        module.ranks = [1] + [c.shape[2] for c in cores]
        module.cores = nn.ParameterList(nn.Parameter(c.contiguous()) for c in cores)
        return module

    def extra_repr(self) -> str:
        return (f"{self.out_features}x{self.in_features}, modes={'x'.join(map(str, self.out_factors))}|"
                f"{'x'.join(map(str, self.in_factors))}, ranks={self.ranks}")
