"""What a model will learn from a dataset, before any training (`ftstudio data inspect`,
GET /api/datasets/{name}/inspect).

Every row goes through the trainer's own code: `data.py` reads and shapes it, and the row builder of
the method turns it into token ids and labels (`batches.tokenize` for sft and pretrain,
`preference.rows_for` for dpo, orpo and kto, `grpo.prompt_row` for grpo). Each row is built once
without a length limit, and `max_length` is applied the way the trainer applies it: the ids and labels
the trainer would see are the first `max_length` of those. What that cut costs is counted from there:
rows cut, rows that lose their whole response (the trainer skips those), response tokens lost.

The report:

    shape, rows          the detected shape, rows read, usable and skipped (with the first problems)
    view                 the first rows as the trainer sees them: ids, and whether each carries the loss
    lengths              prompt, response and total tokens: a histogram each, median, 95th percentile, max
    truncation           rows over max_length, rows that lose every response token, response tokens lost
    duplicates           exact (the same training content) and near (MinHash over character 5-grams)
    leakage              held-out prompts (evaluation.prompts) and validation rows found in the training rows
    cost                 tokens per epoch, as trained (after the cut)

Rows are read one at a time; what is kept per row is three lengths and an 8-byte hash, so memory grows
slowly with the file. Near duplicates are looked for among the first NEAR_ROWS rows (MinHash costs a few
milliseconds a row in Python); the report says how many were compared.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftstudio.training.data import Example, detect_format, read_rows, to_example

IGNORE = -100
VERSION = 1
CACHE_KEEP = 200
"""Reports kept in the cache, newest first."""
"""Part of the cache key: a report cached by an older inspector is computed again."""
NEAR_ROWS = 50_000
NEAR_THRESHOLD = 0.8
"""Jaccard similarity of character 5-grams from which two rows count as near duplicates."""
NUM_PERM = 64
VIEW_ROWS = 20
SHOWN = 10
"""Examples listed for each finding (the counts cover all)."""
BINS = 24
UNLIMITED = 1 << 30
TRUNCATION_WARNING = 0.05
"""A share of response tokens lost to max_length above which the report (and submit) warns."""


@dataclass
class Sequence:
    """One sequence the trainer trains on: its ids and, for each, whether the loss is taken on it."""

    ids: list[int]
    trained: list[bool]


def sequences(method: str, example: Example, tokenizer: Any) -> list[Sequence]:
    """The sequences `method` builds from `example`, without a length limit, by the trainer's own code."""
    if method in ("dpo", "orpo", "kto"):
        from ftstudio.training.preference import rows_for

        out = []
        for row in rows_for(method, example, tokenizer, UNLIMITED):
            prompt = row["prompt_ids"]
            for key in ("chosen_ids", "rejected_ids", "completion_ids"):
                if key in row:
                    out.append(Sequence(prompt + row[key], [False] * len(prompt) + [True] * len(row[key])))
        return out
    if method == "grpo":
        from ftstudio.training.batches import render
        from ftstudio.training.grpo import prompt_row

        row = prompt_row(example, tokenizer, UNLIMITED)
        ids = tokenizer(render(tokenizer, row["prompt"], generation_prompt=True), add_special_tokens=False)["input_ids"]
        return [Sequence(ids, [False] * len(ids))]  # the completions are sampled while training
    from ftstudio.training.batches import tokenize

    t = tokenize(example, tokenizer, UNLIMITED)
    return [Sequence(t.input_ids, [label != IGNORE for label in t.labels])]


def cache_dir() -> Path:
    """Where reports are kept: one cache per machine user (XDG_CACHE_HOME), since a report depends only on the file
    contents and the settings, not on a studio's data home."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ftstudio" / "inspect"


def cache_key(settings: dict[str, Any], files: list[Path | None]) -> str:
    """What a report depends on: the settings and the content of each file (a folder: its files' names, sizes
    and modification times, which is what a saved dataset changes when it is saved again)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        h.update(b"\0")
        if path is None:
            continue
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                st = f.stat()
                h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            continue
        if not path.is_file():
            continue  # reading it says what is wrong with it
        h.update(file_digest(path))
    return h.hexdigest()[:32]


_DIGESTS: dict[tuple[str, int, int, int], bytes] = {}


