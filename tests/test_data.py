"""Tests for rlkit.infra.data: file/HF sources, bad-row handling, splits, the cursor, prompt formatting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlkit.infra.data import (
    DataError,
    PromptCursor,
    format_prompt,
    load_rows,
    register_source,
    split_rows,
)

ROWS = [
    {"prompt": "What is 1 + 1?", "answer": "2", "level": 1},
    {"prompt": "What is 2 + 3?", "answer": 5, "level": 2},  # numeric answer -> "5"
    {"prompt": [{"role": "user", "content": "What is 4 * 4?"}], "answer": "16", "level": 3},
]


def _write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


# ---------------------------------------------------------------------------------- sources


def test_jsonl_source_keeps_columns_and_stringifies_numbers(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "data.jsonl", ROWS)
    rows, stats = load_rows("jsonl", path=str(path))
    assert stats == {"rows": 3, "skipped": 0, "skipped_rows": [], "first_error": None}
    assert [r["answer"] for r in rows] == ["2", "5", "16"]
    assert [r["level"] for r in rows] == [1, 2, 3]
    assert rows[2]["prompt"] == [{"role": "user", "content": "What is 4 * 4?"}]


def test_jsonl_key_remapping_and_limit(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"question": f"q{i}", "solution": i + 0.0, "id": i} for i in range(5)
    ])
    rows, stats = load_rows("jsonl", path=str(path), prompt_key="question",
                            answer_key="solution", limit=2)
    assert rows == [{"prompt": "q0", "answer": "0", "id": 0}, {"prompt": "q1", "answer": "1", "id": 1}]
    assert stats["rows"] == 2


def test_parquet_source(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(
        [{"question": "2+2?", "answer": 4, "tag": "a"}, {"question": "3+3?", "answer": 6, "tag": "b"}]
    ), path)
    rows, stats = load_rows("parquet", path=str(path), prompt_key="question")
    assert rows == [{"prompt": "2+2?", "answer": "4", "tag": "a"},
                    {"prompt": "3+3?", "answer": "6", "tag": "b"}]
    assert stats["rows"] == 2


def test_parquet_bad_row_names_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "ok", "answer": "1"},
                                         {"prompt": "  ", "answer": "2"}]), path)
    with pytest.raises(DataError, match=r"bad\.parquet row 2: empty prompt"):
        load_rows("parquet", path=str(path))


def test_hf_save_to_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list([{"problem": "1+2?", "answer": "3"}, {"problem": "2+5?", "answer": "7"}])
    ds.save_to_disk(str(tmp_path / "plain"))
    rows, _ = load_rows("hf", path=str(tmp_path / "plain"), prompt_key="problem")
    assert [r["prompt"] for r in rows] == ["1+2?", "2+5?"]

    dd = datasets.DatasetDict({"train": ds, "test": ds.select([1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(load_rows("hf", path=str(tmp_path / "dict"), prompt_key="problem")[0]) == 2
    test_rows, _ = load_rows("hf", path=str(tmp_path / "dict"), split="test", prompt_key="problem")
    assert test_rows == [{"prompt": "2+5?", "answer": "7"}]
    with pytest.raises(DataError, match="split 'valid' not found"):
        load_rows("hf", path=str(tmp_path / "dict"), split="valid")


def test_hf_local_data_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    path = _write_jsonl(tmp_path / "local.json", [{"prompt": "a?", "answer": 1}, {"prompt": "b?", "answer": 2}])
    rows, stats = load_rows("hf", path=str(path))
    assert [(r["prompt"], r["answer"]) for r in rows] == [("a?", "1"), ("b?", "2")]
    assert stats["rows"] == 2
    # A directory of data files (not a save_to_disk directory) and a glob work too.
    assert len(load_rows("hf", path=str(tmp_path))[0]) == 2
    assert len(load_rows("hf", path=str(tmp_path / "*.json"))[0]) == 2


def test_hf_never_reaches_the_hub(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="never downloads from the Hub"):
        load_rows("hf", path="openai/gsm8k")


def test_unknown_source_and_missing_path() -> None:
    with pytest.raises(DataError, match="valid: .*arithmetic.*jsonl"):
        load_rows("csv-ish")
    with pytest.raises(DataError, match="needs path"):
        load_rows("jsonl")
    with pytest.raises(DataError, match="needs path"):
        load_rows("parquet", path="/nonexistent/x.parquet")


def test_register_source_custom_and_duplicate() -> None:
    @register_source("test_data_custom")
    def _custom(**_: Any) -> Any:
        return enumerate([{"prompt": "p", "answer": "a"}], 1)

    assert load_rows("test_data_custom")[0] == [{"prompt": "p", "answer": "a"}]
    with pytest.raises(ValueError, match="already registered"):
        register_source("jsonl")(_custom)


# ---------------------------------------------------------------------------------- bad rows

BAD_LINES = [
    ({"prompt": "ok", "answer": "1"}, None),
    ("{not json", "invalid JSON"),
    ({"question": "q", "solution": "s"}, "missing key 'prompt' (have: question, solution)"),
    ({"prompt": "q"}, "missing key 'answer' (have: prompt)"),
    ({"prompt": "", "answer": "1"}, "empty prompt"),
    ({"prompt": "q", "answer": {"x": 1}}, "answer must be a string or a number, got dict"),
    ({"prompt": "q", "answer": True}, "answer must be a string or a number, got bool"),
    ({"prompt": "q", "answer": None}, "is null"),
    ({"prompt": 5, "answer": "1"}, "must be a string or a list"),
    ({"prompt": [{"role": "user"}], "answer": "1"}, "must be a string or a list"),
    ([1, 2], "expected an object"),
]


@pytest.mark.parametrize("index", range(1, len(BAD_LINES)))
def test_bad_row_error_names_file_row_and_reason(tmp_path: Path, index: int) -> None:
    good, (bad, reason) = BAD_LINES[0][0], BAD_LINES[index]
    path = _write_jsonl(tmp_path / "data.jsonl", [good, good, bad, good])
    with pytest.raises(DataError) as info:
        load_rows("jsonl", path=str(path))
    message = str(info.value)
    assert "data.jsonl row 3: " in message and reason in message
    assert isinstance(info.value, ValueError)


def test_skip_mode_counts_bad_rows(tmp_path: Path) -> None:
    lines = [line for line, _ in BAD_LINES]
    path = _write_jsonl(tmp_path / "data.jsonl", lines + ["", BAD_LINES[0][0]])  # blank line 12
    rows, stats = load_rows("jsonl", path=str(path), on_bad_row="skip")
    assert len(rows) == 2 and stats["rows"] == 2
    assert stats["skipped"] == len(BAD_LINES) - 1
    assert stats["skipped_rows"] == list(range(2, len(BAD_LINES) + 1))
    assert "data.jsonl row 2: invalid JSON (" in stats["first_error"]


def test_on_bad_row_must_be_known(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [BAD_LINES[0][0]])
    with pytest.raises(ValueError, match="on_bad_row"):
        load_rows("jsonl", path=str(path), on_bad_row="ignore")


# ---------------------------------------------------------------------------------- split


def _rows(n: int, dup_every: int = 0) -> list[dict[str, Any]]:
    return [{"prompt": f"p{i // dup_every if dup_every else i}", "answer": str(i)} for i in range(n)]


@pytest.mark.parametrize("eval_size, expected", [(10, 10), (0.25, 25), (0, 0), (0.0, 0)])
def test_split_sizes_deterministic_and_disjoint(eval_size: float, expected: int) -> None:
    rows = _rows(100)
    train, evals = split_rows(rows, eval_size, seed=3)
    assert len(evals) == expected and len(train) == 100 - expected
    assert (train, evals) == split_rows(rows, eval_size, seed=3)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    if expected:
        assert split_rows(rows, eval_size, seed=4)[1] != evals


def test_split_keeps_duplicate_prompts_on_one_side() -> None:
    rows = _rows(60, dup_every=3)  # each prompt appears 3 times
    train, evals = split_rows(rows, 10, seed=0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert len(evals) == 12 and len(train) + len(evals) == 60


def test_split_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        split_rows(_rows(10), 10, seed=0)
    with pytest.raises(ValueError):
        split_rows(_rows(10), 1.0, seed=0)
    with pytest.raises(ValueError):
        split_rows(_rows(10), -1, seed=0)
    with pytest.raises(TypeError):
        split_rows(_rows(10), True, seed=0)


# ---------------------------------------------------------------------------------- cursor


def test_cursor_epochs_are_permutations_and_differ() -> None:
    cursor = PromptCursor(10, seed=1)
    first, second = cursor.next_indices(10), cursor.next_indices(10)
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second
    assert cursor.state_dict() == {"epoch": 2, "pos": 0, "seed": 1, "n_rows": 10}
    assert PromptCursor(4, seed=1, shuffle=False).next_indices(6) == [0, 1, 2, 3, 0, 1]
    assert PromptCursor(10, seed=1).next_indices(20) == first + second


@settings(max_examples=60, deadline=None)
@given(
    n_rows=st.integers(1, 12),
    seed=st.integers(0, 2**31),
    shuffle=st.booleans(),
    takes=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    cut=st.integers(0, 8),
)
def test_cursor_resume_matches_uninterrupted(
    n_rows: int, seed: int, shuffle: bool, takes: list[int], cut: int
) -> None:
    reference = PromptCursor(n_rows, seed, shuffle)
    expected = [reference.next_indices(k) for k in takes]

    cursor = PromptCursor(n_rows, seed, shuffle)
    got = [cursor.next_indices(k) for k in takes[:cut]]
    state = json.loads(json.dumps(cursor.state_dict()))  # survives a JSON checkpoint
    resumed = PromptCursor(n_rows, seed=12345, shuffle=shuffle)  # seed comes from the state
    resumed.next_indices(3)  # stale state must be fully replaced
    resumed.load_state_dict(state)
    got += [resumed.next_indices(k) for k in takes[cut:]]
    assert got == expected
    assert resumed.state_dict() == reference.state_dict()


def test_cursor_state_with_changed_row_count_warns() -> None:
    state = {"epoch": 2, "pos": 7, "seed": 0, "n_rows": 8}
    cursor = PromptCursor(5, seed=0)
    with pytest.warns(UserWarning, match="saved for 8 rows"):
        cursor.load_state_dict(state)
    assert cursor.state_dict()["epoch"] == 3 and cursor.state_dict()["pos"] == 0
    PromptCursor(5).load_state_dict({"epoch": 1, "pos": 2, "seed": 0})  # n_rows optional


# ---------------------------------------------------------------------------------- format


def test_format_prompt_string_with_template_and_system() -> None:
    row = {"prompt": "What is 2 + 2?", "answer": "4", "unit": "apples"}
    template = "{prompt} ({unit})\nPut your final answer in \\boxed{{}}."
    assert format_prompt(row, "You are helpful.", template) == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is 2 + 2? (apples)\nPut your final answer in \\boxed{}."},
    ]
    assert format_prompt(row, None, None) == [{"role": "user", "content": "What is 2 + 2?"}]
    with pytest.raises(DataError, match="'missing' which is not a row column"):
        format_prompt(row, None, "{prompt} {missing}")


def test_format_prompt_messages() -> None:
    messages = [{"role": "user", "content": "hi"}]
    row = {"prompt": messages, "answer": "x"}
    out = format_prompt(row, "sys", "ignored {prompt}")
    assert out == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    assert messages == [{"role": "user", "content": "hi"}]  # input not mutated
    with_system = [{"role": "system", "content": "own"}, {"role": "user", "content": "hi"}]
    assert format_prompt({"prompt": with_system, "answer": "x"}, "sys", None) == with_system
