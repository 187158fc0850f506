"""GRPO (issue 22): prompts and their answers, rewards chosen by name or written in Python, checked at submit,
and a real run that learns what its reward asks. Its crash scenarios are in test_chaos.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import api_client, in_memory
from trainer_fixtures import FAST, assert_adapter_loads, merged, shared_home, train, write_jsonl

from ftstudio.config import TrainingConfig
from ftstudio.errors import ValidationError
from ftstudio.training.data import load_examples
from ftstudio.training.mathdata import MATH_PATH


def test_grpo_defaults_and_what_it_refuses() -> None:
    cfg = TrainingConfig.from_dict({"method": "grpo"})
    assert (cfg.data.path, cfg.data.validation, cfg.rewards) == ("builtin:math", "0", ["numeric"])
    assert cfg.grpo.generations == 4 and cfg.grpo.beta == 0.0
    kept = TrainingConfig.from_dict({"method": "grpo", "rewards": ["json"], "data": {"validation": "0.1"}})
    assert (kept.rewards, kept.data.validation) == (["json"], "0.1")
    with pytest.raises(ValidationError, match=r"rewards \(--reward\): method grpo needs at least one reward"):
        TrainingConfig.from_dict({"method": "grpo", "rewards": []})
    with pytest.raises(ValidationError, match=r"batch_size x grad_accum \(6\) must be a multiple of it"):
        TrainingConfig.from_dict({"method": "grpo", "optim": {"batch_size": 3, "grad_accum": 2}})
    with pytest.raises(ValidationError, match="only method grpo uses rewards, and this is method dpo"):
        TrainingConfig.from_dict({"method": "dpo", "rewards": ["json"]})
    with pytest.raises(ValidationError, match=r"method grpo trains on prompts .* but this data holds preference pairs"):
        TrainingConfig.from_dict({"method": "grpo", "data": {"format": "preference"}})


def test_prompts_with_or_without_answers_and_instructions_as_prompts(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from ftstudio.training import batches
    from ftstudio.training.builtin import tiny_model_dir
    from ftstudio.training.grpo import prompt_row

    rows = [
        {"prompt": "What is 2 plus 2?", "answer": "4"},
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 times 3?"}],
            "answer": 9,
        },
        {"prompt": "Say hi."},
        {"prompt": [{"role": "assistant", "content": "Hello"}]},
    ]
    info, examples = load_examples(write_jsonl(tmp_path / "p.jsonl", rows))
    assert info.format == "prompts" and info.skipped_rows == 1
    assert "p.jsonl line 4: `prompt` ends with an assistant turn" in info.problems[0].message
    assert [e.answer for e in examples] == ["4", "9", ""]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(shared_home()))
    batches.prepare_tokenizer(tokenizer)
    first = prompt_row(examples[0], tokenizer, 128)
    assert first == {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}], "answer": "4"}
    # An instruction file serves too: its output is the answer the rewards compare with.
    _, [alpaca] = load_examples(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "2+2?", "output": "4"}]))
    assert prompt_row(alpaca, tokenizer, 128) == {"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4"}
    with pytest.raises(ValueError, match=r"the prompt alone fills data.max_length \(8 tokens\)"):
        prompt_row(examples[1], tokenizer, 8)


def test_bad_grpo_tasks_over_http_are_422_and_create_nothing(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    no_answers = write_jsonl(home / "open.jsonl", [{"prompt": "Tell me a story."}] * 3)
    no_prompts = write_jsonl(home / "none.jsonl", [{"prompt": ""}] * 3)
    reward_file = home / "mine.py"
    reward_file.write_text("def brevity(completions, **kw):\n    return [1.0 for _ in completions]\n")
    with api_client(in_memory(home, in_server=True)) as client:
        before = client.get("/api/tasks").json()["total"]

        def refused(config: dict[str, Any], *needles: str) -> None:
            r = client.post("/api/tasks", json={"config": {"preset": "cpu-demo", "method": "grpo", **config}})
            assert r.status_code == 422, r.text
            assert all(n in r.json()["detail"] for n in needles), r.json()["detail"]

        refused({"rewards": ["exactt"]}, "unknown reward 'exactt'; choose from exact, numeric, regex:PATTERN")
        refused({"rewards": ["regex:("]}, "'regex:(' is not a valid pattern")
        refused({"rewards": ["length:0"]}, "the length target must be above 0 tokens")
        refused(
            {"rewards": [f"python:{reward_file}:brevity"]},
            "custom reward functions run Python code, which is off for requests to this studio",
            "--allow-remote-code",
        )
        refused(
            {"data": {"path": str(no_prompts)}}, "none of its 3 rows is a usable prompts example", "`prompt` is empty"
        )
        refused({"data": {"path": str(no_answers)}}, "numeric compares each completion with the row's 'answer' column")
        refused(
            {"data": {"path": "builtin:preferences"}}, "method grpo trains on prompts", "use method dpo, orpo or kto"
        )
        assert client.get("/api/tasks").json()["total"] == before
        ok = client.post("/api/tasks", json={"config": {"preset": "cpu-demo", "method": "grpo", "rewards": ["json"]}})
        assert ok.status_code == 201, ok.text
        assert ok.json()["config"]["data"]["path"] == "builtin:math"


def test_a_custom_reward_is_taken_from_an_allowed_path_when_the_studio_allows_code(home: Path, tmp_path: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    inside = home / "rewards.py"
    inside.write_text("def brevity(completions, **kw):\n    return [1.0 for _ in completions]\n")
    outside = tmp_path / "elsewhere" / "rewards.py"
    outside.parent.mkdir()
    outside.write_text(inside.read_text())
    from ftstudio.studio.policy import Policy

    service = in_memory(home, in_server=True, policy=Policy(allow_remote_code=True))
    with api_client(service) as client:
        ok = client.post(
            "/api/tasks",
            json={"config": {"preset": "cpu-demo", "method": "grpo", "rewards": [f"python:{inside}:brevity"]}},
        )
        assert ok.status_code == 201, ok.text
        far = client.post(
            "/api/tasks",
            json={"config": {"preset": "cpu-demo", "method": "grpo", "rewards": [f"python:{outside}:brevity"]}},
        )
        assert far.status_code == 422 and "rewards (--reward)" in far.json()["detail"], far.text
        missing = client.post(
            "/api/tasks",
            json={"config": {"preset": "cpu-demo", "method": "grpo", "rewards": [f"python:{home}/nope.py:f"]}},
        )
        assert missing.status_code == 422 and "nope.py is not a file" in missing.json()["detail"], missing.text


GRPO_FAST = merged(
    FAST,
    {
        "method": "grpo",
        "data": {"path": str(MATH_PATH), "max_length": 128},
        "lora": {"rank": 8, "alpha": 16},
        "optim": {"batch_size": 8, "warmup_ratio": 0, "seed": 3},
        "grpo": {"max_completion_length": 12},
    },
)


@pytest.mark.slow
def test_grpo_raises_the_mean_of_a_reward_the_tiny_model_can_learn(tmp_path: Path) -> None:
    """A digit anywhere in the completion: about a third of the untrained model's samples have one."""
    config = merged(GRPO_FAST, {"rewards": ["regex:\\d", "numeric"], "optim": {"max_steps": 40, "learning_rate": 5e-3}})
    code, events = train(tmp_path / "task", config, shared_home())
    assert code == 0, events[-1]
    progress = [e for e in events if e["kind"] == "progress"]
    assert [e["step"] for e in progress] == list(range(1, 41))
    digit = [e["metrics"]["rewards/regex_1/mean"] for e in progress]
    assert {"reward", "reward_std", "completions/mean_length", "rewards/numeric/mean"} <= set(progress[-1]["metrics"])
    first, last = sum(digit[:5]) / 5, sum(digit[-5:]) / 5
    assert last > first + 0.3 and last >= 0.8, digit


