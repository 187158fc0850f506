"""The dataset inspector on crafted files with known answers (duplicates, truncation, leakage), through the
function, the CLI and the API; and its training view against the trainer's own collated batch, token for token,
for every data shape and several chat templates."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import api_client, in_memory

from ftstudio.training.builtin import ensure_tiny
from ftstudio.training.inspector import inspect_data

LLAMA3_STYLE = (
    "{{ '<|im_start|>' }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}"
)
PLAIN = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'A: ' + m['content'] + '<|endoftext|>' }}"
    "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny(tmp_path_factory.mktemp("home"))


@pytest.fixture
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def letters(rng: random.Random, n: int) -> str:
    """Text that no other row shares (random letters and spaces: few BPE merges, so about a token a letter)."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz    ") for _ in range(n)).strip() or "x"


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def duplicates_file(path: Path) -> Path:
    """40 distinct rows, then exactly 7 exact copies and 3 near copies (one letter changed) of earlier ones."""
    rng = random.Random(1)
    rows = [{"instruction": letters(rng, 70), "input": "", "output": letters(rng, 50)} for _ in range(40)]
    rows += [dict(rows[i]) for i in range(7)]
    for i in (10, 11, 12):
        near = dict(rows[i])
        near["instruction"] = "Z" + near["instruction"][1:]
        rows.append(near)
    return write(path, rows)


def truncation_file(path: Path) -> Path:
    """30 short rows; 8 whose reply runs past max_length 64; 4 whose prompt alone does (they lose every reply token)."""
    rng = random.Random(2)
    rows = [{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(30)]
    rows += [{"instruction": f"Tell {i}.", "output": letters(rng, 200)} for i in range(8)]
    rows += [{"instruction": letters(rng, 200), "output": "Yes."} for _ in range(4)]
    rng.shuffle(rows)
    return write(path, rows)


def leakage_files(root: Path) -> tuple[Path, Path]:
    """Training rows, and five held-out prompts of which exactly two are copies of training prompts."""
    rng = random.Random(3)
    rows = [{"instruction": letters(rng, 60), "output": letters(rng, 30)} for _ in range(30)]
    held = [{"instruction": rows[4]["instruction"]}, {"instruction": rows[17]["instruction"]}]
    held += [{"instruction": letters(rng, 60)} for _ in range(3)]
    return write(root / "train.jsonl", rows), write(root / "held.jsonl", held)


def known_answers(report: dict[str, Any], kind: str) -> None:
    if kind == "duplicates":
        assert (report["rows"], report["duplicates"]["exact"], report["duplicates"]["near"]) == (50, 7, 3), report
    elif kind == "truncation":
        t = report["truncation"]
        assert (t["rows"], t["whole_response_lost"]) == (12, 4), t
        assert t["response_tokens_lost"] > 0 and 0 < t["share_lost"] < 1
    else:
        assert report["leakage"]["held_out"]["leaked"] == 2 and report["leakage"]["held_out"]["rows"] == 5


def test_the_crafted_files_give_their_known_numbers(tmp_path: Path, tokenizer: Any) -> None:
    known_answers(inspect_data(duplicates_file(tmp_path / "d.jsonl"), tokenizer, max_length=512), "duplicates")
    report = inspect_data(truncation_file(tmp_path / "t.jsonl"), tokenizer, max_length=64)
    known_answers(report, "truncation")
    assert [w["kind"] for w in report["warnings"]] == ["truncation"]
    assert report["warnings"][0]["fix"]["data.max_length"] > 64
    train, held = leakage_files(tmp_path)
    report = inspect_data(train, tokenizer, max_length=512, held_out=held)
    known_answers(report, "leakage")
    assert {e["training_row"] for e in report["leakage"]["held_out"]["examples"]} == {
        "train.jsonl line 5",
        "train.jsonl line 18",
    }
    assert [w["kind"] for w in report["warnings"]] == ["leakage_held_out"]


@pytest.mark.process
def test_the_cli_reports_the_same_numbers_and_reads_as_words(tmp_path: Path, model_dir: Path) -> None:
    env = {**os.environ, "FTSTUDIO_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    model = ["--model", str(model_dir)]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ftstudio", "data", "inspect", *args, *model],
                              capture_output=True, text=True, env=env, timeout=120)  # fmt: skip

    r = cli(str(duplicates_file(tmp_path / "d.jsonl")), "--json")
    assert r.returncode == 0, r.stderr
    known_answers(json.loads(r.stdout), "duplicates")
    r = cli(str(truncation_file(tmp_path / "t.jsonl")), "--max-length", "64", "--json")
    known_answers(json.loads(r.stdout), "truncation")
    train, held = leakage_files(tmp_path)
    r = cli(str(train), "--eval-prompts", str(held), "--rows", "1")
    assert r.returncode == 0, r.stderr
    assert "leakage: 2 of 5 held-out prompts appear in the training rows" in r.stdout
    assert "[+" in r.stdout and "(trained tokens in [+ +])" in r.stdout
    r = cli(str(tmp_path / "missing.jsonl"))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "check the path" in r.stderr
    r = cli(str(train), "--max-length", "-3")
    assert r.returncode != 0 and "max_length" in r.stderr


