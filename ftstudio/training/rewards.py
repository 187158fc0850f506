"""The built-in reward functions of GRPO, chosen by name the way a person writes them: `--reward NAME[:ARG]`.

    exact            1.0 when the completion, stripped, equals the row's answer, stripped
    numeric          1.0 when the last number in the completion equals the row's answer as a number
    regex:PATTERN    1.0 when PATTERN is found in the completion (a search, not a full match; `^`/`$` are
                     the ends of the whole completion)
    length:TOKENS    1.0 at TOKENS completion tokens, falling linearly to 0.0 at no tokens and at twice TOKENS
    json             1.0 when the completion is one JSON value (whitespace around it, or a ``` / ```json fence)

`parse_rewards(specs)` turns the strings into `Reward` objects, refusing every bad one at once with a
`ValidationError`. Each `Reward` is what TRL's `GRPOTrainer` takes in `reward_funcs`: it calls it once per
batch as `reward(prompts=..., completions=..., completion_ids=..., **columns)`, where `completions` are
strings, or lists of message dicts for a conversational dataset, `completion_ids` the token ids of each
completion (ending with the end-of-sequence token when the model stopped), and `columns` every dataset
column but the prompt, one value per completion (the row's `answer` among them), plus TRL's own
`trainer_state`, `log_extra` and `log_metric`. It returns one score per completion: `None` where the row
gives nothing to score against (no answer, or an answer that is not a number for `numeric`), which TRL
leaves out of the means.

TRL names each reward by its `__name__` and logs `rewards/<__name__>/mean` and `rewards/<__name__>/std`
(with `eval_` in front during evaluation), so the names are the charts' labels and must differ: `exact`,
`numeric`, `json`, `length_<TOKENS>` (`length_64`) and `regex_<N>`, N counting the regex rewards of the
list from 1 in the order written (a pattern makes a poor label). The same spec twice is refused.

A custom reward is Python code: `python:PATH:FUNC`, the function FUNC of the file PATH (a `.py`), called the
way TRL calls any reward and named FUNC on the charts. Parsing one reads nothing; the file runs only when the
trainer loads it (`CustomReward.load`, before the first step). Whether a request may name one at all is the
studio's rule, the same as for `model.trust_remote_code` (studio/service.py), and the file must lie under a
path the studio may read (studio/paths.py).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import regex

from ftstudio.errors import Problem, ValidationError

log = logging.getLogger("ftstudio")

FIELD = "rewards (--reward)"
ANSWER_COLUMN = "answer"
"""The dataset column that `exact` and `numeric` compare with."""

USAGE = ("exact", "numeric", "regex:PATTERN", "length:TOKENS", "json")
"""The built-in rewards as a person writes them, for help texts and error messages."""

CUSTOM_PREFIX = "python"
"""`python:PATH:FUNC`, a reward function in a file."""

MAX_PATTERN_CHARS = 500
"""A pattern is typed on a command line; one longer than this is a mistake (a pasted file), and the length
of a pattern bounds how large a program the matcher builds."""

MATCH_SECONDS = 0.05
"""The time a pattern gets per completion. A pattern can take exponential time on some texts (`(a|aa)+$`)
and no check of the pattern alone catches every such shape, so the matcher (the `regex` package, which
unlike `re` takes a timeout and also backtracks far less on nested repeats) stops it instead; a completion
it cannot decide in time scores 0.0. 50 ms per completion is thousands of times what an ordinary pattern
needs on a GRPO completion, and keeps the worst batch of 64 completions under 4 s. The completion is
examined whole rather than cut at a length: cutting it would let `$` match at the cut, and GRPO already
bounds a completion by `max_completion_length` tokens."""


@dataclass(frozen=True)
class Completion:
    """One completion as a reward sees it."""

    text: str
    """What the model wrote: the string, or the last assistant message of a conversational completion."""
    token_count: int | None
    """How many tokens it is, end-of-sequence token included when there was one; None when not given."""
    answer: object
    """The row's reference answer; None when the row has none."""


