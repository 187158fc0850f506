"""A GGUF of a finished fine-tune, for llama.cpp, Ollama and LM Studio (`ftstudio export --format gguf`).

The model is merged, written as GGUF by llama.cpp's own converter (`convert_hf_to_gguf.py`, with the
gguf-py it ships), quantized by llama.cpp's own quantizer (`llama_model_quantize` in libllama, through
llama-cpp-python), then loaded by llama.cpp and compared with transformers on held-out prompts: the
measured agreement goes into the model card. The converter keeps the chat template
(`tokenizer.chat_template`) and the end-of-turn tokens in the file, so llama.cpp formats a
conversation the way training did; a `Modelfile` beside it carries the same template in Ollama's
template language, its stop tokens, and `FROM ./<file>.gguf`.

    OUT/                      written as .OUT.export-tmp and renamed when whole
      NAME-QUANT.gguf
      Modelfile               ollama create NAME -f Modelfile
      README.md               the model card: quantization, agreement, training figures
      export.json             what this is: format, quantization, file, bytes, sha256, agreement

llama.cpp is an optional extra (`ftstudio[gguf]`): PyPI carries llama-cpp-python only as source, which
is compiled once per machine (minutes), and the converter is not installed by pip at all. `setup()`
(`make gguf`, or `python -m ftstudio.training.gguf setup`) does both from one source archive, so the
converter, gguf-py and libllama are always the same llama.cpp. FTSTUDIO_LLAMA_CPP names another
folder holding `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/` (a llama.cpp checkout).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftstudio.training.adapters import adapter_dir, is_whole, merge
from ftstudio.training.export import CARD, ExportError, base_name, lora_name, model_card, staged
from ftstudio.training.ggufwork import DISK_FULL, PREFIX, PROBLEM

QUANTS = ("f16", "q8_0", "q4_k_m")
QUANT_WORDS = {
    "f16": "16-bit floats: the weights as trained, half the size of float32",
    "q8_0": "8-bit (q8_0): about half the size of f16, answers all but identical",
    "q4_k_m": "4-bit (q4_k_m): about a third of f16, the usual choice for a laptop",
}
LLAMA_CPP_PYTHON = "0.3.36"
"""The llama-cpp-python release whose source carries the converter and libllama (pyproject's `gguf` extra)."""
CONVERTER = "convert_hf_to_gguf.py"
AGREE_PROMPTS = 8
AGREE_TOKENS = 32
MANIFEST = "export.json"
HOW_TO_INSTALL = (
    "GGUF export needs llama.cpp (the ftstudio[gguf] extra), which is not installed here: run `make gguf` "
    "in the ftstudio checkout, or `python -m ftstudio.training.gguf setup` (compiles llama.cpp once, a few minutes)"
)

Progress = Callable[[str], None]


def tools_dir() -> Path:
    """Where the converter is: FTSTUDIO_LLAMA_CPP, else what `setup()` unpacked into this environment."""
    named = os.environ.get("FTSTUDIO_LLAMA_CPP")
    return Path(named).expanduser() if named else Path(sys.prefix) / "share" / "ftstudio" / "llama.cpp"


def missing_tools() -> str | None:
    """Why a GGUF cannot be written here (one line with the fix), or None when everything is in place."""
    import importlib.util

    tools = tools_dir()
    if not (tools / CONVERTER).is_file() or not (tools / "gguf-py" / "gguf").is_dir():
        return HOW_TO_INSTALL
    for module in ("llama_cpp", "sentencepiece"):
        if importlib.util.find_spec(module) is None:
            return HOW_TO_INSTALL
    return None


BUILD_FLAGS = "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"
"""How libllama is compiled. Text models only (the multimodal library is a quarter of the build and nothing here
loads it), and for x86-64 with AVX2 rather than for this exact CPU: a native build uses AVX-512 and AMX where the
CPU lists them, and some virtual machines list them without allowing them (the quantized kernels then stop the
process with an illegal instruction)."""


def wheel_cache() -> Path:
    """Where the compiled llama-cpp-python wheel is kept, per release and build flags: built once per machine."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    flags = hashlib.sha256(BUILD_FLAGS.encode()).hexdigest()[:10]
    return root / "ftstudio" / "wheels" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}-{flags}"


def setup() -> Path:
    """Install the `gguf` extra from one llama-cpp-python source archive: compile its bindings (once per machine:
    the wheel is kept in wheel_cache()) and install them, and unpack its converter and gguf-py into this
    environment. pip's own wheel cache is not used for the build: it keys a wheel by its source alone, so it
    would hand back a library compiled with other flags."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    dest = tools_dir()
    wheels = wheel_cache()
    with tempfile.TemporaryDirectory(prefix="ftstudio-llama-cpp-") as tmp:
        print(f"fetching the source of llama-cpp-python {LLAMA_CPP_PYTHON} (llama.cpp with its converter)", flush=True)
        subprocess.run(
            [*pip, "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
            check=True,
        )  # fmt: skip
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        built = sorted(wheels.glob("llama_cpp_python-*.whl"))
        if not built:
            print(
                "compiling llama.cpp and its Python bindings (once per machine: about 5 minutes on 2 cores)", flush=True
            )
            staging = Path(tmp) / "wheel"
            env = {**os.environ, "CMAKE_ARGS": BUILD_FLAGS}
            subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-cache-dir", "-w", str(staging), str(sdist)],
                           check=True, env=env)  # fmt: skip
            wheels.mkdir(parents=True, exist_ok=True)
            for w in staging.glob("*.whl"):
                shutil.move(w, wheels / w.name)
            built = sorted(wheels.glob("llama_cpp_python-*.whl"))
        subprocess.run([*pip, "install", "-q", str(built[-1]), "sentencepiece>=0.2,<0.3"], check=True)
        unpack_converter(sdist, dest)
    print(f"GGUF export is ready: llama.cpp's converter in {dest}", flush=True)
    return dest


def unpack_converter(sdist: Path, dest: Path) -> None:
    """llama.cpp's converter, its model modules and its gguf-py, from a llama-cpp-python source archive."""
    staged = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        root = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        wanted = (CONVERTER, "conversion/", "gguf-py/", "LICENSE")
        members = []
        for m in tar.getmembers():
            if m.name.startswith(root) and m.name[len(root) :].startswith(wanted):
                m.name = m.name[len(root) :]
                members.append(m)
        tar.extractall(staged, members=members, filter="data")
    (staged / "VERSION").write_text(f"{sdist.name}\n")
    shutil.rmtree(dest, ignore_errors=True)
    staged.rename(dest)


# -- the Modelfile ---------------------------------------------------------------------------------


def _go_text(text: str) -> str:
    """Literal text inside an Ollama (Go text/template) template: as is, unless it holds template braces."""
    if "{{" in text or "}}" in text:
        return "{{ " + json.dumps(text) + " }}"
    return text


def ollama_template(tokenizer: Any) -> str | None:
    """The chat template in Ollama's template language, or None where it cannot be said there exactly.

    Exact for the templates that render a conversation as one piece per message followed by the generation
    prompt (ChatML, Llama 3, Zephyr, Phi and most others): each role's piece is found by rendering the
    training template with marked contents, the result is checked against a whole conversation rendered
    by the template itself, and the Go template repeats the pieces over `.Messages`."""
    from ftstudio.training.batches import render

    def mark(i: int) -> str:
        return f"\x00{i}\x00"

    def turns(*roles: str) -> list[dict[str, str]]:
        return [{"role": r, "content": mark(i)} for i, r in enumerate(roles)]

    try:
        user = render(tokenizer, turns("user"))
        generation = render(tokenizer, turns("user"), generation_prompt=True).removeprefix(user)
        pair = render(tokenizer, turns("user", "assistant"))
        three = render(tokenizer, turns("user", "assistant", "user"))
    except ValueError:
        return None
    if not (pair.startswith(user) and three.startswith(pair)):
        return None  # a template that rewrites earlier turns: no piece per message
    pieces: dict[str, tuple[str, str]] = {}
    assistant_part = pair.removeprefix(user)
    a_before, _, a_after = assistant_part.partition(mark(1))
    u_before, _, u_after = three.removeprefix(pair).partition(mark(2))
    lead = user.partition(mark(0))[0].removesuffix(u_before)
    if lead + u_before + mark(0) + u_after != user:
        return None
    try:
        with_system = render(tokenizer, [{"role": "system", "content": mark(9)}, *turns("user")])
    except ValueError:
        with_system = ""
    head, found, rest = with_system.partition(mark(9))
    if found and head.startswith(lead) and rest.endswith(u_before + mark(0) + u_after):
        pieces["system"] = (head.removeprefix(lead), rest.removesuffix(u_before + mark(0) + u_after))
    pieces["user"] = (u_before, u_after)
    pieces["assistant"] = (a_before, a_after)
    # Check the pieces against the real thing: a two-turn conversation, with a system message where allowed.
    convo = [
        {"role": "user", "content": "A?"},
        {"role": "assistant", "content": "B."},
        {"role": "user", "content": "C?"},
    ]
    if "system" in pieces:
        convo.insert(0, {"role": "system", "content": "S"})
    expected = lead + "".join(pieces[m["role"]][0] + m["content"] + pieces[m["role"]][1] for m in convo) + generation
    try:
        if render(tokenizer, convo, generation_prompt=True) != expected:
            return None
    except ValueError:
        return None
    branches = []
    for i, (role, (before, after)) in enumerate(pieces.items()):
        keyword = "if" if i == 0 else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_go_text(before)}{{{{ .Content }}}}{_go_text(after)}')
    body = (
        f"{_go_text(lead)}{{{{ range .Messages }}}}{''.join(branches)}{{{{ end }}}}{{{{ end }}}}{_go_text(generation)}"
    )
    return None if '"""' in body else body


