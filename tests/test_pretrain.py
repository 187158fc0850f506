"""Continued pre-training (`method: pretrain`, issue 22): raw text, no chat template, the loss on every token,
packing on unless set off; .txt files read a paragraph per row."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from support import api_client, in_memory
from trainer_fixtures import FAST, merged, shared_home, train

from ftstudio.config import TrainingConfig
from ftstudio.errors import ValidationError
from ftstudio.training.data import read_rows


def test_pretrain_reads_text_and_packs_unless_told_otherwise() -> None:
    cfg = TrainingConfig.from_dict({"method": "pretrain"})
    assert (cfg.method, cfg.data.format, cfg.data.packing) == ("pretrain", "text", True)
    kept = TrainingConfig.from_dict({"method": "pretrain", "data": {"packing": False, "format": "auto"}})
    assert (kept.data.format, kept.data.packing) == ("text", False)
    sft = TrainingConfig.from_dict({})
    assert (sft.method, sft.data.format, sft.data.packing) == ("sft", "auto", False)
    with pytest.raises(ValidationError) as refused:
        TrainingConfig.from_dict({"method": "pretrain", "data": {"format": "messages"}})
    assert "method pretrain trains on raw text" in str(refused.value) and "use method sft" in str(refused.value)
    with pytest.raises(ValidationError) as unknown:
        TrainingConfig.from_dict({"method": "dance"})
    assert "method" in str(unknown.value)


def test_a_text_file_is_a_row_per_paragraph_named_by_its_first_line(tmp_path: Path) -> None:
    text = tmp_path / "book.txt"
    text.write_text("First paragraph,\nstill the first.\n\n\nSecond one.\n  \nThird\n")
    rows = list(read_rows(text))
    assert rows == [
        ("line 1", {"text": "First paragraph,\nstill the first."}),
        ("line 5", {"text": "Second one."}),
        ("line 7", {"text": "Third"}),
    ]
    (tmp_path / "long.txt").write_text(("word " * 50 + "\n") * 10)  # lines under the limit, a paragraph over it
    with pytest.raises(ValidationError, match=r"long.txt the paragraph at line 1: longer than 1 KB"):
        list(read_rows(tmp_path / "long.txt", max_row_bytes=1024))
    (tmp_path / "notes.md").write_text("x\n")
    with pytest.raises(ValidationError, match=r"use .jsonl, .json, .csv, .parquet or .txt"):
        list(read_rows(tmp_path / "notes.md"))


def test_a_pretrain_task_over_http_takes_a_text_file_and_refuses_a_conversation_format(home: Path) -> None:
    data = home / "corpus.txt"
    home.mkdir(parents=True, exist_ok=True)
    data.write_text("One paragraph of text.\n\nAnother one.\n")
    with api_client(in_memory(home, in_server=True)) as client:
        r = client.post(
            "/api/tasks", json={"config": {"preset": "cpu-demo", "method": "pretrain", "data": {"path": str(data)}}}
        )
        assert r.status_code == 201, r.text
        stored = r.json()["config"]
        assert (stored["method"], stored["data"]["format"], stored["data"]["packing"]) == ("pretrain", "text", True)
        before = client.get("/api/tasks").json()["total"]
        bad = client.post(
            "/api/tasks",
            json={
                "config": {
                    "preset": "cpu-demo",
                    "method": "pretrain",
                    "data": {"path": "builtin:sample", "format": "alpaca"},
                }
            },
        )
        assert bad.status_code == 422 and "method pretrain trains on raw text" in bad.json()["detail"]
        assert client.get("/api/tasks").json()["total"] == before


def corpus(n: int, seed: int) -> str:
    """Short paragraphs of a tiny, regular language: what a tiny model can learn in a few dozen steps."""
    rng = random.Random(seed)
    things = ["the cat", "a dog", "the bird", "my friend", "the teacher"]
    acts = ["sees", "likes", "finds", "helps", "follows"]
    places = ["in the garden", "at the school", "by the river", "on the hill"]
    return "\n\n".join(
        f"{rng.choice(things)} {rng.choice(acts)} {rng.choice(things)} {rng.choice(places)}." for _ in range(n)
    )


@pytest.mark.slow
def test_continued_pretraining_lowers_the_held_out_perplexity_of_the_text(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text(corpus(400, 1))
    (tmp_path / "held-out.txt").write_text(corpus(60, 2))
    config = merged(
        FAST,
        {
            "method": "pretrain",
            "data": {"path": str(tmp_path / "train.txt"), "validation": str(tmp_path / "held-out.txt")},
            "optim": {"max_steps": 40, "learning_rate": 3e-3},
            "logging": {"eval_on_start": True, "eval_every_steps": 20},
        },
    )
    code, events = train(tmp_path / "task", config, shared_home())
    assert code == 0, events[-1]
    begin = next(e for e in events if e["kind"] == "train_begin")
    assert begin["packing"] and begin["train_rows"] < begin["train_examples"]  # short paragraphs share rows
    evals = [e for e in events if e["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    first, last = evals[0]["perplexity"], evals[-1]["perplexity"]
    assert last < first / 2, [round(e["perplexity"], 2) for e in evals]
    assert (tmp_path / "task" / "adapter" / "adapter_model.safetensors").exists()
