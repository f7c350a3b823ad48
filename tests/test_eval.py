"""a2ats eval: baselines, recall curve, decode-mode perplexity and the command end to end on a tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from a2ats_tools.artifacts.checkpoint import A2atsConfig, write_codebooks, write_config
from a2ats_tools.compat import cache_kwargs
from a2ats_tools.errors import A2atsError
from a2ats_tools.models import geometry, rotary
from a2ats_tools.rope import DistanceBuckets
from a2ats_tools.runtime.selectors.quest import PAGE, page_bounds, page_scores
from a2ats_tools.runtime.settings import RuntimeSettings

from .conftest import build_tiny_model


def write_tiny_checkpoint(directory: Path, tokenizer, codebook_size: int = 32, seed: int = 0) -> Path:
    """Tiny Llama + random codebooks (identity whitening) in the converted-checkpoint format."""
    model = build_tiny_model("llama", seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    geo = geometry(model)
    g = torch.Generator().manual_seed(seed)
    books = [torch.randn(geo.num_kv_heads, codebook_size, geo.head_dim, generator=g) for _ in range(geo.num_layers)]
    eye = [torch.eye(geo.head_dim).expand(geo.num_kv_heads, -1, -1).contiguous() for _ in range(geo.num_layers)]
    write_codebooks(directory, books, eye)
    write_config(directory, A2atsConfig(geometry=geo, codebook_size=codebook_size, whitening="plain"))
    return directory


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("eval-ckpt"), tokenizer)


def test_quest_page_score_bounds_every_token_logit():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 8, generator=g), torch.randn(2, 37, 8, generator=g)  # [Hkv, G, d]; partial last page
    kmin, kmax = page_bounds(k)
    assert kmin.shape == (2, 3, 8)
    assert torch.equal(kmax[:, 2], k[:, 2 * PAGE :].amax(1))  # padding does not widen the last page
    bound = page_scores(q, kmin, kmax).repeat_interleave(PAGE, -1)[..., :37]  # each token gets its page's bound
    exact = torch.einsum("hgd,hnd->hgn", q, k)
    assert bound.shape == exact.shape
    assert (bound >= exact - 1e-5).all()


def test_quest_selector_tracks_page_bounds_in_the_runtime(tiny_checkpoint):
    from a2ats_tools.evaluation.harness import ModelUnderTest, Variant

    mut = ModelUnderTest(str(tiny_checkpoint))
    make_cache = mut.use(Variant("quest", {"budget": 16, "selector": "quest"}))
    cache = make_cache()
    ids = torch.randint(100, 1000, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = mut.model(input_ids=ids, **cache_kwargs(cache), use_cache=True)
        mut.model(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwargs(cache), use_cache=True)
    state = cache.layers[1].state
    kmin, kmax = page_bounds(state.keys[0, :, : state.length].float())
    assert torch.allclose(state.meta["kmin"][0, :, : kmin.shape[1]], kmin)
    assert torch.allclose(state.meta["kmax"][0, :, : kmax.shape[1]], kmax)
    idx, keep = cache.layers[1].last_selection
    assert int(keep.sum(-1).max()) <= 8 + 64 + 16


def test_recall_curve_oracle_is_the_upper_bound_and_full_budget_recalls_all(tiny_checkpoint, tokenizer):
    from a2ats_tools.artifacts.checkpoint import read_codebooks, read_config
    from a2ats_tools.evaluation.recall_curve import (
        RECALL_METHODS,
        capture_sequence,
        heldout_ids,
        recall_curve,
    )

    model = build_tiny_model("llama")
    ids = heldout_ids(tokenizer, 200, seed=5)
    assert len(ids) == 200 and ids == heldout_ids(tokenizer, 200, seed=5)
    cap = capture_sequence(model, ids)
    assert cap.keys[0].shape == (2, 200, 16) and cap.queries[1].shape == (4, 200, 16)
    config = read_config(tiny_checkpoint)
    books, white = read_codebooks(tiny_checkpoint, config)
    settings = RuntimeSettings(n_sink=2, window=4, buckets=DistanceBuckets.log_spaced(4096))
    res = recall_curve([cap], books, white, rotary(model), settings, [4, 1000], queries_per_sequence=4)
    overall = res["overall"]
    for method in RECALL_METHODS:
        assert overall[method]["1000"]["mass"] == pytest.approx(1.0, abs=1e-5)
        assert overall[method]["4"]["mass"] <= overall["oracle"]["4"]["mass"] + 1e-6
    assert overall["oracle"]["4"]["topk"] == pytest.approx(1.0)
    assert len(res["per_layer"]["a2ats"]["4"]["mass"]) == 2
    assert overall["a2ats"]["4"]["mass"] < 1.0  # random codebooks are not exact


def test_recall_curve_weighs_mass_with_the_models_attention_scale(tiny_checkpoint, tokenizer):
    """The recall curve reads the model's softmax scale (a module ``scaling`` other than head_dim**-0.5 changes
    the mass, as it changes the model's attention); head_dim**-0.5 passed explicitly is the default."""
    from a2ats_tools.artifacts.checkpoint import read_codebooks, read_config
    from a2ats_tools.evaluation.recall_curve import capture_sequence, heldout_ids, recall_curve
    from a2ats_tools.models import attention_modules, attention_scale

    model = build_tiny_model("llama")
    assert attention_scale(model) == pytest.approx(16**-0.5)
    cap = capture_sequence(model, heldout_ids(tokenizer, 120, seed=3))
    books, white = read_codebooks(tiny_checkpoint, read_config(tiny_checkpoint))

    def curve(scale):
        settings = RuntimeSettings(n_sink=2, window=4, buckets=DistanceBuckets.log_spaced(4096))
        return recall_curve([cap], books, white, rotary(model), settings, [6], queries_per_sequence=4,
                            methods=("a2ats", "oracle"), scale=scale)["overall"]

    default, same, sharper = curve(None), curve(16**-0.5), curve(2.0)
    assert same == default
    assert sharper["oracle"]["6"]["mass"] != pytest.approx(default["oracle"]["6"]["mass"], abs=1e-4)
    for module in attention_modules(model):
        module.scaling = 2.0
    assert attention_scale(model) == 2.0
    attention_modules(model)[0].scaling = 1.0
    with pytest.raises(ValueError, match="different scales"):
        attention_scale(model)


