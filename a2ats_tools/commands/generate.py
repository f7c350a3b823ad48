"""``a2ats generate``: decode from a converted checkpoint with A²ATS retrieval attention."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from ..errors import A2atsError


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise A2atsError("give exactly one of --prompt or --prompt-file")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise A2atsError(f"prompt file {prompt_file} does not exist")
        return prompt_file.read_text(encoding="utf-8")
    return prompt  # type: ignore[return-value]


def generate(
    checkpoint: Path = typer.Argument(..., help="Converted checkpoint directory (from a2ats convert)."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Prompt text."),
    prompt_file: Path = typer.Option(None, "--prompt-file", "-f", help="Read the prompt from this UTF-8 file."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template (instruct models)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate."),
    budget: str = typer.Option(None, "--budget", "-b", help="Top-K per KV head: fraction (0.03), percent (3%) or tokens (256)."),
    buckets: str = typer.Option(None, "--buckets", help="single, single:DIST, log or log:RATIO (default: checkpoint's)."),
    selector: str = typer.Option(None, "--selector", help="a2ats (default), streaming or exact (oracle)."),
    rerank: float = typer.Option(None, "--rerank", help="Exact re-ranking of RERANK×K over-fetched candidates (default 2; 0 = off)."),
    rerank_aggregation: str = typer.Option(
        None, "--rerank-aggregation", help="How a GQA group's exact logits rank candidates: softmax (default: attention mass), sum or max."
    ),
    aggregation: str = typer.Option(
        None, "--aggregation", help="How a GQA group shares approximate scores: sum (default, fastest), max or softmax (best quality, slower)."
    ),
    prefill_chunk: int = typer.Option(None, "--prefill-chunk", help="Prefill in chunks of this many tokens."),
    offload: str = typer.Option(None, "--offload", help="'cpu': keep the full K/V in host memory."),
    dense_layers: str = typer.Option(None, "--dense-layers", help="Layers that decode densely, e.g. '0,1' ('none' = off)."),
    score_dtype: str = typer.Option(None, "--score-dtype", help="Score-table precision: auto (bf16), float32 or bfloat16."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    compare_dense: bool = typer.Option(False, "--compare-dense", help="Also generate with dense attention and show both."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the generated text (no streaming, no stats)."),
) -> None:
    """Generate text with retrieval attention, streaming tokens as they come.

    Examples:

      a2ats generate runs/ckpt --prompt "The capital of France is" -n 16

      a2ats generate runs/ckpt --chat -p "Write a haiku about caches." -t 0.7 --top-p 0.9 --seed 1

      a2ats generate runs/ckpt -f long_report.txt --budget 5% --prefill-chunk 2048 --compare-dense

      a2ats generate runs/ckpt -f book.txt --buckets log --offload cpu --device cuda
    """
    import torch
    from transformers import DynamicCache, TextStreamer

    from ..runtime.loader import load_converted

    text = _read_prompt(prompt, prompt_file)
    if max_new_tokens < 1:
        raise A2atsError("--max-new-tokens must be at least 1")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise A2atsError(f"unknown --dtype {dtype!r}; use float32, bfloat16 or float16")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise A2atsError("--device cuda requested but no CUDA device is available")
    err = Console(stderr=True)
    model, tok = load_converted(
        checkpoint, device=device, dtype=getattr(torch, dtype), budget=budget, offload=offload,
        buckets=buckets, selector=selector, rerank=rerank, rerank_aggregation=rerank_aggregation,
        aggregation=aggregation, prefill_chunk=prefill_chunk, dense_layers=dense_layers, score_dtype=score_dtype,
    )
    if chat:
        if not getattr(tok, "chat_template", None):
            raise A2atsError("this tokenizer has no chat template; drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    else:
        ids = tok(text, return_tensors="pt")["input_ids"]
    ids = ids.to(device)
    limit = model.config.max_position_embeddings
    if ids.shape[1] + max_new_tokens > limit:
        raise A2atsError(f"prompt ({ids.shape[1]} tokens) + {max_new_tokens} new tokens exceeds the model's context of {limit}")
    sampling = {"do_sample": temperature > 0}
    if temperature > 0:
        sampling.update(temperature=temperature, top_p=top_p)
    common = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)

    def run(label: str, **extra):
        torch.manual_seed(seed)
        streamer = None if quiet else TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        if not quiet:
            err.print(f"[bold]{label}[/]", highlight=False)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, streamer=streamer, **common, **extra)
        seconds = time.perf_counter() - start
        new = out[0, ids.shape[1] :]
        if quiet:
            print(tok.decode(new, skip_special_tokens=True))
        else:
            err.print(f"[dim]{len(new)} tokens in {seconds:.2f} s (prompt {ids.shape[1]} tokens)[/]", highlight=False)
        return new

    s = model.a2ats.settings
    ours = run(f"A²ATS ({s.selector}, budget {s.budget}, buckets {s.buckets.mode}):")
    if compare_dense:
        dense = run("dense attention:", past_key_values=DynamicCache(config=model.config))
        same = ours.tolist() == dense.tolist()
        err.print("[green]identical to dense[/]" if same else "[yellow]differs from dense[/]", highlight=False)
