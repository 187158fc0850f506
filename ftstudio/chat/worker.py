"""The chat worker: `python -m ftstudio.chatworker`, a process of its own that holds a model and
answers chat messages, streaming the reply token by token.

The studio (and `ftstudio chat`) start it through `ftstudio.chat.ChatWorker` and talk to it in JSON
lines: a request on stdin, then its events on stdout (`loading`, `ready`, `token`, `done`, ending
with `end` or `error`). Why a process: a crash in generation (out of memory, a bad adapter) never
touches the studio, and the model stays loaded between messages without living in the studio's
memory. It exits when stdin closes (its parent went) or after `--idle` seconds without a request,
which unloads the model.

One model at a time: base + adapter (peft). "Compare with the base model" answers a second time with
the adapter switched off, from the same weights, so comparing costs no second model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftstudio.home import keep_private

_out_lock = threading.Lock()


def emit(rid: int, event: str, **fields: Any) -> None:
    line = json.dumps({"id": rid, "event": event, **fields})
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


@dataclass
class Loaded:
    key: tuple[str, str, float]
    model: Any
    tokenizer: Any
    whole: bool = False
    """The weights are a whole model (adapter full or freeze): the base to compare with is a model of its own."""
    base_model: Any = None
    """That base, loaded the first time a comparison asks for it."""


class Worker:
    def __init__(self) -> None:
        self.loaded: Loaded | None = None
        self.stop = threading.Event()

    def load(self, rid: int, base: str, weights: str, trust: bool) -> Loaded:
        path = Path(weights)
        whole = not (path / "adapter_config.json").exists()
        stamp = (path / ("config.json" if whole else "adapter_model.safetensors")).stat().st_mtime
        key = (base, weights, stamp)
        if self.loaded is not None and self.loaded.key == key:
            return self.loaded
        self.loaded = None
        gc.collect()
        emit(rid, "loading", message=f"loading the model and {path.name}")
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cuda = torch.cuda.is_available()
        dtype = "auto" if cuda else torch.float32
        model: Any
        if whole:  # trained in full: the folder is the model
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust)
        else:
            base_model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=trust)
            model = PeftModel.from_pretrained(base_model, str(path))
        if cuda:
            model = model.to("cuda")
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust)
        self.loaded = Loaded(key, model, tokenizer, whole=whole)
        return self.loaded

    def base_of(self, loaded: Loaded, base: str, trust: bool) -> Any:
        """The base model beside a whole fine-tuned one, for a comparison: a second model, loaded once."""
        if loaded.base_model is None:
            import torch
            from transformers import AutoModelForCausalLM

            cuda = torch.cuda.is_available()
            model: Any = AutoModelForCausalLM.from_pretrained(
                base, dtype="auto" if cuda else torch.float32, trust_remote_code=trust
            )
            loaded.base_model = (model.to("cuda") if cuda else model).eval()
        return loaded.base_model

    def generate(self, req: dict[str, Any]) -> None:
        rid = int(req["id"])
        try:
            loaded = self.load(rid, req["base"], req["weights"], bool(req.get("trust_remote_code")))
            emit(rid, "ready", weights=Path(req["weights"]).name)
            for who in ("adapter", "base") if req.get("compare") else ("adapter",):
                if self.stop.is_set():
                    break
                self._answer(rid, loaded, req, who)
            emit(rid, "end")
        except Exception as e:  # the request's end, not the worker's: one line for the person
            emit(rid, "error", message=f"{type(e).__name__}: {e}".splitlines()[0][:500])

    def _answer(self, rid: int, loaded: Loaded, req: dict[str, Any], who: str) -> None:
        import contextlib

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        tokenizer, model = loaded.tokenizer, loaded.model
        if who == "base" and loaded.whole:
            model = self.base_of(loaded, req["base"], bool(req.get("trust_remote_code")))
        messages = list(req["messages"])
        if req.get("system"):
            messages.insert(0, {"role": "system", "content": req["system"]})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(model.device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = self.stop

        class Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return stop.is_set()

        temperature = float(req.get("temperature", 0.7))
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_p": float(req.get("top_p", 0.9))}
            if temperature > 0
            else {"do_sample": False}
        )
        seed = req.get("seed")
        if isinstance(seed, int):
            torch.manual_seed(seed)
        adapter_off = model.disable_adapter() if who == "base" and not loaded.whole else contextlib.nullcontext()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with adapter_off, torch.no_grad():
                    model.generate(
                        **enc,
                        max_new_tokens=int(req.get("max_new_tokens", 256)),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([Stop()]),
                        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                        **sampling,
                    )
            except BaseException as e:  # reported by the reading side, after the streamer ends
                failure.append(e)
                streamer.end()

        started = time.monotonic()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        pieces = 0
        for piece in streamer:
            if piece:
                pieces += 1
                emit(rid, "token", who=who, text=piece)
        thread.join()
        if failure:
            raise failure[0]
        emit(rid, "done", who=who, pieces=pieces, seconds=round(time.monotonic() - started, 3), stopped=stop.is_set())


def main(argv: list[str] | None = None) -> int:
    keep_private()
    parser = argparse.ArgumentParser(prog="python -m ftstudio.chatworker", description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=600.0, help="exit after this many seconds without a request")
    args = parser.parse_args(argv)
    threads = os.environ.get("FTSTUDIO_CHAT_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
    worker = Worker()
    busy: threading.Thread | None = None
    last = time.monotonic()
    buffered = b""
    while True:
        idle = busy is None or not busy.is_alive()
        if busy is not None and idle:
            busy, last = None, time.monotonic()  # idle from the end of the last reply
        if idle and time.monotonic() - last > args.idle:
            return 0  # unloads the model: the next message starts a new worker
        ready, _, _ = select.select([sys.stdin], [], [], 1.0)
        if not ready:
            continue
        chunk = os.read(sys.stdin.fileno(), 65536)
        if not chunk:
            worker.stop.set()
            return 0  # the parent closed the pipe (it stopped or died)
        buffered += chunk
        while b"\n" in buffered:
            raw, buffered = buffered.split(b"\n", 1)
            try:
                req = json.loads(raw)
            except ValueError:
                continue
            last = time.monotonic()
            if req.get("op") == "stop":
                worker.stop.set()
            elif req.get("op") == "generate":
                if busy is not None:
                    # The studio sends one message at a time, after the last one's `end`: a thread still
                    # alive here is only finishing (at SCHED_IDLE beside training it may wait seconds for
                    # the CPU), so wait for it rather than refusing a message nobody else is answering.
                    busy.join(timeout=60)
                if busy is not None and busy.is_alive():
                    emit(
                        int(req.get("id", 0)), "error",
                        message="the chat is still finishing the last reply; send yours again in a moment",
                    )  # fmt: skip
                    continue
                worker.stop.clear()
                busy = threading.Thread(target=worker.generate, args=(req,), daemon=True)
                busy.start()


if __name__ == "__main__":
    sys.exit(main())
