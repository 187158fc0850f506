"""Held-out prompts (evaluation.prompts): the fine-tune and its base model answer them when training
ends and after checkpoints, a pause cuts the answering short without leaving half a stage, and the
stored stages are read back safely."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from trainer_fixtures import ALPACA, FAST, merged, shared_home, train, write_jsonl

from ftstudio.config import LoraConfig, ModelConfig
from ftstudio.training import evaluation
from ftstudio.training.adapters import generate
from ftstudio.training.builtin import tiny_model_dir
from ftstudio.training.evaluation import HeldOut, load_prompts, stages, tidy

HELD_OUT = [
    {"instruction": "What is 5 plus 5?", "input": "", "output": "5 plus 5 is 10."},
    {"instruction": "What is 6 plus 1?", "input": "", "output": "6 plus 1 is 7."},
    {"instruction": "Repeat the phrase exactly.", "input": "red fox", "output": "red fox"},
]


@pytest.mark.slow
def test_the_fine_tune_and_the_base_model_answer_every_held_out_prompt(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA)
    prompts = write_jsonl(tmp_path / "held-out.jsonl", HELD_OUT)
    config = merged(
        FAST,
        {
            "data": {"path": str(data)},
            "optim": {"max_steps": 6},
            "checkpoint": {"every_steps": 2},
            "evaluation": {"prompts": str(prompts), "max_new_tokens": 8, "at_checkpoints": True},
        },
    )
    task = tmp_path / "task"
    code, events = train(task, config, shared_home())
    assert code == 0, events[-1]

    # One stage per checkpoint of the schedule, and the final one (at step 6, not a checkpoint-6 beside it).
    assert sorted(p.name for p in (task / "evals").iterdir()) == [
        "checkpoint-2.json",
        "checkpoint-4.json",
        "final.json",
    ]
    final = json.loads((task / "evals" / "final.json").read_text())
    assert (final["stage"], final["step"], final["max_new_tokens"]) == ("final", 6, 8) and final["seconds"] > 0
    assert [s["prompt"] for s in final["samples"]] == [
        "What is 5 plus 5?",
        "What is 6 plus 1?",
        HELD_OUT[2]["instruction"] + "\n\nred fox",
    ]
    assert [s["reference"] for s in final["samples"]] == [r["output"] for r in HELD_OUT]
    assert all(s["adapter"] and s["base"] for s in final["samples"])
    # The fine-tune's answer is the saved adapter's, asked the way `ftstudio generate` asks; the base model's
    # is the plain base model's, with no adapter loaded at all.
    assert final["samples"][0]["adapter"] == generate(task, "What is 5 plus 5?", max_new_tokens=8, home=shared_home())
    assert final["samples"][0]["base"] == base_answer(task / "adapter", "What is 5 plus 5?", 8)

    answered = [e for e in events if e["kind"] == "samples"]
    assert [(e["stage"], e["step"], e["count"]) for e in answered] == [
        ("checkpoint-2", 2, 3),
        ("checkpoint-4", 4, 3),
        ("final", 6, 3),
    ]
    kinds = [e["kind"] for e in events]
    assert kinds[-2:] == ["samples", "train_end"]
    assert any(e["kind"] == "status" and e["phase"] == "answering_prompts" for e in events)
    # What the studio serves: the same stages, oldest first.
    assert [s["stage"] for s in stages(task)] == ["checkpoint-2", "checkpoint-4", "final"]
    assert stages(task)[-1]["samples"] == final["samples"]


def base_answer(adapter: Path, prompt: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)  # with the chat template the run trained with
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(shared_home()), dtype=torch.float32)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_a_pause_while_answering_stops_at_the_next_token_and_writes_nothing(tmp_path: Path) -> None:
    from ftstudio.training.models import attach_lora, load_model, load_tokenizer

    ref = tiny_model_dir(shared_home())
    tokenizer = load_tokenizer(ref, ModelConfig())
    model, _ = attach_lora(load_model(ref, ModelConfig()), LoraConfig(rank=4, alpha=8))
    model.train()  # as the Trainer leaves it between steps
    asked = []

    def pause_asked() -> bool:
        asked.append(1)
        return len(asked) > 3  # asked for while the first answer is being written

    prompts = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", HELD_OUT)), shared_home(), 20)
    held_out = HeldOut(
        prompts,
        tokenizer,
        max_length=128,
        max_new_tokens=200,
        batch_size=2,
        out_dir=tmp_path,
        events=None,
        stop=pause_asked,
    )
    assert held_out.answer(model, "checkpoint-2", 2) is False
    # Asked at every token while generating, and stopped at the first token after the pause: not 200 tokens later.
    assert 4 <= len(asked) < 10
    assert not (tmp_path / "evals").exists() and stages(tmp_path) == []
    assert model.training  # left as training found it


def test_prompts_of_every_shape(tmp_path: Path, capsys) -> None:
    home = shared_home()

    def prompts(rows: list[dict]) -> list[tuple[str, str | None]]:
        path = write_jsonl(tmp_path / "p.jsonl", rows)
        return [(p.text, p.reference) for p in load_prompts(str(path), home, 20)]

    # alpaca with and without an answer
    assert prompts([{"instruction": "Hi?", "output": "Hello."}, {"instruction": "Name a colour.", "output": ""}]) == [
        ("Hi?", "Hello."),
        ("Name a colour.", None),
    ]
    assert prompts([{"instruction": "Only asked."}]) == [("Only asked.", None)]
    # a conversation: the last assistant turn is expected; one that ends with the user is all prompt
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert prompts([{"messages": turns}, {"messages": [*turns, {"role": "assistant", "content": "6"}]}]) == [
        ("system: Be brief.\n\nuser: 2+2?\n\nassistant: 4\n\nuser: And 3+3?", None),
        ("system: Be brief.\n\nuser: 2+2?\n\nassistant: 4\n\nuser: And 3+3?", "6"),
    ]
    sharegpt = [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]
    assert prompts([{"conversations": sharegpt}]) == [("Say hi", "hi")]
    # text: a plain prompt the model continues
    assert prompts([{"text": "Once upon a time"}]) == [("Once upon a time", None)]
    # at most max_prompts, the first ones; a row that cannot be a prompt is skipped and said so
    path = write_jsonl(tmp_path / "many.jsonl", [{"instruction": f"q{i}"} for i in range(5)] + [{"instruction": 3}])
    assert [p.text for p in load_prompts(str(path), home, 2)] == ["q0", "q1"]
    assert "skipping held-out prompt many.jsonl line 6: `instruction` must be text" in capsys.readouterr().out


def stage_file(task: Path, stage: str, step: int, **extra: object) -> Path:
    path = task / "evals" / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = {"prompt": "p", "reference": None, "adapter": "a", "base": "b"}
    path.write_text(json.dumps({"stage": stage, "step": step, "max_new_tokens": 8, "samples": [sample], **extra}))
    return path


def test_an_attempt_drops_the_answers_of_steps_it_does_not_resume_from(tmp_path: Path) -> None:
    for stage, step in [("checkpoint-2", 2), ("checkpoint-4", 4), ("checkpoint-6", 6), ("final", 8)]:
        stage_file(tmp_path, stage, step)
    tidy(tmp_path, 4)  # resumed from checkpoint-4: what came after it is redone
    assert [s["stage"] for s in stages(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    tidy(tmp_path, None)  # a fresh start
    assert stages(tmp_path) == []


def test_stored_stages_are_read_oldest_first_and_never_through_a_link(tmp_path: Path) -> None:
    task = tmp_path / "task"
    stage_file(task, "final", 10)
    stage_file(task, "checkpoint-10", 10)
    stage_file(task, "checkpoint-2", 2)
    outside = stage_file(tmp_path / "elsewhere", "checkpoint-3", 3)
    (task / "evals" / "checkpoint-3.json").symlink_to(outside)
    (task / "evals" / "notes.json").write_text("{}")
    (task / "evals" / "checkpoint-5.json").write_text('{"step": NaN, "samples": []}')
    stage_file(task, "checkpoint-7", 7, seconds=float("inf"))
    found = stages(task)
    assert [s["stage"] for s in found] == ["checkpoint-2", "checkpoint-7", "checkpoint-10", "final"]
    assert found[1]["seconds"] is None  # Infinity cannot go out as JSON
    assert found[0]["samples"] == [{"prompt": "p", "reference": None, "adapter": "a", "base": "b"}]
    # A task's evals/ that is itself a link is not followed either.
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(task / "evals", other / "evals")
    assert stages(other) == []
    assert evaluation.STAGE_FILE.fullmatch("checkpoint-12.json") and not evaluation.STAGE_FILE.fullmatch("x.json")
