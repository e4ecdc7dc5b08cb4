"""report.md and its figures: rebuilt from a run directory without a model, the summary's
best method per budget, latency by model shape (never ranking identical shapes), the combined
multi-seed report and its refusal of differing recipes and of other metrics schemas."""

import json

import pytest

from jas_prune.cli import main
from jas_prune.errors import MetricsSchemaError
from jas_prune.metrics import SCHEMA_VERSION, Metrics
from jas_prune.reporting import combine_reports, prune_stats, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = """version: 1
data: {images_per_class: 3, batch_size: 64}
attribution: {method: jas, steps: 2}
masks: {topk: 2}
prune: {methods: [jas, random], ratios: [0.25, 0.5], bias_compensation: [false, true]}
"""

RECIPE = """version: 1
model: {name: builtin:shapes-vit}
data: {kind: shapes, images_per_class: 10}
prune: {methods: [jas, magnitude], ratios: [0.3, 0.5], bias_compensation: [false, true]}
runtime: {seed: %d, device: auto}
"""


def _valid_png(path) -> bool:
    from PIL import Image

    with open(path, "rb") as f:
        if f.read(8) != PNG_MAGIC:
            return False
    with Image.open(path) as im:
        im.verify()
        return im.size[0] > 300 and im.size[1] > 200


def _entry(method, ratio, comp, top1, *, top5=1.0, dense=0.9, ckpt=None):
    return {"method": method, "ratio": ratio, "classes": None, "top1": top1, "top5": top5,
            "params": int(1e6 * (1 - ratio / 2)), "macs": int(2e7 * (1 - ratio / 2)), "bias_compensation": comp,
            "checkpoint": ckpt or f"pruned-{method}-r{round(100 * ratio)}{'-bc' if comp else ''}.safetensors",
            "dense_top1": dense, "removed_fraction": ratio}


def _metrics(jas50=0.80, dense=0.9):
    return {"schema_version": SCHEMA_VERSION, "data": {"kind": "shapes", "classes": 48, "probe": 384, "test": 96},
            "dense": {"top1": dense, "top5": 1.0, "params": 1_000_000, "macs": 20_000_000, "test_images": 96},
            "pruned": [_entry("jas", 0.3, False, 0.70), _entry("jas", 0.3, True, 0.84),
                       _entry("magnitude", 0.3, False, 0.85), _entry("magnitude", 0.3, True, 0.86),
                       _entry("jas", 0.5, False, jas50), _entry("jas", 0.5, True, 0.60),
                       _entry("magnitude", 0.5, False, 0.50), _entry("magnitude", 0.5, True, 0.55)],
            "paper": {"cls_mask": {"topk": 5, "depth": 6, "fractions": [0.5, 1.0], "test_images": 96,
                                   "results": {m: [{"fraction": 0.5, "top1": 0.8, "top5": 0.9 + d},
                                                   {"fraction": 1.0, "top1": 0.6, "top5": 0.8 + d}]
                                               for m, d in (("jas", 0.05), ("random", 0.0))}}}}


def _write_run(path, metrics, seed=0, recipe=RECIPE):
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "recipe.yaml").write_text(recipe % seed)
    return path


def _summary(report: str) -> str:
    return report.split("## Summary", 1)[1].split("\n## ", 1)[0]


@pytest.fixture
def tiny_run(tmp_path, tiny_builtin, monkeypatch):
    """A real run directory of the tiny model; its end-of-run report is left to the test."""
    import jas_prune.reporting

    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(jas_prune.reporting, "write_report", lambda run_dir, **kwargs: None)
        assert main(["recipe", "run", str(recipe), "--out", str(out)]) == 0
    return out


def test_rebuild_from_run_dir_needs_no_model(tiny_run, monkeypatch):
    import jas_prune
    import jas_prune.models

    def no_model(*args, **kwargs):
        raise AssertionError("the report must not load a model")

    monkeypatch.setattr(jas_prune, "load_model", no_model, raising=False)
    monkeypatch.setattr(jas_prune.models, "load_model", no_model)
    monkeypatch.setattr(jas_prune.models, "create_model", no_model)
    assert main(["report", str(tiny_run)]) == 0
    report = (tiny_run / "report.md").read_text()
    assert report.startswith("# jas-prune run report\n\n## Summary")
    assert report.index("## Summary") < report.index("## Figures") < report.index("## Dense model") \
        < report.index("## Settings")
    figures = {p.name for p in (tiny_run / "figures").glob("*.png")}
    assert figures == {"pruning_tradeoff.png", "neuron_paths.png", "class_similarity.png", "similar_classes.png",
                       "semantic_check.png"}
    for name in figures:
        assert _valid_png(tiny_run / "figures" / name), name
        assert f"](figures/{name})" in report
    assert not list((tiny_run / "figures").glob(".*.tmp"))  # atomic writes leave no temporaries
    # the masks stage wrote the semantic check (shapes class names carry the truth)
    semantic = json.loads((tiny_run / "metrics.json").read_text())["paper"]["semantic"]
    assert set(semantic) >= {"mean", "pairs", "auc"} and "Semantic check (paper Finding 4)" in report