class Reward:
    """A built-in reward function, called the way TRL's GRPOTrainer calls its reward functions."""

    needs_answer: ClassVar[bool] = False
    """Whether it compares with each row's `answer` column (check the dataset has one before training)."""
    needs_token_ids: ClassVar[bool] = False

    __name__: str
    """The label of its charts, unique within one list: TRL logs `rewards/<__name__>/mean` and `/std`."""

    def __init__(self, spec: str, name: str) -> None:
        self.spec = spec
        """The spec it came from, as written (`length:64`)."""
        self.__name__ = name

    def __call__(
        self,
        *,
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        prompts: Sequence[Any] | None = None,
        **columns: Any,
    ) -> list[float | None]:
        if completion_ids is None and self.needs_token_ids:
            raise ValueError(f"reward {self.spec!r} counts tokens, and no completion_ids came with the completions")
        answers = columns.get(ANSWER_COLUMN)
        if answers is None and self.needs_answer:
            raise ValidationError(answer_problems([self], ()))
        counts = [len(ids) for ids in completion_ids] if completion_ids is not None else None
        return [
            self.score(
                Completion(
                    text=completion_text(c),
                    token_count=counts[i] if counts is not None else None,
                    answer=answers[i] if answers is not None else None,
                )
            )
            for i, c in enumerate(completions)
        ]

    def score(self, completion: Completion) -> float | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<reward {self.__name__} from {self.spec!r}>"


class ExactReward(Reward):
    needs_answer = True

    def score(self, completion: Completion) -> float | None:
        if completion.answer is None:
            return None
        return 1.0 if completion.text.strip() == str(completion.answer).strip() else 0.0


class NumericReward(Reward):
    needs_answer = True

    def score(self, completion: Completion) -> float | None:
        expected = reference_number(completion.answer)
        if expected is None:
            return None
        return 1.0 if last_number(completion.text) == expected else 0.0


class RegexReward(Reward):
    def __init__(self, spec: str, name: str, pattern: regex.Pattern[str]) -> None:
        super().__init__(spec, name)
        self.pattern = pattern
        self._warned = False

    def score(self, completion: Completion) -> float | None:
        try:
            return 1.0 if self.pattern.search(completion.text, timeout=MATCH_SECONDS) else 0.0
        except TimeoutError:
            if not self._warned:  # once per reward: a pattern that is slow on one completion is slow on many
                self._warned = True
                log.warning(
                    "reward %s: the pattern took over %d ms on a completion, which scores 0; "
                    "simplify the pattern (no repeat inside a repeat, like (a|aa)+)",
                    self.spec,
                    MATCH_SECONDS * 1000,
                )
            return 0.0


class LengthReward(Reward):
    needs_token_ids = True

    def __init__(self, spec: str, name: str, target: int) -> None:
        super().__init__(spec, name)
        self.target = target

    def score(self, completion: Completion) -> float | None:
        if completion.token_count is None:
            return None
        return max(0.0, 1.0 - abs(completion.token_count - self.target) / self.target)


class JsonReward(Reward):
    def score(self, completion: Completion) -> float | None:
        text = completion.text.strip()
        fenced = _FENCE.fullmatch(text)
        if fenced:
            text = fenced.group(1)
        try:
            json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
            return 0.0
        return 1.0