@pytest.mark.parametrize("how", ["sum", "softmax"])
def test_recall_curve_keeps_the_rows_the_runtime_keeps(tiny_checkpoint, how):
    """The recall curve's ``a2ats`` method is the runtime's selector on the cache as a prefill leaves it: at the
    first decode step it keeps the rows the runtime's own decode step keeps, layer by layer."""
    from a2ats_tools import load_converted
    from a2ats_tools.evaluation.recall_curve import capture_sequence, method_selector, prefilled_state
    from a2ats_tools.rope import apply_rope
    from a2ats_tools.runtime.step import StepContext
    from a2ats_tools.selection import chosen_mask

    model, _ = load_converted(str(tiny_checkpoint), budget=6, n_sink=2, window=8, rerank=2.0, rerank_aggregation=how,
                              kernels="torch")
    n = 120
    ids = torch.randint(100, 1000, (1, n + 1), generator=torch.Generator().manual_seed(4))
    cache = model.a2ats.new_cache()
    with torch.no_grad():
        model(input_ids=ids[:, :n], **cache_kwargs(cache), use_cache=True)
        model(input_ids=ids[:, n:], **cache_kwargs(cache), use_cache=True)
        captured = capture_sequence(model, ids[0].tolist())
    rt, settings = model.a2ats, cache.layers[0].selector.settings
    geo = rt.config.geometry
    exact_layers = 0
    for layer in range(geo.num_layers):
        sel = method_selector("a2ats", settings, layer, (geo.num_heads, geo.num_kv_heads, geo.head_dim),
                              rt.codebooks[layer], rt.whitening[layer], rt.rotary, cache.layers[layer].selector.scale)
        keys, queries = captured.keys[layer], captured.queries[layer]
        state = prefilled_state(keys, rt.rotary, [sel])
        state.step = StepContext()
        cos, sin = rt.rotary.cos_sin(torch.tensor([n]))
        q_pre = queries[None, :, n]
        q_post = apply_rope(q_pre.float(), cos, sin)
        ours = chosen_mask(sel.select(state, q_pre, q_post, n + 1, torch.ones(1, n + 1, dtype=torch.bool)), n + 1)
        indices, keep = cache.layers[layer].last_selection
        runtime = torch.zeros_like(ours).scatter_(-1, indices, keep)
        assert torch.equal(ours.sum(-1), runtime.sum(-1)), f"layer {layer}: another number of rows"
        # the cache stores post-RoPE keys and undoes RoPE to encode them; the capture keeps the model's own
        # pre-RoPE keys: a near-tie may swap one row for another, never more than a couple per layer
        assert int((ours & ~runtime).sum()) <= 2, f"layer {layer}: {int((ours & ~runtime).sum())} rows differ"
        exact_layers += int(torch.equal(ours, runtime))
    assert exact_layers >= geo.num_layers - 1


