"""``a2ats generate``: decode from a converted checkpoint with A²ATS retrieval attention."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from ..errors import A2atsError
from ..evaluation.haystack import HAYSTACK_HELP
from . import options

if TYPE_CHECKING:
    import torch

    from ..reporting import Reporter


def _read_prompt(prompt: str | None, prompt_file: Path | None, task: str | None) -> str | None:
    """The prompt text from ``--prompt`` or ``--prompt-file`` (None for ``--task``: the task builds it)."""
    from ..models import check_prompt

    if sum(x is not None for x in (prompt, prompt_file, task)) != 1:
        raise A2atsError("give exactly one of --prompt, --prompt-file or --task")
    if task is not None:
        return None
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise A2atsError(f"prompt file {prompt_file} does not exist")
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise A2atsError(f"prompt file {prompt_file} is not UTF-8 text") from None
    return check_prompt(prompt)


def _check_task_options(task: str | None, length: int, index: int, haystack: str | None, chat: bool) -> None:
    """Refuse bad or inapplicable --task options before any model is loaded."""
    from ..evaluation.tasks import TASKS

    if task is None:
        if haystack is not None:
            raise A2atsError("--haystack applies to --task only")
        return
    if task not in TASKS:
        raise A2atsError(f"unknown --task {task!r}; choose from {', '.join(TASKS)}")
    if length < 128:
        raise A2atsError("--task-length must be at least 128 tokens")
    if index < 0:
        raise A2atsError("--task-sample must be >= 0")
    if chat:
        raise A2atsError("--task prompts carry the chat template already; drop --chat")
    from ..evaluation.haystack import Haystack

    Haystack.check(haystack)


def _task_sample(task: str, tokenizer, length: int, index: int, seed: int, haystack: str | None):
    """Sample ``index`` of an eval task at ``length`` tokens, the same as ``a2ats eval --seed SEED`` builds (its
    prompt already carries the chat template)."""
    from ..evaluation.haystack import Haystack
    from ..evaluation.tasks import make_sample

    hay = Haystack.named(haystack, tokenizer)
    return make_sample(task, tokenizer, hay, length, index, seed)


def answer_verdict(sample, text: str) -> str:
    """Rich markup saying whether ``text`` holds the task sample's expected answer(s)."""
    found = sample.score(text)
    verdict = "[green]found[/]" if found == 1 else "[yellow]partly found[/]" if found else "[red]missed[/]"
    return f"expected {escape(', '.join(sample.answers))}: {verdict}"


def retrieval_summary(cache) -> str:
    """What the last decode step read: rows attended per KV head against the cached rows, over all layers."""
    picked = [s for s in (getattr(layer, "last_selection", None) for layer in cache.layers) if s is not None]
    length = cache.get_seq_length()
    if not picked:
        return (f"no decode step selected rows: all {length} cached rows were attended (the cache never outgrew "
                "sinks + window + budget, every layer is dense, or nothing was decoded after the prefill)")
    rows = sum(float(keep.sum(-1).float().mean()) for _, keep in picked) / len(picked)
    return (f"last step: {rows:.0f} of {length} cached rows attended per KV head ({100 * rows / length:.1f}%) "
            f"in {len(picked)} of {len(cache.layers)} layers")


