"""GGUF export, run and not only written: a real fine-tune of builtin:tiny exported by llama.cpp's own converter
and quantizer, then loaded by llama.cpp (llama-cpp-python's bindings) and compared with transformers on the
merged model; the chat template in the file formats a conversation into the tokens training built; and the
bad cases each end with one line and leave no file that looks whole. The `gguf` extra is installed by
`make test` (`make gguf`); without it these tests skip, saying so, except in CI where they fail."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support import api_client, in_memory, wait_for
from trainer_fixtures import ALPACA, FAST, merged, shared_home, train, write_jsonl

from ftstudio.training.export import ExportError
from ftstudio.training.gguf import HOW_TO_INSTALL, export_gguf, missing_tools

pytestmark = [pytest.mark.slow, pytest.mark.process]

TASK = "20261206-0000-gguf0001"
NEW_TOKENS = 32
EOG = (0, 2)  # <|endoftext|> and <|im_end|>: llama.cpp ends generation at both


@pytest.fixture(scope="module", autouse=True)
def llama_cpp_installed() -> None:
    problem = missing_tools()
    if problem and os.environ.get("CI"):
        pytest.fail(f"CI needs the gguf extra: {problem}", pytrace=False)
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tune that learned its data well enough for its answers to be confident (few near-ties)."""
    root = tmp_path_factory.mktemp("gguf")
    data = write_jsonl(root / "d.jsonl", ALPACA)
    config = merged(FAST, {"data": {"path": str(data)}, "optim": {"max_steps": 40, "learning_rate": 3e-3}})
    code, _ = train(root / TASK, config, shared_home())
    assert code == 0
    return root / TASK


@pytest.fixture(scope="module")
def merged_model(task: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftstudio.training.adapters import merge

    out = merge(task / "adapter", tmp_path_factory.mktemp("merged") / "m", home=shared_home())
    return AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def exports(task: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {q: export_gguf(TASK, "Add numbers", task, root / q, q, shared_home()) for q in ("f16", "q8_0", "q4_k_m")}


def prompts(tokenizer: Any) -> list[list[int]]:
    from ftstudio.training.batches import render

    held_out = [{"role": "user", "content": f"What is {a} plus {b}?"} for a, b in ((1, 1), (4, 3), (2, 4), (3, 3))]
    held_out += [{"role": "user", "content": "Tell me something about the sea."}]
    return [
        tokenizer(render(tokenizer, [m], generation_prompt=True), add_special_tokens=False)["input_ids"]
        for m in held_out
    ]


def llama(path: Path, **kw: Any) -> Any:
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, **kw)


def llama_greedy(llm: Any, ids: list[int]) -> list[int]:
    out: list[int] = []
    for tok in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        out.append(int(tok))
        if tok in EOG or len(out) == NEW_TOKENS:
            return out
    return out


def hf_greedy(model: Any, ids: list[int]) -> list[int]:
    import torch

    with torch.no_grad():
        seq = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=list(EOG), pad_token_id=0
        )
    return [int(t) for t in seq[0, len(ids) :]]


def gguf_file(folder: Path) -> Path:
    (only,) = folder.glob("*.gguf")
    return only


def test_f16_gives_transformers_greedy_tokens_on_every_prompt(exports: dict[str, Path], merged_model: Any) -> None:
    model, tokenizer = merged_model
    llm = llama(gguf_file(exports["f16"]))
    for ids in prompts(tokenizer):
        want = hf_greedy(model, ids)
        assert len(want) == NEW_TOKENS or want[-1] in EOG
        assert llama_greedy(llm, ids) == want, tokenizer.decode(ids)
    # ... and the export measured it so itself, for its model card.
    manifest = json.loads((exports["f16"] / "export.json").read_text())
    assert manifest["agreement"]["same_greedy"] == manifest["agreement"]["prompts"] >= 1


