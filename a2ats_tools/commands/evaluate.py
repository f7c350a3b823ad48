"""``a2ats eval``: quality of a converted checkpoint against dense attention, side by side."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import options

STAGES = ("recall", "tasks", "perplexity")


def evaluate(
    checkpoint: options.Checkpoint,
    out: Path = typer.Option(Path("runs/eval"), "--out", "-o", help="Directory for results.json and the PNG plots."),
    budgets: str = typer.Option("0.01,0.02,0.03,0.05,0.1", "--budgets", help="Top-K budgets: fractions, 5%, or tokens."),
    baselines: str = typer.Option(
        "streaming,quest,wrope", "--baselines", help="Baselines at --baseline-budget: streaming, quest, wrope, exact, norerank, all, none."
    ),
    baseline_budget: str = typer.Option(
        None, "--baseline-budget", help="Per-KV-head budget of the baselines and --also (default: the checkpoint's)."
    ),
    also: list[str] = typer.Option(
        None, "--also",
        help="Another A²ATS configuration at --baseline-budget, as runtime overrides, e.g. 'score_dtype=float32' "
        "(repeatable; tasks and perplexity).",
    ),
    stages: str = typer.Option("recall,tasks,perplexity", "--stages", help="Which stages to run (comma list)."),
    tasks: str = typer.Option("all", "--tasks", help="passkey, niah_single, niah_multikey, niah_multivalue, variable_tracking, niah, all."),
    lengths: str = typer.Option("1024,2048,4096,8192", "--lengths", help="Task context lengths (tokens; longer than the model's are skipped)."),
    samples: int = typer.Option(2, "--samples", help="Samples per task and length."),
    haystack: Path = typer.Option(None, "--haystack", help="Haystack text file (default: built-in noise sentences)."),
    recall_length: int = typer.Option(4096, "--recall-length", help="Tokens per held-out sequence for recall."),
    recall_sequences: int = typer.Option(1, "--recall-sequences", help="Held-out sequences for recall."),
    queries: int = typer.Option(16, "--queries", help="Query positions per held-out sequence (second half)."),
    heldout: Path = typer.Option(None, "--heldout", help="Held-out text file for recall and perplexity (default: built-in)."),
    ppl_length: int = typer.Option(2048, "--ppl-length", help="Length of the perplexity text (tokens)."),
    ppl_tokens: int = typer.Option(128, "--ppl-tokens", help="Last tokens scored one decode step at a time."),
    ppl_texts: int = typer.Option(
        1, "--ppl-texts",
        help="Held-out texts for perplexity (pooled; per-text figures in results.json). One text of 256 tokens "
        "moves by a few percent between texts: use 4 or more to compare configurations.",
    ),
    seed: int = typer.Option(1234, "--seed", help="Seed of the task samples and held-out text (differs from calibration's)."),
    device: options.Device = "cpu",
    dtype: options.Dtype = "float32",
    overwrite: options.Overwrite = False,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no tables."),
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
) -> None:
    """Compare a converted checkpoint with dense attention on held-out recall, long-context tasks and
    decode-mode perplexity. Everything is generated offline from --seed; the dense model runs on the same
    prompts in the same process. The runtime options set every A²ATS configuration and baseline (a baseline's
    own selector, buckets and re-ranking still apply).

    Writes results.json, recall.png and recall_topk.png (attention-mass and top-K recall vs budget) and
    tasks.png (score vs context length) to --out.

    Examples:

      a2ats eval runs/ckpt --out runs/eval

      a2ats eval runs/ckpt --stages recall --budgets 0.01,0.03,0.1 -o runs/recall

      a2ats eval runs/ckpt --stages tasks --tasks passkey,niah --lengths 4k,8k --samples 4 -o runs/niah

      a2ats eval runs/ckpt --stages perplexity --ppl-length 8192 --ppl-tokens 256 --baselines none -o runs/ppl

      a2ats eval runs/ckpt --stages perplexity,tasks --baselines norerank --also score_dtype=float32 -o runs/knobs
    """
    params = dict(locals())  # the options as given, before any other local exists
    from ..errors import A2atsError
    from ..evaluation import plots
    from ..evaluation.harness import ModelUnderTest, Variant, build_variants, parse_baselines
    from ..evaluation.haystack import Haystack
    from ..evaluation.options import parse_budget_list, parse_int_list
    from ..evaluation.results import new_results, print_results, write_results
    from ..evaluation.run import run_perplexity, run_recall, run_tasks
    from ..evaluation.tasks import parse_tasks
    from ..io import atomic_directory, check_output_dir
    from ..runtime.settings import parse_budget, parse_overrides

    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    for s in chosen:
        if s not in STAGES:
            raise A2atsError(f"unknown stage {s!r}; choose from {', '.join(STAGES)}")
    budget_list = parse_budget_list(budgets)
    task_list = parse_tasks(tasks)
    length_list = parse_int_list(lengths, "--lengths")
    baseline_list = parse_baselines(baselines)
    if samples < 1 or recall_sequences < 1 or queries < 1 or ppl_tokens < 1 or ppl_texts < 1:
        raise A2atsError("--samples, --recall-sequences, --queries, --ppl-tokens and --ppl-texts must be positive")
    check_output_dir(out, overwrite, "eval output directory")  # fail fast; written once the results are in

    console = Console(stderr=True, quiet=quiet)
    options.check_device_and_dtype(device, dtype)
    mut = ModelUnderTest(checkpoint, device=device, dtype=dtype, **options.runtime_overrides(params))
    base_budget = mut.base_settings.budget if baseline_budget is None else parse_budget(baseline_budget)
    max_len = mut.runtime.config.geometry.max_position_embeddings
    notes = []
    kept = [n for n in length_list if n <= max_len]
    if len(kept) < len(length_list):
        notes.append(f"lengths above the model's context ({max_len}) skipped: {sorted(set(length_list) - set(kept))}")
    variants = build_variants(budget_list, baseline_list, base_budget)
    for spec in also or []:
        extra = {"budget": base_budget, "selector": "a2ats", **parse_overrides(spec)}
        mut.base_settings.with_overrides(**extra)  # a bad key or value fails before any work
        variants.append(Variant(f"a2ats[{spec}]", extra))
    haystack_text = Haystack.from_file(haystack, mut.tokenizer) if haystack else Haystack.noise(mut.tokenizer)

    settings = {
        "budgets": budget_list, "baselines": baseline_list, "baseline_budget": base_budget, "stages": chosen,
        "tasks": task_list, "lengths": kept, "samples": samples, "seed": seed, "device": device, "dtype": dtype,
        "haystack": str(haystack) if haystack else "builtin:noise", "runtime": mut.base_settings.to_record(),
    }
    results = new_results(str(checkpoint), settings)
    results["notes"] = notes
    n_layers = len(mut.runtime.codebooks)  # the retrieved layers, which the recall curve measures
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=quiet,
    ) as progress:
        if "recall" in chosen:
            rlen = min(recall_length, max_len)
            bar = progress.add_task("recall", total=recall_sequences * n_layers)
            results["recall"] = run_recall(
                mut, budget_list, length=rlen, sequences=recall_sequences, queries=queries, seed=seed,
                heldout=heldout, tick=lambda: progress.advance(bar),
            )
        if "tasks" in chosen and kept:
            bar = progress.add_task("tasks", total=len(task_list) * len(kept) * samples * len(variants))
            results["tasks"] = run_tasks(
                mut, variants, task_list, kept, samples=samples, seed=seed, haystack=haystack_text,
                tick=lambda: progress.advance(bar),
            )
        if "perplexity" in chosen:
            plen = min(ppl_length, max_len)
            n_decode = min(ppl_tokens, plen - 2)
            bar = progress.add_task("perplexity", total=n_decode * len(variants) * ppl_texts)
            results["perplexity"] = run_perplexity(
                mut, variants, length=plen, n_decode=n_decode, seed=seed, text=heldout, texts=ppl_texts,
                tick=lambda: progress.advance(bar),
            )
    with atomic_directory(out, overwrite, "eval output directory", writer="eval") as tmp:  # a previous --out stays whole until now
        if results["recall"]:
            plots.plot_recall(results["recall"], tmp / "recall.png", "mass")
            plots.plot_recall(results["recall"], tmp / "recall_topk.png", "topk")
        if results["tasks"]:
            plots.plot_tasks(results["tasks"], tmp / "tasks.png")
        write_results(tmp, results)
    path = out / "results.json"
    if not quiet:
        print_results(results, Console())
        console.print(f"wrote {path}", highlight=False)