class CustomReward(Reward):
    """FUNC of the Python file PATH (`python:PATH:FUNC`). It gets what TRL passes (`prompts`, `completions`,
    `completion_ids`, each dataset column) and returns a score per completion (a number, or None for none)."""

    def __init__(self, spec: str, path: Path, func: str) -> None:
        super().__init__(spec, func)
        self.path = path
        self.func = func
        self._fn: Any = None

    def load(self) -> None:
        """Run the file and find FUNC: a file that fails, or lacks FUNC, is a ValidationError naming both."""
        import importlib.util

        where = f"reward {self.spec!r}"
        if not self.path.is_file():
            raise ValidationError(Problem(FIELD, f"{where}: {self.path} is not a file; check the path"))
        module_spec = importlib.util.spec_from_file_location(f"ftstudio_reward_{self.func}", self.path)
        if module_spec is None or module_spec.loader is None:
            raise ValidationError(Problem(FIELD, f"{where}: {self.path} cannot be loaded as Python; use a .py file"))
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            failed = f"{where}: running {self.path.name} failed: {type(e).__name__}: {e}"
            raise ValidationError(Problem(FIELD, failed)) from e
        fn = getattr(module, self.func, None)
        if not callable(fn):
            raise ValidationError(Problem(FIELD, f"{where}: {self.path.name} defines no function {self.func}"))
        self._fn = fn

    def __call__(self, **kwargs: Any) -> list[float | None]:
        if self._fn is None:
            self.load()
        scores = self._fn(**kwargs)
        count = len(kwargs.get("completions") or ())
        if not isinstance(scores, list | tuple) or len(scores) != count:
            raise ValueError(f"reward {self.func} returned {type(scores).__name__}, not a list of {count} scores")
        out: list[float | None] = []
        for score in scores:
            if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)):
                raise ValueError(f"reward {self.func} returned a {type(score).__name__}; return numbers (or None)")
            out.append(None if score is None else float(score))
        return out


_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL | re.IGNORECASE)

# A number as people write it: an optional sign, digits grouped by commas or not, an optional decimal part.
# The sign counts only where it cannot be a hyphen or minus between two things ("3-4" is 3 and 4), and a
# number never starts inside another ("1.5" is not also "5"). ASCII digits only: Fraction reads no others.
_NUMBER = re.compile(r"(?:(?<![\w.])[-+])?(?<![0-9.])(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?![0-9])")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-"})


def last_number(text: str) -> Fraction | None:
    """The last number written in the text, exactly ("2.50" is 2.5; "1,234" is 1234); None when there is none."""
    numbers = _NUMBER.findall(text.translate(_MINUS_SIGNS))
    return Fraction(numbers[-1].replace(",", "")) if numbers else None


def reference_number(answer: object) -> Fraction | None:
    """A row's answer as a number: an int, a float, or a string holding one number (a trailing period allowed)."""
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, int):
        return Fraction(answer)
    if isinstance(answer, float):
        # repr, not the float itself: the answer 0.1 means one tenth, not the binary fraction nearest it
        return Fraction(repr(answer)) if math.isfinite(answer) else None
    text = str(answer).strip().translate(_MINUS_SIGNS).removesuffix(".")
    whole = _NUMBER.fullmatch(text)
    return Fraction(whole.group().replace(",", "")) if whole else None


def completion_text(completion: Any) -> str:
    """What the model wrote: a plain completion as it is; for a conversational one, the last assistant message
    (with tools, the earlier ones are calls and the last one the answer)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        for message in reversed(completion):
            if isinstance(message, dict) and message.get("role") == "assistant":
                return _content_text(message.get("content"))
        return ""
    raise TypeError(f"a completion is a string or a list of messages, not {type(completion).__name__}")


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": "..."}, ...]
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""  # None: a message that only calls tools


def parse_rewards(specs: Sequence[object], custom_allowed: bool = False) -> list[Reward]:
    """The rewards the specs name, in their order; every bad spec is reported at once in one ValidationError.

    `custom_allowed`: whether a custom reward (`python:PATH:FUNC`) may be named at all; no user code is ever
    loaded here. An empty list is returned as it is: whether a method needs a reward is the config's to say."""
    problems: list[Problem] = []
    rewards: list[Reward] = []
    seen: dict[str, str] = {}  # what a reward scores -> the spec that named it first
    for spec in specs:
        if not isinstance(spec, str):
            problems.append(Problem(FIELD, f"expected a reward like 'numeric' or 'length:64' (got {spec!r})"))
            continue
        regex_number = 1 + sum(isinstance(r, RegexReward) for r in rewards)
        reward = _parse_one(spec, custom_allowed, regex_number)
        if isinstance(reward, Problem):
            problems.append(reward)
            continue
        # The same reward twice would be counted twice in the total and share one chart ("length:64" and
        # "length: 64" alike), so it is refused rather than silently weighted double.
        same = f"regex:{reward.pattern.pattern}" if isinstance(reward, RegexReward) else reward.__name__
        if same in seen:
            problems.append(Problem(FIELD, f"{spec!r} repeats {seen[same]!r}; keep one"))
            continue
        seen[same] = spec
        rewards.append(reward)
    if problems:
        raise ValidationError(problems)
    return rewards


