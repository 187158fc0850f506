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
    assert set(data) == {"model", "data", "lora", "optim", "checkpoint", "logging", "preset"}
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
