"""Handing a finished fine-tune over: a folder that stands on its own (`ftstudio export`), and the
commands that load the result in the tools people serve with (the task view's "Use it").

`--format adapter` copies the LoRA adapter as peft saved it (weights, `adapter_config.json`, the
tokenizer with its chat template) with the training config and summary; `--format merged` folds the
adapter into the base weights (safetensors a plain transformers loads). A run that trained the model's
own weights (adapter full or freeze) is a whole model already: it exports as `merged` only. Both get
a `README.md` model card written from the task: the base model, the data, the configuration and the final figures.

The folder is written beside its destination under a temporary name and renamed into place, so it is
either complete or absent; a destination that exists is refused, never overwritten.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftstudio.errors import UserError
from ftstudio.training.adapters import adapter_dir, base_model_ref, is_whole, merge

FORMATS = ("adapter", "merged")
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""What vLLM's --max-lora-rank accepts; its default is 16, and an adapter of a higher rank needs the flag."""
CARD = "README.md"


class ExportError(UserError):
    """The export cannot be written where it was asked (the message says why and what to do)."""


def lora_name(task_name: str, task_id: str) -> str:
    """A name for the adapter in a server (vLLM's --lora-modules NAME=..., Ollama's model): the task's
    name as lower-case words joined by '-', or the task id when the name has none."""
    slug = re.sub(r"[^a-z0-9]+", "-", task_name.lower()).strip("-")[:40].strip("-")
    return slug or task_id


def _read(adapter: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads((adapter / name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def base_name(adapter: Path, home: Path) -> str:
    """The base model as a server is told it: the hub id trained from, or the local folder it was
    loaded from (builtin:tiny, a local path)."""
    name = str(_read(adapter, "training_config.json").get("model", {}).get("name") or "")
    if name and not name.startswith("builtin:") and not Path(name).expanduser().exists():
        return name  # a hub id: what vLLM, peft and transformers download by, on any machine
    try:
        return str(base_model_ref(adapter, home))
    except (OSError, ValueError, KeyError, UserError):
        # An adapter that does not say its base (not one this studio trained): name the slot to fill.
        return name or "BASE_MODEL"


def handover(task_id: str, task_name: str, adapter: Path, home: Path) -> dict[str, str]:
    """Ready-to-copy ways to load the task's result: peft in Python, vLLM, an Ollama Modelfile, and the
    export commands. Paths are this machine's."""
    adapter = adapter_dir(adapter)
    if is_whole(adapter):
        return _whole_handover(task_id, task_name, adapter, home)
    base = base_name(adapter, home)
    name = lora_name(task_name, task_id)
    config = _read(adapter, "training_config.json")
    lora = config.get("lora", {}) if isinstance(config.get("lora"), dict) else {}
    rank = int(_read(adapter, "adapter_config.json").get("r") or lora.get("rank") or 16)
    vllm = ["vllm", "serve", base, "--enable-lora", "--lora-modules", f"{name}={adapter}"]
    if rank > 16:
        vllm += ["--max-lora-rank", str(next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), rank))]
    vllm_text = shlex.join(vllm)
    if lora.get("modules_to_save"):
        vllm_text = (
            f"# vLLM loads no adapter that trains whole modules ({', '.join(lora['modules_to_save'])}); serve the "
            f"merged export instead:\n{shlex.join(['ftstudio', 'export', task_id, '--format', 'merged'])}\n"
            f"vllm serve {shlex.quote(name + '-merged')}"
        )
    peft = "\n".join(
        [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f"model = AutoPeftModelForCausalLM.from_pretrained({str(adapter)!r})",
            f"tokenizer = AutoTokenizer.from_pretrained({str(adapter)!r})",
            'messages = [{"role": "user", "content": "Hello!"}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt',",
            "                                       return_dict=True)",
            "reply = model.generate(**inputs, max_new_tokens=128)",
            "print(tokenizer.decode(reply[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        ]
    )
    modelfile = "\n".join(
        [
            "# Ollama takes safetensors adapters for Llama, Mistral and Gemma bases; for any base, export a GGUF",
            f"# (ftstudio export {task_id} --format gguf): it comes with a Modelfile that needs no editing.",
            f"FROM {base}",
            f"ADAPTER {adapter}",
        ]
    )
    return {
        "name": name,
        "base": base,
        "adapter": str(adapter),
        "peft": peft,
        "vllm": vllm_text,
        "ollama_modelfile": modelfile,
        "ollama": f"ollama create {shlex.quote(name)} -f Modelfile && ollama run {shlex.quote(name)}",
        "export_adapter": shlex.join(["ftstudio", "export", task_id, "--format", "adapter"]),
        "export_merged": shlex.join(["ftstudio", "export", task_id, "--format", "merged"]),
        "gguf": gguf_commands(task_id, name),
    }


def gguf_commands(task_id: str, name: str, quant: str = "q4_k_m") -> str:
    """How to write a GGUF of the task and run it with llama.cpp and Ollama."""
    out = f"{name}-{quant}"
    gguf = f"{out}/{name}-{quant}.gguf"
    return "\n".join(
        [
            shlex.join(["ftstudio", "export", task_id, "--format", "gguf", "--quant", quant]),
            "# (or Export GGUF below); then:",
            shlex.join(["llama-cli", "-m", gguf, "-cnv"]),
            shlex.join(["llama-server", "-m", gguf, "--port", "8080"]),
            f"cd {shlex.quote(out)} && ollama create {shlex.quote(name)} -f Modelfile && ollama run {shlex.quote(name)}",
        ]
    )


def _whole_handover(task_id: str, task_name: str, folder: Path, home: Path) -> dict[str, str]:
    """The same ways in for a model trained in full (adapter full or freeze): the folder is the model."""
    name = lora_name(task_name, task_id)
    python = "\n".join(
        [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r})",
            f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})",
            'messages = [{"role": "user", "content": "Hello!"}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt',",
            "                                       return_dict=True)",
            "reply = model.generate(**inputs, max_new_tokens=128)",
            "print(tokenizer.decode(reply[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        ]
    )
    return {
        "name": name,
        "base": str(folder),
        "adapter": str(folder),
        "peft": python,
        "vllm": shlex.join(["vllm", "serve", str(folder), "--served-model-name", name]),
        "ollama_modelfile": f"FROM {folder}",
        "ollama": f"ollama create {shlex.quote(name)} -f Modelfile && ollama run {shlex.quote(name)}",
        "export_adapter": f"# trained in full: there is no adapter; export the model with\n"
        f"{shlex.join(['ftstudio', 'export', task_id, '--format', 'merged'])}",
        "export_merged": shlex.join(["ftstudio", "export", task_id, "--format", "merged"]),
        "gguf": gguf_commands(task_id, name),
    }


