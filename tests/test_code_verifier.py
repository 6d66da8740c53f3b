"""code_tests: code extraction, assert-style and stdin/stdout tests, modes, and reward-hack resistance."""

from __future__ import annotations

import time

import pytest

from rewards import RewardManager, VerifierSpec, resolve
from rewards.code import CodeTests, extract_code, normalize_output

ADD = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]
SUM_STDIN = "```python\nimport sys\nprint(sum(map(int, sys.stdin.read().split())))\n```"


@pytest.fixture(scope="module")
def fraction():
    return CodeTests(timeout_s=5.0, max_parallel=2)


def test_extract_code():
    assert extract_code(ADD) == "def add(a, b):\n    return a + b\n"
    two = "```python\nx = 1\n```\nfixed:\n```python\nx = 2\n```"
    assert extract_code(two) == "x = 2\n"  # the last block is the answer
    assert extract_code("```py\nA\n```\n```\nB\n```") == "A\n"  # tagged beats untagged
    assert extract_code("```bash\nls\n```") is None and extract_code("no code") is None
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # truncated
    assert extract_code("```python\n\n```") is None and extract_code(None) is None


def test_normalize_output():
    assert normalize_output("1 2  \r\n3\n\n\n") == "1 2\n3"
    assert normalize_output(" 1") != normalize_output("1")  # leading space is significant


def test_assert_tests_fraction_and_all(fraction):
    assert fraction([ADD, "no code at all"], tests=[ADD_TESTS, ADD_TESTS]) == [pytest.approx(2 / 3), 0.0]
    strict = CodeTests(mode="all")
    right = ADD_TESTS[:2]
    assert strict([ADD, ADD], tests=[right, ADD_TESTS]) == [1.0, 0.0]


def test_tests_as_json_string_single_string_and_setup(fraction):
    as_json = '["assert add(1, 2) == 3", "assert add(1, 1) == 3"]'
    humaneval = "def check(candidate):\n    assert candidate(2, 3) == 5\ncheck(add)\n"
    setup = "import math\nTARGET = math.factorial(3)"
    out = fraction([ADD, ADD, ADD], tests=[as_json, humaneval, ["assert add(3, 3) == TARGET"]],
                   test_setup=[None, None, setup])  # fmt: skip
    assert out == [0.5, 1.0, 1.0]


def test_stdin_stdout_pairs_and_apps_column(fraction):
    pairs = {"inputs": [["1 2", "3 4\n", "5"]] * 2, "outputs": [["3", "7  \n\n", "6"]] * 2}
    const = "```python\nprint(3)\n```"
    assert fraction([SUM_STDIN, const], **pairs) == [pytest.approx(2 / 3), pytest.approx(1 / 3)]
    apps = ['{"inputs": ["1 2\\n", "10 -3\\n"], "outputs": ["3\\n", "7\\n"]}']
    assert fraction([SUM_STDIN], input_output=apps) == [1.0]
    call_based = ['{"fn_name": "f", "inputs": [[1]], "outputs": [1]}']
    assert fraction([SUM_STDIN], input_output=call_based) == [None]  # unsupported: not applicable


def test_all_mode_stops_at_the_first_failing_pair():
    strict = CodeTests(mode="all", timeout_s=5.0)
    slow = "```python\nimport time\nx = int(input())\nif x == 2:\n    time.sleep(30)\nprint(x)\n```"
    t0 = time.monotonic()
    assert strict([slow], inputs=[["1", "0", "2"]], outputs=[["1", "99", "2"]]) == [0.0]
    assert time.monotonic() - t0 < 4.0  # the sleeping third case never ran


def test_rows_without_tests_are_not_applicable(fraction):
    assert fraction([ADD, ADD], tests=[[], None]) == [None, None]


@pytest.mark.parametrize(
    "hack",
    [
        "import sys\nsys.exit(0)",  # exit status 0 before any test runs
        "import os\nos._exit(0)",
        "print('pass')\nprint('0 pass')\nprint('1 pass')",  # forged result lines (no nonce)
        "import json\nT = json.load(open('tests.json'))",  # the tests are not readable
        "import builtins\nbuiltins.AssertionError = Exception\nclass AssertionError(Exception): pass",
        # forge result lines with a nonce found in any file or fd the code can reach
        "import glob, os\nfor p in glob.glob('../ctl/*') + glob.glob('/proc/self/fd/*') + ['/proc/self/fd/0']:\n"
        "    try:\n        os.lseek(0, 0, 0) if p.endswith('/0') else None\n"
        "        w = open(p, 'rb').read(4096).split()\n"
        "        os.write(1, b''.join(b'\\n%s %d pass\\n' % (x, i) for x in w for i in (0, 1)))\n"
        "    except Exception:\n        pass",
    ],
)
def test_reward_hacks_score_nothing(fraction, hack):
    completion = f"```python\n{hack}\ndef add(a, b):\n    return None\n```"
    assert fraction([completion], tests=[ADD_TESTS[:2]]) == [0.0]


def test_hanging_test_fails_only_itself_and_later_ones():
    fn = CodeTests(timeout_s=2.0)
    tests = ["assert add(1, 1) == 2", "import time\ntime.sleep(60)", "assert add(0, 0) == 0"]
    t0 = time.monotonic()
    assert fn([ADD], tests=[tests]) == [pytest.approx(1 / 3)]
    assert time.monotonic() - t0 < 6.0


def test_code_that_prints_a_lot_or_reads_stdin_still_scores(fraction):
    chatty = "```python\nprint('x' * 5000)\ndef add(a, b):\n    return a + b\nprint('y')\n```"
    reader = "```python\nimport sys\nDATA = sys.stdin.read()\ndef add(a, b):\n    return a + b\n```"
    assert fraction([chatty, reader], tests=[ADD_TESTS[:2]] * 2) == [1.0, 1.0]


def test_params_through_resolve_and_validation():
    assert resolve("code_tests", {"mode": "all", "tests_key": "test_list"})([ADD], test_list=[ADD_TESTS]) == [
        0.0
    ]
    with pytest.raises(ValueError, match="mode"):
        CodeTests(mode="most")
    with pytest.raises(TypeError, match="cannot build CodeTests"):
        resolve("code_tests", {"nonsense": 1})
    with pytest.raises(ValueError, match="3 inputs but 1 outputs"):
        CodeTests()([SUM_STDIN], inputs=[["1", "2", "3"]], outputs=[["1"]])
    with pytest.raises(ValueError, match="column 'tests' has 1 rows for 2"):
        CodeTests()([ADD, ADD], tests=[ADD_TESTS])


def test_through_the_reward_manager_in_workers():
    spec = VerifierSpec("code_tests", timeout_s=60.0, params={"mode": "all", "max_parallel": 2}, label="code")
    with RewardManager([spec, VerifierSpec("format", weight=0.5)], num_workers=1) as rm:
        total, metrics, per = rm.score([ADD, "```python\ndef add(a, b):\n    return a - b\n```"],
                                       {"tests": [ADD_TESTS[:2]] * 2})  # fmt: skip
    assert per["code"] == [1.0, 0.0] and total == [1.0, 0.0]
    assert metrics["reward/code/failures"] == 0 and metrics["reward/code/mean"] == 0.5
