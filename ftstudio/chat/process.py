"""Chatting with a fine-tune: what a message may ask, which weights answer it, and the worker
process that holds the model (`ftstudio.chatworker`). The page (POST /api/tasks/{id}/chat, streamed
as server-sent events) and `ftstudio chat TASK` go through the same `ChatWorker.chat`.

Any task with weights can be tried: a completed task answers with its adapter; a paused,
interrupted, failed or cancelled one with a complete checkpoint ("try checkpoint 400"), the newest
unless one is named.

The worker goes where training is not (`place`): a GPU no training task holds, else the CPU while
a training slot is free (`studio start --slots`). Training always comes first: the chat holds no
lease, so it never makes a task wait, and a task that starts where the chat is (its GPU, the last
free slot, or anything while it has the whole CPU) stops the worker before the task's runner starts
(`yield_to`; a task another process started: within WATCH_S). When training holds every GPU and
slot, a message is refused (409) rather than slowing it, unless it asks to answer beside training
(`beside_training`): then the worker takes only CPU time nothing else wants, one thread under
SCHED_IDLE, and training pays for some (bench/bench_chat.py, docs/benchmarks.md). It is one
process, answering one message at a time; it stays loaded between messages and exits after
`idle_s` without one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ftstudio.checkpoints import find_resume_checkpoint, is_complete
from ftstudio.errors import Conflict, NotFound, Problem, ValidationError
from ftstudio.home import TaskDir, write_json_atomic
from ftstudio.taskfiles import has_result

log = logging.getLogger("ftstudio.chat")

IDLE_S = 600.0
"""How long the worker keeps the model loaded without a message (FTSTUDIO_CHAT_IDLE_S)."""
LOAD_S = 600.0
"""The longest the first answer may wait while the worker loads a model."""
QUIET_S = 120.0
"""The longest a reply may go without a token before the worker is called stuck and restarted."""
POLL_S = 0.25
"""How often a reply's threads look whether it was stopped."""
BUSY_WAIT_S = 30.0
"""How long a message waits for the one before it to be answered before it is refused."""
STOP_S = 30.0
"""How long the worker has to end a stopped reply before it is killed (and started again for the next)."""
WATCH_S = 1.0
"""How often a running worker looks whether training has taken its GPU or slot."""
ROLES = ("user", "assistant")
CHECKPOINT_RE = re.compile(r"checkpoint-\d{1,12}")


class ChatBusy(Conflict):
    """The worker is answering another message (HTTP 409)."""


class ChatWaits(Conflict):
    """Training holds every GPU and slot, and the message did not ask to answer beside it (HTTP 409)."""

    code = "chat_waits_for_training"


