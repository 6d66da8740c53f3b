"""Built-in prompt generators: seeded synthetic tasks with exact gold answers.

`generate_arithmetic` makes grade-school arithmetic (word problems or bare expressions) — the
offline default task for the SmolLM2 recipes, where 2-term addition leaves plenty of room for RL.
`generate_reasoning_gym` adapts any `reasoning_gym` task to rlkit rows; the package is imported
lazily so rlkit works without it.

Every generator returns rows `{"prompt": str, "answer": str, ...}` and is a pure function of its
arguments: the same seed gives the same rows on every machine and Python version (only
`random.Random` with integer seeds is used, whose stream Python keeps stable).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

__all__ = ["generate_arithmetic", "generate_reasoning_gym", "evaluate_terms"]

_OPS = ("+", "-", "*")
_NAMES = (
    ("Mia", "she"), ("Liam", "he"), ("Ava", "she"), ("Noah", "he"),
    ("Zoe", "she"), ("Omar", "he"), ("Lena", "she"), ("Ravi", "he"),
)
_OBJECTS = (
    ("apple", "apples"), ("marble", "marbles"), ("sticker", "stickers"), ("book", "books"),
    ("pencil", "pencils"), ("coin", "coins"), ("cookie", "cookies"), ("shell", "shells"),
)
# Placeholders: {name} {Pron} {pron} {a} / {b} (counted nouns, e.g. "23 apples") {n} {bn} (bare b).
_ADD_TEMPLATES = (
    "{name} has {a}. {Pron} buys {bn} more. How many {objs} does {pron} have now?",
    "{name} picked {a} in the morning and {b} in the afternoon. "
    "How many {objs} did {pron} pick in total?",
    "A basket holds {a}. {name} adds {b}. How many {objs} are in the basket now?",
    "{name} found {a} on Monday and {b} on Tuesday. How many {objs} did {pron} find altogether?",
)
_SUB_TEMPLATES = (
    "{name} has {a}. {Pron} gives {bn} to a friend. How many {objs} does {pron} have left?",
    "There are {a} on the table. {name} takes {bn} of them. How many {objs} are left on the table?",
    "{name} had {a} and used {bn} of them. How many {objs} does {pron} have now?",
    "A box holds {a}. {name} removes {b}. How many {objs} are still in the box?",
)


# Multi-step stories (3+ terms): an opening, one sentence per step, a question. The adding and removing
# verbs are disjoint from each other, so a reader (or a test) can tell each step's sign from its verb.
_OPENINGS = ("{name} has {a}.", "{name} starts the day with {a}.", "A box holds {a} that belong to {name}.")
_ADD_STEPS = ("{Then} {pron} buys {n} more.", "{Then} {pron} finds {n} more.",
              "{Then} a friend gives {obj} {n} more.", "{Then} {pron} wins {n} more.")
_SUB_STEPS = ("{Then} {pron} gives {n} to a friend.", "{Then} {pron} uses {n} of them.",
              "{Then} {pron} loses {n}.", "{Then} {pron} sells {n}.")
_THEN = ("Then", "After that,", "Later", "Next,")


def evaluate_terms(terms: Sequence[int], ops: Sequence[str]) -> int:
    """Evaluate `terms[0] ops[0] terms[1] ...` with `*` binding tighter than `+`/`-`.

    >>> evaluate_terms([2, 3, 4], ["+", "*"])
    14
    """
    if len(ops) != len(terms) - 1:
        raise ValueError(f"need {len(terms) - 1} ops for {len(terms)} terms, got {len(ops)}")
    total, sign, product = 0, 1, terms[0]
    for op, term in zip(ops, terms[1:], strict=True):
        if op == "*":
            product *= term
        elif op in ("+", "-"):
            total += sign * product
            sign, product = (1 if op == "+" else -1), term
        else:
            raise ValueError(f"unknown op {op!r}; valid: {', '.join(_OPS)}")
    return total + sign * product


def _count(k: int, obj: tuple[str, str]) -> str:
    return f"{k} {obj[0] if k == 1 else obj[1]}"


def _word_problem(rng: random.Random, a: int, b: int, op: str) -> str:
    name, pron = rng.choice(_NAMES)
    obj = rng.choice(_OBJECTS)
    template = rng.choice(_ADD_TEMPLATES if op == "+" else _SUB_TEMPLATES)
    return template.format(
        name=name, Pron=pron.capitalize(), pron=pron, objs=obj[1],
        a=_count(a, obj), b=_count(b, obj), bn=b,
    )


def _story(rng: random.Random, terms: Sequence[int], ops: Sequence[str]) -> str:
    """A word problem of one step per op: "Mia has 12 coins. Then she buys 5 more. Later she loses 3. ..."."""
    name, pron = rng.choice(_NAMES)
    obj = rng.choice(_OBJECTS)
    parts = [rng.choice(_OPENINGS).format(name=name, a=_count(terms[0], obj))]
    for op, n in zip(ops, terms[1:], strict=True):
        step = rng.choice(_ADD_STEPS if op == "+" else _SUB_STEPS)
        parts.append(step.format(Then=rng.choice(_THEN), pron=pron, obj="her" if pron == "she" else "him", n=n))
    parts.append(f"How many {obj[1]} does {pron} have now?")
    return " ".join(parts)


def _running_totals_ok(terms: Sequence[int], ops: Sequence[str]) -> bool:
    total = terms[0]
    for op, n in zip(ops, terms[1:], strict=True):
        total += n if op == "+" else -n
        if total < 0:
            return False
    return True


def _expression(terms: Sequence[int], ops: Sequence[str]) -> str:
    parts = [str(terms[0]) if terms[0] >= 0 else f"({terms[0]})"]
    for op, term in zip(ops, terms[1:], strict=True):
        parts += [op, str(term) if term >= 0 else f"({term})"]
    return f"What is {' '.join(parts)}?"


def generate_arithmetic(
    n: int,
    *,
    seed: int = 0,
    min_value: int = 1,
    max_value: int = 99,
    ops: Sequence[str] = ("+", "-"),
    n_terms: int | Sequence[int] = 2,
    word_problems: bool = True,
    allow_negative: bool = False,
) -> list[dict[str, str]]:
    """Generate `n` seeded arithmetic problems as rows `{"prompt", "answer"}`.

    Operands are drawn uniformly from `[min_value, max_value]`, one op per gap from `ops`.
    `+`/`-` problems with non-negative operands become word problems when `word_problems` is
    set: two terms as a one-step story ("Mia has 23 apples. She buys 17 more. ..."), more terms
    as a multi-step story with one sentence per step ("Mia has 12 coins. Then she buys 5 more.
    Later she loses 3. How many coins does she have now?"), whose running total never drops
    below zero. Anything else (`*`, negative operands, `word_problems=False`) is phrased
    "What is 23 + 17 - 5?". `n_terms` may be a list, e.g. `[2, 3]`: each problem then draws its
    number of terms from it (a mix of one- and two-step problems). `*` binds tighter than
    `+`/`-`. With `allow_negative=False` every answer is >= 0 (a word problem's `a - b` is
    ordered so); answers are integers as strings. Prompts are unique within a call unless the
    space of problems is too small, in which case duplicates are allowed.

    >>> generate_arithmetic(1, seed=0, word_problems=False)[0]["prompt"].startswith("What is")
    True
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if min_value > max_value:
        raise ValueError(f"min_value ({min_value}) must be <= max_value ({max_value})")
    choices = [n_terms] if isinstance(n_terms, int) else list(n_terms)
    if not choices or any(not isinstance(k, int) or isinstance(k, bool) or k < 2 for k in choices):
        raise ValueError(f"n_terms must be >= 2 (or a list of such), got {n_terms}")
    if isinstance(ops, str):
        ops = tuple(ops)
    if not ops or any(op not in _OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {list(_OPS)}, got {list(ops)}")
    if not allow_negative and max_value < 0:
        raise ValueError("allow_negative=False needs max_value >= 0")

    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for _ in range(n):
        # Rejection sampling: first for a non-negative answer, then for a prompt not yet seen.
        # Bounded tries keep tiny problem spaces (e.g. 1..2) from looping forever: after 50
        # duplicates a duplicate is accepted.
        prompt, answer, duplicates = "", 0, 0
        for _attempt in range(1000):
            k = choices[0] if len(choices) == 1 else rng.choice(choices)  # one int: the draws of old
            terms = [rng.randint(min_value, max_value) for _ in range(k)]
            row_ops = [rng.choice(ops) for _ in range(k - 1)]
            wordy = word_problems and "*" not in row_ops and min(terms) >= 0
            if wordy and k == 2 and row_ops[0] == "-" and terms[0] < terms[1]:
                terms.reverse()  # "has 3, gives away 5" is not a sensible story
            if wordy and k > 2 and not _running_totals_ok(terms, row_ops):
                continue  # a story cannot give away more than there is
            value = evaluate_terms(terms, row_ops)
            if value < 0 and not allow_negative:
                continue
            if not wordy:
                prompt = _expression(terms, row_ops)
            elif k == 2:
                prompt = _word_problem(rng, terms[0], terms[1], row_ops[0])
            else:
                prompt = _story(rng, terms, row_ops)
            answer = value
            duplicates += prompt in seen
            if prompt not in seen or duplicates >= 50:
                break
        if not prompt:
            raise ValueError(
                "could not draw a problem with a non-negative answer; widen [min_value, "
                "max_value], use fewer terms or set allow_negative=True"
            )
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": str(answer)})
    return rows


def generate_reasoning_gym(
    task: str, size: int, *, seed: int = 0, **params: Any
) -> list[dict[str, Any]]:
    """Rows from `reasoning_gym.create_dataset(task, size=size, seed=seed, **params)`.

    Each entry becomes `{"prompt": question, "answer": answer, "metadata": json}`; metadata is a
    JSON string (tuples become lists) so the column is uniform and survives Arrow/Ray transport.
    A verifier can rebuild the entry for `dataset.score_answer` with `json.loads(metadata)`.
    """
    try:
        import reasoning_gym
    except ImportError as e:  # optional dependency
        raise ImportError(
            "source 'reasoning_gym' needs the reasoning-gym package (pip install reasoning-gym)"
        ) from e
    try:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **params)
    except Exception as e:
        raise ValueError(f"reasoning_gym task {task!r} with params {params}: {e}") from e
    return [
        {
            "prompt": entry["question"],
            "answer": entry["answer"],
            "metadata": json.dumps(entry.get("metadata", {}), default=str, sort_keys=True),
        }
        for entry in dataset
    ]