def test_summary_names_best_method_per_budget_with_figures(tmp_path):
    m = _metrics()
    m["export"] = [{"model": "dense", "checkpoint": None, "provider": "CPUExecutionProvider",
                    "latency": [{"batch_size": 1, "latency_ms_p50": 2.0}, {"batch_size": 32, "latency_ms_p50": 30.0}]},
                   {"model": "pruned-jas-r50", "checkpoint": "pruned-jas-r50.safetensors",
                    "provider": "CPUExecutionProvider",
                    "latency": [{"batch_size": 1, "latency_ms_p50": 1.5}, {"batch_size": 32, "latency_ms_p50": 20.0}]}]
    m["paper"]["intervention"] = {k: {"path_jas_mean": j, "removal_acc_dev": -30.0, "removal_prob_dev_mean": -40.0,
                                      "removal_prob_dev_median": -20.0, "enhancement_acc_dev": 2.0,
                                      "enhancement_prob_dev_mean": 20.0, "enhancement_prob_dev_median": 1.0}
                                  for k, j in (("jas", 0.1), ("activation", 0.02))}
    run = _write_run(tmp_path / "run", m)
    write_report(run)
    report = (run / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in _summary(report).splitlines() if line.startswith("| ")}
    assert "**magnitude**" in rows["30 %"] and "| yes |" in rows["30 %"] and "86.00 %" in rows["30 %"]
    assert "**jas**" in rows["50 %"] and "| no |" in rows["50 %"] and "80.00 %" in rows["50 %"]
    assert "88.89 %" in rows["50 %"] and "1.50× (b=32)" in rows["50 %"]  # kept = 0.80 / 0.90; 30 / 20 ms
    assert "remove up to **30 %** of the FFN neurons with **magnitude**" in report  # 0.86 / 0.9 >= 95 %
    for name in ("pruning_tradeoff", "cls_mask_protocol", "table1", "deployment"):
        assert _valid_png(run / "figures" / f"{name}.png"), name


def _export(model, p50s, ckpt=None, speedup=None):
    """An export record timed at batch sizes ``p50s`` (b -> ms), optionally with interleaved speed-ups."""
    return {"model": model, "checkpoint": ckpt, "provider": "CPUExecutionProvider",
            "latency": [{"batch_size": b, "latency_ms_p50": v, **({"speedup": speedup[b]} if speedup else {})}
                        for b, v in p50s.items()]}


def _with_widths(m):
    for e in m["pruned"]:
        e["widths"] = {str(b): round(256 * (1 - e["ratio"])) for b in range(6)}
    return m


def test_identical_shapes_share_one_speedup_and_are_never_ranked(tmp_path):
    m = _with_widths(_metrics())
    half = [e for e in m["pruned"] if e["ratio"] == 0.5]
    m["export"] = [_export("dense", {1: 2.0, 32: 30.0})] + [
        _export(e["checkpoint"].removesuffix(".safetensors"), {1: 1.5, 32: v}, e["checkpoint"])
        for e, v in zip(half, (20.0, 22.0, 25.0, 18.0))]  # the same shape, timed one after another
    run = _write_run(tmp_path / "run", m)
    write_report(run)
    report = (run / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in _summary(report).splitlines() if line.startswith("| ")}
    # 30/20, 30/22, 30/25, 30/18: one speed-up for the shape (median), the models' range as its spread
    assert "1.43× (1.20–1.67, b=32)" in rows["50 %"]
    for single in ("1.50×", "1.36×", "1.20×", "1.67×"):  # no model of the shape gets its own speed-up
        assert single not in report
    latency = report.split("### Latency by model shape", 1)[1]
    shape_rows = [line for line in latency.splitlines() if line.startswith("| A |")]
    assert len(shape_rows) == 1 and all(e["checkpoint"].removesuffix(".safetensors") in shape_rows[0] for e in half)
    assert "Shape A: 4 models with identical FFN widths" in latency and "not ranked by latency" in latency
    assert _valid_png(run / "figures" / "deployment.png")