def stop_tokens(tokenizer: Any) -> list[str]:
    """The texts that end a turn: the eos token and the end-of-turn markers llama.cpp also stops at."""
    end_of_turn = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>")
    vocab = set(tokenizer.get_vocab())
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    return stops + [t for t in end_of_turn if t in vocab and t not in stops]


def modelfile(gguf_name: str, tokenizer: Any, system: str | None = None) -> str:
    template = ollama_template(tokenizer)
    lines = [f"# ollama create NAME -f Modelfile && ollama run NAME   (written by ftstudio with {gguf_name})", ""]
    lines += [f"FROM ./{gguf_name}", ""]
    if template is None:
        lines += [
            "# This model's chat template has no exact equivalent in Ollama's template language; Ollama",
            "# reads the template stored in the GGUF (tokenizer.chat_template) and matches it to one it knows.",
            "",
        ]
    else:
        lines += [f'TEMPLATE """{template}"""', ""]
    if system and '"""' not in system:
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stop_tokens(tokenizer)]
    return "\n".join(lines) + "\n"


# -- the export ------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _step(args: list[str], log: Path, what: str, where: Path) -> None:
    """One ggufwork step in a process of its own; its output goes to `log`. A stopped export (a signal, ^C)
    stops the step too before the exception goes on."""
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ftstudio.training.ggufwork", *args], stdout=out, stderr=out)
        try:
            code = proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            raise
    if code == 0:
        return
    text = log.read_text(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    said = [ln.removeprefix(PREFIX) for ln in lines if ln.startswith(PREFIX)]
    if code == PROBLEM and said:
        raise ExportError(said[-1])
    if code == DISK_FULL or "No space left on device" in text or "Disk quota exceeded" in text:
        raise ExportError(
            f"the disk filled up while {what} into {where}; nothing was kept. Free some space there "
            "(or name a folder on another disk with --out) and export again"
        )
    last = lines[-1] if lines else f"exit code {code}"
    raise ExportError(f"llama.cpp failed while {what}: {last[:300]} (the whole log: {log})")


def _prompts(adapter: Path, tokenizer: Any, home: Path) -> list[list[int]]:
    """Token ids of up to AGREE_PROMPTS held-out prompts, as training rendered them: the task's evaluation
    prompts, else the last rows of its validation file or dataset."""
    from ftstudio.training.batches import render
    from ftstudio.training.evaluation import load_prompts

    config = json.loads((adapter / "training_config.json").read_text())
    data = config.get("data") or {}
    validation = data.get("validation")
    refs = [(config.get("evaluation") or {}).get("prompts"), validation if isinstance(validation, str) else None]
    refs.append(data.get("path"))
    for ref in refs:
        if not ref:
            continue
        try:
            prompts = load_prompts(str(ref), home, 10_000)
        except Exception:  # a dataset moved away since training: fall back to the next source
            continue
        ids: list[list[int]] = []
        for p in reversed(prompts):  # the last rows: the validation split's side of the data
            if len(ids) == AGREE_PROMPTS:
                break
            try:
                text = render(tokenizer, p.messages, generation_prompt=True) if p.messages else p.text
            except ValueError:
                continue
            ids.append(tokenizer(text, add_special_tokens=not p.messages)["input_ids"][-512:])
        if ids:
            return ids
    return [tokenizer(render(tokenizer, [{"role": "user", "content": "Hello!"}], generation_prompt=True))["input_ids"]]


def trained_system(adapter: Path, home: Path) -> str | None:
    """The system prompt the model was trained with, when every conversation of its data began with the same one
    (the Modelfile's SYSTEM, so Ollama sends it when a user sends none); else None."""
    from ftstudio.training.evaluation import load_prompts

    try:
        ref = (json.loads((adapter / "training_config.json").read_text()).get("data") or {}).get("path")
        prompts = load_prompts(str(ref), home, 100_000) if ref else []
    except Exception:  # the data moved away since training: no SYSTEM line, nothing else lost
        return None
    systems = {p.messages[0]["content"] if p.messages and p.messages[0]["role"] == "system" else None for p in prompts}
    only = systems.pop() if len(systems) == 1 else None
    return only or None


def agreement_words(quant: str, agreement: dict[str, Any]) -> str:
    share = agreement.get("top1_agreement")
    pct = f"{share * 100:.1f}%" if isinstance(share, float) else "-"
    return (
        f"On {agreement['prompts']} held-out prompts, llama.cpp running this {quant} file picked the same next "
        f"token as transformers running the merged model at {pct} of positions over answers of up to "
        f"{agreement['new_tokens']} tokens, and gave the same greedy answer on {agreement['same_greedy']} of "
        f"{agreement['prompts']} prompts."
    )


def _card(quant: str, gguf_name: str, name: str, size: int, agreement: dict[str, Any], base_card: str) -> str:
    rest = base_card.split("\n---\n", 1)[-1].lstrip("\n")  # the training card, without its front matter
    base = next((ln for ln in base_card.splitlines() if ln.startswith("base_model: ")), None)
    front = [
        "---",
        *([base] if base else []),
        "library_name: gguf",
        "pipeline_tag: text-generation",
        "tags:",
        "- ftstudio",
        "- gguf",
        f"- {quant}",
        "---",
        "",
    ]
    lines = [
        f"## GGUF: {gguf_name}",
        "",
        f"- quantization: **{quant}**, {QUANT_WORDS[quant]}",
        f"- file: `{gguf_name}`, {size / 2**20:.1f} MiB, written by llama.cpp's converter"
        + (" and quantizer" if quant == "q4_k_m" else ""),
        f"- agreement with the original: {agreement_words(quant, agreement)}",
        "",
        "Run it:",
        "",
        "```sh",
        f"llama-cli -m {gguf_name} -cnv",
        f"llama-server -m {gguf_name} --port 8080",
        f"ollama create {name} -f Modelfile && ollama run {name}",
        "```",
        "",
    ]
    # The GGUF first (what a person downloading it wants to know), then how it was trained.
    title, results, training = rest.partition("## Results")
    return "\n".join(front) + title + "\n".join(lines) + "\n" + results + training


WORK_PREFIX = ".gguf-work-"


def tidy_work(task_dir: Path) -> None:
    """Remove the work folders of exports that were killed mid-way (a merged model each: gigabytes of a task's
    disk); a folder whose process still runs is another export's, and stays."""
    import psutil

    for old in task_dir.glob(f"{WORK_PREFIX}*"):
        pid = old.name.removeprefix(WORK_PREFIX).split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and psutil.pid_exists(int(pid)):
            continue
        shutil.rmtree(old, ignore_errors=True)


def export_gguf(
    task_id: str,
    task_name: str,
    task_dir: Path,
    out: Path,
    quant: str,
    home: Path,
    wall_s: float | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write the task's result to the new folder `out` as a GGUF of `quant`, with its Modelfile and model card."""
    say = progress or (lambda line: print(line, flush=True))
    if quant not in QUANTS:
        raise ExportError(f"--quant must be one of {', '.join(QUANTS)}, not {quant[:40]!r}")
    problem = missing_tools()
    if problem:
        raise ExportError(problem)
    adapter = adapter_dir(task_dir)
    out = out.expanduser().absolute()
    name = lora_name(task_name, task_id)
    gguf_name = f"{name}-{quant}.gguf"
    # Kept after a failure, for the lines the one-line error leaves out (an export job writes its own there too).
    log = task_dir / "exports" / f"gguf-{quant}.log"
    log.parent.mkdir(exist_ok=True)
    started = time.monotonic()
    tidy_work(task_dir)
    # The merged model: large, so on this disk. Named for this process, so a later export knows it from a dead one's.
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=task_dir))
    try:
        with staged(out) as tmp:
            from transformers import AutoTokenizer

            whole = is_whole(adapter)
            final = tmp / gguf_name
            first = final if quant in ("f16", "q8_0") else work / "model-f16.gguf"
            steps = 2 + (not whole) + (first != final)
            done = iter(range(1, steps + 1))
            if whole:
                model_dir = adapter
            else:
                say(f"{next(done)}/{steps} merging the adapter into the base model")
                model_dir = merge(adapter, work / "merged", home=home)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            say(
                f"{next(done)}/{steps} writing GGUF ({'f16' if quant == 'q4_k_m' else quant}) with llama.cpp's converter"
            )
            _step(["convert", str(tools_dir()), str(model_dir), str(first), "f16" if quant == "q4_k_m" else quant, name],
                  log, "writing the GGUF", out.parent if first == final else task_dir)  # fmt: skip
            if first != final:
                say(f"{next(done)}/{steps} quantizing to {quant} with llama.cpp's quantizer")
                _step(["quantize", str(first), str(final), quant], log, "quantizing", out.parent)
                first.unlink()
            say(f"{next(done)}/{steps} measuring agreement with the original on up to {AGREE_PROMPTS} held-out prompts")
            prompts = work / "prompts.json"
            prompts.write_text(json.dumps(_prompts(adapter, tokenizer, home)))
            result = work / "agreement.json"
            _step(["agree", str(final), str(model_dir), str(prompts), str(result), str(AGREE_TOKENS)],
                  log, "loading the GGUF to compare it", work)  # fmt: skip
            agreement = json.loads(result.read_text())
            (tmp / "Modelfile").write_text(modelfile(gguf_name, tokenizer, trained_system(adapter, home)))
            size = final.stat().st_size
            base_card = model_card("merged", task_id, task_name, adapter, base_name(adapter, home), wall_s)
            (tmp / CARD).write_text(_card(quant, gguf_name, name, size, agreement, base_card))
            manifest = {
                "format": "gguf",
                "quant": quant,
                "task": task_id,
                "file": gguf_name,
                "bytes": size,
                "sha256": _sha256(final),
                "seconds": round(time.monotonic() - started, 1),
                "agreement": {k: v for k, v in agreement.items() if k != "rows"},
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"wrote {out / gguf_name} ({size / 2**20:.1f} MiB) in {time.monotonic() - started:.0f} s")
    return out


if __name__ == "__main__":
    if sys.argv[1:] != ["setup"]:
        raise SystemExit("usage: python -m ftstudio.training.gguf setup")
    setup()