def test_q8_0_agrees_on_the_top_token_at_least_95_percent(exports: dict[str, Path], merged_model: Any) -> None:
    import numpy as np

    model, tokenizer = merged_model
    llm = llama(gguf_file(exports["q8_0"]), logits_all=True)
    hits = total = 0
    for ids in prompts(tokenizer):
        answer = hf_greedy(model, ids)
        llm.reset()
        llm.eval(ids + answer)
        top = np.asarray(llm.scores[: len(ids) + len(answer)]).argmax(axis=-1)
        hits += sum(int(top[len(ids) - 1 + i] == t) for i, t in enumerate(answer))
        total += len(answer)
    assert total >= 40 and hits / total >= 0.95, f"{hits}/{total}"
    card = (exports["q8_0"] / "README.md").read_text()
    share = json.loads((exports["q8_0"] / "export.json").read_text())["agreement"]["top1_agreement"]
    assert share >= 0.95 and f"at {share * 100:.1f}% of positions" in card and "**q8_0**" in card


def test_q4_k_m_loads_and_answers(exports: dict[str, Path], merged_model: Any) -> None:
    _, tokenizer = merged_model
    llm = llama(gguf_file(exports["q4_k_m"]))
    assert llm.metadata["general.file_type"] == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    answer = llama_greedy(llm, prompts(tokenizer)[0])
    assert answer and tokenizer.decode(answer, skip_special_tokens=True).strip()
    sizes = {q: gguf_file(f).stat().st_size for q, f in exports.items()}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"], sizes


def test_the_chat_template_in_the_file_formats_a_conversation_as_training_did(
    exports: dict[str, Path], merged_model: Any
) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from ftstudio.training.batches import tokenize
    from ftstudio.training.data import Example

    _, tokenizer = merged_model
    llm = llama(gguf_file(exports["q8_0"]))
    meta = llm.metadata
    assert meta["tokenizer.ggml.pre"] == "qwen2" and meta["tokenizer.ggml.eos_token_id"] == "2"
    conversation = [
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "2 plus 2 is 4."},
        {"role": "user", "content": "And 3 plus 1?"},
        {"role": "assistant", "content": "3 plus 1 is 4."},
    ]
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    formatter = Jinja2ChatFormatter(
        meta["tokenizer.chat_template"], eos_token=eos, bos_token="", add_generation_prompt=False
    )
    text = formatter(messages=conversation).prompt
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    trained = tokenize(Example(where="test", messages=conversation, text=""), tokenizer, 512)
    assert ids == trained.input_ids


def test_the_modelfile_is_ollamas_chatml_with_the_stop_tokens(exports: dict[str, Path], merged_model: Any) -> None:
    text = (exports["q4_k_m"] / "Modelfile").read_text()
    assert "FROM ./add-numbers-q4_k_m.gguf\n" in text
    assert (
        'TEMPLATE """{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
        '{{ end }}{{ end }}<|im_start|>assistant\n"""'
    ) in text
    assert 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"' in text
    manifest = json.loads((exports["q4_k_m"] / "export.json").read_text())
    data = (exports["q4_k_m"] / manifest["file"]).read_bytes()
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest() and manifest["bytes"] == len(data)


# -- the bad cases: one line each, and no half-written file that looks whole -----------------------


def test_an_architecture_the_converter_does_not_know_gets_one_line(task: Path, tmp_path: Path) -> None:
    whole = tmp_path / "task"
    shutil.copytree(shared_home() / "models" / "tiny", whole / "adapter")  # a whole model, as full fine-tunes leave
    shutil.copy2(task / "adapter" / "training_config.json", whole / "adapter")
    config = json.loads((whole / "adapter" / "config.json").read_text())
    (whole / "adapter" / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen9ForCausalLM"]}))
    with pytest.raises(ExportError) as e:
        export_gguf(TASK, "odd", whole, tmp_path / "out", "q8_0", shared_home())
    assert str(e.value).startswith("llama.cpp's converter does not know the architecture 'Qwen9ForCausalLM'")
    assert "\n" not in str(e.value) and "--format merged" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]
    assert not list(whole.glob(".gguf-work-*"))


def test_a_disk_that_fills_halfway_through_the_write_gets_one_line_and_leaves_nothing(
    task: Path, tmp_path: Path
) -> None:
    from test_checkpoint_faults import tmpfs

    disk = tmp_path / "disk"
    disk.mkdir()
    with tmpfs(disk, "2m"):  # f16 of tiny is 4.8 MiB
        with pytest.raises(ExportError) as e:
            export_gguf(TASK, "Add numbers", task, disk / "out", "f16", shared_home())
        assert list(disk.iterdir()) == []
    message = str(e.value)
    assert message.startswith(f"the disk filled up while writing the GGUF into {disk}") and "\n" not in message
    assert "export again" in message