def test_the_api_inspects_an_uploaded_dataset_and_keeps_the_report(home: Path, tmp_path: Path) -> None:
    service = in_memory(home, in_server=True)
    with api_client(service) as client:
        path = truncation_file(tmp_path / "trunc.jsonl")
        r = client.post("/api/datasets", files={"file": ("trunc.jsonl", path.read_bytes())})
        assert r.status_code == 201, r.text
        name = r.json()["name"]
        r = client.get(f"/api/datasets/{name}/inspect", params={"max_length": 64})
        assert r.status_code == 200, r.text
        known_answers(r.json(), "truncation")
        again = client.get(f"/api/datasets/{name}/inspect", params={"max_length": 64})
        assert again.json() == r.json()  # from the cache
        for params, status, words in [
            ({"max_length": 0}, 422, "max_length"),
            ({"method": "rlhf"}, 422, "method"),
            ({"eval_prompts": "/etc/passwd"}, 422, "/etc/passwd"),
        ]:
            bad = client.get(f"/api/datasets/{name}/inspect", params=params)
            assert bad.status_code == status and words in bad.text, bad.text
        missing = client.get("/api/datasets/nope.jsonl/inspect")
        assert missing.status_code == 404 and "no dataset 'nope.jsonl'" in missing.json()["detail"]


