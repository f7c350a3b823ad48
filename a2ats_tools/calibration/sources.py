"""Calibration data sources. Each yields documents as token-id lists, in a seeded order, until asked to stop.

Kinds (the ``kind`` of a recipe source):

* ``files``: local ``.txt`` (one document per file), ``.jsonl`` (one per line, field ``field``, default ``text``)
  or ``.parquet`` (column ``field``) files, or folders of them (searched recursively, sorted);
* ``hf``: a Hugging Face dataset (Hub id or local folder) through ``datasets`` (optional dependency);
* ``uuid``: the paper's random UUID strings, one per line, seeded;
* ``generated``: text sampled from the model itself (seeded, batched, varied short prompts);
* ``pydoc``: the English documentation text shipped with Python (``pydoc_data.topics``), offline and real.
"""

from __future__ import annotations

import json
import random
import uuid as _uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
KINDS = ("files", "hf", "uuid", "generated", "pydoc")


@dataclass
class SourceSpec:
    """One entry of a recipe: what to read and how many training tokens to take from it."""

    kind: str
    tokens: int
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"unknown calibration source kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if int(self.tokens) < 0:
            raise DataError(f"source {self.label}: token count must be >= 0, got {self.tokens}")
        self.tokens = int(self.tokens)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind in ("files", "hf"):
            return f"{self.kind}:{self.options.get('path', '?')}"
        return self.kind

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.label, "kind": self.kind, "tokens": self.tokens, **self.options}


# ---------------------------------------------------------------- text readers


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    raise DataError(f"calibration data {path} does not exist")


def _read_jsonl(path: Path, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path} line {n} is not valid JSON") from None
            if not isinstance(row, dict) or key not in row:
                raise DataError(f"{path} line {n} has no field {key!r} (set the source's 'field')")
            yield str(row[key])


