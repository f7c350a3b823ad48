"""``a2ats eval``: quality of a converted checkpoint against dense attention, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..evaluation.haystack import HAYSTACK_HELP
from . import options

if TYPE_CHECKING:
    from ..evaluation.harness import ModelUnderTest, Variant
    from ..reporting import Reporter

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
    haystack: str = typer.Option(None, "--haystack", help="Task filler: " + HAYSTACK_HELP + " (default: noise)."),
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

      a2ats eval runs/ckpt --stages tasks --tasks niah_single --haystack pydoc --samples 10 -o runs/niah-text

      a2ats eval runs/ckpt --stages perplexity --ppl-length 8192 --ppl-tokens 256 --baselines none -o runs/ppl

      a2ats eval runs/ckpt --stages perplexity,tasks --baselines norerank --also score_dtype=float32 -o runs/knobs
    """
    params = dict(locals())  # the options as given, before any other local exists
    from ..evaluation.harness import ModelUnderTest
    from ..evaluation.haystack import Haystack
    from ..evaluation.results import new_results, show_results
    from ..io import check_output_dir
    from ..reporting import ConsoleReporter

    chosen, budget_list, task_list, length_list, baseline_list = _parse_options(
        stages, budgets, tasks, lengths, baselines, samples, recall_sequences, queries, ppl_tokens, ppl_texts
    )
    check_output_dir(out, overwrite, "eval output directory")  # fail fast; written once the results are in
    Haystack.check(haystack)
    options.check_device_and_dtype(device, dtype)
    mut = ModelUnderTest(checkpoint, device=device, dtype=dtype, **options.runtime_overrides(params))
    max_len = mut.runtime.config.geometry.max_position_embeddings
    kept = [n for n in length_list if n <= max_len]
    notes = []
    if len(kept) < len(length_list):
        notes.append(f"lengths above the model's context ({max_len}) skipped: {sorted(set(length_list) - set(kept))}")
    base_budget, variants = _configurations(mut, budget_list, baseline_list, baseline_budget, also or [])
    haystack_text = Haystack.named(haystack, mut.tokenizer)
    results = new_results(str(checkpoint), mut.runtime.config.model_name(), {
        "budgets": budget_list, "baselines": baseline_list, "baseline_budget": base_budget, "stages": chosen,
        "tasks": task_list, "lengths": kept, "samples": samples, "seed": seed, "device": device, "dtype": dtype,
        "haystack": Haystack.describe(haystack), "runtime": mut.base_settings.to_record(),
    })
    results["notes"] = notes
    reporter = ConsoleReporter(quiet)
    if "recall" in chosen:
        results["recall"] = _recall(mut, budget_list, min(recall_length, max_len), recall_sequences, queries, seed,
                                    heldout, reporter)
    if "tasks" in chosen and kept:
        results["tasks"] = _tasks(mut, variants, task_list, kept, samples, seed, haystack_text, reporter)
    if "perplexity" in chosen:
        results["perplexity"] = _perplexity(mut, variants, min(ppl_length, max_len), ppl_tokens, ppl_texts, seed,
                                            heldout, reporter)
    path = _write(out, overwrite, results)
    show_results(results, ConsoleReporter(quiet, stderr=False))  # the tables are the command's output: stdout
    reporter.info(f"wrote {path}")


def _parse_options(
    stages: str, budgets: str, tasks: str, lengths: str, baselines: str, *counts: int
) -> tuple[list[str], list, list[str], list[int], list[str]]:
    """The stages, budgets, tasks, lengths and baselines asked for; refuses unknown ones and a ``counts``
    (samples, sequences, queries, scored tokens, texts) below 1, before anything is loaded."""
    from ..errors import A2atsError
    from ..evaluation.harness import parse_baselines
    from ..evaluation.options import parse_budget_list, parse_int_list
    from ..evaluation.tasks import parse_tasks

    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    for s in chosen:
        if s not in STAGES:
            raise A2atsError(f"unknown stage {s!r}; choose from {', '.join(STAGES)}")
    budget_list = parse_budget_list(budgets)
    task_list = parse_tasks(tasks)
    length_list = parse_int_list(lengths, "--lengths")
    baseline_list = parse_baselines(baselines)
    if min(counts) < 1:
        raise A2atsError("--samples, --recall-sequences, --queries, --ppl-tokens and --ppl-texts must be positive")
    return chosen, budget_list, task_list, length_list, baseline_list


def _configurations(
    mut: ModelUnderTest, budgets: list, baselines: list[str], baseline_budget: str | None, also: list[str]
) -> tuple[Any, list[Variant]]:
    """The baselines' budget (default: the checkpoint's) and every configuration the tasks and perplexity
    compare: A²ATS at each budget, the baselines, and each ``--also`` (checked here, before any work)."""
    from ..evaluation.harness import Variant, build_variants
    from ..runtime.settings import parse_budget, parse_overrides

    base_budget = mut.base_settings.budget if baseline_budget is None else parse_budget(baseline_budget)
    variants = build_variants(budgets, baselines, base_budget)
    for spec in also:
        extra = {"budget": base_budget, "selector": "a2ats", **parse_overrides(spec)}
        mut.base_settings.with_overrides(**extra)  # a bad key or value fails before any work
        variants.append(Variant(f"a2ats[{spec}]", extra))
    return base_budget, variants


def _recall(
    mut: ModelUnderTest, budgets: list, length: int, sequences: int, queries: int, seed: int, heldout: Path | None,
    reporter: Reporter,
) -> dict:
    from ..evaluation.run import run_recall

    n_layers = len(mut.runtime.codebooks)  # the retrieved layers, which the recall curve measures
    with reporter.progress("recall", sequences * n_layers) as bar:
        return run_recall(mut, budgets, length=length, sequences=sequences, queries=queries, seed=seed,
                          heldout=heldout, tick=bar.advance)


def _tasks(
    mut: ModelUnderTest, variants: list[Variant], tasks: list[str], lengths: list[int], samples: int, seed: int,
    haystack: Any, reporter: Reporter,
) -> dict:
    from ..evaluation.run import run_tasks

    with reporter.progress("tasks", len(tasks) * len(lengths) * samples * len(variants)) as bar:
        return run_tasks(mut, variants, tasks, lengths, samples=samples, seed=seed, haystack=haystack, tick=bar.advance)


def _perplexity(
    mut: ModelUnderTest, variants: list[Variant], length: int, tokens: int, texts: int, seed: int,
    heldout: Path | None, reporter: Reporter,
) -> dict:
    from ..evaluation.run import run_perplexity

    n_decode = min(tokens, length - 2)
    with reporter.progress("perplexity", n_decode * len(variants) * texts) as bar:
        return run_perplexity(mut, variants, length=length, n_decode=n_decode, seed=seed, text=heldout, texts=texts,
                              tick=bar.advance)


def _write(out: Path, overwrite: bool, results: dict) -> Path:
    """The plots and ``results.json`` in ``out`` (a previous ``out`` stays whole until they are all written)."""
    from ..evaluation import plots
    from ..evaluation.results import write_results
    from ..io import atomic_directory

    with atomic_directory(out, overwrite, "eval output directory", writer="eval") as tmp:
        if results["recall"]:
            plots.plot_recall(results["recall"], tmp / "recall.png", "mass")
            plots.plot_recall(results["recall"], tmp / "recall_topk.png", "topk")
        if results["tasks"]:
            plots.plot_tasks(results["tasks"], tmp / "tasks.png")
        write_results(tmp, results)
    return out / "results.json"