def test_a_second_export_to_the_same_folder_is_refused_and_the_first_kept(exports: dict[str, Path], task: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in exports["q8_0"].iterdir()}
    with pytest.raises(ExportError) as e:
        export_gguf(TASK, "Add numbers", task, exports["q8_0"], "q8_0", shared_home())
    assert str(e.value) == f"{exports['q8_0']} already exists; name a new folder with --out, or move that one away"
    assert {p.name: p.stat().st_mtime_ns for p in exports["q8_0"].iterdir()} == before


def test_without_the_extra_the_cli_says_how_to_install_it(task: Path, tmp_path: Path) -> None:
    env = {**os.environ, "FTSTUDIO_LLAMA_CPP": str(tmp_path / "nowhere"), "FTSTUDIO_HOME": str(tmp_path / "home")}
    with pytest.raises(ExportError) as e:
        os.environ["FTSTUDIO_LLAMA_CPP"] = env["FTSTUDIO_LLAMA_CPP"]
        try:
            export_gguf(TASK, "x", task, tmp_path / "out", "q4_k_m", shared_home())
        finally:
            del os.environ["FTSTUDIO_LLAMA_CPP"]
    assert str(e.value) == HOW_TO_INSTALL
    # The CLI: an unknown task first, then a bad quantization, each one line and a non-zero exit.
    r = subprocess.run([sys.executable, "-m", "ftstudio", "export", "20990101-0000-ffffff", "--format", "gguf"],
                       capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([sys.executable, "-m", "ftstudio", "export", "x", "--format", "merged", "--quant", "q8_0"],
                       capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert r.returncode != 0 and "--quant is for --format gguf" in r.stderr


# -- the job the page starts: queued, a progress line, cancellable, the files downloadable ----------


@pytest.fixture
def client(home: Path, task: Path) -> Any:
    service = in_memory(home, in_server=True)
    with api_client(service) as c:
        c.service = service
        yield c


def completed_with_real_adapter(client: Any, task: Path) -> str:
    r = client.post("/api/tasks", json={"name": "Add numbers", "config": {"preset": "cpu-demo"}})
    assert r.status_code == 201, r.text
    task_id = r.json()["id"]
    client.service.executor.runner(task_id).complete(steps=2)
    client.service.supervisor.sync(client.service.store.get(task_id))
    adapter = client.service.get(task_id).dir.adapter
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.copytree(task / "adapter", adapter)
    return task_id


def test_an_export_job_runs_beside_the_studio_and_its_files_download_with_their_checksum(
    client: Any, task: Path
) -> None:
    task_id = completed_with_real_adapter(client, task)
    r = client.post(f"/api/tasks/{task_id}/exports", json={"format": "gguf", "quant": "q8_0"})
    assert r.status_code == 202, r.text
    assert r.json()["status"] in ("queued", "running")
    seen: set[str] = set()

    def done() -> dict[str, Any] | None:
        (job,) = client.get(f"/api/tasks/{task_id}/exports").json()["exports"]
        seen.add(job["progress"] or "")
        return job if job["status"] in ("completed", "failed", "cancelled") else None

    job = wait_for(done, timeout=240, what="the export job")
    assert job["status"] == "completed", job
    assert any("llama.cpp's converter" in line for line in seen) or "done" in seen
    names = [f["name"] for f in job["files"]]
    assert names == ["add-numbers-q8_0.gguf", "Modelfile", "README.md", "export.json"]
    gguf = job["files"][0]
    body = client.get(gguf["url"]).content
    assert len(body) == gguf["bytes"] and hashlib.sha256(body).hexdigest() == gguf["sha256"]
    assert job["agreement"]["top1_agreement"] >= 0.95
    again = client.post(f"/api/tasks/{task_id}/exports", json={"quant": "q8_0"})
    assert again.status_code == 409 and "has a q8_0 export already" in again.json()["detail"]
    assert client.delete(f"/api/tasks/{task_id}/exports/gguf-q8_0").status_code == 204
    assert client.get(f"/api/tasks/{task_id}/exports").json()["exports"] == []


def test_a_queued_export_job_is_cancelled_and_leaves_nothing(client: Any, task: Path, home: Path) -> None:
    task_id = completed_with_real_adapter(client, task)
    home.mkdir(exist_ok=True)
    with (home / "exports.lock").open("wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another export holds the machine: this one waits its turn
        r = client.post(f"/api/tasks/{task_id}/exports", json={"quant": "f16"})
        assert r.status_code == 202, r.text
        wait_for(lambda: client.get(f"/api/tasks/{task_id}/exports").json()["exports"][0]["progress"].startswith("waits"),
                 timeout=60, what="the job to queue")  # fmt: skip
        r = client.post(f"/api/tasks/{task_id}/exports/gguf-f16/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    folder = client.service.get(task_id).dir.path / "exports"
    assert not (folder / "gguf-f16").exists() and not list(folder.glob(".*export-tmp"))


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"quant": "q2_k"}, 422, "quant must be one of f16, q8_0, q4_k_m"),
        ({"format": "onnx"}, 422, "format must be gguf"),
        ({"quant": "f16", "out": "/etc"}, 422, "unknown field 'out'"),
    ],
)
def test_bad_export_requests_get_one_line(
    client: Any, task: Path, body: dict[str, Any], status: int, words: str
) -> None:
    task_id = completed_with_real_adapter(client, task)
    r = client.post(f"/api/tasks/{task_id}/exports", json=body)
    assert r.status_code == status and words in str(r.json()["detail"]), r.text


