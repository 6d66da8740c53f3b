"""Format verifiers: ``\\boxed{}`` usage and ``<think>...</think>`` structure.

``format`` rewards exactly one non-empty, brace-balanced ``\\boxed{...}``; several boxes (hedging)
or an unbalanced one score 0, and so does a box that only copies a placeholder (``placeholders``, e.g.
``["answer"]`` when the prompt asks for ``\\boxed{answer}``: a small model learns to write that box
verbatim, which would otherwise earn the format reward without an answer). ``think_format`` rewards a single ``<think>`` block followed by a
non-empty answer, the layout of R1-style reasoning models.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Any

from rewards.registry import completion_text, reward

_BOXED = "\\boxed"
_THINK_RE = re.compile(r"^\s*<think>(?P<thought>.*?)</think>(?P<answer>.*)$", re.DOTALL)


def find_boxed(text: str) -> list[str | None]:
    """Contents of every ``\\boxed`` in ``text``, in order; ``None`` where braces do not balance.

    >>> find_boxed("a \\\\boxed{x^{2}} b \\\\boxed{3")
    ['x^{2}', None]
    """
    found: list[str | None] = []
    start = text.find(_BOXED)
    while start != -1:
        i = start + len(_BOXED)
        while i < len(text) and text[i] in " \t":
            i += 1
        content = None
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        content = text[i + 1 : j]
                        break
                j += 1
        found.append(content)
        start = text.find(_BOXED, i)
    return found


def last_boxed(text: str) -> str | None:
    """Content of the last well-formed, non-empty ``\\boxed{...}``, or None.

    >>> last_boxed("\\\\boxed{1} then \\\\boxed{2}")
    '2'
    """
    for content in reversed(find_boxed(text)):
        if content is not None and content.strip():
            return content.strip()
    return None


def has_boxed(text: str, placeholders: Collection[str] = ()) -> bool:
    """True if ``text`` holds at least one well-formed, non-empty ``\\boxed{...}`` whose content is not
    one of ``placeholders`` (compared stripped, case-insensitively).

    >>> has_boxed("so \\\\boxed{42}"), has_boxed("\\\\boxed{}"), has_boxed("\\\\boxed{Answer}", ["answer"])
    (True, False, False)
    """
    marks = _marks(placeholders)
    return any(_is_answer(c, marks) for c in find_boxed(text))


def _marks(placeholders: Collection[str]) -> set[str]:
    return {str(p).strip().lower() for p in placeholders}


def _is_answer(content: str | None, marks: set[str]) -> bool:
    """A balanced, non-empty box content that is not a placeholder (``marks``: :func:`_marks`)."""
    return content is not None and bool(content.strip()) and content.strip().lower() not in marks


def template_placeholders(template: str | None) -> set[str]:
    """The contents of the ``\\boxed{...}`` examples a ``str.format`` prompt template shows (``{{``
    and ``}}`` unescaped): what a model that copies the instruction would put in its box.

    >>> sorted(template_placeholders("{prompt} Give it as \\\\boxed{{answer}}."))
    ['answer']
    """
    if not template:
        return set()
    text = template.replace("{{", "{").replace("}}", "}")
    return {c.strip() for c in find_boxed(text) if _is_answer(c, set())}


def boxed_format_reward(completions: list[Any], placeholders: Collection[str] = (), **columns: Any) -> list[float]:
    """1.0 if a completion holds exactly one non-empty, balanced ``\\boxed{...}`` whose content is not
    one of ``placeholders`` (stripped, case-insensitive), else 0.0.

    >>> boxed_format_reward(["\\\\boxed{7}", "\\\\boxed{7} or \\\\boxed{8}", "\\\\boxed{7", "7"])
    [1.0, 0.0, 0.0, 0.0]
    >>> boxed_format_reward(["\\\\boxed{answer}", "\\\\boxed{7}"], placeholders=["answer"])
    [0.0, 1.0]
    """
    marks = _marks(placeholders)
    out = []
    for completion in completions:
        boxes = find_boxed(completion_text(completion))
        out.append(1.0 if len(boxes) == 1 and _is_answer(boxes[0], marks) else 0.0)
    return out


@reward("format")
class BoxedFormat:
    """Registered form of :func:`boxed_format_reward`; ``placeholders`` is checked when it is built, so a
    recipe's mistake (a string, a misspelt key) is a config error, not a failure at every step.

    >>> BoxedFormat(placeholders=["answer"])(["\\\\boxed{answer}", "\\\\boxed{7}"])
    [0.0, 1.0]
    """

    def __init__(self, placeholders: Sequence[str] = ()) -> None:
        if isinstance(placeholders, str) or not all(isinstance(p, str) for p in placeholders):
            raise TypeError(f"format: placeholders must be a list of strings, e.g. [answer]; got {placeholders!r}")
        self.placeholders = tuple(placeholders)

    def __call__(self, completions: list[Any], **columns: Any) -> list[float]:
        return boxed_format_reward(completions, placeholders=self.placeholders)


@reward("think_format")
def think_format_reward(completions: list[Any], **columns: Any) -> list[float]:
    """1.0 for ``<think>thought</think>answer`` with one non-empty thought and a non-empty answer.

    >>> think_format_reward(["<think>2+2</think> 4", "<think></think>4", "4", "<think>a</think>"])
    [1.0, 0.0, 0.0, 0.0]
    """
    out = []
    for completion in completions:
        text = completion_text(completion)
        m = _THINK_RE.match(text)
        ok = (
            m is not None
            and text.count("<think>") == 1
            and text.count("</think>") == 1
            and bool(m.group("thought").strip())
            and bool(m.group("answer").strip())
        )
        out.append(1.0 if ok else 0.0)
    return out
