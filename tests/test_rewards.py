"""The built-in GRPO rewards: what each scores, the specs refused and why, and the call TRL makes (pure, fast)."""

from __future__ import annotations

import ast
import logging
import pickle
import re
import time
from fractions import Fraction
from pathlib import Path

import pytest

from ftstudio.errors import ValidationError
from ftstudio.training import rewards
from ftstudio.training.rewards import (
    MAX_PATTERN_CHARS,
    Reward,
    answer_problems,
    completion_text,
    last_number,
    parse_rewards,
    reference_number,
)


def one(spec: str) -> Reward:
    (reward,) = parse_rewards([spec])
    return reward


def score(spec: str, text: str, answer: object = None, ids: list[int] | None = None) -> float | None:
    """One completion scored the way TRL calls a reward: keywords, a list per column, its extras beside."""
    columns = {"answer": [answer]} if answer is not None else {}
    (result,) = one(spec)(
        prompts=["What is 2 plus 2?"],
        completions=[text],
        completion_ids=[ids if ids is not None else [7] * 3],
        trainer_state=None,
        log_extra=lambda *a: None,
        log_metric=lambda *a: None,
        **columns,
    )
    return result


def conversational(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# ---- what each reward scores


def test_exact_compares_stripped_text() -> None:
    assert score("exact", "  Paris\n", answer="Paris ") == 1.0
    assert score("exact", "paris", answer="Paris") == 0.0
    assert score("exact", "The answer is 4", answer="4") == 0.0
    assert score("exact", "4", answer=4) == 1.0  # a number in a JSON file is compared as it is written


def test_numeric_takes_the_last_number() -> None:
    assert score("numeric", "2 plus 2 is 4", answer="4") == 1.0
    assert score("numeric", "4, or maybe 5", answer="4") == 0.0
    assert score("numeric", "no idea", answer="4") == 0.0
    assert score("numeric", "", answer="4") == 0.0


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("The total is 1,234.", "1234"),
        ("1234", "1,234"),
        ("It is -3.", "-3"),
        ("x = -3", "-3"),
        ("It is \u22123", "-3"),  # a typeset minus sign
        ("2.50", "2.5"),
        ("$2.5", "2.50"),
        ("Answer: 7.", "7."),
        ("7", 7),
        ("0.1", 0.1),
        ("12,345,678 people", "12345678"),
        ("-0", "0"),
    ],
)
def test_numeric_equal_numbers_written_differently(text: str, answer: object) -> None:
    assert score("numeric", text, answer=answer) == 1.0


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("pages 3-4", "-4"),  # a hyphen between numbers is not a minus sign
        ("2.5", "25"),
        ("1,234", "1.234"),
        ("4th", "5"),
    ],
)
def test_numeric_different_numbers(text: str, answer: object) -> None:
    assert score("numeric", text, answer=answer) == 0.0


def test_last_number_and_reference_number() -> None:
    assert last_number("1.5") == Fraction(3, 2)  # not also 5
    assert last_number("pages 3-4") == 4
    assert last_number("v1.2 or abc123") == 123
    assert last_number("1,2345") == 2345  # not a thousands grouping
    assert last_number("nothing") is None
    assert reference_number(" 42. ") == 42
    assert reference_number("1,000,000") == 1_000_000
    for unusable in ("four", "4 apples", "", None, True, float("nan"), float("inf")):
        assert reference_number(unusable) is None, unusable


def test_a_row_without_a_usable_answer_is_not_scored() -> None:
    # None: TRL leaves it out of the reward's mean instead of counting it as wrong
    assert score("numeric", "4", answer="four") is None
    reward = one("exact")
    assert reward(prompts=["p", "q"], completions=["4", "4"], answer=["4", None]) == [1.0, None]


def test_regex_searches_the_completion() -> None:
    assert score(r"regex:^Answer: \d+$", "Answer: 42") == 1.0
    assert score(r"regex:^Answer: \d+$", "Answer: 42\nmore") == 0.0  # multiline off: $ is the very end
    assert score(r"regex:^Answer: \d+$", "So. Answer: 42") == 0.0
    assert score(r"regex:\d", "it is 4 I think") == 1.0  # a search, not a full match
    assert score("regex:a:b", "xa:by") == 1.0  # everything after the first colon is the pattern