def file_digest(path: Path) -> bytes:
    """The sha256 of a file's content, remembered by its path, inode, size and modification time: the form asks the
    inspector and the time estimate about the same file again and again, and a large one takes seconds to read."""
    st = path.stat()
    seen = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if seen not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if len(_DIGESTS) > 256:
            _DIGESTS.clear()
        _DIGESTS[seen] = h.digest()
    return _DIGESTS[seen]


def content_key(example: Example) -> str:
    """What a row teaches, as text: two rows with the same key train the same thing."""
    return json.dumps([example.messages, example.text, example.chosen, example.rejected, example.completion])


def content_text(example: Example) -> str:
    """The words of a row, without its structure: what near duplicates are compared on."""
    parts = [m["content"] for m in example.messages]
    return "\n".join([*parts, example.text, example.chosen, example.rejected, example.completion]).strip()


def prompt_text(example: Example) -> str:
    """The prompt of a row (everything before the reply that is trained, or the text itself)."""
    messages = example.messages
    if messages and messages[-1]["role"] == "assistant" and not (example.chosen or example.completion):
        messages = messages[:-1]
    return "\n".join(m["content"] for m in messages) if messages else example.text


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _minhash(text: str) -> Any:
    from datasketch import MinHash

    norm = _normal(text)
    grams = {norm[i : i + 5] for i in range(max(1, len(norm) - 4))}
    m = MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch([g.encode() for g in grams])
    return m