class _Taken(Exception):
    """Training took the place a message was given before its worker started."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id


@dataclass(frozen=True)
class Machine:
    """What training holds on this machine now, as the chat sees it."""

    gpus: tuple[int, ...] = ()
    slots: int = 1
    held: Mapping[str, str] = field(default_factory=dict)
    """Resource (`gpu:N`, `slot:N`) -> the task holding it."""

    @property
    def slot_free(self) -> bool:
        return sum(r.startswith("slot:") for r in self.held) < self.slots


@dataclass(frozen=True)
class Placement:
    """Where the worker runs: a GPU, or the CPU; `humble`: one thread under SCHED_IDLE, taking only CPU
    time that training does not want."""

    gpu: int | None = None
    humble: bool = False

    @property
    def device(self) -> str:
        if self.gpu is not None:
            return f"GPU {self.gpu}"
        return "the CPU, beside training (lowest priority)" if self.humble else "the CPU"


def taken_by(p: Placement, m: Machine, *, beside: bool) -> str | None:
    """The task that now holds what the worker at `p` needs, or None while `p` is still its to use."""
    if p.gpu is not None:
        return m.held.get(f"gpu:{p.gpu}")
    if not p.humble:
        return next(iter(m.held.values()), None)  # all of the CPU: only while nothing trains
    if beside or m.slot_free:
        return None
    return next((t for r, t in m.held.items() if r.startswith("slot:")), None)


def place(m: Machine, *, beside: bool, keep: Placement | None = None) -> Placement:
    """Where the next message is answered: `keep` (the running worker's place) while it is still free
    and nothing better is; else a free GPU; else the CPU when a training slot is free (all of it when
    nothing trains, else only its idle time: GPU tasks need a core each to feed their GPU); else, with
    `beside`, the CPU's idle time. ChatWaits when training holds everything and `beside` is not asked."""
    fresh: Placement | None = None
    free = [g for g in m.gpus if f"gpu:{g}" not in m.held]
    if free:
        fresh = Placement(gpu=free[0])
    elif m.slot_free:
        fresh = Placement(humble=bool(m.held))
    elif beside:
        fresh = Placement(humble=True)
    if keep is not None and taken_by(keep, m, beside=beside) is None:
        better = fresh is not None and (
            (keep.gpu is None and fresh.gpu is not None) or (keep.humble and not fresh.humble)
        )
        if not better:
            return keep
    if fresh is None:
        raise ChatWaits(_waiting(m))
    return fresh


BESIDE_HOW = (
    'the page\'s "Answer beside training", /beside in `ftstudio chat` (or --beside-training), '
    '"beside_training": true in the API'
)


def _waiting(m: Machine) -> str:
    tasks = list(dict.fromkeys(m.held.values()))
    if len(tasks) == 1:
        who, end = f"task {tasks[0]} holds", "it has finished or is paused"
    else:
        more = f" and {len(tasks) - 3} more" if len(tasks) > 3 else ""
        who, end = f"tasks {', '.join(tasks[:3])}{more} hold", "one has finished or is paused"
    what = (
        "every GPU and training slot"
        if m.gpus
        else f"this studio's {m.slots} training slot" + ("s" if m.slots != 1 else "")
    )
    return (
        f"{who} {what}, and a chat now would take from its training: try again when {end}, or answer beside "
        f"training at the lowest priority ({BESIDE_HOW})"
    )


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    system: str = ""
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    compare: bool = False
    """Answer a second time with the adapter switched off: the base model's answer, side by side."""
    checkpoint: str = ""
    """`checkpoint-N` to answer with; empty: the adapter, or the newest complete checkpoint."""
    seed: int | None = None
    beside_training: bool = False
    """When training holds every GPU and slot, answer anyway with the CPU time it leaves idle (it slows
    training some: docs/benchmarks.md), rather than being refused."""


def parse_request(body: Any) -> ChatRequest:
    """A chat request from JSON, or ValidationError naming every problem (a 422, one line each)."""
    problems: list[Problem] = []
    if not isinstance(body, Mapping):
        raise ValidationError(Problem("body", "must be a JSON object with messages"))

    def bad(field_name: str, message: str) -> None:
        problems.append(Problem(field_name, message))

    known = {
        "messages", "system", "temperature", "top_p", "max_new_tokens", "compare", "checkpoint", "seed",
        "beside_training",
    }  # fmt: skip
    for key in body:
        if key not in known:
            bad(str(key)[:40], f"unknown field; a chat request takes {', '.join(sorted(known))}")
    messages = body.get("messages")
    out: list[dict[str, str]] = []
    if not isinstance(messages, list) or not messages:
        bad("messages", "must be a list of {role, content}, ending with the user's message")
    elif len(messages) > 200:
        bad("messages", f"at most 200 messages (got {len(messages)}); start a new conversation")
    else:
        total = 0
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                bad(f"messages[{i}]", "must be {role: user|assistant, content: text}")
                continue
            total += len(m["content"])
            out.append({"role": str(m["role"]), "content": m["content"]})
        if total > 100_000:
            bad("messages", f"at most 100,000 characters in all (got {total:,}); start a new conversation")
        if out and out[-1]["role"] != "user":
            bad("messages", "the last message must be the user's")
    system = body.get("system", "")
    if not isinstance(system, str) or len(system) > 20_000:
        bad("system", "must be text of at most 20,000 characters")

    def number(name: str, default: float, lo: float, hi: float, *, low_open: bool = False) -> float:
        value = body.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            bad(name, f"must be a number from {lo:g} to {hi:g}")
            return default
        if value < lo or value > hi or (low_open and value == lo):
            bad(name, f"must be {'above' if low_open else 'at least'} {lo:g} and at most {hi:g} (got {value:g})")
            return default
        return float(value)

    temperature = number("temperature", 0.7, 0, 2)
    top_p = number("top_p", 0.9, 0, 1, low_open=True)
    max_new = body.get("max_new_tokens", 256)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= 4096:
        bad("max_new_tokens", "must be a whole number from 1 to 4096")
        max_new = 256
    compare = body.get("compare", False)
    if not isinstance(compare, bool):
        bad("compare", "must be true or false")
    beside = body.get("beside_training", False)
    if not isinstance(beside, bool):
        bad("beside_training", "must be true or false")
    checkpoint = body.get("checkpoint", "") or ""
    if not isinstance(checkpoint, str) or (checkpoint and not CHECKPOINT_RE.fullmatch(checkpoint)):
        bad("checkpoint", "must be a checkpoint's name, e.g. checkpoint-400")
        checkpoint = ""
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        bad("seed", "must be a whole number from 0 to 4294967295")
        seed = None
    if problems:
        raise ValidationError(problems)
    return ChatRequest(out, system, temperature, top_p, int(max_new), bool(compare), checkpoint, seed, beside is True)


def weights_of(task_id: str, status: str, tdir: TaskDir, checkpoint: str = "") -> Path:
    """The folder whose adapter answers: the named checkpoint, the final adapter, or the newest
    complete checkpoint. NotFound says why there is none."""
    if checkpoint:
        path = tdir.checkpoints / checkpoint
        if not (path.is_dir() and not path.is_symlink() and is_complete(path)):
            raise NotFound(f"task {task_id} has no complete {checkpoint}; pick one of its saved checkpoints")
        return path
    if status == "completed" and has_result(tdir.adapter):
        return tdir.adapter
    newest = find_resume_checkpoint(tdir.checkpoints)
    if newest is None:
        raise NotFound(
            f"task {task_id} has no adapter or checkpoint yet; chat works once training has saved one (it is {status})"
        )
    return newest


@dataclass
class _Running:
    proc: subprocess.Popen[bytes]
    placement: Placement
    task: str = ""
    """The task whose weights the last message asked for (shown in the queue)."""
    lines: queue.Queue[dict[str, Any] | None] = field(default_factory=queue.Queue)
    beside: bool = False
    """The message being answered asked to answer beside training."""
    yielded_to: str | None = None
    """The task the worker was stopped for: training took its GPU or slot."""


class ChatReply:
    """One reply as it streams: iterate it for the events, or take them in batches; `cancel()` (any
    thread) stops it."""

    def __init__(self, number: int = 0, task: str = "") -> None:
        self.number = number
        """Which reply of this worker's it is: its `worker` event says it, and `ChatWorker.stop` takes it."""
        self.task = task
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.cancelled = threading.Event()
        self._ended = False

    def next_batch(self) -> list[dict[str, Any]] | None:
        """The next event and every one already behind it (one write to the page for all of them:
        fewer wake-ups of the studio while a task trains beside the chat); None once the reply ended."""
        while not self._ended:
            try:
                first = self.events.get(timeout=POLL_S)
            except queue.Empty:
                if self.cancelled.is_set():
                    self._ended = True
                continue
            batch: list[dict[str, Any]] = []
            event: dict[str, Any] | None = first
            while event is not None:
                batch.append(event)
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    return batch
            self._ended = True
            return batch or None
        return None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while (batch := self.next_batch()) is not None:
            yield from batch

    def cancel(self) -> None:
        self.cancelled.set()


class ChatWorker:
    """The studio's side of the worker: starts it when a message comes, streams its answer, stops it.

    `machine()`: what training holds now (the store's leases); the worker goes where `place` says, and
    is stopped when training takes that place (`yield_to`, and a look every WATCH_S)."""

    def __init__(
        self,
        log_path: Path,
        *,
        machine: Callable[[], Machine] | None = None,
        idle_s: float | None = None,
        env: Mapping[str, str] | None = None,
        registry: Path | None = None,
    ) -> None:
        self.log_path = log_path
        self.machine = machine or Machine
        self.registry = registry
        env_idle = os.environ.get("FTSTUDIO_CHAT_IDLE_S", "")
        self.idle_s = idle_s if idle_s is not None else float(env_idle) if env_idle else IDLE_S
        self.env = dict(env if env is not None else os.environ)
        self._lock = threading.Lock()  # one message at a time
        self._placing = threading.Lock()  # a worker's start, or a launch's look at it: one at a time
        self._running: _Running | None = None
        self._answering: ChatReply | None = None  # the reply holding `_lock`
        self._next = 0

    # -- the process ---------------------------------------------------------

    def _start(self, placement: Placement) -> _Running:
        from ftstudio.execution.procs import TASK_ENV

        env = {k: v for k, v in self.env.items() if k not in (TASK_ENV, "FTSTUDIO_ATTEMPT")}
        gpu = "" if placement.gpu is None else str(placement.gpu)
        env.update(PYTHONUNBUFFERED="1", FTSTUDIO_CHAT_WORKER="1", CUDA_VISIBLE_DEVICES=gpu)
        if placement.humble:
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FTSTUDIO_CHAT_THREADS="1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as errors:
            # Not die_with_parent: that fires when the starting *thread* ends (a server's worker thread
            # may). The worker ends when its stdin closes instead, which is when this process goes.
            def child() -> None:
                # Beside training, training first: the chat takes only CPU time nothing else wants
                # (SCHED_IDLE, and nice 19 where that policy is missing), and one thread, so it never
                # holds a core that a training step's threads are waiting to get back.
                os.nice(19 if placement.humble else 5)
                if placement.humble:
                    with contextlib.suppress(AttributeError, OSError):
                        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

            proc = subprocess.Popen(
                [sys.executable, "-m", "ftstudio.chatworker", "--idle", f"{self.idle_s:g}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                env=env,
                preexec_fn=child,
                close_fds=True,
            )
        running = _Running(proc, placement)
        threading.Thread(target=self._read, args=(running,), daemon=True, name="chat-worker-reader").start()
        threading.Thread(target=self._watch, args=(running,), daemon=True, name="chat-worker-watch").start()
        log.info("chat worker started (pid %s) on %s", proc.pid, placement.device)
        return running

    def _watch(self, running: _Running) -> None:
        """Stop the worker once training takes its GPU or slot: a task another process started (the
        CLI, a second look of the queue) is seen here within WATCH_S."""
        while running.proc.poll() is None:
            time.sleep(WATCH_S)
            try:
                holder = taken_by(running.placement, self.machine(), beside=running.beside)
            except Exception:  # a locked or vanished store: look again next time
                log.debug("chat placement check failed", exc_info=True)
                continue
            if holder is not None:
                self._yield(running, holder)

    def yield_to(self, task_id: str, resources: Sequence[str]) -> None:
        """Task `task_id` is about to start on `resources`: stop the worker first if they were its place, and
        wait for it to exit (a GPU's memory is free once it has), so the task never starts beside a loaded
        chat model. Never raises: it runs in the middle of a launch."""
        with self._placing:  # no worker starts while this looks (see _alive)
            r = self._running
            if r is None or r.proc.poll() is not None:
                return
            try:
                m = self.machine()
                after = Machine(m.gpus, m.slots, {**m.held, **dict.fromkeys(resources, task_id)})
                clash = taken_by(r.placement, after, beside=r.beside) is not None
            except Exception:  # the store could not say: training first
                log.warning("could not tell whether the chat uses task %s's place; stopping it", task_id, exc_info=True)
                clash = True
            if clash:
                self._yield(r, task_id)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    r.proc.wait(timeout=5)

    def _yield(self, running: _Running, task_id: str) -> None:
        if running.yielded_to is None:
            running.yielded_to = task_id
            log.info(
                "chat worker (pid %s) stopped: task %s starts on %s",
                running.proc.pid, task_id, running.placement.device,
            )  # fmt: skip
        with contextlib.suppress(OSError):
            running.proc.kill()

    def _read(self, running: _Running) -> None:
        assert running.proc.stdout is not None
        for raw in running.proc.stdout:
            try:
                running.lines.put(json.loads(raw))
            except ValueError:
                continue
        if self.registry is not None:
            (self.registry / f"{running.proc.pid}.json").unlink(missing_ok=True)
        running.lines.put(None)  # it ended: idle timeout, a crash, or we stopped it

    def _register(self, running: _Running) -> None:
        """Say where the worker runs and for which task, in a file the queue reads (`running_chats`): the
        studio and a terminal's `ftstudio chat` each have their own worker."""
        if self.registry is None:
            return
        try:
            record = {
                "pid": running.proc.pid, "create_time": psutil.Process(running.proc.pid).create_time(),
                "device": running.placement.device, "task": running.task,
            }  # fmt: skip
            write_json_atomic(self.registry / f"{running.proc.pid}.json", record)
        except (OSError, psutil.Error):  # a full disk or a worker already gone: the queue just does not show it
            log.debug("could not record the chat worker", exc_info=True)

    def _alive(self, placement: Placement, beside: bool, task: str = "") -> _Running:
        """The worker at `placement`, started if need be. _Taken when training took that place since the
        message was placed: looked at again, under the lock `yield_to` takes, just before a start, so
        a task launched meanwhile either is seen here or sees the new worker and stops it."""
        r = self._running
        if r is not None and r.proc.poll() is None and (r.placement != placement or r.yielded_to is not None):
            self.close()  # stopped for training, or a better place is free (a GPU, the whole CPU)
        with self._placing:
            holder = taken_by(placement, self.machine(), beside=beside)
            if holder is not None:
                raise _Taken(holder)
            if self._running is None or self._running.proc.poll() is not None:
                self._running = self._start(placement)
            running = self._running
        running.beside = beside
        if running.task != task:
            running.task = task
            self._register(running)
        return running

    def pid(self) -> int | None:
        r = self._running
        return r.proc.pid if r is not None and r.proc.poll() is None else None

    def close(self) -> None:
        r, self._running = self._running, None
        if r is None:
            return
        try:
            if r.proc.stdin:
                r.proc.stdin.close()
            r.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            r.proc.kill()
            r.proc.wait()

    # -- a message -------------------------------------------------------------

    def chat(
        self, req: ChatRequest, *, base: str, weights: Path, trust_remote_code: bool = False, task_id: str = ""
    ) -> ChatReply:
        """Start answering `req`; the reply's events come from iterating the result (`worker` {device,
        reply}, `loading`, `ready`, `token`, `done`, then `end` or `error`). ChatBusy when another message
        is still being answered after BUSY_WAIT_S.

        The reply is pumped by a thread of its own, which holds the worker until the reply has ended or
        was stopped: a reader that goes away (a closed page, Ctrl-C) only has to `cancel()`, from any
        thread, and the next message is never left waiting on a reply nobody reads."""
        if not self._take_turn():
            raise ChatBusy("the chat is answering another message; send yours again when that one has finished")
        try:
            r = self._running
            keep = r.placement if r is not None and r.proc.poll() is None and r.yielded_to is None else None
            machine = self.machine()
            try:
                placement = place(machine, beside=req.beside_training, keep=keep)
            except ChatWaits:
                if r is not None and taken_by(r.placement, machine, beside=False) is not None:
                    self.close()  # loaded for an answer beside training, and this one did not ask: unload it
                raise
        except BaseException:
            self._lock.release()
            raise
        self._next += 1
        reply = self._answering = ChatReply(self._next, task_id)

        def pump() -> None:
            try:
                for event in self._chat(req, placement, base, weights, trust_remote_code, reply, task_id):
                    reply.events.put(event)
            except Exception as e:  # the worker's pipes, not the reply's words: say it and end the reply
                log.exception("chat reply failed")
                reply.events.put({"event": "error", "message": f"the chat failed: {e}"})
            finally:
                reply.events.put(None)
                self._answering = None
                self._lock.release()

        threading.Thread(target=pump, daemon=True, name="chat-reply").start()
        return reply

    def stop(self, number: int, task_id: str) -> bool:
        """Stop reply `number` of task `task_id` if it is still being answered (False: it had ended). A
        page's Stop says this before its next message is sent: a closed connection alone may reach the
        studio only after that message (seconds later on a loaded machine, after Chromium has drained
        the response for a while), which would then wait for a reply nobody had stopped (issue 20)."""
        reply = self._answering
        if reply is None or reply.number != number or reply.task != task_id:
            return False
        reply.cancel()
        return True

    def _take_turn(self) -> bool:
        """Wait for the reply before this message to end; False: it is still being answered for someone
        after BUSY_WAIT_S. A reply that was stopped (Stop, a closed page) is waited for until it has wound
        down, which takes the worker at most STOP_S before it is killed (beside training, at the lowest
        priority, it may need seconds of CPU to get there): the message typed after a Stop must not be
        refused for the reply it stopped (issue 20)."""
        if self._lock.acquire(timeout=BUSY_WAIT_S):
            return True
        before = self._answering
        return before is not None and before.cancelled.is_set() and self._lock.acquire(timeout=2 * STOP_S)

    def _chat(
        self,
        req: ChatRequest,
        placement: Placement,
        base: str,
        weights: Path,
        trust: bool,
        reply: ChatReply,
        task: str = "",
    ) -> Generator[dict[str, Any], None, None]:
        try:
            running = self._alive(placement, req.beside_training, task)
        except _Taken as taken:
            yield {"event": "error", "message": _yielded(taken.task_id, placement), "code": ChatWaits.code}
            return
        rid, cancelled = reply.number, reply.cancelled  # the worker's id for the request: the reply's number
        ended = False
        message = {
            "op": "generate", "id": rid, "base": base, "weights": str(weights), "trust_remote_code": trust,
            "messages": req.messages, "system": req.system, "temperature": req.temperature, "top_p": req.top_p,
            "max_new_tokens": req.max_new_tokens, "compare": req.compare, "seed": req.seed,
        }  # fmt: skip
        try:
            self._send(running, message)
            yield {"event": "worker", "device": running.placement.device, "reply": rid}
            loaded = False
            quiet_since = time.monotonic()
            while not cancelled.is_set():
                try:
                    item = running.lines.get(timeout=POLL_S)
                except queue.Empty:
                    if time.monotonic() - quiet_since > (QUIET_S if loaded else LOAD_S):
                        self._kill(running)
                        ended = True
                        yield {
                            "event": "error",
                            "message": "the chat worker stopped answering; it was restarted, send the message again",
                        }
                        return
                    continue
                quiet_since = time.monotonic()
                if item is None:
                    ended = True
                    code = running.proc.wait()
                    if running.yielded_to is not None:
                        why = _yielded(running.yielded_to, running.placement)
                        yield {"event": "error", "message": why, "code": ChatWaits.code}
                        return
                    yield {
                        "event": "error",
                        "message": f"the chat worker stopped unexpectedly (exit code {code}; its log: "
                        f"{self.log_path}); your next message starts it again",
                    }
                    return
                if item.get("id") != rid:
                    continue  # a stopped reply's last words
                loaded = loaded or item.get("event") in ("ready", "token")
                event = {k: v for k, v in item.items() if k != "id"}
                if event.get("event") in ("end", "error"):
                    ended = True
                yield event
                if ended:
                    return
        finally:
            if not ended:
                self._stop(running, rid)

    def _send(self, running: _Running, message: dict[str, Any]) -> None:
        assert running.proc.stdin is not None
        try:
            running.proc.stdin.write(json.dumps(message).encode() + b"\n")
            running.proc.stdin.flush()
        except OSError:
            pass  # it died: the reader says so

    def _stop(self, running: _Running, rid: int) -> None:
        """The reader went away mid-reply: stop generating, and wait for its end so the next message
        starts clean (a worker that does not stop within STOP_S is killed)."""
        self._send(running, {"op": "stop", "id": rid})
        deadline = time.monotonic() + STOP_S
        while time.monotonic() < deadline:
            try:
                item = running.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None or (item.get("id") == rid and item.get("event") in ("end", "error")):
                return
        self._kill(running)

    def _kill(self, running: _Running) -> None:
        running.proc.kill()
        running.proc.wait()
        if self._running is running:
            self._running = None


def _yielded(task_id: str, placement: Placement) -> str:
    where = f"GPU {placement.gpu}" if placement.gpu is not None else "the CPU"
    return (
        f"the chat stopped: task {task_id} started training on {where}, and training comes first; try again "
        f"when it has finished, or answer beside training at the lowest priority ({BESIDE_HOW})"
    )


def running_chats(registry: Path) -> list[dict[str, Any]]:
    """The chat workers alive now (the studio's, a terminal's): pid, device, task. A record whose process
    has gone (a studio that was SIGKILLed) is removed."""
    found = []
    for path in sorted(registry.glob("*.json")) if registry.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            alive = abs(psutil.Process(int(record["pid"])).create_time() - float(record["create_time"])) < 1e-3
        except (OSError, ValueError, psutil.Error, KeyError, TypeError):  # gone, half-written by hand, or not ours
            alive = False
        if not alive:
            path.unlink(missing_ok=True)
            continue
        found.append(
            {"pid": record["pid"], "device": str(record.get("device", "")), "task": str(record.get("task", ""))}
        )
    return found
