"""Seeds derived from seeds (SplitMix64), so every random stream a method draws (a step's
zeroth-order noise, a layer's random projection, a chunk of noise on one thread) is fixed by the
run's seed and its position, whatever the number of threads or processes drawing it."""

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def step_seed(base_seed: int, step: int) -> int:
    """Output ``step`` of a SplitMix64 generator seeded with ``base_seed`` (63 bits, for torch)."""
    z = (base_seed + (step + 1) * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 over their sum chain): nearby inputs, far-apart seeds."""
    z = 0
    for value in values:
        z = step_seed(z, value)
    return z
