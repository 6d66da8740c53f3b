"""A dense verifier for end-to-end tests on random tiny models (real rewards are all zero there)."""


def digit_fraction(completions, **kwargs):
    """Fraction of characters that are digits: varies across samples, so advantages are non-zero.

    >>> digit_fraction(["a1", "22"])
    [0.5, 1.0]
    """
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]