SHAPES: dict[str, list[dict[str, Any]]] = {
    "alpaca": [{"instruction": "Add 2 and 3", "input": "", "output": "5"}, {"instruction": "Hi", "output": "Hello!"}],
    "sharegpt": [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."},
                {"from": "human", "value": "Again?"},
                {"from": "gpt", "value": "Hello again."},
            ]
        },
    ],
    "messages": [
        {"messages": [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"}]},
    ],
    "text": [{"text": "The quick brown fox jumps over the lazy dog. " * 4}],
}


@pytest.mark.parametrize("template", ["chatml", "llama3-style", "plain"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_training_view_is_the_trainers_collated_batch_token_for_token(
    tmp_path: Path, tokenizer: Any, shape: str, template: str
) -> None:
    from ftstudio.training.batches import IGNORE, Collator, Row, prepare_tokenizer, tokenize
    from ftstudio.training.data import load_examples

    if template != "chatml":
        tokenizer.chat_template = LLAMA3_STYLE if template == "llama3-style" else PLAIN
    path = write(tmp_path / "rows.jsonl", SHAPES[shape])
    for max_length in (24, 512):  # cut, and whole
        report = inspect_data(path, tokenizer, max_length=max_length)
        prepare_tokenizer(tokenizer)
        _, examples = load_examples(path)
        assert len(report["view"]) == len(examples)
        for example, view in zip(examples, report["view"], strict=True):
            try:
                t = tokenize(example, tokenizer, max_length)
            except ValueError:  # the trainer skips a row whose prompt fills max_length: nothing of it is trained
                assert not any(view["trained"]) and view["dropped_tokens"] > 0
                continue
            batch = Collator(tokenizer.pad_token_id)([Row(t.input_ids, t.labels)])
            assert view["ids"] == batch["input_ids"][0].tolist()
            assert view["trained"] == (batch["labels"][0] != IGNORE).tolist()
            assert any(view["trained"])


def test_a_preference_pair_is_viewed_as_dpo_trains_it(tmp_path: Path, tokenizer: Any) -> None:
    from ftstudio.training.batches import prepare_tokenizer
    from ftstudio.training.data import load_examples
    from ftstudio.training.preference import pair_row

    rows = [{"prompt": "Pick a fruit", "chosen": "An apple, crisp and sweet.", "rejected": "Rocks."}]
    path = write(tmp_path / "pairs.jsonl", rows)
    report = inspect_data(path, tokenizer, method="dpo", max_length=512)
    assert report["format"] == "preference"
    prepare_tokenizer(tokenizer)
    (example,) = load_examples(path)[1]
    row = pair_row(example, tokenizer, 512)
    (view,) = report["view"]
    assert view["ids"] == row["prompt_ids"] + row["chosen_ids"]  # the longer reply of the two
    assert view["trained"] == [False] * len(row["prompt_ids"]) + [True] * len(row["chosen_ids"])
    assert report["cost"]["tokens_per_epoch"] == 2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(
        row["rejected_ids"]
    )


def test_the_fixes_write_new_datasets_and_leave_the_original_alone(home: Path, tmp_path: Path) -> None:
    service = in_memory(home, in_server=True)
    with api_client(service) as client:

        def upload(path: Path) -> str:
            r = client.post("/api/datasets", files={"file": (path.name, path.read_bytes())})
            assert r.status_code == 201, r.text
            return str(r.json()["name"])

        dups = upload(duplicates_file(tmp_path / "dups.jsonl"))
        before = (home / "datasets" / dups).read_bytes()
        r = client.post(f"/api/datasets/{dups}/derive", json={"drop": "duplicates"})
        assert r.status_code == 201, r.text
        assert (r.json()["name"], r.json()["kept"], r.json()["dropped"]) == ("dups-dedup.jsonl", 43, 7)
        assert (home / "datasets" / dups).read_bytes() == before
        again = client.get("/api/datasets/dups-dedup.jsonl/inspect").json()["duplicates"]
        assert (again["exact"], again["near"]) == (0, 3)  # near duplicates are shown, and left for a person to judge

        train, held = leakage_files(tmp_path)
        train_name = upload(train)
        held_name = str(home / "held.jsonl")  # held-out prompts have no answers: a file under the data home
        Path(held_name).write_bytes(held.read_bytes())
        r = client.post(f"/api/datasets/{train_name}/derive", json={"drop": "leaked", "eval_prompts": held_name})
        assert r.status_code == 201 and (r.json()["kept"], r.json()["dropped"]) == (28, 2), r.text
        fixed = r.json()["name"]
        leak = client.get(f"/api/datasets/{fixed}/inspect", params={"eval_prompts": held_name}).json()["leakage"]
        assert leak["held_out"]["leaked"] == 0

        for body, status, words in [
            ({"drop": "everything"}, 422, "drop must be duplicates or leaked"),
            ({"drop": "leaked"}, 422, "name the held-out prompts"),
            ({"drop": "duplicates", "path": "/etc/passwd"}, 422, "unknown field 'path'"),
            ({"drop": "leaked", "eval_prompts": "/etc/shadow"}, 422, "/etc/shadow"),
        ]:
            bad = client.post(f"/api/datasets/{train_name}/derive", json=body)
            assert bad.status_code == status and words in bad.text, bad.text
        assert client.post("/api/datasets/nope.jsonl/derive", json={"drop": "duplicates"}).status_code == 404


def test_a_submit_records_the_datas_warnings_and_strict_refuses_it(home: Path, tmp_path: Path) -> None:
    service = in_memory(home, in_server=True)
    with api_client(service) as client:
        path = truncation_file(tmp_path / "cut.jsonl")
        name = client.post("/api/datasets", files={"file": (path.name, path.read_bytes())}).json()["name"]
        config = {"preset": "cpu-demo", "data": {"path": name, "max_length": 64}}
        r = client.post("/api/tasks", json={"config": config, "strict": True})
        assert r.status_code == 422 and "--strict refuses it" in r.text and "max_length 64" in r.text, r.text
        assert client.get("/api/tasks").json()["total"] == 0
        r = client.post("/api/tasks", json={"config": config})
        assert r.status_code == 201, r.text
        (warning,) = r.json()["warnings"]
        assert (
            warning["kind"] == "truncation"
            and "are never trained on (12 rows cut, 4 of them entirely)" in warning["message"]
        )
        assert client.get(f"/api/tasks/{r.json()['id']}").json()["warnings"] == [warning]
        # Clean data: no warning, and strict lets it through.
        r = client.post("/api/tasks", json={"config": {"preset": "cpu-demo"}, "strict": True})
        assert r.status_code == 201 and r.json()["warnings"] == [], r.text


def test_kto_and_grpo_rows_are_viewed_as_their_trainers_build_them(tmp_path: Path, tokenizer: Any) -> None:
    from ftstudio.training.batches import prepare_tokenizer, render
    from ftstudio.training.data import load_examples
    from ftstudio.training.grpo import prompt_row
    from ftstudio.training.preference import unpaired_rows

    prepare_tokenizer(tokenizer)
    unpaired = write(
        tmp_path / "kto.jsonl", [{"prompt": "Say yes", "completion": "Yes, gladly and at once.", "label": True}]
    )
    report = inspect_data(unpaired, tokenizer, method="kto", max_length=512)
    (example,) = load_examples(unpaired)[1]
    (row,) = unpaired_rows(example, tokenizer, 512)
    (view,) = report["view"]
    assert view["ids"] == row["prompt_ids"] + row["completion_ids"]
    assert view["trained"] == [False] * len(row["prompt_ids"]) + [True] * len(row["completion_ids"])

    prompts = write(tmp_path / "math.jsonl", [{"prompt": "What is 2 plus 2?", "answer": "4"}])
    report = inspect_data(prompts, tokenizer, method="grpo", max_length=512)
    (example,) = load_examples(prompts)[1]
    messages = prompt_row(example, tokenizer, 512)["prompt"]
    ids = tokenizer(render(tokenizer, messages, generation_prompt=True), add_special_tokens=False)["input_ids"]
    (view,) = report["view"]
    assert view["ids"] == ids and not any(view["trained"])  # grpo trains on completions it samples itself
    assert report["lengths"]["response"]["max"] == 0 and report["truncation"]["rows"] == 0
