"""``reasoning_gym`` verifier: score a completion with the row's own reasoning-gym dataset.

Rows from ``data.source: reasoning_gym`` carry ``answer`` and ``metadata`` (a JSON string whose
``source_dataset`` names the task). The verifier extracts the answer the completion commits to —
the last ``\\boxed{...}``, or the last ``<answer>...</answer>`` — and calls that dataset's own
``score_answer(answer, entry)``, so every reasoning-gym task, numeric or not (lists, words,
expressions, partial credit), trains without a verifier of its own. ``reasoning-gym`` is imported
on first use (in the reward worker), not with the ``rewards`` package.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from rewards.format import last_boxed
from rewards.registry import completion_text, reward

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
EXTRACTORS = ("auto", "boxed", "answer_tag")


def extract_gym_answer(text: str, how: str = "auto") -> str | None:
    """The answer ``text`` commits to: the last ``\\boxed{}`` (``boxed``), the last
    ``<answer>`` tag (``answer_tag``), or the first of the two that is present (``auto``).

    >>> extract_gym_answer("so <answer>cat</answer>"), extract_gym_answer("\\\\boxed{4} <answer>5</answer>")
    ('cat', '4')
    """
    if how not in EXTRACTORS:
        raise ValueError(f"reasoning_gym: extract must be one of {EXTRACTORS}, got {how!r}")
    if how in ("auto", "boxed"):
        boxed = last_boxed(text)
        if boxed is not None or how == "boxed":
            return boxed
    tags = _ANSWER_TAG.findall(text)
    return tags[-1].strip() if tags else None


@reward("reasoning_gym")
class ReasoningGymScore:
    """Score with the row's reasoning-gym dataset (see the module docstring).

    Args:
        extract: ``auto`` (boxed, else ``<answer>``), ``boxed`` or ``answer_tag``.
        metadata_key, answer_key: dataset columns (the ``reasoning_gym`` source writes both).

    A completion with no extractable answer scores 0.0; a row without metadata naming its task
    gets ``None`` (the verifier does not apply; the sample gets the configured failure value).
    """

    def __init__(self, extract: Literal["auto", "boxed", "answer_tag"] = "auto", metadata_key: str = "metadata",
                 answer_key: str = "answer") -> None:  # fmt: skip
        if extract not in EXTRACTORS:
            raise ValueError(f"reasoning_gym: extract must be one of {EXTRACTORS}, got {extract!r}")
        self.extract, self.metadata_key, self.answer_key = extract, metadata_key, answer_key
        self._score_fns: dict[str, Any] = {}

    def setup(self) -> None:
        try:
            from reasoning_gym.factory import get_score_answer_fn
        except ImportError as e:  # optional dependency
            raise ImportError("the reasoning_gym verifier needs the reasoning-gym package "
                              "(pip install reasoning-gym)") from e  # fmt: skip
        self._get = get_score_answer_fn

    def __call__(self, completions: list[Any], **columns: Any) -> list[float | None]:
        if not hasattr(self, "_get"):
            self.setup()
        metas, answers = columns.get(self.metadata_key), columns.get(self.answer_key)
        if metas is None:
            raise ValueError(f"reasoning_gym: rows need a {self.metadata_key!r} column (data.source: reasoning_gym "
                             "writes it)")  # fmt: skip
        out: list[float | None] = []
        for i, c in enumerate(completions):
            meta = metas[i]
            meta = json.loads(meta) if isinstance(meta, str) else dict(meta or {})
            task = meta.get("source_dataset")
            if not task:
                out.append(None)
                continue
            answer = extract_gym_answer(completion_text(c), self.extract)
            if answer is None:
                out.append(0.0)
                continue
            if task not in self._score_fns:
                self._score_fns[task] = self._get(task)
            entry = {"answer": None if answers is None else answers[i], "metadata": meta}
            out.append(float(self._score_fns[task](answer, entry)))
        return out