def _read_parquet(path: Path, key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        if key not in pq.read_schema(path).names:
            raise DataError(f"{path} has no column {key!r} (set the source's 'field')")
        table = pq.read_table(path, columns=[key])
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises many types for corrupt files
        raise DataError(f"cannot read {path} as parquet: {str(exc).splitlines()[0]}") from None
    for value in table.column(key).to_pylist():
        if value is not None:
            yield str(value)


def read_texts(path: str | Path, key: str = "text") -> Iterator[str]:
    """Every document in a file or folder of .txt/.jsonl/.parquet files, in sorted file order."""
    files = _files_under(Path(path).expanduser())
    if not files:
        raise DataError(f"{path} holds no .txt, .jsonl or .parquet files")
    for f in files:
        suffix = f.suffix.lower()
        try:
            if suffix == ".jsonl":
                yield from _read_jsonl(f, key)
            elif suffix == ".parquet":
                yield from _read_parquet(f, key)
            elif suffix == ".txt":
                yield f.read_text(encoding="utf-8")
            else:
                raise DataError(f"{f}: unsupported file type {suffix!r} (use .txt, .jsonl or .parquet)")
        except UnicodeDecodeError:
            raise DataError(f"{f} is not UTF-8 text") from None
        except OSError as exc:
            raise DataError(f"cannot read {f}: {exc.strerror or exc}") from None


def read_hf_dataset(path: str, split: str = "train", key: str = "text", config: str | None = None) -> Iterator[str]:
    """Documents of a Hugging Face dataset (needs the optional ``datasets`` package)."""
    try:
        import datasets
    except ImportError:
        raise DataError("the 'hf' source needs the datasets package: pip install 'a2ats-tools[data]'") from None
    try:
        ds = datasets.load_dataset(path, config, split=split, streaming=not Path(path).exists())
    except Exception as exc:  # datasets raises many types for a missing or malformed dataset
        raise DataError(f"cannot load dataset {path!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    for row in ds:
        if key not in row:
            raise DataError(f"dataset {path!r} has no field {key!r} (set the source's 'field')")
        yield str(row[key])


def pydoc_texts() -> list[str]:
    """Python's own documentation topics (English prose and code), one document per topic."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def uuid_documents(rng: random.Random, doc_tokens_hint: int = 2048) -> Iterator[str]:
    """Endless documents of random UUID strings, one per line (about 25 tokens each)."""
    per_doc = max(1, doc_tokens_hint // 25)
    while True:
        yield "\n".join(str(_uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(per_doc))


GENERATION_PROMPTS = (
    "Write a short story about",
    "Explain in simple terms how",
    "Write a detailed news article about",
    "Describe the history of",
    "Write a letter to a friend about",
    "Give step-by-step instructions for",
    "Write an essay discussing",
    "Summarize what is known about",
    "Write a dialogue between two people about",
    "Write a product review of",
    "Describe a day in the life of",
    "Write a blog post about",
)
GENERATION_TOPICS = (
    "the ocean", "a small village", "machine learning", "the Roman empire", "cooking pasta", "a lost key",
    "space travel", "the stock market", "a mountain hike", "climate change", "an old library", "chess",
    "a rainy city", "volcanoes", "the printing press", "a robot", "gardening", "the human heart",
    "ancient Egypt", "a jazz musician", "electric cars", "a football match", "bees", "the internet",
)


@torch.no_grad()
def generated_documents(
    model: Any,
    tokenizer: Any,
    rng: random.Random,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
) -> Iterator[list[int]]:
    """Endless model-generated documents (prompt + sampled continuation, as token ids), batch by batch."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    batch_index = 0
    while True:
        prompts = [f"{rng.choice(GENERATION_PROMPTS)} {rng.choice(GENERATION_TOPICS)}." for _ in range(batch_size)]
        if getattr(tokenizer, "chat_template", None):
            prompts = [
                tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts
            ]
        tokenizer.padding_side = "left"
        try:
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tokenizer.padding_side = side
        torch.manual_seed(seed * 1_000_003 + batch_index)
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            pad_token_id=tokenizer.pad_token_id,
        )
        batch_index += 1
        prompt_len = enc["input_ids"].shape[1]
        for row, mask in zip(out.tolist(), enc["attention_mask"].tolist(), strict=True):
            prompt = row[mask.index(1) if 1 in mask else prompt_len : prompt_len]
            continuation = row[prompt_len:]
            if tokenizer.eos_token_id in continuation:
                continuation = continuation[: continuation.index(tokenizer.eos_token_id) + 1]
            if continuation:
                yield prompt + continuation


def tokenize_texts(texts: Iterator[str], tokenizer: Any) -> Iterator[list[int]]:
    for text in texts:
        if text.strip():
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            if ids:
                yield list(ids)


def documents(spec: SourceSpec, tokenizer: Any, model: Any, seed: int) -> Iterator[list[int]]:
    """Token-id documents of one source, in a seeded order (file sources: shuffled at document level)."""
    rng = random.Random(f"{seed}:{spec.label}")
    opts = spec.options
    if spec.kind == "uuid":
        yield from tokenize_texts(uuid_documents(rng, int(opts.get("doc_tokens", 2048))), tokenizer)
    elif spec.kind == "generated":
        yield from generated_documents(
            model,
            tokenizer,
            rng,
            batch_size=int(opts.get("batch_size", 32)),
            max_new_tokens=int(opts.get("max_new_tokens", 256)),
            temperature=float(opts.get("temperature", 1.0)),
            top_p=float(opts.get("top_p", 0.95)),
            seed=seed,
        )
    else:
        if spec.kind == "pydoc":
            texts: list[str] | Iterator[str] = pydoc_texts()
        elif spec.kind == "files":
            if "path" not in opts:
                raise DataError(f"source {spec.label} needs a 'path'")
            texts = read_texts(opts["path"], opts.get("field", "text"))
        else:
            if "path" not in opts:
                raise DataError(f"source {spec.label} needs a 'path' (dataset id or folder)")
            texts = read_hf_dataset(opts["path"], opts.get("split", "train"), opts.get("field", "text"), opts.get("config"))
        if opts.get("shuffle", True) and spec.kind != "hf":
            texts = list(texts)
            rng.shuffle(texts)
        yield from tokenize_texts(iter(texts), tokenizer)