def test_interleaved_spreads_say_what_they_cannot_tell_apart(tmp_path):
    m = _with_widths(_metrics())
    sp = lambda med, lo, hi: {32: {"reference": "dense", "median": med, "low": lo, "high": hi,  # noqa: E731
                                   "confidence": 0.95, "repeats": 15}}
    m["export"] = [_export("dense", {32: 30.0}),
                   _export("pruned-jas-r30", {32: 29.0}, "pruned-jas-r30.safetensors", sp(1.03, 0.97, 1.08)),
                   _export("pruned-jas-r50", {32: 27.0}, "pruned-jas-r50.safetensors", sp(1.07, 1.02, 1.12))]
    run = _write_run(tmp_path / "run", m)
    write_report(run)
    report = (run / "report.md").read_text()
    assert "1.03× (0.97–1.08, b=32)" in report and "1.07× (1.02–1.12, b=32)" in report
    assert "Shape A: the speed-up 1.03× (0.97–1.08, b=32) is within the measurement spread of no speed-up" in report
    assert "Shapes A and B: speed-ups 1.03× (0.97–1.08, b=32) and 1.07× (1.02–1.12, b=32) are within the " \
           "measurement spread of each other" in report
    assert "95 % bootstrap intervals" in report and "Shape B: the speed-up" not in report


def test_report_refuses_metrics_of_another_schema(tmp_path):
    m = _metrics()
    del m["schema_version"]  # written by jas-prune before the schema
    run = _write_run(tmp_path / "run", m)
    with pytest.raises(MetricsSchemaError) as err:
        write_report(run)
    assert str(err.value) == (f"{run / 'metrics.json'}: written by an older jas-prune (metrics schema version 1); "
                              "this jas-prune reads version 2: rerun the recipe into a new --out directory")
    assert not (run / "report.md").exists()


def test_unparsable_recipe_is_said_in_one_line(tmp_path, caplog):
    run = _write_run(tmp_path / "run", _metrics(), recipe=RECIPE.replace("runtime:", "bogus: 1\nruntime:"))
    write_report(run)
    report = (run / "report.md").read_text()
    line = next(ln for ln in report.splitlines() if ln.startswith("`recipe.yaml`"))
    assert line == "`recipe.yaml` cannot be parsed by this jas-prune (bogus: unknown key (valid keys: version, " \
                   "model, data, attribution, masks, prune, evaluate, export, report, runtime)); shown as written."
    assert "bogus: 1" in report.split("## Settings", 1)[1]  # the settings as written
    assert any("cannot be parsed" in r.getMessage() for r in caplog.records)
    good = _write_run(tmp_path / "good", _metrics(), seed=1)
    with pytest.raises(Exception, match=r"--combine: .*recipe.yaml cannot be parsed by this jas-prune \(bogus"):
        combine_reports([good, run], tmp_path / "c")


def test_labels_and_colours_come_from_the_registries():
    from jas_prune.attribution import METHODS
    from jas_prune.pruning.criteria import CRITERIA
    from jas_prune.reporting.style import FALLBACK_COLOURS, method_colour, method_label

    for entry in [*CRITERIA, *(m for m in METHODS if m.name not in CRITERIA)]:  # a name in both: the criterion
        assert (method_label(entry.name), method_colour(entry.name)) == (entry.label, entry.colour)
    assert method_label("vit_slim") == "ViT-Slim" and method_label("influence_pattern") == "influence pattern"
    assert method_label("dense") == "dense" and method_colour("dense") in FALLBACK_COLOURS
    assert method_colour("dense") == method_colour("dense") != method_colour("dense2")


def test_dense_only_run_still_gets_a_report(tmp_path):
    m = {"schema_version": SCHEMA_VERSION, "data": {"kind": "shapes", "classes": 48, "probe": 8, "test": 2},
         "dense": {"top1": 0.5, "top5": 1.0, "params": 1000, "macs": 2000, "test_images": 2}}
    run = _write_run(tmp_path / "run", m)
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "## Summary" in report and "## Settings" in report and "## Figures" not in report
    assert not list(run.glob("figures/*.png"))