def test_shared_prefill_generation_equals_plain_generate(tiny_checkpoint, tokenizer):
    """One dense prefill shared by every variant gives the same greedy text as each variant's own generate."""
    from a2ats_tools.evaluation.harness import ModelUnderTest, Variant

    mut = ModelUnderTest(str(tiny_checkpoint))
    variants = [Variant("dense"), Variant("a2ats", {"budget": 8, "selector": "a2ats", "n_sink": 2, "window": 4}),
                Variant("quest", {"budget": 16, "selector": "quest"})]
    g = torch.Generator().manual_seed(3)
    prompt = tokenizer.decode(torch.randint(100, 1000, (150,), generator=g))
    shared = mut.generate(prompt, 10, variants)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    for variant in variants:
        make_cache = mut.use(variant)
        out = mut.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                 do_sample=False, **cache_kwargs(make_cache()), pad_token_id=0)
        assert shared[variant.name] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    from a2ats_tools.runtime.cache import A2atsCache

    prefix = mut.prefill(ids)
    cache = mut.cache_for(variants[1], prefix)  # the retrieval variant gets a retrieval cache, every key encoded
    assert isinstance(cache, A2atsCache) and cache.get_seq_length() == ids.shape[1]
    layer = cache.layers[0]
    assert layer.selector.name == "a2ats" and layer.state.meta["codes"].shape[-1] >= ids.shape[1]


def test_decode_nll_matches_full_forward():
    from a2ats_tools.evaluation.perplexity import decode_nll

    model = build_tiny_model("qwen3")
    ids = torch.randint(100, 2000, (50,), generator=torch.Generator().manual_seed(2)).tolist()
    nll = decode_nll(model, ids, 6)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    want = [-float(logp[p - 1, ids[p]]) for p in range(44, 50)]
    assert nll == pytest.approx(want, abs=1e-4)
    with pytest.raises(A2atsError):
        decode_nll(model, ids[:5], 6)


def test_perplexity_texts_are_distinct_held_out_windows(tmp_path, tokenizer):
    """Several perplexity texts: the first is the single-text default; built-in texts differ; a user file is cut
    into consecutive windows, and one too short for them all is an error."""
    from a2ats_tools.evaluation.recall_curve import heldout_ids
    from a2ats_tools.evaluation.run import perplexity_texts

    tok = tokenizer
    texts = perplexity_texts(tok, 64, 3, 5, None)
    assert texts[0] == heldout_ids(tok, 64, 7, None) and len({tuple(x) for x in texts}) == 3
    f = tmp_path / "heldout.txt"
    f.write_text(" ".join(f"word{i}" for i in range(400)))
    whole = heldout_ids(tok, 96, 0, f)
    assert perplexity_texts(tok, 32, 3, 5, f) == [whole[:32], whole[32:64], whole[64:96]]
    with pytest.raises(A2atsError):
        perplexity_texts(tok, 10_000, 3, 5, f)


