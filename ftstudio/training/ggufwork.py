"""The steps of a GGUF export that run in a process of their own (`python -m ftstudio.training.ggufwork`):
llama.cpp's own converter, its quantizer, and the measure of how closely the file agrees with the model
it came from. gguf.py starts them; a separate process keeps the converter's copy of gguf-py off this
interpreter's path, gives the memory of a whole model back when it ends, and can be stopped by a signal
(a cancelled export) without leaving a thread behind.

    convert TOOLS MODEL_DIR OUT_FILE OUTTYPE NAME    convert_hf_to_gguf.py, f16 | q8_0 | f32
    quantize IN_FILE OUT_FILE QUANT                  llama_model_quantize, from libllama (llama-cpp-python)
    agree GGUF MODEL_DIR PROMPTS_JSON OUT_JSON N     greedy answers of both, and top-1 agreement

A problem a person can act on (an architecture or tokenizer the converter does not know) ends the
process with exit code PROBLEM and one line on stderr that starts with PREFIX; gguf.py shows that line.
A disk that filled up ends it with DISK_FULL (numpy's short writes carry no errno, so the disk is asked).
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

PROBLEM = 3
DISK_FULL = 4
PREFIX = "ftstudio-gguf: "
LLAMA_FTYPES = {"f16": 1, "q8_0": 7, "q4_k_m": 15}
"""llama.h's llama_ftype values for the quantizations offered."""


class Problem(Exception):
    """Something about the model that the export cannot handle; the message says what and what to do."""


def _qwen2_split() -> str:
    from ftstudio.training.builtin import _QWEN2_SPLIT

    return _QWEN2_SPLIT


def pre_tokenizer_name(model_dir: Path) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a tokenizer its converter does not list, when it is one llama.cpp
    implements: today Qwen2's split (builtin:tiny and tokenizers built the same way). The converter recognises
    tokenizers by a hash of the ids they give a test text, so a new vocabulary with a known split is unknown to it."""
    try:
        pre = json.loads((model_dir / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if isinstance(s, dict) and s.get("type") == "Split"]
    byte_level = [s for s in steps if isinstance(s, dict) and s.get("type") == "ByteLevel"]
    if len(splits) == 1 and byte_level and (splits[0].get("pattern") or {}).get("Regex") == _qwen2_split():
        return "qwen2"
    return None


def convert(tools: Path, model_dir: Path, out_file: Path, outtype: str, name: str) -> None:
    sys.path.insert(0, str(tools))
    sys.path.insert(1, str(tools / "gguf-py"))
    import conversion
    import conversion.base as base

    config = json.loads((model_dir / "config.json").read_text())
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    known = getattr(conversion, "TEXT_MODEL_MAP", None)
    if not archs or (known is not None and archs[0] not in known):
        raise Problem(
            f"llama.cpp's converter does not know the architecture {(archs or ['(none named)'])[0]!r}, so this "
            "model cannot be written as GGUF; export it with --format merged and serve it with transformers or vLLM"
        )
    original = base.TextModel.get_vocab_base_pre

    def known_pre(self: Any, tokenizer: Any) -> str:
        try:
            return str(original(self, tokenizer))
        except NotImplementedError:
            name_ = pre_tokenizer_name(model_dir)
            if name_ is None:
                raise Problem(
                    "llama.cpp's converter does not recognise this model's tokenizer (its pre-tokenizer is not one it "
                    "lists), so a GGUF of it would split text differently; export it with --format merged instead"
                ) from None
            return name_

    base.TextModel.get_vocab_base_pre = known_pre
    script = tools / "convert_hf_to_gguf.py"
    sys.argv = [str(script), str(model_dir), "--outfile", str(out_file), "--outtype", outtype, "--model-name", name]
    runpy.run_path(str(script), run_name="__main__")


def quantize(in_file: Path, out_file: Path, quant: str) -> None:
    import ctypes
    import os

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[quant]
    params.nthread = len(os.sched_getaffinity(0))
    code = llama_cpp.llama_model_quantize(str(in_file).encode(), str(out_file).encode(), ctypes.byref(params))
    if code != 0:
        raise OSError(f"llama.cpp's quantizer failed (code {code}) writing {out_file.name}")


def agree(gguf: Path, model_dir: Path, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Both models answer each prompt (token ids, rendered with the training template) greedily; then each reads
    transformers' answer, and at every position the two models' most likely next tokens are compared."""
    import os

    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    longest = max((len(p) for p in prompts), default=1) + new_tokens + 1
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=max(longest, 64), logits_all=True, n_threads=len(os.sched_getaffinity(0)),
        verbose=False, seed=0,
    )  # fmt: skip
    vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def eog(token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(vocab, token))

    same = matches = positions = 0
    rows = []
    for ids in prompts:
        with torch.no_grad():
            hf: list[int] = []
            seq = torch.tensor([ids])
            for _ in range(new_tokens):  # greedy by hand: stop where llama.cpp stops (any end-of-generation token)
                nxt = int(model(seq).logits[0, -1].argmax())
                hf.append(nxt)
                if eog(nxt):
                    break
                seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        ll: list[int] = []
        for tok in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            ll.append(int(tok))
            if eog(tok) or len(ll) >= new_tokens:
                break
        full = ids + hf
        llm.reset()
        llm.eval(full)
        top = np.asarray(llm.scores[: len(full)]).argmax(axis=-1)
        hits = sum(int(top[len(ids) - 1 + i] == t) for i, t in enumerate(hf))
        matches += hits
        positions += len(hf)
        same += int(ll == hf)
        rows.append({"prompt_tokens": len(ids), "transformers": hf, "llama_cpp": ll, "top1_hits": hits})
    return {
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "same_greedy": same,
        "top1_agreement": matches / positions if positions else None,
        "rows": rows,
    }


def main(argv: list[str]) -> int:
    try:
        if argv[0] == "convert":
            convert(Path(argv[1]), Path(argv[2]), Path(argv[3]), argv[4], argv[5])
        elif argv[0] == "quantize":
            quantize(Path(argv[1]), Path(argv[2]), argv[3])
        elif argv[0] == "agree":
            prompts = json.loads(Path(argv[3]).read_text())
            result = agree(Path(argv[1]), Path(argv[2]), prompts, int(argv[5]))
            Path(argv[4]).write_text(json.dumps(result))
        else:
            print(f"{PREFIX}unknown step {argv[0]!r}", file=sys.stderr)
            return 2
    except Problem as e:
        print(f"{PREFIX}{e}", file=sys.stderr, flush=True)
        return PROBLEM
    except OSError as e:
        import errno
        import shutil
        import traceback

        traceback.print_exc()
        out = Path({"convert": argv[3], "quantize": argv[2]}.get(argv[0], argv[-2]))  # the file the step writes
        if e.errno in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(out.parent).free < 1 << 20:
            return DISK_FULL
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
