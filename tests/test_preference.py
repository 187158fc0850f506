"""Preference tuning (issue 22): dpo (DPO, IPO, SimPO), orpo and kto on TRL, with ftstudio's data shapes,
rows, checks and events. The crash scenarios of a dpo run are in test_chaos.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support import api_client, in_memory
from trainer_fixtures import FAST, assert_adapter_loads, merged, shared_home, train, write_jsonl

from ftstudio.config import TrainingConfig
from ftstudio.errors import ValidationError
from ftstudio.training.data import inspect_dataset, load_examples, to_example
from ftstudio.training.preference_samples import PREFERENCES_PATH, generate

PAIRS = [
    {"prompt": f"What is {a} plus 1?", "chosen": f"{a} plus 1 is {a + 1}.", "rejected": "No idea."} for a in range(8)
]


def test_the_methods_pick_their_data_and_refuse_what_they_cannot_train_on() -> None:
    dpo = TrainingConfig.from_dict({"method": "dpo"})
    assert (dpo.data.path, dpo.data.format, dpo.preference.beta) == ("builtin:preferences", "preference", 0.1)
    kto = TrainingConfig.from_dict({"method": "kto"})
    assert (kto.data.path, kto.data.format) == ("builtin:preferences", "auto")  # pairs or labelled completions
    simpo = TrainingConfig.from_dict({"method": "dpo", "preference": {"loss": "simpo"}})
    assert simpo.preference.beta == 2.0  # SimPO's own scale, unless set
    assert TrainingConfig.from_dict({"method": "dpo", "preference": {"loss": "simpo", "beta": 5}}).preference.beta == 5
    assert TrainingConfig.from_dict({"method": "sft"}).data.path == "builtin:sample"
    with pytest.raises(ValidationError) as wrong:
        TrainingConfig.from_dict({"method": "dpo", "data": {"format": "alpaca", "packing": True}})
    text = str(wrong.value)
    assert "method dpo trains on preference pairs (prompt/chosen/rejected), but this data holds instructions" in text
    assert "use method sft or grpo for it" in text and "data.packing: method dpo compares whole replies" in text
    with pytest.raises(ValidationError, match=r"method sft trains on .* use method dpo, orpo or kto for it"):
        TrainingConfig.from_dict({"data": {"format": "preference"}})
    with pytest.raises(ValidationError, match="method kto needs at least 2 per batch"):
        TrainingConfig.from_dict({"method": "kto", "optim": {"batch_size": 1}})
    with pytest.raises(ValidationError, match=r"preference.loss \(--loss\): must be one of sigmoid, ipo, simpo"):
        TrainingConfig.from_dict({"method": "dpo", "preference": {"loss": "hinge"}})
    with pytest.raises(ValidationError, match=r"preference.beta \(--beta\)"):
        TrainingConfig.from_dict({"method": "dpo", "preference": {"beta": 0}})


@pytest.mark.parametrize(
    ("row", "prompt", "chosen", "rejected"),
    [
        ({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}, [("user", "Hi?")], "Hello.", "Go away."),
        (  # UltraFeedback: a prompt, and both replies as whole conversations
            {
                "prompt": "Hi?",
                "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
                "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}],
                "messages": [{"role": "user", "content": "Hi?"}],
                "score_chosen": 9.0,
            },
            [("user", "Hi?")],
            "Hello.",
            "Go away.",
        ),
        (  # TRL's conversational shape: the prompt as messages, each reply one assistant turn
            {
                "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
                "chosen": [{"role": "assistant", "content": "Hello."}],
                "rejected": [{"role": "assistant", "content": "Go away."}],
            },
            [("system", "Be kind."), ("user", "Hi?")],
            "Hello.",
            "Go away.",
        ),
        (  # Anthropic HH: two transcripts and no prompt; the prompt is every turn they share
            {
                "chosen": "\n\nHuman: Hi?\n\nAssistant: Hi.\n\nHuman: Help me?\n\nAssistant: Gladly.",
                "rejected": "\n\nHuman: Hi?\n\nAssistant: Hi.\n\nHuman: Help me?\n\nAssistant: No.",
            },
            [("user", "Hi?"), ("assistant", "Hi."), ("user", "Help me?")],
            "Gladly.",
            "No.",
        ),
        (  # ShareGPT turns inside the lists
            {
                "chosen": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}],
                "rejected": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Go away."}],
            },
            [("user", "Hi?")],
            "Hello.",
            "Go away.",
        ),
    ],
    ids=["text", "ultrafeedback", "trl-conversational", "anthropic-hh", "sharegpt-turns"],
)
def test_preference_pairs_in_the_shapes_people_publish_them(
    row: dict[str, Any], prompt: list[tuple[str, str]], chosen: str, rejected: str, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])
    info, [example] = load_examples(path)
    assert info.format == "preference"
    assert [(m["role"], m["content"]) for m in example.messages] == prompt
    assert (example.chosen, example.rejected) == (chosen, rejected)
    # As held-out prompts, the chosen reply is the expected answer.
    _, [held_out] = load_examples(path, prompts=True)
    assert held_out.messages[-1] == {"role": "assistant", "content": chosen}


def test_unpaired_completions_for_kto(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Hi?", "completion": "Hello.", "label": True},
        {"prompt": "Hi?", "completion": [{"role": "assistant", "content": "Go away."}], "label": False},
    ]
    info, examples = load_examples(write_jsonl(tmp_path / "kto.jsonl", rows))
    assert info.format == "unpaired"
    assert [(e.completion, e.label) for e in examples] == [("Hello.", True), ("Go away.", False)]
    csv = tmp_path / "kto.csv"
    csv.write_text("prompt,completion,label\nHi?,Hello.,true\nHi?,Go away.,FALSE\nHi?,Maybe.,sometimes\n")
    info, examples = load_examples(csv)
    assert [e.label for e in examples] == [True, False] and info.skipped_rows == 1
    assert "kto.csv line 4: `label` must be true (a good completion) or false (a bad one)" in info.problems[0].message


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Hi?", "chosen": "Hello."}, "`rejected` is missing; a preference pair needs prompt, chosen and"),
        ({"prompt": "Hi?", "chosen": "Same.", "rejected": " Same. "}, "are the same reply: nothing to prefer"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "`prompt` is empty"),
        ({"chosen": "Hello.", "rejected": "Go away."}, "`chosen` is text but there is no `prompt`"),
        (
            {
                "chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "x"}],
                "rejected": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "y"}],
            },
            "must share every turn but a last assistant reply",
        ),
        (
            {"prompt": "Hi?", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
            "must end with an assistant",
        ),
        ({"prompt": "Hi?", "chosen": [{"role": "cat", "content": "x"}], "rejected": "b"}, "has a role that is not one"),
    ],
    ids=["no-rejected", "same", "empty-prompt", "no-prompt", "different-prompts", "no-reply", "bad-role"],
)
def test_a_bad_pair_names_its_row_and_what_is_wrong(row: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_example(row, "preference", "pairs.jsonl line 3")


def test_a_file_of_unusable_pairs_is_refused_naming_the_row_and_the_field(tmp_path: Path) -> None:
    missing = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "Hi?", "chosen": "Hello."}] * 3)
    with pytest.raises(ValidationError) as e:
        inspect_dataset(missing, data_format="preference")
    assert "m.jsonl: none of its 3 rows is a usable preference example (first: m.jsonl line 1: `rejected` is" in str(
        e.value
    )
    same = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Hi?", "chosen": "Hi.", "rejected": "Hi."}] * 3)
    with pytest.raises(ValidationError, match=r"s\.jsonl line 1: `chosen` and `rejected` are the same reply"):
        inspect_dataset(same)


def test_the_builtin_preferences_match_their_recipe_and_every_pair_differs() -> None:
    rows = [json.loads(line) for line in PREFERENCES_PATH.read_text().splitlines()]
    assert rows == generate()
    assert all(r["chosen"] != r["rejected"] for r in rows) and len(rows) == 300
    info = inspect_dataset(PREFERENCES_PATH)
    assert (info.format, info.usable_rows, info.skipped_rows) == ("preference", 300, 0)


def test_the_reference_is_precomputed_when_asked_or_when_a_run_covers_an_epoch() -> None:
    from ftstudio.training.preference import precompute_reference

    def decided(epochs: float, **preference: Any) -> bool:
        method = preference.pop("method", "dpo")
        return precompute_reference(TrainingConfig.from_dict({"method": method, "preference": preference}), epochs)

    assert decided(1.0) and decided(3.0) and not decided(0.4)  # auto: from one epoch on
    assert decided(0.1, precompute_reference="on") and not decided(5.0, precompute_reference="off")
    assert decided(2.0, method="kto") and not decided(2.0, method="orpo")  # orpo has no reference
    assert not decided(2.0, loss="simpo", precompute_reference="on")  # nor has SimPO


def test_pair_rows_are_the_prompt_then_each_reply_through_its_end_of_turn() -> None:
    from transformers import AutoTokenizer

    from ftstudio.training import batches
    from ftstudio.training.builtin import tiny_model_dir
    from ftstudio.training.data import Example
    from ftstudio.training.preference import length, pair_row, unpaired_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(shared_home()))
    batches.prepare_tokenizer(tokenizer)
    example = Example("x line 1", [{"role": "user", "content": "Hi?"}], chosen="Hello there.", rejected="Go.")
    row = pair_row(example, tokenizer, 128)
    assert tokenizer.decode(row["prompt_ids"]) == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(row["chosen_ids"]) == "Hello there.<|im_end|>"
    assert tokenizer.decode(row["rejected_ids"]) == "Go.<|im_end|>"
    assert length(row) == len(row["prompt_ids"]) + len(row["chosen_ids"])
    short = pair_row(example, tokenizer, len(row["prompt_ids"]) + 2)  # each reply cut to what is left
    assert len(short["chosen_ids"]) == len(short["rejected_ids"]) == 2
    with pytest.raises(ValueError, match=r"the prompt alone fills data.max_length \(8 tokens\)"):
        pair_row(example, tokenizer, 8)
    alike = Example("x line 2", example.messages, chosen="Hello there.", rejected="Hello you.")
    with pytest.raises(ValueError, match=r"are the same in the 1 tokens data\.max_length leaves them"):
        pair_row(alike, tokenizer, len(row["prompt_ids"]) + 1)
    # kto: a pair is a good and a bad completion of the same prompt.
    good, bad = unpaired_rows(example, tokenizer, 128)
    assert (good["label"], bad["label"]) == (True, False)
    assert good["completion_ids"] == row["chosen_ids"] and bad["completion_ids"] == row["rejected_ids"]


def test_bad_preference_tasks_over_http_are_422_and_create_nothing(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    missing = write_jsonl(home / "missing.jsonl", [{"prompt": "Hi?", "chosen": "Hello."}] * 4)
    same = write_jsonl(home / "same.jsonl", [{"prompt": "Hi?", "chosen": "Hi.", "rejected": "Hi."}] * 4)
    with api_client(in_memory(home, in_server=True)) as client:
        before = client.get("/api/tasks").json()["total"]

        def refused(config: dict[str, Any], *needles: str) -> None:
            r = client.post("/api/tasks", json={"config": {"preset": "cpu-demo", **config}})
            assert r.status_code == 422, r.text
            assert all(n in r.json()["detail"] for n in needles), r.json()["detail"]

        refused({"method": "dpo", "data": {"path": str(missing)}}, "missing.jsonl line 1: `rejected` is missing")
        refused({"method": "orpo", "data": {"path": str(same)}}, "`chosen` and `rejected` are the same reply")
        refused({"data": {"path": "builtin:preferences"}}, "method sft trains on", "use method dpo, orpo or kto")
        refused({"method": "dpo", "data": {"path": "builtin:sample"}}, "`chosen` is missing")
        refused({"method": "dpo", "preference": {"loss": "kto"}}, "preference.loss (--loss): must be one of")
        assert client.get("/api/tasks").json()["total"] == before
        ok = client.post("/api/tasks", json={"config": {"preset": "cpu-demo", "method": "dpo"}})
        assert ok.status_code == 201, ok.text
        assert ok.json()["config"]["data"]["path"] == "builtin:preferences"


PREFERENCE_FAST = merged(FAST, {"data": {"path": str(PREFERENCES_PATH), "max_length": 64}})


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "preference", "metrics"),
    [
        ("dpo", {"loss": "sigmoid"}, ("rewards/accuracies", "rewards/margins")),
        ("dpo", {"loss": "ipo"}, ("rewards/accuracies", "rewards/margins")),
        ("dpo", {"loss": "simpo"}, ("rewards/accuracies", "rewards/margins")),
        ("orpo", {}, ("rewards/accuracies", "nll_loss", "log_odds_ratio")),
        ("kto", {}, ("kl", "rewards/chosen", "rewards/rejected")),
    ],
    ids=["dpo", "ipo", "simpo", "orpo", "kto"],
)
def test_each_preference_method_trains_to_an_adapter_with_its_own_metrics(
    method: str, preference: dict[str, Any], metrics: tuple[str, ...], tmp_path: Path
) -> None:
    config = merged(PREFERENCE_FAST, {"method": method, "preference": preference, "data": {"validation": "0.1"}})
    # Held-out prompts from the pairs themselves: the chosen reply is the expected answer.
    config["evaluation"] = {"prompts": str(PREFERENCES_PATH), "max_prompts": 2, "max_new_tokens": 4}
    code, events = train(tmp_path / "task", config, shared_home())
    assert code == 0, events[-1]
    samples = [e for e in events if e["kind"] == "samples"]
    assert samples and samples[-1]["count"] == 2
    begin = next(e for e in events if e["kind"] == "train_begin")
    assert begin["method"] == method and begin["adapted_layers"] > 0
    progress = [e for e in events if e["kind"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4]
    # The first figure at every step; the others where the batch has what they measure (a kto batch may hold no
    # bad completion).
    assert all(metrics[0] in e["metrics"] for e in progress), progress[-1]
    assert set(metrics) <= {k for e in progress for k in e["metrics"]}, progress
    evals = [e for e in events if e["kind"] == "eval"]
    assert evals and metrics[0] in evals[-1]["metrics"]
    end = next(e for e in events if e["kind"] == "train_end")
    assert end["steps"] == 4 and end["final_loss"] is not None
    adapter = tmp_path / "task" / "adapter"
    assert not (tmp_path / "task" / "checkpoints" / "README.md").exists()
    assert_adapter_loads(adapter, shared_home())


@pytest.mark.slow
def test_dpo_raises_reward_accuracy_on_the_builtin_preferences_above_its_untrained_value(tmp_path: Path) -> None:
    config = merged(
        PREFERENCE_FAST,
        {
            "method": "dpo",
            "data": {"validation": "0.1"},
            "optim": {"max_steps": 40, "learning_rate": 5e-4},
            "logging": {"eval_on_start": True, "eval_every_steps": 20},
        },
    )
    code, events = train(tmp_path / "task", config, shared_home())
    assert code == 0, events[-1]
    evals = [e for e in events if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 20, 40]
    accuracy = [e["metrics"]["rewards/accuracies"] for e in evals]
    margins = [e["metrics"]["rewards/margins"] for e in evals]
    # Untrained, the model is its own reference: every reward is 0 and no pair is won.
    assert accuracy[0] == 0.0 and margins[0] == 0.0
    assert accuracy[-1] >= 0.75 and margins[-1] > 0.1, (accuracy, margins)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


@pytest.mark.slow
def test_a_precomputed_reference_trains_the_same_and_resumes_the_same(tmp_path: Path) -> None:
    """The reference scored once before training gives the losses scoring it at every step gives, and a run
    resumed from a checkpoint scores it again the same (the adapter switched off is the same base)."""
    import shutil

    config = merged(
        PREFERENCE_FAST,
        {"method": "dpo", "optim": {"max_steps": 10, "learning_rate": 5e-4}, "checkpoint": {"every_steps": 5}},
    )
    _, plain = train(tmp_path / "plain", config, shared_home())
    pre = merged(config, {"preference": {"precompute_reference": "on"}})
    code, scored = train(tmp_path / "scored", pre, shared_home())
    assert code == 0, scored[-1]

    def losses(events: list[dict[str, Any]]) -> list[float]:
        return [round(e["loss"], 4) for e in events if e["kind"] == "progress"]

    assert losses(scored) == losses(plain)
    # Interrupted after checkpoint-5: the next attempt scores the data again and ends where the others did.
    task = tmp_path / "scored"
    shutil.rmtree(task / "adapter")
    shutil.rmtree(task / "checkpoints" / "checkpoint-10")
    code, again = train(task, merged(pre, {"checkpoint": {"resume_from": "auto"}}), shared_home())
    assert code == 0, again[-1]
    resumed = [e for e in again if e["kind"] == "train_begin"][-1]
    assert resumed["resumed_from_step"] == 5
    assert losses(again)[-5:] == losses(plain)[-5:]


@pytest.mark.process
@pytest.mark.slow
def test_every_method_submitted_through_the_api_trains_to_an_adapter_with_its_figures(
    home: Path, studio_factory: Any
) -> None:
    """Through a real studio, as a person submits them: each method and loss the studio offers (dpo and grpo
    are also run through faults in test_chaos.py), each to a completed task whose adapter loads."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "corpus.txt").write_text("\n\n".join(f"The river {i} runs by the old stone bridge." for i in range(40)))
    base = {"preset": "cpu-demo", "optim": {"max_steps": 4, "batch_size": 4}, "data": {"max_length": 64}}
    asked: dict[str, tuple[dict[str, Any], str | None]] = {
        "ipo": ({"method": "dpo", "preference": {"loss": "ipo"}}, "rewards/margins"),
        "simpo": ({"method": "dpo", "preference": {"loss": "simpo"}}, "rewards/margins"),
        "orpo": ({"method": "orpo"}, "log_odds_ratio"),
        "kto": ({"method": "kto"}, "kl"),
        "pretrain": ({"method": "pretrain", "data": {"path": str(home / "corpus.txt")}}, None),
    }
    studio = studio_factory().start("--slots", "2")
    tids = {}
    for name, (over, _) in asked.items():
        r = studio.http.post("/api/tasks", json={"name": name, "config": merged(base, over)})
        assert r.status_code == 201, r.text
        tids[name] = r.json()["id"]
    for name, tid in tids.items():
        done = studio.wait_status(tid, "completed", "failed", "cancelled", timeout=300)
        assert done["status"] == "completed" and done["step"] == 4, (name, done["error"])
        assert_adapter_loads(home / "tasks" / tid / "adapter", home)
        figure = asked[name][1]
        if figure:
            events = studio.http.get(f"/api/tasks/{tid}/metrics").json()["events"]
            assert all(figure in e["metrics"] for e in events if e["kind"] == "progress"), name