def test_length_peaks_at_the_target() -> None:
    assert score("length:4", "", ids=[1, 2, 3, 4]) == 1.0
    assert score("length:4", "", ids=[1, 2]) == 0.5
    assert score("length:4", "", ids=[1] * 6) == 0.5
    assert score("length:4", "", ids=[]) == 0.0
    assert score("length:4", "", ids=[1] * 8) == 0.0
    assert score("length:4", "", ids=[1] * 100) == 0.0  # never below zero
    assert score("length:3", "", ids=[1]) == pytest.approx(1 / 3)


def test_length_needs_token_ids() -> None:
    with pytest.raises(ValueError, match="counts tokens"):
        one("length:4")(prompts=["p"], completions=["text"])


def test_json_accepts_a_value_or_a_fenced_block() -> None:
    assert score("json", '{"answer": 4}') == 1.0
    assert score("json", "  \n[1, 2]\n") == 1.0
    assert score("json", '```json\n{"answer": 4}\n```') == 1.0
    assert score("json", '```\n{"answer": 4}\n```') == 1.0
    assert score("json", '```JSON {"a": 1}```') == 1.0
    assert score("json", "4") == 1.0  # a bare number is a JSON value
    assert score("json", '{"answer": 4') == 0.0
    assert score("json", 'Here you go: {"answer": 4}') == 0.0
    assert score("json", "") == 0.0
    assert score("json", "[" * 100_000) == 0.0  # nesting too deep for the parser is not JSON either


@pytest.mark.parametrize(
    ("spec", "text", "answer", "expected"),
    [
        ("exact", "4", "4", 1.0),
        ("numeric", "It is 4.", "4", 1.0),
        (r"regex:^It is \d+\.$", "It is 4.", None, 1.0),
        ("json", '{"a": 4}', None, 1.0),
        ("length:3", "It is 4.", None, 1.0),
    ],
)
def test_every_reward_reads_conversational_completions(spec: str, text: str, answer: object, expected: float) -> None:
    columns = {"answer": [answer]} if answer is not None else {}
    reward = one(spec)
    assert reward(
        prompts=[[{"role": "user", "content": "q"}]], completions=[text], completion_ids=[[1, 2, 3]], **columns
    ) == [expected]
    assert reward(
        prompts=[[{"role": "user", "content": "q"}]],
        completions=[conversational(text)],
        completion_ids=[[1, 2, 3]],
        **columns,
    ) == [expected]


