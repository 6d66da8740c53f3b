"""Prompt token ids for training and evaluation rows (chat template, optional length target)."""

from __future__ import annotations

from typing import Any


class PromptEncoder:
    """``encoder(row, budget=None) -> prompt token ids``; the row's token ``budget``, when given, is
    written into the prompt (``data.budget``). Cached per (row, budget)."""

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self._cache: dict[tuple[int, Any], list[int]] = {}

    def __call__(self, row: dict, budget: Any = None) -> list[int]:
        from rlkit.infra.data import format_prompt
        from rlkit.infra.models import apply_chat_template

        key = (id(row), budget)
        if key not in self._cache:
            d = self.cfg.data
            msgs = format_prompt(row, d.system_prompt, d.prompt_template)
            if budget is not None:
                from rewards.budget_prompt import apply_budget, budget_params

                msgs = apply_budget(msgs, budget, budget_params(d.budget))
            self._cache[key] = apply_chat_template(self.tokenizer, msgs)
        return self._cache[key]