def test_eval_command_end_to_end(tiny_checkpoint, tmp_path):
    from a2ats_tools.cli import app

    out = tmp_path / "eval"
    args = ["eval", str(tiny_checkpoint), "--out", str(out), "--budgets", "0.05,0.5,1.0", "--baselines", "all",
            "--baseline-budget", "0.05", "--tasks", "passkey,niah_single", "--lengths", "160,9000", "--samples", "1",
            "--recall-length", "160", "--queries", "3", "--ppl-length", "120", "--ppl-tokens", "4", "--quiet",
            "--ppl-texts", "2", "--also", "score_dtype=bfloat16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    from a2ats_tools.artifacts.checkpoint import read_config

    assert data["model"] == read_config(tiny_checkpoint).model_name() != ""  # a results table names its model
    assert data["tasks"]["configs"][0] == "dense"
    assert {"a2ats@5%", "a2ats@50%", "streaming@5%", "quest@5%", "wrope2048@5%", "exact@5%", "a2ats-norerank@5%",
            "a2ats[score_dtype=bfloat16]"} <= set(data["tasks"]["configs"])
    assert [r["length"] for r in data["tasks"]["rows"]] == [160, 160]  # 9000 is beyond the tiny model's context
    for row in data["tasks"]["rows"]:  # at a full budget decode is dense attention: the same greedy output
        assert row["same_as_dense"]["a2ats@100%"] == 1
        assert set(row["same_as_dense"]) == set(data["tasks"]["configs"]) - {"dense"}
    assert any("skipped" in n for n in data["notes"])
    assert set(data["perplexity"]["configs"]) == set(data["tasks"]["configs"])
    for cell in data["perplexity"]["configs"].values():  # pooled over two texts of 4 scored tokens each
        a, b = cell["per_text"]
        assert cell["perplexity"] == pytest.approx((a * b) ** 0.5, rel=1e-9)
    assert data["perplexity"]["texts"] == 2
    assert data["recall"]["overall"]["oracle"]["0.5"]["mass"] > 0.5
    assert "norerank" in data["recall"]["methods"] and data["recall"]["rerank"] == 3.0
    for png in ("recall.png", "recall_topk.png", "tasks.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, A2atsError) and "--overwrite" in str(again.exception)


@pytest.mark.parametrize("bad", [["--budgets", "lots"], ["--stages", "speed"], ["--tasks", "nope"], ["--baselines", "h2o"],
                                 ["--also", "buckets=spiral"]])
def test_eval_command_rejects_bad_options(tiny_checkpoint, tmp_path, bad):
    from a2ats_tools.cli import app

    result = CliRunner().invoke(app, ["eval", str(tiny_checkpoint), "--out", str(tmp_path / "x"), *bad])
    assert isinstance(result.exception, A2atsError)
    assert not (tmp_path / "x").exists()  # nothing written for a rejected command


def test_result_tables_show_bracketed_configuration_names():
    """Labels such as ``a2ats[buckets=log:4]`` are text, not rich markup: the terminal tables print them whole."""
    from rich.console import Console

    from a2ats_tools.commands.bench import bench_table
    from a2ats_tools.evaluation.results import perplexity_table, same_output_table, task_table

    name = "a2ats[buckets=log:4]"
    ppl = {"n_decode": 8, "length": 64, "texts": 2, "configs": {
        "dense": {"perplexity": 10.0, "per_text": [9.0, 11.0]}, name: {"perplexity": 10.5, "per_text": [9.5, 11.5]}}}
    tasks = {"configs": ["dense", name], "rows": [{"task": "passkey", "length": 64,
                                                  "scores": {"dense": {"mean": 1.0, "n": 2}, name: {"mean": 0.5, "n": 2}}}]}
    speed = {"tokens_per_s": {"median": 2.0}, "prefill_s": 1.0, "kv_device_bytes": 2**20,
             "speedup_vs_dense": {"min": 1.0, "median": 1.5, "max": 2.0}}
    points = [{"context": 64, "batch": 1, "contenders": {"dense": speed, name: speed}}]
    tasks["rows"][0]["same_as_dense"] = {name: 1}
    for table in (perplexity_table(ppl), task_table(tasks), same_output_table(tasks), bench_table(points)):
        console = Console(record=True, width=400)
        console.print(table)
        assert name in console.export_text()


def test_greedy_agreement_script_runs_and_a_full_budget_never_diverges(tiny_checkpoint, tmp_path, monkeypatch):
    """benchmarks/greedy_agreement.py end to end on a tiny checkpoint: at a 100% budget decode is dense attention,
    so the configuration's argmax follows dense's tokens at every step."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "greedy_agreement.py"
    spec = importlib.util.spec_from_file_location("greedy_agreement", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "agree.json"
    monkeypatch.setattr(sys, "argv", ["greedy_agreement.py", str(tiny_checkpoint), "--task", "niah_single",
                                      "--length", "160", "--samples", "2", "--config", "full=budget=1.0",
                                      "--config", "small=budget=2,n_sink=1,window=2", "-o", str(out)])
    script.main()
    result = json.loads(out.read_text())
    full = result["summary"]["full"]
    assert full["identical"] == 2 and full["token_agreement"] == 1.0 and full["loses_dense_answers"] == []
    assert set(result["summary"]) == {"full", "small"} and len(result["rows"]) == 2
    assert all(len(r["tokens"]) >= 1 and set(r["configs"]) == {"full", "small"} for r in result["rows"])


def test_eval_runtime_options_set_every_retrieval_configuration(tiny_checkpoint, tmp_path):
    """``eval`` takes the runtime options ``generate`` takes: they set the base of every A²ATS configuration and
    baseline, and the results record them; the baselines' budget defaults to the checkpoint's."""
    from a2ats_tools.cli import app

    out = tmp_path / "eval"
    args = ["eval", str(tiny_checkpoint), "--out", str(out), "--stages", "perplexity", "--budgets", "0.05",
            "--baselines", "norerank", "--ppl-length", "120", "--ppl-tokens", "4", "--quiet", "--rerank", "2",
            "--kernels", "torch", "--score-dtype", "bfloat16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    runtime = data["settings"]["runtime"]
    assert (runtime["rerank"], runtime["kernels"], runtime["score_dtype"]) == (2.0, "torch", "bfloat16")
    assert data["settings"]["baseline_budget"] == runtime["budget"]  # the checkpoint's
    bad = CliRunner().invoke(app, ["eval", str(tiny_checkpoint), "--out", str(tmp_path / "x"), "--kernels", "gpu"])
    assert isinstance(bad.exception, A2atsError) and "kernels" in str(bad.exception)
    assert not (tmp_path / "x").exists()
