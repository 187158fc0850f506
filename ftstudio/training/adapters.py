"""The trained adapter: saving it, merging it into the base model, generating with it.

`adapter/` holds `adapter_model.safetensors` and `adapter_config.json` (peft), or, for a run
that trained the model's own weights (adapter full or freeze), the whole model (`config.json`
and its weights, as transformers saves it; see `is_whole`),
the tokenizer with the chat template used in training, `training_config.json`
(the full TrainingConfig) and `summary.json`. It is written into a temporary
directory and renamed into place, so `adapter/` is either complete or absent.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

from ftstudio.errors import NotFound
from ftstudio.home import home_dir, write_json_atomic

ADAPTER_DIR = "adapter"


def save_adapter(
    model: Any,
    tokenizer: Any,
    config: dict[str, Any],
    summary: dict[str, Any],
    task_dir: Path,
    convert_from: Path | None = None,
) -> Path:
    """Write the final adapter; returns its directory. `convert_from`: a PiSSA run's starting adapter
    (models.keep_pissa_start): the adapter is saved as a plain LoRA adapter of twice the rank on the original base."""
    final = Path(task_dir) / ADAPTER_DIR
    tmp = Path(task_dir) / f".{ADAPTER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # Only the run's own adapter: TRL keeps a frozen copy named "ref" beside it when a run goes on from one.
    options: dict[str, Any] = {"selected_adapters": ["default"]} if hasattr(model, "peft_config") else {}
    if convert_from is not None:
        options["path_initial_model_for_weight_conversion"] = str(convert_from)
    with warnings.catch_warnings():
        # peft loads the starting adapter beside the trained one to convert, and warns that PiSSA should be
        # converted: which is what this does.
        warnings.filterwarnings("ignore", message="PiSSA changes the base weights", category=UserWarning)
        model.save_pretrained(tmp, **options)
    tokenizer.save_pretrained(tmp)
    write_json_atomic(tmp / "training_config.json", config)
    write_json_atomic(tmp / "summary.json", summary)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def is_whole(folder: Path) -> bool:
    """Whether a result folder holds a whole model (adapter full or freeze), not a peft adapter."""
    return not (Path(folder) / "adapter_config.json").exists() and (Path(folder) / "config.json").exists()


def adapter_dir(task_dir_or_adapter: Path) -> Path:
    """Accept a task directory or the adapter directory itself (a whole model's folder too)."""
    path = Path(task_dir_or_adapter)
    for candidate in (path, path / ADAPTER_DIR):
        if (candidate / "adapter_config.json").exists() or is_whole(candidate):
            return candidate
    raise NotFound(f"no trained adapter in {path}: the task has not finished training (adapter/ is missing)")


def base_model_ref(adapter: Path, home: Path | None = None) -> str | Path:
    """Where the base model of an adapter lies now: the path used in training, or the name resolved again."""
    from ftstudio.training.builtin import resolve_model

    summary = json.loads((adapter / "summary.json").read_text()) if (adapter / "summary.json").exists() else {}
    base = summary.get("base_model", {})
    path = base.get("path")
    if path and Path(path).exists():
        return Path(path)
    if base.get("name"):
        return resolve_model(base["name"], home or home_dir())
    named: str = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    return named


def _load(task_dir_or_adapter: Path, home: Path | None) -> tuple[Any, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = adapter_dir(task_dir_or_adapter)
    config = json.loads((adapter / "training_config.json").read_text())
    trust = bool(config.get("model", {}).get("trust_remote_code", False))
    dtype = torch.float32 if not torch.cuda.is_available() else "auto"
    if is_whole(adapter):  # the model itself, trained in full: nothing to put on a base
        whole: Any = AutoModelForCausalLM.from_pretrained(str(adapter), dtype=dtype, trust_remote_code=trust)
        return whole, AutoTokenizer.from_pretrained(str(adapter), trust_remote_code=trust)
    base_ref = base_model_ref(adapter, home)
    base = AutoModelForCausalLM.from_pretrained(str(base_ref), dtype=dtype, trust_remote_code=trust)
    model = PeftModel.from_pretrained(base, str(adapter))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter), trust_remote_code=trust)
    return model, tokenizer


def merge(task_dir_or_adapter: Path, out_dir: Path, home: Path | None = None) -> Path:
    """Fold the adapter into the base weights and save a full model transformers loads without peft."""
    model, tokenizer = _load(Path(task_dir_or_adapter), home)
    merged = model if is_whole(adapter_dir(Path(task_dir_or_adapter))) else model.merge_and_unload()
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def generate(
    task_dir_or_adapter: Path,
    prompt: str,
    max_new_tokens: int = 64,
    home: Path | None = None,
    system: str | None = None,
) -> str:
    """The adapted model's reply to one user prompt, rendered with the chat template used in training."""
    import torch

    model, tokenizer = _load(Path(task_dir_or_adapter), home)
    model.eval()
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    answer: str = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return answer.strip()
