"""TrainingConfig: presets, validation naming field and flag, and the generated reference page."""

from __future__ import annotations

import pytest

from ftstudio import configdoc
from ftstudio.config import CLI_FLAGS, PRESETS, TrainingConfig, describe_fields, label, set_path
from ftstudio.errors import ValidationError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name: str) -> None:
    cfg = TrainingConfig.from_dict({"preset": name})
    assert cfg.preset == name
    assert TrainingConfig.from_dict(cfg.to_dict()) == cfg


def test_cpu_demo_targets_the_tiny_model() -> None:
    cfg = TrainingConfig.from_dict({"preset": "cpu-demo"})
    assert cfg.model.name == "builtin:tiny" and cfg.data.path == "builtin:sample" and cfg.model.dtype == "float32"


def test_round_trip_keeps_the_nested_shape() -> None:
    data = TrainingConfig().to_dict()
    sections = {
        "model",
        "data",
        "lora",
        "optim",
        "preference",
        "grpo",
        "checkpoint",
        "logging",
        "evaluation",
        "resources",
        "resume",
    }
    assert set(data) == {*sections, "preset", "method", "rewards", "adapter", "freeze_layers"}
    assert TrainingConfig.from_dict(data) == TrainingConfig()


def test_bad_values_name_field_and_flag() -> None:
    with pytest.raises(ValidationError) as e:
        TrainingConfig.from_dict(
            {
                "optim": {"learning_rate": -0.1, "divergence_factor": 0.5},
                "data": {"validation": "2"},
                "checkpoint": {"keep": 1},
                "lora": {"rank": "many"},
            }
        )
    fields = {p.field for p in e.value.problems}
    assert {"optim.learning_rate (--lr)", "optim.divergence_factor", "data.validation", "checkpoint.keep"} <= fields
    assert "lora.rank (--lora-rank)" in fields
    assert "must be positive" in str(e.value)


def test_cli_strings_are_coerced() -> None:
    data: dict = {}
    set_path(data, "optim.learning_rate", "1e-4")
    set_path(data, "lora.target_modules", "q_proj, v_proj")
    set_path(data, "logging.eval_on_start", "false")
    cfg = TrainingConfig.from_dict(data)
    assert cfg.optim.learning_rate == 1e-4 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.logging.eval_on_start is False


def test_every_field_is_documented() -> None:
    fields = describe_fields()
    assert all(f.help for f in fields), [f.path for f in fields if not f.help]
    assert set(CLI_FLAGS) <= {f.path for f in fields}
    assert label("optim.learning_rate") == "optim.learning_rate (--lr)"


def test_config_reference_page_is_current() -> None:
    assert configdoc.DOC_PATH.read_text() == configdoc.render(), "run: python -m ftstudio.configdoc"


def problems_of(data: dict) -> dict[str, str]:
    with pytest.raises(ValidationError) as e:
        TrainingConfig.from_dict(data)
    return {p.field: p.message for p in e.value.problems}


def test_a_step_count_past_64_bits_names_the_limit() -> None:
    assert problems_of({"optim": {"max_steps": 2**70}}) == {
        "optim.max_steps (--max-steps)": "must be at most 1,000,000,000 (got 1180591620717411303424)"
    }


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("optim.epochs", 10_001, "must be at most 10,000"),
        ("optim.batch_size", 65_537, "must be at most 65,536"),
        ("optim.grad_accum", 0, "must be at least 1"),
        ("data.max_length", 2_000_000, "must be at most 1,048,576 tokens"),
        ("lora.rank", 4097, "must be at most 4,096"),
        ("lora.alpha", 10**6, "must be at most 65,536"),
        ("checkpoint.every_steps", 10**9 + 1, "must be at most 1,000,000,000"),
        ("checkpoint.keep", 1001, "must be at most 1,000"),
        ("checkpoint.keep", 1, "must be at least 2 so a half-written checkpoint never leaves none"),
        ("logging.every_steps", 2**64, "must be at most 1,000,000,000"),
        ("logging.eval_every_steps", -1, "must be at least 0"),
        ("optim.seed", 2**32, "must be at most 4,294,967,295"),
        ("optim.seed", -1, "must be at least 0"),
        ("optim.divergence_patience", 2**63, "must be at most 1,000,000,000"),
        ("optim.weight_decay", 1e300, "must be at most 10"),
        ("optim.max_grad_norm", 1e6, "must be at most 1,000"),
        ("optim.divergence_factor", 1e9, "must be at most 1,000"),
        ("optim.warmup_ratio", 1.0, "must be below 1"),
        ("optim.learning_rate", 5.0, "far too large"),
        ("optim.weight_decay", 10**400, "must be at most 10"),  # float(10**400) overflows: not a crash
        ("optim.batch_size", "9" * 5000, "must be at most 65,536"),  # int() of it would refuse with a hint about sys
        ("model.name", "x" * 4097, "is 4,097 characters long; at most 4,096 are allowed"),
        ("data.path", "d" * 5000, "at most 4,096"),
        ("data.validation", "v" * 5000, "at most 4,096"),
        ("checkpoint.resume_from", "r" * 4097, "at most 4,096"),
        ("lora.target_modules", ["q_proj"] * 257, "has 257 entries; at most 256 are allowed"),
        ("lora.modules_to_save", ["w" * 300], "an entry 300 characters long; at most 256"),
    ],
)
def test_every_value_has_bounds(path: str, value: object, message: str) -> None:
    data: dict = {}
    set_path(data, path, value)
    (field, got), *rest = problems_of(data).items()
    assert not rest and field == label(path) and message in got, (field, got)
    assert "\n" not in got and len(got) < 200


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf", "-Infinity", "1e999"])
@pytest.mark.parametrize(
    "path", ["optim.learning_rate", "optim.epochs", "optim.max_steps", "lora.dropout", "model.name"]
)
def test_nan_and_infinity_are_refused_everywhere(path: str, value: object) -> None:
    data: dict = {}
    set_path(data, path, value)
    if path == "model.name" and isinstance(value, str):
        return  # a name may be any text; a non-finite *number* for it is what must be refused
    problems = problems_of(data)
    assert label(path) in problems, problems


def test_a_preset_must_be_a_name() -> None:
    assert problems_of({"preset": {"name": "cpu-demo"}}) == {
        "preset (--preset)": "must be the name of a preset: cpu-demo, single-gpu-24gb, low-memory"
    }


def test_the_bounds_are_one_table_read_by_the_page_and_the_docs() -> None:
    info = {f.path: f for f in describe_fields()}
    assert (info["optim.max_steps"].min, info["optim.max_steps"].max) == (-1, 1_000_000_000)
    assert info["data.max_length"].range == "8 to 1,048,576 tokens"
    assert info["model.name"].max_length == 4096
    numeric = [f for f in describe_fields() if f.type in ("int", "float")]
    assert all(f.min is not None and f.max is not None for f in numeric), [f.path for f in numeric if f.max is None]
    assert all(f.range for f in describe_fields() if f.type in ("int", "float", "str", "list"))
    assert "| 8 to 1,048,576 tokens |" in configdoc.render()
    defaults = TrainingConfig()  # every default lies inside its own bounds
    assert TrainingConfig.from_dict(defaults.to_dict()) == defaults
