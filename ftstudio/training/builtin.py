"""Built-in model and dataset, so everything works with no network and no GPU.

`builtin:tiny` is a small Qwen2-architecture causal LM built here from a config,
with a byte-level BPE tokenizer trained on the bundled sample text and a
ChatML chat template. It is built once into `$FTSTUDIO_HOME/models/tiny/`: into
a temporary directory first, renamed into place when complete, so a crash never
leaves half a model. The build is deterministic: same weights, same tokenizer.

`builtin:sample` is `ftstudio/data/sample.jsonl` (see `ftstudio.training.samples`), instructions for SFT;
`builtin:preferences` is `ftstudio/data/preferences.jsonl` (see `ftstudio.training.preference_samples`), preference
pairs for dpo, orpo and kto; `builtin:math` is `ftstudio/data/math.jsonl` (see `ftstudio.training.mathdata`),
arithmetic prompts with their answers for grpo.

`resolve_model` / `resolve_dataset` turn what a user wrote into something to load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ftstudio.errors import Problem, ValidationError
from ftstudio.training.datafiles import DATASET_SUFFIXES
from ftstudio.training.mathdata import MATH_PATH
from ftstudio.training.preference_samples import PREFERENCES_PATH
from ftstudio.training.samples import SAMPLE_PATH

BUILTIN_MODELS = ("builtin:tiny",)
# Each made here by a fixed recipe (samples.py, preference_samples.py, mathdata.py), small, shipped in ftstudio/data.
BUILTIN_DATA_FILES = {
    "builtin:sample": SAMPLE_PATH,
    "builtin:preferences": PREFERENCES_PATH,
    "builtin:math": MATH_PATH,
}
BUILTIN_DATASETS = tuple(BUILTIN_DATA_FILES)

# Bump when the recipe below changes: an older build on disk is then replaced.
TINY_VERSION = 2
TINY_SEED = 0
_MARKER = "ftstudio-builtin.json"
# Small enough that the demo trains in about a minute on two CPU cores.
TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    # Larger than the usual 0.02: with random (never pretrained) weights, small embeddings cap
    # how peaked the output can get, and LoRA alone then learns the sample data only slowly.
    "initializer_range": 0.08,
}

TINY_VOCAB_MAX = 1024  # the tokenizer's trainer is asked for this many tokens; the sample text yields fewer

# ChatML, as Qwen2 uses: every turn ends with <|im_end|>, which is also the eos token.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Hub ids look like `org/name` or `name`; anything else is not one.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def tiny_model_dir(home: Path) -> Path:
    return Path(home) / "models" / "tiny"


def ensure_tiny(home: Path) -> Path:
    """The built-in tiny model's directory, building it on first use."""
    target = tiny_model_dir(home)
    if _built_version(target) == TINY_VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        _build_tiny(tmp)
        if target.exists():
            # An older recipe, or a concurrent build that already finished.
            if _built_version(target) == TINY_VERSION:
                return target
            old = target.with_name(f".tiny-old-{os.getpid()}")
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its build into place first; theirs is as good as ours.
            if _built_version(target) != TINY_VERSION:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _built_version(path: Path) -> int | None:
    try:
        return int(json.loads((path / _MARKER).read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_tokenizer() -> object:
    """A byte-level BPE tokenizer trained on the sample text: no download, same result every time."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ftstudio.training.samples import generate

    tok = Tokenizer(models.BPE())
    # Qwen2's own normalizer and split rule (digits one by one), so that transformers'
    # Qwen2Tokenizer, which AutoTokenizer picks for a qwen2 model, tokenizes exactly as trained.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_MAX,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = []
    for row in generate():
        texts.extend([row["instruction"], row["input"], row["output"], "user", "assistant", "system"])
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 1024
    return fast


def _build_tiny(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")  # type: ignore[attr-defined]
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # type: ignore[attr-defined]
    config = Qwen2Config(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        **TINY_SHAPE,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    # A private RNG stream: building the model must not shift the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    (out / _MARKER).write_text(json.dumps({"name": "builtin:tiny", "version": TINY_VERSION}) + "\n")


def resolve_model(ref: str, home: Path) -> str | Path:
    """A directory to load from (built-in or local), or a hub id string for transformers."""
    ref = ref.strip()
    if ref.startswith("builtin:"):
        if ref not in BUILTIN_MODELS:
            raise ValidationError(
                Problem(
                    "model.name (--model)", f"unknown built-in model {ref!r}; built-in: {', '.join(BUILTIN_MODELS)}"
                )
            )
        return ensure_tiny(home)
    path = Path(ref).expanduser()
    if path.exists() or ref.startswith((".", "/", "~")):
        return path.resolve()
    return ref


def looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.fullmatch(ref)) and ".." not in ref


def uploaded_dataset(ref: str, home: Path) -> Path | None:
    """The uploaded dataset `ref` names (`data.jsonl`, or `data` for it), if there is one."""
    if not _DATASET_NAME.fullmatch(ref):
        return None
    uploads = Path(home) / "datasets"
    for candidate in [uploads / ref, *(uploads / f"{ref}{suffix}" for suffix in DATASET_SUFFIXES)]:
        # Never a link: an upload is a plain file, and a link planted there must not lead out.
        if candidate.is_file() and not candidate.is_symlink():
            return candidate
    return None


def resolve_dataset(ref: str, home: Path) -> Path:
    """The file or directory to load: a built-in dataset, an uploaded dataset's name, or a local path."""
    ref = ref.strip()
    field = "data.path (--dataset)"
    if ref.startswith("builtin:"):
        if ref not in BUILTIN_DATASETS:
            raise ValidationError(
                Problem(field, f"unknown built-in dataset {ref!r}; built-in: {', '.join(BUILTIN_DATASETS)}")
            )
        return BUILTIN_DATA_FILES[ref]
    uploaded = uploaded_dataset(ref, home)
    if uploaded is not None:
        return uploaded
    path = Path(ref).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name the system refuses (too long, a NUL)
        exists = False
    if exists:
        return path.resolve()
    raise ValidationError(
        Problem(field, f"no dataset {ref!r}: not a built-in, an uploaded dataset or an existing file; check the path")
    )
