"""``code_tests``: reward = share of a problem's tests that the completion's Python code passes.

The code is the last fenced Python block of the completion (```` ```python ````, ```` ```py ````,
or an untagged fence when no tagged one exists; an unterminated last block, as left by
truncation, counts). It runs in :mod:`rewards.sandbox`, never in the calling process. Test cases
come from dataset columns (names configurable):

- ``tests``: assert-style tests, a list of code strings (MBPP's ``test_list``) or one string
  (HumanEval's ``check(candidate)`` plus a call to it). All of a completion's tests run in one
  sandboxed process, after the code and the optional ``test_setup`` column; each test reports
  pass/fail on its own, so a test that hangs fails it and the ones after it, not the earlier ones.
- ``inputs`` / ``outputs``: stdin/stdout pairs; one sandboxed process per pair, passing when the
  program exits 0 and its stdout equals the expected one up to trailing whitespace per line and
  trailing blank lines. An APPS/TACO-style ``input_output`` column (JSON with ``inputs`` and
  ``outputs``) works too.

Reward: fraction of tests passed (``mode="fraction"``) or 1.0 only when all pass (``mode="all"``,
which stops a completion's stdin/stdout cases at the first failure). A completion without a code
block scores 0.0; a row without tests scores None (not applicable).

Departure from common harnesses (which report "exit status 0" as a pass): each assert test's result
is a line tagged with a per-run random nonce that the parent sends on stdin and the harness reads
before the model's code runs, so ``exit(0)`` or printing "PASSED" earns nothing. This defends
against accidental exploits that an RL policy can stumble on, not against code written to read
the harness's memory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from rewards.registry import reward
from rewards.sandbox import SandboxLimits, SandboxResult, SandboxUnavailable, refusal_message, run_python

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}

_HARNESS = r"""
def _main():
    import json, os, sys, traceback
    nonce = sys.stdin.readline().strip()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the nonce's file is now unreachable: no fd of any process points to it
    os.close(null)
    out = os.fdopen(os.dup(1), "w")  # survives the code closing or replacing stdout

    def report(tag):
        try:
            out.write("\n%s %s\n" % (nonce, tag))
            out.flush()
        except Exception:
            pass

    with open("tests.json") as f:
        spec = json.load(f)
    os.remove("tests.json")  # the code must not read its tests
    g = {"__name__": "solution", "__builtins__": __builtins__}  # main guards do not run, as in HumanEval
    try:
        exec(compile(spec["code"], "solution.py", "exec"), g)
        if spec["setup"]:
            exec(compile(spec["setup"], "test_setup.py", "exec"), g)
    except BaseException:
        traceback.print_exc()
        report("code_failed")
        os._exit(0)
    for i, test in enumerate(spec["tests"]):
        try:
            exec(compile(test, "test_%d.py" % i, "exec"), g)
            report("%d pass" % i)
        except BaseException:
            traceback.print_exc(limit=3)
            report("%d fail" % i)
    os._exit(0)