def generate(
    checkpoint: options.Checkpoint,
    prompt: str = typer.Option(None, "--prompt", "-p", help="Prompt text."),
    prompt_file: Path = typer.Option(None, "--prompt-file", "-f", help="Read the prompt from this UTF-8 file."),
    task: str = typer.Option(
        None, "--task", help="Instead of a prompt, a seeded long-context task from a2ats eval (passkey, niah_single, "
        "niah_multikey, niah_multivalue, variable_tracking); its expected answer is checked (not with --quiet)."
    ),
    task_length: int = typer.Option(4096, "--task-length", help="Context length of the --task prompt, in tokens."),
    task_sample: int = typer.Option(0, "--task-sample", help="Which --task sample (numbered as a2ats eval numbers them)."),
    task_seed: int = typer.Option(1234, "--task-seed", help="Seed of the --task samples (a2ats eval's --seed)."),
    haystack: str = typer.Option(None, "--haystack", help="The --task filler: " + HAYSTACK_HELP + " (default: noise)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template (instruct models)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", "-n", help="Tokens to generate (default 64; a --task's own)."),
    budget: options.Budget = None,
    buckets: options.Buckets = None,
    selector: options.Selector = None,
    rerank: options.Rerank = None,
    rerank_aggregation: options.RerankAggregation = None,
    aggregation: options.Aggregation = None,
    prefill_chunk: options.PrefillChunk = None,
    offload: options.Offload = None,
    dense_layers: options.DenseLayers = None,
    score_dtype: options.ScoreDtype = None,
    kernels: options.Kernels = None,
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    device: options.Device = "cpu",
    dtype: options.Dtype = "float32",
    compare_dense: bool = typer.Option(False, "--compare-dense", help="Also generate with dense attention and show both."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the generated text (no streaming, no stats)."),
) -> None:
    """Generate text with retrieval attention, streaming tokens as they come.

    Examples:

      a2ats generate runs/ckpt --prompt "The capital of France is" -n 16

      a2ats generate runs/ckpt --chat -p "Write a haiku about caches." -t 0.7 --top-p 0.9 --seed 1

      a2ats generate runs/ckpt -f long_report.txt --budget 5% --prefill-chunk 2048 --compare-dense

      a2ats generate runs/ckpt -f book.txt --buckets log --offload cpu --device cuda

      a2ats generate runs/ckpt --task niah_single --task-length 4096 --compare-dense
    """
    params = dict(locals())  # the options as given, before any other local exists
    import torch
    from transformers import DynamicCache

    from ..compat import cache_kwargs
    from ..reporting import ConsoleReporter
    from ..runtime.loader import load_converted

    text = _read_prompt(prompt, prompt_file, task)
    _check_task_options(task, task_length, task_sample, haystack, chat)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise A2atsError("--max-new-tokens must be at least 1")
    options.check_device_and_dtype(device, dtype)
    model, tok = load_converted(checkpoint, device=device, dtype=getattr(torch, dtype), **options.runtime_overrides(params))
    sample = None
    if task is not None:
        sample = _task_sample(task, tok, task_length, task_sample, task_seed, haystack)
        max_new_tokens = max_new_tokens or sample.max_new_tokens
    ids = _prompt_ids(tok, text, sample, chat).to(device)
    max_new_tokens = max_new_tokens or 64
    limit = model.config.max_position_embeddings
    if ids.shape[1] + max_new_tokens > limit:
        raise A2atsError(f"prompt ({ids.shape[1]} tokens) + {max_new_tokens} new tokens exceeds the model's context of {limit}")
    sampling: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        sampling.update(temperature=temperature, top_p=top_p)
    decoding = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
    reporter = ConsoleReporter(quiet)

    def run(label: str, cache) -> torch.Tensor:
        return _decode(model, tok, ids, label, seed, sample, reporter, **decoding, **cache_kwargs(cache))

    s = model.a2ats.settings
    cache = model.a2ats.new_cache()
    ours = run(f"A²ATS ({s.selector}, budget {s.budget}, buckets {s.buckets.mode}):", cache)
    reporter.info(f"[dim]{escape(retrieval_summary(cache))}[/]", markup=True)
    del cache
    if compare_dense:
        dense = run("dense attention:", DynamicCache(config=model.config))
        same = ours.tolist() == dense.tolist()
        verdict = "[green]identical to dense[/]" if same else "[yellow]differs from dense[/]"
        ConsoleReporter().info(verdict, markup=True)  # what --compare-dense asks for: shown with --quiet too


def _prompt_ids(tok, text: str | None, sample, chat: bool) -> torch.Tensor:
    """The prompt's token ids ``[1, L]``: the task sample's (it carries the chat template), the text in the chat
    template with ``chat``, or the text as it is."""
    import torch

    if sample is not None:
        return tok(sample.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if chat:
        if not getattr(tok, "chat_template", None):
            raise A2atsError("this tokenizer has no chat template; drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt")
        return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    return tok(text, return_tensors="pt")["input_ids"]


def _decode(model, tok, ids: torch.Tensor, label: str, seed: int, sample, reporter: Reporter, **generate: Any) -> torch.Tensor:
    """One seeded ``model.generate`` from ``ids``: streamed with its label and timing, or (quiet) printed once at
    the end; returns the new tokens. A task sample's answer is checked."""
    import torch
    from transformers import TextStreamer

    torch.manual_seed(seed)
    streamer = None if reporter.quiet else TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    reporter.info(f"[bold]{escape(label)}[/]", markup=True)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, streamer=streamer, **generate)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1] :]
    if reporter.quiet:
        print(tok.decode(new, skip_special_tokens=True))  # the command's output, on stdout
    reporter.info(f"[dim]{len(new)} tokens in {seconds:.2f} s (prompt {ids.shape[1]} tokens)[/]", markup=True)
    if sample is not None:
        reporter.info(answer_verdict(sample, tok.decode(new, skip_special_tokens=True)), markup=True)
    return new