@pytest.mark.slow
def test_a_custom_reward_trains_and_is_charted_under_its_name(tmp_path: Path) -> None:
    reward_file = tmp_path / "mine.py"
    reward_file.write_text(
        "def brevity(completions, completion_ids, **columns):\n"
        "    assert 'answer' in columns\n"
        "    return [1.0 / len(ids) for ids in completion_ids]\n"
    )
    config = merged(GRPO_FAST, {"rewards": [f"python:{reward_file}:brevity"]})
    config["evaluation"] = {"prompts": str(MATH_PATH), "max_prompts": 2, "max_new_tokens": 4}
    code, events = train(tmp_path / "task", config, shared_home())
    assert code == 0, events[-1]
    progress = [e for e in events if e["kind"] == "progress"]
    assert all(0 < e["metrics"]["rewards/brevity/mean"] <= 1 for e in progress), progress[-1]
    assert [e for e in events if e["kind"] == "samples"][-1]["count"] == 2
    assert_adapter_loads(tmp_path / "task" / "adapter", shared_home())
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('not today')\n")
    code, events = train(tmp_path / "again", merged(config, {"rewards": [f"python:{broken}:f"]}), shared_home())
    assert code == 2 and "running broken.py failed: RuntimeError: not today" in events[-1]["message"], events[-1]