_main()
"""


def extract_code(text: str) -> str | None:
    """The last fenced Python block of ``text`` (tagged blocks win over untagged ones), or None.

    >>> extract_code("try:\\n```python\\nx = 1\\n```\\nbetter:\\n```py\\nx = 2\\n```")
    'x = 2\\n'
    >>> extract_code("```bash\\nls\\n```") is None, extract_code("```\\nprint(1)")
    (True, 'print(1)')
    """
    tagged, untagged = None, None
    for tag, body in _FENCE.findall(text or ""):
        if tag.lower() in _PYTHON_TAGS:
            tagged = body
        elif not tag:
            untagged = body
    code = tagged if tagged is not None else untagged
    return code if code is not None and code.strip() else None


def normalize_output(text: str) -> str:
    """Compare program outputs up to trailing whitespace per line and trailing blank lines.

    >>> normalize_output("1 2  \\n3\\n\\n") == normalize_output("1 2\\n3")
    True
    """
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n")).rstrip("\n")


@reward("code_tests")
class CodeTests:
    """Run a completion's code against the row's tests in the sandbox (see the module docstring).

    Args:
        mode: ``"fraction"`` (share of tests passed) or ``"all"`` (1.0 iff every test passes).
        timeout_s: wall limit of one sandboxed run (all assert tests of a completion, or one
            stdin/stdout pair); the CPU limit is the same.
        memory_mb, max_output_bytes, max_procs, network, confine, allow_unconfined: the other
            :class:`SandboxLimits`. Where the filesystem cannot be confined every call raises
            :class:`~rewards.sandbox.SandboxUnavailable`, unless ``allow_unconfined``.
        tests_key, setup_key, inputs_key, outputs_key, io_key: dataset column names.
        max_parallel: sandboxed runs at once (threads waiting on subprocesses); default: CPU count.
        python: interpreter for the code; default: the one running this verifier.

    >>> fn = CodeTests()
    >>> fn(["```python\\ndef add(a, b):\\n    return a + b\\n```", "no code"],
    ...    tests=[["assert add(1, 2) == 3", "assert add(2, 2) == 5"]] * 2)
    [0.5, 0.0]
    """

    def __init__(
        self,
        mode: Literal["fraction", "all"] = "fraction",
        timeout_s: float = 5.0,
        memory_mb: int = 1024,
        max_output_bytes: int = 1 << 20,
        max_procs: int = 16,
        network: bool = False,
        tests_key: str = "tests",
        setup_key: str = "test_setup",
        inputs_key: str = "inputs",
        outputs_key: str = "outputs",
        io_key: str = "input_output",
        max_parallel: int | None = None,
        python: str | None = None,
        confine: str = "auto",
        allow_unconfined: bool = False,
    ) -> None:
        if mode not in ("fraction", "all"):
            raise ValueError(f"code_tests: mode must be 'fraction' or 'all', got {mode!r}")
        self.mode = mode
        self.limits = SandboxLimits(wall_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
                                    max_procs=max_procs, network=network, confine=confine,
                                    allow_unconfined=allow_unconfined)  # fmt: skip
        self.keys = {"tests": tests_key, "setup": setup_key, "inputs": inputs_key, "outputs": outputs_key,
                     "io": io_key}  # fmt: skip
        self.max_parallel = max_parallel or os.cpu_count() or 1
        self.python = python

    uses_sandbox = True  # runs model-written code: the reward manager checks confinement first

    def __call__(self, completions: list[str], **columns: Any) -> list[float | None]:
        n = len(completions)
        for key in self.keys.values():
            if key in columns and isinstance(columns[key], list) and len(columns[key]) != n:
                raise ValueError(
                    f"code_tests: column {key!r} has {len(columns[key])} rows for {n} completions"
                )

        def col(name: str, i: int) -> Any:
            value = columns.get(self.keys[name])
            return value[i] if isinstance(value, list) else None

        jobs = [(completions[i], *self._cases(col, i)) for i in range(n)]
        if n <= 1 or self.max_parallel == 1:
            return [self.score_one(*job) for job in jobs]
        with ThreadPoolExecutor(max_workers=min(self.max_parallel, n), thread_name_prefix="code_tests") as ex:
            return list(ex.map(lambda job: self.score_one(*job), jobs))

    def _cases(self, col: Any, i: int) -> tuple[list[str], str, list[tuple[str, str]]]:
        tests = _as_list(col("tests", i))
        inputs, outputs = col("inputs", i), col("outputs", i)
        io = col("io", i)
        if io is not None and inputs is None:
            io = json.loads(io) if isinstance(io, str) else io
            if isinstance(io, dict) and not io.get("fn_name"):  # call-based APPS problems: unsupported
                inputs, outputs = io.get("inputs"), io.get("outputs")
        pairs: list[tuple[str, str]] = []
        if inputs is not None or outputs is not None:
            inputs, outputs = _as_list(inputs), _as_list(outputs)
            if len(inputs) != len(outputs):
                raise ValueError(f"code_tests: row {i} has {len(inputs)} inputs but {len(outputs)} outputs")
            pairs = [(_text(a), _text(b)) for a, b in zip(inputs, outputs)]
        return [str(t) for t in tests], str(col("setup", i) or ""), pairs

    def score_one(self, completion: str, tests: Sequence[str], setup: str, pairs: Sequence[tuple[str, str]]
                  ) -> float | None:  # fmt: skip
        """Reward of one completion against its assert ``tests`` and stdin/stdout ``pairs``."""
        total = len(tests) + len(pairs)
        if total == 0:
            return None
        code = extract_code(completion)
        if code is None:
            return 0.0
        passed = self.run_asserts(code, tests, setup) if tests else 0
        if pairs and (self.mode == "fraction" or passed == len(tests)):
            passed += self.run_pairs(code, pairs, stop_at_failure=self.mode == "all")
        if self.mode == "all":
            return 1.0 if passed == total else 0.0
        return passed / total

    def run_asserts(self, code: str, tests: Sequence[str], setup: str = "") -> int:
        """Number of assert-style ``tests`` that pass after running ``code`` (one sandboxed run)."""
        nonce = secrets.token_hex(16)
        spec = json.dumps({"code": code, "setup": setup, "tests": list(tests)})
        result = _checked(run_python(_HARNESS, stdin=nonce + "\n", files={"tests.json": spec},
                                     limits=self.limits, python=self.python))  # fmt: skip
        passed = set()
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == nonce and parts[2] == "pass" and parts[1].isdigit():
                passed.add(int(parts[1]))
        return len(passed & set(range(len(tests))))

    def run_pairs(self, code: str, pairs: Sequence[tuple[str, str]], stop_at_failure: bool = False) -> int:
        """Number of (stdin, expected stdout) ``pairs`` the program ``code`` gets right."""
        passed = 0
        for stdin, expected in pairs:
            result = _checked(run_python(code, stdin=stdin, limits=self.limits, python=self.python))
            if result.ok and normalize_output(result.stdout) == normalize_output(expected):
                passed += 1
            elif stop_at_failure:
                break
        return passed


def _checked(result: SandboxResult) -> SandboxResult:
    if result.status == "refused":  # a verdict on the code would be a lie: nothing ran
        raise SandboxUnavailable(f"code_tests: {refusal_message(result.isolation)}")
    return result


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                parsed = json.loads(stripped)
            except ValueError:
                parsed = None
            if isinstance(parsed, list):
                return parsed
        return [value] if stripped else []
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value)


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):  # some datasets store stdin/stdout as lists of lines
        return "\n".join(map(str, value))
    return str(value)