def test_an_export_of_a_task_that_has_not_completed_is_refused(client: Any) -> None:
    r = client.post("/api/tasks", json={"name": "still going", "config": {"preset": "cpu-demo"}})
    task_id = r.json()["id"]
    r = client.post(f"/api/tasks/{task_id}/exports", json={"quant": "q4_k_m"})
    assert r.status_code == 422 and "needs a completed task" in str(r.json()["detail"]), r.text
    assert client.get(f"/api/tasks/{task_id}/exports").json()["exports"] == []
    time.sleep(0)


def test_an_export_job_outlives_a_studio_restart_and_a_killed_one_says_so(task: Path, home: Path) -> None:
    service = in_memory(home, in_server=True)
    with api_client(service) as first:
        first.service = service
        task_id = completed_with_real_adapter(first, task)
        home.mkdir(exist_ok=True)
        lock = (home / "exports.lock").open("wb")
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert first.post(f"/api/tasks/{task_id}/exports", json={"quant": "q8_0"}).status_code == 202
        assert first.post(f"/api/tasks/{task_id}/exports", json={"quant": "f16"}).status_code == 202
    # The studio is gone; a new one on the same home finds both jobs waiting, and they go on once the lock frees.
    again = in_memory(home, in_server=True)
    with api_client(again) as client:
        jobs = {j["quant"]: j for j in client.get(f"/api/tasks/{task_id}/exports").json()["exports"]}
        assert {j["status"] for j in jobs.values()} == {"queued"}
        # The queue lists them beside training, oldest first.
        listed = client.get("/api/queue").json()["exports"]
        assert [(e["task"], e["quant"], e["status"]) for e in listed] == [
            (task_id, "q8_0", "queued"),
            (task_id, "f16", "queued"),
        ]
        pid = json.loads((again.get(task_id).dir.path / "exports" / "gguf-f16.process.json").read_text())["pid"]
        refused = client.delete(f"/api/tasks/{task_id}")
        assert refused.status_code == 409 and "cancel the export, then delete" in refused.json()["detail"]
        os.killpg(pid, 9)  # a job killed outright (the OOM killer, a reboot) writes nothing itself
        lock.close()

        def ended() -> dict[str, Any] | None:
            jobs = {j["quant"]: j for j in client.get(f"/api/tasks/{task_id}/exports").json()["exports"]}
            return jobs if all(j["status"] in ("completed", "failed") for j in jobs.values()) else None

        jobs = wait_for(ended, timeout=240, what="both jobs to end")
        assert jobs["q8_0"]["status"] == "completed", jobs
        assert jobs["f16"]["status"] == "failed" and jobs["f16"]["error"].startswith(
            "the export's process ended without"
        )
        r = client.delete(f"/api/tasks/{task_id}")
        assert r.status_code == 204, r.text