def answer_problems(rewards: Sequence[Reward], columns: Collection[str]) -> list[Problem]:
    """What is wrong with using these rewards on a dataset with these columns (empty when nothing is)."""
    needing = [r.spec for r in rewards if r.needs_answer]
    if not needing or ANSWER_COLUMN in columns:
        return []
    others = ", ".join(u for u in USAGE if u.split(":")[0] not in ("exact", "numeric"))
    return [
        Problem(
            FIELD,
            f"{', '.join(needing)} compare{'s' if len(needing) == 1 else ''} each completion with the row's "
            f"'{ANSWER_COLUMN}' column, and the dataset has none; add that column or use {others}",
        )
    ]


def _parse_one(spec: str, custom_allowed: bool, regex_number: int) -> Reward | Problem:
    name, has_arg, arg = spec.partition(":")
    name = name.strip()
    known = ", ".join(USAGE)
    if name == CUSTOM_PREFIX:
        if not custom_allowed:
            return Problem(
                FIELD, f"{spec!r} is custom reward code; start the studio with --allow-remote-code to use it"
            )
        path, _, func = arg.rpartition(":")
        if not path.strip() or not func.isidentifier():
            return Problem(
                FIELD, f"{spec!r}: write a custom reward as python:PATH:FUNC, e.g. python:rewards.py:brevity"
            )
        if not path.endswith(".py"):
            return Problem(FIELD, f"{spec!r}: {path} is not a .py file; a custom reward is a Python function")
        return CustomReward(spec, Path(path).expanduser(), func)
    if name in ("exact", "numeric", "json"):
        if has_arg:
            return Problem(FIELD, f"{spec!r}: {name} takes no argument; write it as {name}")
        kind = {"exact": ExactReward, "numeric": NumericReward, "json": JsonReward}[name]
        return kind(spec, name)
    if name == "regex":
        return _parse_regex(spec, arg, regex_number)
    if name == "length":
        return _parse_length(spec, arg.strip())
    if not name:
        return Problem(FIELD, f"an empty reward; choose from {known}")
    return Problem(FIELD, f"unknown reward {spec!r}; choose from {known}")


def _parse_regex(spec: str, pattern: str, number: int) -> Reward | Problem:
    # The pattern is taken as written after the first colon: spaces and colons in it are part of it.
    if not pattern:
        return Problem(FIELD, f"{spec!r}: regex needs a pattern, e.g. regex:^Answer: \\d+$")
    if len(pattern) > MAX_PATTERN_CHARS:
        return Problem(
            FIELD, f"the regex pattern is {len(pattern)} characters, over the {MAX_PATTERN_CHARS} allowed; shorten it"
        )
    try:
        compiled = regex.compile(pattern)
    except regex.error as e:
        return Problem(FIELD, f"{spec!r} is not a valid pattern ({e}); fix the pattern")
    return RegexReward(spec, f"regex_{number}", compiled)


def _parse_length(spec: str, arg: str) -> Reward | Problem:
    if not arg:
        return Problem(FIELD, f"{spec!r}: length needs a target in tokens, e.g. length:64")
    try:
        target = int(arg)
    except ValueError:
        return Problem(FIELD, f"{spec!r}: the length target must be a whole number of tokens, e.g. length:64")
    if target <= 0:
        return Problem(FIELD, f"{spec!r}: the length target must be above 0 tokens, e.g. length:64")
    return LengthReward(spec, f"length_{target}", target)
