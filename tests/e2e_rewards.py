"""A dense verifier for end-to-end tests on random tiny models (real rewards are all zero there)."""


def digit_fraction(completions, **kwargs):
    """Fraction of characters that are digits: varies across samples, so advantages are non-zero.

    >>> digit_fraction(["a1", "22"])
    [0.5, 1.0]
    """
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def has_digit(completions, **kwargs):
    """1.0 when the completion contains a digit: a 0/1 "correctness" that random tiny models reach.

    >>> has_digit(["a1", "bb"])
    [1.0, 0.0]
    """
    return [float(any(ch.isdigit() for ch in c)) for c in completions]