def _figure(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    s = int(seconds)
    return f"{s // 3600}h {s % 3600 // 60}m {s % 60}s" if s >= 3600 else f"{s // 60}m {s % 60}s"


def model_card(fmt: str, task_id: str, task_name: str, adapter: Path, base: str, wall_s: float | None) -> str:
    """The README.md of an export: what it is, what it was trained on, with what, and how it ended."""
    config = _read(adapter, "training_config.json")
    summary = _read(adapter, "summary.json")
    data = config.get("data", {}) if isinstance(config.get("data"), dict) else {}
    lora = config.get("lora", {}) if isinstance(config.get("lora"), dict) else {}
    kind = str(config.get("adapter") or "lora")
    what = (
        f"A LoRA adapter (rank {lora.get('rank', '?')}, alpha {lora.get('alpha', '?')}) for `{base}`"
        if fmt == "adapter"
        else f"`{base}` fine-tuned in full ({kind})"
        if kind in ("full", "freeze")
        else f"`{base}` with a LoRA adapter (rank {lora.get('rank', '?')}) merged into its weights"
    )
    front = [
        "---",
        f"base_model: {json.dumps(base)}",
        f"library_name: {'peft' if fmt == 'adapter' else 'transformers'}",
        "pipeline_tag: text-generation",
        "tags:",
        "- ftstudio",
        "- lora",
        "---",
    ]
    rows = [
        ("steps", f"{_figure(summary.get('steps'))} ({_figure(summary.get('epochs'))} epochs)"),
        ("final training loss", _figure(summary.get("final_loss"))),
        ("best training loss", _figure(summary.get("best_loss"))),
        ("eval loss, first → last", f"{_figure(summary.get('first_eval_loss'))} → {_figure(summary.get('final_eval_loss'))}"),
        ("best eval loss", _figure(summary.get("best_eval_loss"))),
        ("tokens seen", _figure(summary.get("tokens"))),
        ("throughput (last attempt)", f"{_figure(summary.get('tokens_per_s'))} tokens/s"),
        ("wall time", _duration(wall_s if wall_s is not None else summary.get("wall_s"))),
        ("trainable parameters", f"{_figure(summary.get('trainable_params'))} of {_figure(summary.get('total_params'))}"),
    ]  # fmt: skip
    lines = [
        *front,
        "",
        f"# {task_name}",
        "",
        f"{what}, fine-tuned with ftstudio as task `{task_id}`.",
        "",
        "## Results",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Data",
        "",
        f"- dataset: `{data.get('path', '?')}` (format {data.get('format', 'auto')})",
        f"- training examples: {_figure(summary.get('train_examples'))}; validation: `{data.get('validation', '?')}`",
        f"- longest sequence: {data.get('max_length', '?')} tokens; packing: {data.get('packing', False)}",
        "",
        "## Training configuration",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A new export folder, whole or absent: the block writes into the temporary folder it is given (beside `out`,
    so the rename cannot cross disks), which becomes `out` when the block ends and is removed when it fails.
    A destination that exists is refused, never overwritten."""
    if out.exists() or out.is_symlink():
        raise ExportError(f"{out} already exists; name a new folder with --out, or move that one away")
    if not out.parent.is_dir():
        raise ExportError(f"the folder {out.parent} does not exist; create it, or name another with --out")
    tmp = out.with_name(f".{out.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what an export stopped by a crash left
    try:
        tmp.mkdir()
        yield tmp
        tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"could not write the export to {out}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(
    task_id: str, task_name: str, task_dir: Path, out: Path, fmt: str, home: Path, wall_s: float | None = None
) -> Path:
    """Write the task's result to `out` (which must not exist) as `fmt`; returns `out`."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be adapter or merged, not {fmt[:40]!r}")
    adapter = adapter_dir(task_dir)
    if fmt == "adapter" and is_whole(adapter):
        raise ExportError(
            f"task {task_id} trained the whole model (adapter full or freeze), so it has no adapter; "
            "export it with --format merged"
        )
    out = out.expanduser().absolute()
    base = base_name(adapter, home)
    with staged(out) as tmp:
        if fmt == "merged":
            merge(adapter, tmp, home=home)
            for name in ("training_config.json", "summary.json"):
                shutil.copy2(adapter / name, tmp / name)
        else:
            for item in adapter.iterdir():
                if item.name == CARD:  # peft's blank template: ours replaces it
                    continue
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            # Where peft finds the base: the hub id where there is one (the folder then works on any
            # machine), not the path of this machine's download.
            config = _read(tmp, "adapter_config.json")
            config["base_model_name_or_path"] = base
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / CARD).write_text(model_card(fmt, task_id, task_name, adapter, base, wall_s))
    return out