def test_combine_means_and_std_over_seeds(tmp_path, capsys):
    runs = [_write_run(tmp_path / f"s{i}", _metrics(jas50=v, dense=d), seed=i)
            for i, (v, d) in enumerate(((0.80, 0.88), (0.82, 0.90), (0.84, 0.92)))]
    stats = {(s.method, s.ratio, s.bias_compensation): s
             for s in prune_stats([Metrics.from_dict(json.loads((r / "metrics.json").read_text())) for r in runs])}
    s = stats[("jas", 0.5, False)]
    assert s.top1 == pytest.approx(0.82) and s.top1_std == pytest.approx(0.02) and s.runs == 3
    assert s.dense_top1 == pytest.approx(0.9)  # each entry's own dense_top1 (0.9 in every run)
    out = tmp_path / "combined"
    assert main(["report", "--combine", *map(str, runs), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "82.00 ± 2.00 %" in report  # jas, 50 %, no compensation: 0.80 / 0.82 / 0.84
    assert "90.00 ± 2.00 %" in report  # dense top-1: 0.88 / 0.90 / 0.92
    assert "95.00 ± 0.00 % (80.00 ± 0.00 %)" in report  # CLS-mask protocol, jas at p = 0.5
    assert "seed 0" in report and "seed 2" in report
    for name in ("pruning_tradeoff", "cls_mask_protocol"):
        assert _valid_png(out / "figures" / f"{name}.png"), name


def test_combine_refuses_recipes_that_differ_beyond_the_seed(tmp_path, capsys):
    a = _write_run(tmp_path / "a", _metrics(), seed=0)
    b = _write_run(tmp_path / "b", _metrics(), seed=1, recipe=RECIPE.replace("0.3, 0.5", "0.3, 0.7"))
    assert main(["report", "--combine", str(a), str(b), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "prune.ratios" in err and "runtime.seed" in err and "Traceback" not in err
    assert not (tmp_path / "c" / "report.md").exists()
    assert main(["report", "--combine", str(a), "--out", str(tmp_path / "c")]) == 2  # one run is no combination
    assert main(["report", "--combine", str(a), str(a), "--out", str(tmp_path / "c")]) == 2
    assert main(["report", "--combine", str(a), str(b)]) == 2  # no --out
    with pytest.raises(Exception, match="is one of the combined runs"):
        combine_reports([a, _write_run(tmp_path / "d", _metrics(), seed=2)], a)


def test_clustered_order_and_class_choice_are_deterministic():
    import numpy as np

    from jas_prune.classes import choose_classes
    from jas_prune.reporting.path_plots import leaf_order

    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])  # three interleaved groups of similar classes
    sim = np.where(labels[:, None] == labels[None, :], 0.9, 0.1)
    np.fill_diagonal(sim, 1.0)
    order = leaf_order(sim)
    assert sorted(order) == list(range(9))
    assert all(len(set(labels[order][k:k + 3])) == 1 for k in (0, 3, 6))  # each group contiguous
    counts = [5, 5, 5, 5, 5, 5, 5, 5, 0]
    chosen = choose_classes(counts, sim, k=3)
    assert chosen == [0, 1, 2] and len({labels[c] for c in chosen}) == 3  # one per group, lowest index first
    assert choose_classes([1, 3, 3, 0], None, k=2) == [1, 2]


def test_tradeoff_figure_without_a_dense_line(tmp_path):
    from jas_prune.reporting.plots import Panel, tradeoff_figure

    path = tradeoff_figure(tmp_path / "t.png", [Panel("no dense", {"jas": [(30.0, 90.0, None), (50.0, 80.0, 1.5)]})],
                           title="t", xlabel="removed (%)", ylabel="top-1 (%)")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("dense_top1, warned", [(0.125, True), (0.19, False)])
def test_summary_says_when_the_dense_model_is_at_chance(dense_top1, warned):
    from jas_prune.reporting.summary import summary_section

    entries = [{"method": m, "ratio": 0.5, "classes": None, "top1": dense_top1, "top5": 0.6, "params": 10, "macs": 20,
                "checkpoint": f"pruned-{m}-r50.safetensors", "bias_compensation": False, "finetune": None}
               for m in ("jas", "magnitude")]
    m = Metrics.from_dict({"schema_version": SCHEMA_VERSION, "data": {"kind": "imagefolder", "classes": 8},
                           "dense": {"top1": dense_top1, "top5": 0.6, "params": 20, "macs": 40},
                           "pruned": entries})
    text = "\n".join(summary_section([m], None, None))
    assert ("at chance level (12.50 % top-1 with 8 classes" in text) == warned
    assert ("To keep ≥" in text) == (not warned)  # no budget advice drawn from chance-level accuracy
    assert "| 50 % | all | **jas** (tied: magnitude)" in text
