"""Data shapes, file formats, bad rows, label masking, packing and row order (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_fixtures import ALPACA, MESSAGES, SHAREGPT, TEXT, shared_home, write_jsonl

from ftstudio.errors import ValidationError
from ftstudio.training import batches
from ftstudio.training.builtin import SAMPLE_PATH, tiny_model_dir
from ftstudio.training.data import Example, inspect_dataset, load_examples


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir(shared_home()))
    batches.prepare_tokenizer(tok)
    return tok


@pytest.mark.parametrize(
    ("rows", "shape"), [(ALPACA, "alpaca"), (SHAREGPT, "sharegpt"), (MESSAGES, "messages"), (TEXT, "text")]
)
def test_each_shape_is_detected(tmp_path: Path, rows, shape) -> None:
    info = inspect_dataset(write_jsonl(tmp_path / "d.jsonl", rows), preview_rows=2)
    assert (info.format, info.rows, info.usable_rows, len(info.preview)) == (shape, 16, 16, 2)
    assert info.preview[0] == rows[0]


def test_file_formats(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.json").write_text(json.dumps({"data": ALPACA}))
    with open(tmp_path / "d.csv", "w") as f:
        f.write("instruction,input,output\n" + "".join(f'"{r["instruction"]}",,"{r["output"]}"\n' for r in ALPACA))
    pq.write_table(pa.Table.from_pylist(MESSAGES), tmp_path / "d.parquet")
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "hfdir"))
    for name in ("d.json", "d.csv", "d.parquet", "hfdir"):
        info = inspect_dataset(tmp_path / name)
        assert info.usable_rows == 16, name


def test_a_saved_dataset_dict_trains_on_train_and_validates_on_a_split_by_name(tmp_path: Path) -> None:
    import datasets

    from ftstudio.config import TrainingConfig
    from ftstudio.training.data import split_validation
    from ftstudio.training.preflight import check

    path = tmp_path / "hfdict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ALPACA[:12]), "validation": datasets.Dataset.from_list(ALPACA[12:])}
    ).save_to_disk(str(path))
    info, examples = load_examples(path)
    assert (info.usable_rows, examples[0].where) == (12, "hfdict row 1")
    config = TrainingConfig.from_dict({"data": {"path": str(path), "validation": "validation"}})
    check(config, tmp_path)  # the split name is not mistaken for a missing file
    train, val, meta = split_validation(config, examples, tmp_path)
    assert (len(train), len(val)) == (12, 4)
    assert val[0].messages[-1]["content"] == ALPACA[12]["output"]
    assert meta["validation"] == f"the validation split of {path}"
    with pytest.raises(ValidationError) as e:
        load_examples(path, split="test")
    assert "hfdict has no split 'test'; its splits are train, validation" in str(e.value)
    # A name that is neither a split nor a file is one clear problem, under data.validation.
    bad = TrainingConfig.from_dict({"data": {"path": str(path), "validation": "test"}})
    with pytest.raises(ValidationError) as e:
        check(bad, tmp_path)
    assert [p.field for p in e.value.problems] == ["data.validation"]


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", ALPACA[:6])
    path.write_text(path.read_text() + '{"instruction": "x" "output": "y"}\n')
    with pytest.raises(ValidationError) as e:
        inspect_dataset(path)
    assert "data.jsonl line 7: not valid JSON (Expecting ','" in str(e.value)
    assert e.value.problems[0].field.startswith("data.path")


def test_empty_and_useless_datasets_are_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValidationError, match=r"empty\.jsonl has no rows"):
        inspect_dataset(tmp_path / "empty.jsonl")
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": ""}] * 3)
    with pytest.raises(ValidationError, match=r"none of its 3 rows .*line 1: `output` is empty"):
        inspect_dataset(path)
    with pytest.raises(ValidationError, match="cannot tell the data shape from columns \\(foo\\)"):
        inspect_dataset(write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}]))


def test_bad_rows_are_skipped_and_reported(tmp_path: Path) -> None:
    rows = [*ALPACA[:3], {"instruction": "no answer"}, *ALPACA[3:5]]
    info = inspect_dataset(write_jsonl(tmp_path / "d.jsonl", rows))
    assert (info.rows, info.usable_rows, info.skipped_rows) == (6, 5, 1)
    assert "d.jsonl line 4: `output` is empty" in info.problems[0].message


def test_sample_dataset_is_alpaca() -> None:
    info = inspect_dataset(SAMPLE_PATH)
    assert info.format == "alpaca" and info.usable_rows >= 300


def _trained_text(tok, item) -> str:
    return tok.decode([i for i, lab in zip(item.input_ids, item.labels, strict=True) if lab != batches.IGNORE])


def test_chat_template_and_label_masking(tokenizer) -> None:
    ex = Example("x", [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."}])
    item = batches.tokenize(ex, tokenizer, 64)
    text = tokenizer.decode(item.input_ids)
    assert text == "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
    # Every response token and the end-of-turn token train; nothing of the prompt does.
    assert _trained_text(tokenizer, item) == "4.<|im_end|>"
    prompt_len = len(tokenizer.apply_chat_template(ex.messages[:1], add_generation_prompt=True, tokenize=True))
    assert all(lab == batches.IGNORE for lab in item.labels[:prompt_len])


def test_multi_turn_trains_every_assistant_turn(tokenizer, tmp_path: Path) -> None:
    _, examples = load_examples(write_jsonl(tmp_path / "s.jsonl", SHAREGPT[:1]))
    item = batches.tokenize(examples[0], tokenizer, 256)
    out = ALPACA[0]["output"]
    assert _trained_text(tokenizer, item) == f"{out}<|im_end|>{out}<|im_end|>"


def test_padding_is_masked(tokenizer) -> None:
    items = [batches.tokenize(Example("x", text=t), tokenizer, 64) for t in ("a b c d e f", "a")]
    batch = batches.Collator(tokenizer.pad_token_id)([batches.Row(i.input_ids, i.labels) for i in items])
    short = len(items[1].input_ids)
    assert batch["labels"][1, short:].eq(batches.IGNORE).all()
    assert batch["attention_mask"][1, short:].eq(0).all()
    assert int(batch["num_real_tokens"]) == sum(len(i.input_ids) for i in items)


def test_fallback_template_for_tokenizer_without_one(tokenizer) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir(shared_home()))
    tok.chat_template = None
    batches.prepare_tokenizer(tok)
    ex = Example("x", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    item = batches.tokenize(ex, tok, 64)
    assert tok.decode(item.input_ids).startswith("### User:\nhi\n\n### Assistant:\nhello")
    assert _trained_text(tok, item) == "hello<|im_end|>"


def test_prompt_longer_than_max_length_is_refused(tokenizer) -> None:
    ex = Example("x", [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}])
    with pytest.raises(ValueError, match="raise it"):
        batches.tokenize(ex, tokenizer, 16)


def test_packing_restarts_positions_and_never_trains_across_examples(tokenizer) -> None:
    items = [batches.tokenize(Example("x", text=f"row {i} " * (i + 1)), tokenizer, 64) for i in range(6)]
    rows = batches.pack(items, 40)
    assert sum(len(r) for r in rows) == sum(len(i.input_ids) for i in items)
    assert all(len(r) <= 40 for r in rows)
    for r in rows:
        starts = [k for k, p in enumerate(r.position_ids) if p == 0]
        assert all(r.labels[k] == batches.IGNORE for k in starts)
    batch = batches.Collator(tokenizer.pad_token_id)(rows)
    assert "attention_mask" not in batch and "position_ids" in batch


def test_row_order_depends_on_seed_and_epoch_only() -> None:
    lengths = [((i * 37) % 100) + 1 for i in range(200)]
    a = batches.EpochSampler(lengths, 4, seed=1, group_by_length=True)
    b = batches.EpochSampler(lengths, 4, seed=1, group_by_length=True)
    a.set_epoch(1)
    b.set_epoch(1)
    order = list(a)
    assert order == list(b) and sorted(order) == list(range(200))
    b.set_epoch(2)
    assert list(b) != order
    # grouped: the rows of a batch have similar lengths
    spread = [
        max(lengths[i] for i in order[k : k + 4]) - min(lengths[i] for i in order[k : k + 4]) for k in range(0, 200, 4)
    ]
    assert sum(spread) / len(spread) < 10


@pytest.fixture(scope="module")
def model():
    """builtin:tiny loaded as for training (KV cache off), in eval mode."""
    from ftstudio.config import ModelConfig
    from ftstudio.training.models import load_model

    m = load_model(tiny_model_dir(shared_home()), ModelConfig())
    m.eval()
    return m


def two_examples(tokenizer) -> tuple[batches.Tokenized, batches.Tokenized]:
    a = batches.tokenize(Example("a", text="What is 2 plus 2? It is 4."), tokenizer, 64)
    b = batches.tokenize(Example("b", text="The capital of France is Paris."), tokenizer, 64)
    return a, b


def test_packed_examples_do_not_attend_to_each_other(tokenizer, model) -> None:
    """The logits of an example are the same alone and packed after another one (model loaded as for training)."""
    import torch

    a, b = two_examples(tokenizer)
    rows = batches.pack([a, b], 64)
    assert len(rows) == 1 and rows[0].input_ids == a.input_ids + b.input_ids
    batch = batches.Collator(tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone = model(input_ids=torch.tensor([b.input_ids])).logits[0]
    assert torch.allclose(packed[len(a.input_ids) :], alone, atol=1e-4)


def test_a_fixed_shape_for_compile_adds_only_padding(tokenizer, model) -> None:
    """torch.compile pads packed batches to one shape; the real rows train exactly as without it."""
    import torch

    a, b = two_examples(tokenizer)
    rows = batches.pack([a, b], 64)
    plain = batches.Collator(tokenizer.pad_token_id)(rows)
    fixed = batches.Collator(tokenizer.pad_token_id, shape=(3, 64))(rows)
    n = plain["input_ids"].shape[1]
    assert fixed["input_ids"].shape == (3, 64) and n < 64
    assert int(fixed["num_real_tokens"]) == int(plain["num_real_tokens"]) == len(a.input_ids) + len(b.input_ids)
    assert (fixed["labels"][:, n:] == batches.IGNORE).all() and (fixed["labels"][1:] == batches.IGNORE).all()
    assert fixed["position_ids"][2].tolist() == list(range(64))
    with torch.no_grad():
        want = model(input_ids=plain["input_ids"], position_ids=plain["position_ids"]).logits[0]
        got = model(input_ids=fixed["input_ids"], position_ids=fixed["position_ids"]).logits[0, :n]
    assert torch.allclose(got, want, atol=1e-4)
    # Unpacked batches keep their own shape: compile copes with those by compiling for dynamic shapes.
    unpacked = batches.Collator(tokenizer.pad_token_id, shape=(3, 64))([batches.Row(a.input_ids, a.labels)])
    assert unpacked["input_ids"].shape == (1, len(a.input_ids))


def tokenizer_with_template_prefix(prefix: str):
    """builtin:tiny's tokenizer with `prefix` put before its chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir(shared_home()))
    tok.chat_template = prefix + tok.chat_template
    return tok


def test_a_template_that_refuses_a_row_skips_it(tokenizer) -> None:
    tok = tokenizer_with_template_prefix(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    )
    ex = Example(
        "x",
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
    )
    with pytest.raises(ValueError, match="System role not supported"):
        batches.tokenize(ex, tok, 64)


def test_template_with_a_default_system_prompt(tokenizer) -> None:
    """Qwen2.5-style: a system turn is added when the conversation has none; it is never trained on."""
    tok = tokenizer_with_template_prefix(
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    )
    ex = Example(
        "x",
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "see you"},
        ],
    )
    item = batches.tokenize(ex, tok, 128)
    assert tok.decode(item.input_ids).startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi")
    assert _trained_text(tok, item) == "hello<|im_end|>see you<|im_end|>"