def test_completion_text_of_each_shape() -> None:
    assert completion_text("plain") == "plain"
    assert completion_text(conversational("hi")) == "hi"
    with_tools = [
        {"role": "assistant", "content": None, "tool_calls": [{"name": "calc"}]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "It is 4."},
    ]
    assert completion_text(with_tools) == "It is 4."  # the final answer, not the call or the tool's reply
    assert (
        completion_text(
            [{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
        )
        == "ab"
    )
    assert completion_text([]) == ""
    with pytest.raises(TypeError):
        completion_text(42)


def test_one_score_per_completion_in_order() -> None:
    reward = one("numeric")
    out = reward(prompts=["p"] * 3, completions=["1", "2", "3"], completion_ids=[[1]] * 3, answer=["1", "3", "3"])
    assert out == [1.0, 0.0, 1.0]


# ---- names, specs, the call TRL makes


def test_names_for_the_charts() -> None:
    parsed = parse_rewards(["numeric", "length:64", r"regex:^Answer: \d+$", "json", "exact", "regex:done", "length:8"])
    assert [r.__name__ for r in parsed] == ["numeric", "length_64", "regex_1", "json", "exact", "regex_2", "length_8"]
    assert [r.spec for r in parsed] == [
        "numeric",
        "length:64",
        r"regex:^Answer: \d+$",
        "json",
        "exact",
        "regex:done",
        "length:8",
    ]
    assert [r.needs_answer for r in parsed] == [True, False, False, False, True, False, False]


def test_trl_takes_the_name_and_can_pickle_the_reward() -> None:
    reward = one(r"regex:^\d+$")
    # TRL's get_callable_name (trl/trainer/utils.py): getattr(func, "__name__", type(func).__name__); trl itself
    # is not imported here, it takes seconds and this is the fast tier
    assert getattr(reward, "__name__", type(reward).__name__) == "regex_1"
    copy = pickle.loads(pickle.dumps(reward))
    assert copy.__name__ == "regex_1" and copy(prompts=["p"], completions=["12"]) == [1.0]


def test_empty_list_is_the_configs_to_judge() -> None:
    assert parse_rewards([]) == []


# ---- specs refused, each with one line that names the spec and the fix

KNOWN = "choose from exact, numeric, regex:PATTERN, length:TOKENS, json"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("exactt", f"unknown reward 'exactt'; {KNOWN}"),
        ("Numeric", f"unknown reward 'Numeric'; {KNOWN}"),
        ("", f"an empty reward; {KNOWN}"),
        ("regex", r"'regex': regex needs a pattern, e.g. regex:^Answer: \d+$"),
        ("regex:", r"'regex:': regex needs a pattern, e.g. regex:^Answer: \d+$"),
        ("regex:(", "'regex:(' is not a valid pattern (missing ) at position 1); fix the pattern"),
        ("length", "'length': length needs a target in tokens, e.g. length:64"),
        ("length:0", "'length:0': the length target must be above 0 tokens, e.g. length:64"),
        ("length:-5", "'length:-5': the length target must be above 0 tokens, e.g. length:64"),
        ("length:1.5", "'length:1.5': the length target must be a whole number of tokens, e.g. length:64"),
        ("length:many", "'length:many': the length target must be a whole number of tokens, e.g. length:64"),
        ("exact:yes", "'exact:yes': exact takes no argument; write it as exact"),
        ("numeric:2", "'numeric:2': numeric takes no argument; write it as numeric"),
        ("json:", "'json:': json takes no argument; write it as json"),
    ],
)
def test_bad_spec_message(spec: str, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_rewards([spec])
    assert str(err.value) == f"rewards (--reward): {message}"
    assert [p.field for p in err.value.problems] == ["rewards (--reward)"]
    assert "\n" not in str(err.value)


def test_not_a_string() -> None:
    with pytest.raises(ValidationError, match=r"expected a reward like 'numeric' or 'length:64' \(got 5\)"):
        parse_rewards([5])


def test_every_bad_spec_is_reported_at_once() -> None:
    with pytest.raises(ValidationError) as err:
        parse_rewards(["numeric", "exactt", "length:0", "json"])
    assert [p.message for p in err.value.problems] == [
        f"unknown reward 'exactt'; {KNOWN}",
        "'length:0': the length target must be above 0 tokens, e.g. length:64",
    ]


def test_the_same_reward_twice_is_refused() -> None:
    for specs in (["numeric", "numeric"], ["length:64", "length: 64"], ["regex:a+", "regex:a+"]):
        with pytest.raises(ValidationError, match=re.escape(f"'{specs[1]}' repeats '{specs[0]}'; keep one")):
            parse_rewards(specs)
    # different patterns, and a pattern that spells a reward's name, are different rewards
    assert [r.__name__ for r in parse_rewards(["regex:a", "regex:b", "numeric", "regex:numeric"])] == [
        "regex_1",
        "regex_2",
        "numeric",
        "regex_3",
    ]


def test_custom_reward_code_needs_the_flag_and_runs_only_when_loaded(tmp_path) -> None:
    code = tmp_path / "reward.py"
    marker = tmp_path / "ran"
    code.write_text(
        f"open({str(marker)!r}, 'w').close()\ndef score(completions, **kw): return [1.0 for _ in completions]\n"
    )
    spec = f"python:{code}:score"
    with pytest.raises(ValidationError, match="is custom reward code; start the studio with --allow-remote-code"):
        parse_rewards([spec])
    (custom,) = parse_rewards([spec], custom_allowed=True)
    assert custom.__name__ == "score" and not marker.exists()  # parsed, never run
    assert custom(prompts=["p", "q"], completions=["a", "b"]) == [1.0, 1.0]
    assert marker.exists()
    for bad, message in [
        (f"python:{code}", "write a custom reward as python:PATH:FUNC"),
        (f"python:{tmp_path / 'reward.txt'}:score", "is not a .py file"),
    ]:
        with pytest.raises(ValidationError, match=message):
            parse_rewards([bad], custom_allowed=True)
    (missing,) = parse_rewards([f"python:{code}:nothing"], custom_allowed=True)
    with pytest.raises(ValidationError, match=r"reward\.py defines no function nothing"):
        missing.load()
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def score(completions, **kw): return 'high'\n")
    (liar,) = parse_rewards([f"python:{wrong}:score"], custom_allowed=True)
    with pytest.raises(ValueError, match="reward score returned str, not a list of 1 scores"):
        liar(prompts=["p"], completions=["a"])


def test_answer_column_check() -> None:
    parsed = parse_rewards(["numeric", "exact", "length:8"])
    assert answer_problems(parsed, ["prompt", "answer"]) == []
    assert answer_problems(parse_rewards(["length:8", "json"]), ["prompt"]) == []
    (problem,) = answer_problems(parsed, ["prompt"])
    assert str(problem) == (
        "rewards (--reward): numeric, exact compare each completion with the row's 'answer' column, "
        "and the dataset has none; add that column or use regex:PATTERN, length:TOKENS, json"
    )
    # called without the column anyway (a config that skipped the check): the same words, not a KeyError
    with pytest.raises(ValidationError, match="exact compares each completion with the row's 'answer' column"):
        one("exact")(prompts=["p"], completions=["4"])


# ---- the guard on patterns


def test_a_pattern_over_the_limit_is_refused() -> None:
    parse_rewards(["regex:" + "a" * MAX_PATTERN_CHARS])
    with pytest.raises(ValidationError, match=f"over the {MAX_PATTERN_CHARS} allowed; shorten it"):
        parse_rewards(["regex:" + "a" * (MAX_PATTERN_CHARS + 1)])


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"(a+)+$", [0.0, 0.0, 0.0]),  # the textbook exponential shape: this matcher needs no time limit for it
        (r".*.*.*.*x", [0.0, 1.0, 0.0]),  # polynomial with Python's re: about a minute on 1,000 characters
        (r"(x+x+)+y", [0.0, 0.0, 0.0]),
    ],
)
def test_slow_patterns_end_quickly(pattern: str, expected: list[float]) -> None:
    reward = one("regex:" + pattern)
    started = time.perf_counter()
    out = reward(prompts=["p"] * 3, completions=["a" * 40 + "!", "x" * 5000, ""])
    assert time.perf_counter() - started < 3 * rewards.MATCH_SECONDS + 1.0
    assert out == expected


def test_a_pattern_out_of_time_scores_zero_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    reward = one("regex:(a|aa)+$")
    with caplog.at_level(logging.WARNING, logger="ftstudio"):
        started = time.perf_counter()
        out = reward(prompts=["p"] * 3, completions=["a" * 60 + "b"] * 2 + ["aaa"])
    assert out == [0.0, 0.0, 1.0]
    assert time.perf_counter() - started < 2 * rewards.MATCH_SECONDS + 1.0
    (record,) = caplog.records
    assert "regex:(a|aa)+$" in record.getMessage() and "simplify the pattern" in record.getMessage()


def test_rewards_import_nothing_heavy() -> None:
    # read from the source, not sys.modules: other tests in this process may have loaded torch already
    tree = ast.parse(Path(rewards.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {
        "__future__",
        "collections",
        "dataclasses",
        "fractions",
        "importlib",
        "json",
        "logging",
        "math",
        "pathlib",
        "re",
        "typing",
        "regex",
        "ftstudio",
    }