def _histogram(values: array[int], top: int) -> dict[str, Any]:
    width = max(1, -(-top // BINS))
    counts = [0] * BINS
    for v in values:
        counts[min(v // width, BINS - 1)] += 1
    return {"bin_width": width, "counts": counts}


def _figures(values: array[int]) -> dict[str, int]:
    if not values:
        return {"median": 0, "p95": 0, "max": 0}
    ordered = sorted(values)
    return {
        "median": int(statistics.median(ordered)),
        "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
        "max": ordered[-1],
    }


def _examples(path: Path, shape: str | None, prompts: bool = False) -> Iterator[tuple[str, str, Example | None, str]]:
    """(where, shape, example or None, problem) for every row, the shape detected from the first row."""
    for where, row in read_rows(path):
        if shape is None:
            shape = detect_format(row, f"{path.name} {where}", prompts=prompts)
        try:
            yield where, shape, to_example(row, shape, f"{path.name} {where}", prompts=prompts), ""
        except ValueError as e:
            yield where, shape, None, str(e)


def _view(tokenizer: Any, seq: Sequence, max_length: int) -> dict[str, Any]:
    """A row as the trainer sees it: ids and trained flags up to the cut, and its text in runs of the same kind."""
    ids, trained = seq.ids[:max_length], seq.trained[:max_length]
    runs: list[dict[str, Any]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            runs.append({"text": tokenizer.decode(ids[start:i]), "trained": trained[start]})
            start = i
    dropped = seq.ids[max_length:]
    if dropped:
        runs.append({"text": tokenizer.decode(dropped), "trained": False, "dropped": True})
    return {"ids": ids, "trained": trained, "runs": runs, "dropped_tokens": len(dropped)}


def inspect_data(
    path: Path,
    tokenizer: Any,
    *,
    method: str = "sft",
    max_length: int = 1024,
    data_format: str = "auto",
    held_out: Path | None = None,
    validation: Path | None = None,
    view_rows: int = VIEW_ROWS,
) -> dict[str, Any]:
    """The report on the dataset at `path` for training `method` with `tokenizer` at `max_length`."""
    from datasketch import MinHashLSH

    from ftstudio.training.batches import prepare_tokenizer

    prepare_tokenizer(tokenizer)
    shape = None if data_format == "auto" else data_format
    prompt_len, response_len, total_len = array("I"), array("I"), array("I")
    problems: list[str] = []
    view: list[dict[str, Any]] = []
    # Per row, a few numbers only (about 30 bytes): a million rows are tens of MB, whatever their text.
    keys, prompt_keys, places = array("Q"), array("Q"), array("I")
    window: set[int] = set()  # the keys among the rows compared for near duplicates (exact ones are not near)
    unit = "line"
    near: list[dict[str, Any]] = []
    near_count = rows = usable = skipped = 0
    truncated = whole_lost = lost_tokens = response_tokens = tokens_per_epoch = 0
    lsh = MinHashLSH(threshold=NEAR_THRESHOLD, num_perm=NUM_PERM)
    prompt_lsh = MinHashLSH(threshold=NEAR_THRESHOLD, num_perm=NUM_PERM)
    compared = 0
    detected = shape or "?"
    for where, row_shape, example, problem in _examples(path, shape):
        rows += 1
        detected = row_shape
        if example is None:
            skipped += 1
            if len(problems) < SHOWN:
                problems.append(f"{path.name} {where}: {problem}")
            continue
        try:
            seqs = sequences(method, example, tokenizer)
        except ValueError as e:
            skipped += 1
            if len(problems) < SHOWN:
                problems.append(f"{path.name} {where}: {e}")
            continue
        usable += 1
        # Lengths and the cut, by the longest sequence of the row (a pair trains both replies).
        longest = max(seqs, key=lambda s: len(s.ids))
        trained_at = [i for i, t in enumerate(longest.trained) if t]
        first_trained = trained_at[0] if trained_at else len(longest.ids)
        prompt_len.append(first_trained)
        response_len.append(len(trained_at))
        total_len.append(len(longest.ids))
        for seq in seqs:
            kept = sum(seq.trained[:max_length])
            response = sum(seq.trained)
            response_tokens += response
            lost_tokens += response - kept
            tokens_per_epoch += min(len(seq.ids), max_length)
        if len(longest.ids) > max_length:
            truncated += 1
            if sum(longest.trained) and not sum(longest.trained[:max_length]):
                whole_lost += 1
        if len(view) < view_rows:
            view.append({"where": f"{path.name} {where}", **_view(tokenizer, longest, max_length)})
        # Duplicates: the same content exactly (counted at the end), else nearly (among the first NEAR_ROWS rows).
        label = f"{path.name} {where}"
        unit, _, number = where.partition(" ")
        key = _hash(_normal(content_key(example)))
        keys.append(key)
        prompt_keys.append(_hash(_normal(prompt_text(example))))
        places.append(int(number) if number.isdigit() else len(places) + 1)
        if compared < NEAR_ROWS and key not in window:
            window.add(key)
            compared += 1
            m = _minhash(content_text(example))
            matches = lsh.query(m)
            if matches:
                near_count += 1
                if len(near) < SHOWN:
                    near.append({"row": label, "like": sorted(matches)[0]})
            lsh.insert(label, m)
            prompt_lsh.insert(label, _minhash(prompt_text(example)))

    def where_of(i: int) -> str:
        return f"{path.name} {unit} {places[i]}"

    exact_count, exact = _exact_duplicates(keys, where_of)
    prompts_seen = _first_of(prompt_keys, where_of)
    leakage = {
        name: _leaks(source, prompts_seen, prompt_lsh, prompts=name == "held_out")
        for name, source in (("held_out", held_out), ("validation", validation))
        if source is not None
    }
    top = max([max_length, *total_len]) if total_len else max_length
    share = lost_tokens / response_tokens if response_tokens else 0.0
    warnings = []
    if share > TRUNCATION_WARNING:
        warnings.append(
            {
                "kind": "truncation",
                "message": f"{share * 100:.1f}% of the response tokens fall beyond max_length {max_length} and are "
                f"never trained on ({truncated} rows cut, {whole_lost} of them entirely); raise data.max_length "
                f"to {_suggest(total_len)} to keep 95% of rows whole",
                "fix": {"data.max_length": _suggest(total_len)},
            }
        )
    if exact_count:
        warnings.append(
            {
                "kind": "duplicates",
                "message": f"{exact_count} rows repeat an earlier row exactly; each repeat weighs "
                "that row more in training",
            }
        )
    for name, leak in leakage.items():
        if leak["leaked"]:
            what = "held-out prompts" if name == "held_out" else "validation rows"
            warnings.append(
                {
                    "kind": f"leakage_{name}",
                    "message": f"{leak['leaked']} of {leak['rows']} {what} also appear in the "
                    "training rows, so their scores measure memory, not generalisation",
                }
            )
    return {
        "path": str(path),
        "format": detected,
        "method": method,
        "max_length": max_length,
        "rows": rows,
        "usable_rows": usable,
        "skipped_rows": skipped,
        "problems": problems,
        "view": view,
        "lengths": {
            name: {**_figures(values), "histogram": _histogram(values, top)}
            for name, values in (("prompt", prompt_len), ("response", response_len), ("total", total_len))
        },
        "truncation": {
            "rows": truncated,
            "whole_response_lost": whole_lost,
            "response_tokens_lost": lost_tokens,
            "response_tokens": response_tokens,
            "share_lost": share,
        },
        "duplicates": {
            "exact": exact_count,
            "near": near_count,
            "compared_for_near": compared,
            "exact_examples": exact,
            "near_examples": near,
        },
        "leakage": leakage,
        "cost": {"tokens_per_epoch": tokens_per_epoch},
        "warnings": warnings,
    }


def _suggest(total_len: array[int]) -> int:
    """A max_length that keeps 95% of rows whole, rounded up to a multiple of 64."""
    p95 = _figures(total_len)["p95"]
    return max(64, -(-p95 // 64) * 64)


def _exact_duplicates(keys: array[int], where_of: Any) -> tuple[int, list[dict[str, str]]]:
    """How many rows repeat an earlier one, and the first few with the row each repeats."""
    import numpy as np

    if not keys:
        return 0, []
    values = np.frombuffer(keys, dtype=np.uint64)
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    original = first[inverse]
    repeats = np.nonzero(original != np.arange(len(values)))[0]
    shown = [{"row": where_of(int(i)), "same_as": where_of(int(original[i]))} for i in repeats[:SHOWN]]
    return len(repeats), shown


def _first_of(keys: array[int], where_of: Any) -> Any:
    """A lookup from a key to the row it first appeared in (None for a key no row has)."""
    import numpy as np

    values = np.frombuffer(keys, dtype=np.uint64) if keys else np.zeros(0, dtype=np.uint64)
    unique, first = np.unique(values, return_index=True)

    def lookup(key: int) -> str | None:
        i = int(np.searchsorted(unique, np.uint64(key)))
        return where_of(int(first[i])) if i < len(unique) and int(unique[i]) == key else None

    return lookup


def _leaks(source: Path, prompts_seen: Any, lsh: Any, *, prompts: bool) -> dict[str, Any]:
    """How many rows of `source` (held-out prompts or validation rows) have their prompt among the training rows'."""
    leaked = rows = 0
    examples: list[dict[str, Any]] = []
    for where, _, example, _ in _examples(source, None, prompts=prompts):
        if example is None:
            continue
        rows += 1
        text = prompt_text(example)
        same = prompts_seen(_hash(_normal(text)))
        match = same or next(iter(sorted(lsh.query(_minhash(text)))), None)
        if match:
            leaked += 1
            if len(examples) < SHOWN:
                examples.append({"row": f"{source.name} {where}", "exact": bool(same), "training_row": match})
    return {"path": str(source), "rows": rows, "leaked": leaked, "examples": examples}


def kept_rows(
    path: Path, drop: str, *, data_format: str = "auto", held_out: list[Path] | None = None
) -> Iterator[tuple[dict[str, Any], bool]]:
    """Every row of `path` as it is in the file, with whether a fix keeps it: `drop="duplicates"` drops each row
    that repeats an earlier one exactly; `drop="leaked"` drops each row whose prompt is, exactly or nearly, one
    of the rows of `held_out` (held-out prompts, a validation file). A row the trainer cannot read is kept."""
    from datasketch import MinHashLSH

    seen: set[int] = set()
    leaked: set[int] = set()
    lsh = MinHashLSH(threshold=NEAR_THRESHOLD, num_perm=NUM_PERM)
    for source in held_out or []:
        for i, (_, _, example, _) in enumerate(_examples(source, None, prompts=True)):
            if example is not None:
                text = prompt_text(example)
                leaked.add(_hash(_normal(text)))
                lsh.insert(f"{source}:{i}", _minhash(text))
    shape = None if data_format == "auto" else data_format
    for where, row in read_rows(path):
        if shape is None:
            shape = detect_format(row, f"{path.name} {where}")
        try:
            example = to_example(row, shape, f"{path.name} {where}")
        except ValueError:
            yield row, True
            continue
        if drop == "duplicates":
            key = _hash(_normal(content_key(example)))
            yield row, key not in seen
            seen.add(key)
        else:
            text = prompt_text(example)
            yield row, not (_hash(_normal(text)) in leaked or lsh.query(_minhash(text)))
