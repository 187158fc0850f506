"""The bundled arithmetic dataset for GRPO: the committed file is its recipe's output, and every answer is right."""

from __future__ import annotations

import json
import operator
import re

from ftstudio.training import mathdata
from ftstudio.training.rewards import parse_rewards, reference_number


def test_math_file_matches_its_recipe() -> None:
    rows = [json.loads(line) for line in mathdata.MATH_PATH.read_text().splitlines()]
    assert rows == mathdata.generate()
    assert 250 <= len(rows) <= 400
    assert all(set(row) == {"prompt", "answer"} for row in rows)


def test_every_answer_is_the_arithmetic_of_its_prompt() -> None:
    # read back from the words, independently of the recipe's code
    ops = {"plus": operator.add, "+": operator.add, "buys": operator.add, "minus": operator.sub, "-": operator.sub}
    ops |= {"gave": operator.sub, "times": operator.mul, "boxes": operator.mul}
    for row in mathdata.generate():
        a, b = (int(n) for n in re.findall(r"\d+", row["prompt"]))
        (word,) = [w for w in re.findall(r"[a-z]+|[+-]", row["prompt"]) if w in ops]
        assert row["answer"] == str(ops[word](a, b)), row


def test_numeric_and_exact_are_well_defined_on_it() -> None:
    rows = mathdata.generate()
    numeric, exact = parse_rewards(["numeric", "exact"])
    answers = [row["answer"] for row in rows]
    assert all(reference_number(a) is not None and a.isdigit() for a in answers)
    assert numeric(prompts=answers, completions=[f"The answer is {a}." for a in answers], answer=answers) == [
        1.0
    ] * len(rows)
    assert exact(prompts=answers, completions=answers, answer=answers) == [1.0] * len(rows)


def test_generate_is_deterministic_and_seeded() -> None:
    assert mathdata.generate() == mathdata.generate()
    assert mathdata.generate(seed=1) != mathdata.generate()
