import pytest

from jas_prune.errors import RecipeError
from jas_prune.recipe import SECTIONS, apply_overrides, dump_recipe, load_recipe, parse_recipe


@pytest.mark.parametrize("data, message", [
    ({"version": 1, "attribution": {"steps": 0}}, "attribution.steps: must be ≥ 1"),
    ({"version": 1, "attribution": {"stepz": 3}}, "attribution.stepz: unknown key (did you mean 'steps'?)"),
    ({"version": 1, "atribution": {}}, "atribution: unknown key (did you mean 'attribution'?)"),
    ({"version": 1, "prune": {"vit_slim": {"lamda": 1}}}, "prune.vit_slim.lamda: unknown key (did you mean 'lambda'?)"),
    ({"version": 1, "export": {"onnx": {"zzz": 1}}}, "export.onnx.zzz: unknown key"),
    ({"version": 1, "export": {"onnx": {"batch_sizes": []}}},
     "export.onnx.batch_sizes: must list distinct batch sizes ≥ 1 (got [])"),
    ({"version": 1, "export": {"onnx": {"batch_sizes": [1, 1]}}},
     "export.onnx.batch_sizes: must list distinct batch sizes ≥ 1 (got [1, 1])"),
    ({"version": 1, "export": {"onnx": {"max_seconds": 0}}}, "export.onnx.max_seconds: must be > 0"),
    ({"version": 1, "runtime": {"seed": "abc"}}, "runtime.seed: input should be a valid integer"),
    ({"version": 1, "attribution": {"scope": "patch"}}, "attribution.scope: must be one of 'cls' or 'all'"),
    ({"version": 1, "attribution": {"topk": -2}}, "attribution.topk: must be ≥ 1"),
    ({"version": 1, "attribution": {"layers": [1, 1]}}, "attribution.layers: block indices must be distinct"),
    ({"version": 1, "prune": {"ratios": [0.5, 1.0]}}, "prune.ratios: 1.0 is outside (0, 1)"),
    ({"version": 1, "prune": {"ratios": []}}, "prune.ratios: must list at least one ratio"),
    ({"version": 1, "evaluate": {"cls_mask": {"ablation": {"topk": [0, 5]}}}},
     "evaluate.cls_mask.ablation.topk: every value must be ≥ 1"),
    ({"version": 1, "evaluate": {"cls_mask": {"ablation": {"depth": []}}}},
     "evaluate.cls_mask.ablation.depth: must list at least one value"),
    ({"version": 1, "masks": {"importance": "median"}}, "masks.importance: must be one of 'mean', 'mean_abs'"),
    ({"version": 1, "prune": {"methods": ["jas", "l1"]}}, "prune.methods.1: must be one of"),
    ({"version": 1, "data": {"kind": "imagefolder"}}, "data.root: required when kind is 'imagefolder'"),
    ({"version": 1, "data": {"probe_fraction": 1.5}}, "data.probe_fraction: must be < 1.0"),
    ({"version": 1, "data": {"batch_size": 0}}, "data.batch_size: must be ≥ 1"),
    ({"version": 1, "model": {"pretrained": "maybe"}}, "model.pretrained: input should be a valid boolean"),
    ({"version": 1, "runtime": {"device": "tpu"}}, "runtime.device: must be one of"),
    ({"version": 2}, "version: must be one of 1"),
    ({"model": {}}, "version: missing"),
    ([1, 2], "a recipe must be a YAML mapping"),
])
def test_bad_values_name_the_yaml_path(data, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    assert message in str(info.value)


def test_defaults_and_sections():
    r = parse_recipe({"version": 1})
    assert r.model.name == "builtin:shapes-vit" and r.data.probe_fraction == 0.8
    assert r.attribution is None and r.prune is None and r.export is None
    text = dump_recipe(r)
    order = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")]
    assert order == ["version", *SECTIONS]


def test_overrides_with_type_coercion():
    data = apply_overrides({"version": 1, "attribution": {"steps": 20}},
                           ["attribution.steps=8", "attribution.scope=all", "prune.ratios=[0.3, 0.7]",
                            "prune.vit_slim.lambda=1e-3", "model.checkpoint=null", "data.root=/x/y=z"])
    r = parse_recipe(data)
    assert r.attribution.steps == 8 and isinstance(r.attribution.steps, int)
    assert r.attribution.scope == "all" and r.prune.ratios == [0.3, 0.7]
    assert r.prune.vit_slim.lambda_ == pytest.approx(1e-3) and r.model.checkpoint is None
    assert r.data.root == "/x/y=z"
    assert parse_recipe(apply_overrides(data, ["prune=null"])).prune is None


@pytest.mark.parametrize("override, message", [
    ("attribution.steps", "expected KEY=VALUE"),
    ("attribution..steps=3", "empty key segment"),
    ("model.name.x=3", "model.name is not a section"),
])
def test_bad_overrides(override, message):
    with pytest.raises(RecipeError, match=message):
        apply_overrides({"version": 1, "model": {"name": "x"}}, [override])


def test_load_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodel: [unclosed\n")
    with pytest.raises(RecipeError, match=r"malformed YAML at line \d+"):
        load_recipe(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("version: 1\nattribution:\n  steps: 20\n")
    assert load_recipe(ok, ["attribution.steps=3"]).attribution.steps == 3


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe(path)


def test_billion_laughs_is_refused_in_bounded_time_and_memory(tmp_path):
    """Issue 18: nine levels of nine aliases (9**9 strings once expanded) under model.name, under a
    --set, or deeply nested: refused in well under 2 s and 200 MB (the document is never expanded)."""
    import time
    import tracemalloc

    from conftest import laughs

    path = tmp_path / "laughs.yaml"
    deep = tmp_path / "deep.yaml"
    path.write_text(laughs("model: {name: *i}"))
    deep.write_text("version: 1\nmodel: " + "[" * 5000 + "]" * 5000 + "\n")
    tracemalloc.start()
    t0 = time.perf_counter()
    for p, sets, msg in [(path, [], "more than 100000 values"), (deep, [], "nested deeper than 32"),
                         (path, ["model.name=" + laughs("x: *i").replace("\n", ", ")], "more than 100000 values")]:
        with pytest.raises(RecipeError, match=msg) as info:
            load_recipe(p, sets)
        assert len(str(info.value)) < 300
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 2.0 and peak < 200e6, (seconds, peak)


def test_errors_echo_a_short_value():
    """A huge value is named by its key, echoed at most a few dozen characters (issue 18)."""
    for data in ({"runtime": {"seed": "9" * 100_000}}, {"prune": {"ratios": [0.5] * 50_000 + [2.0]}},
                 {"data": {"kind": "x" * 100_000}}, {"x" * 100_000: 1}):
        with pytest.raises(RecipeError) as info:
            parse_recipe({"version": 1, **data})
        assert len(str(info.value)) < 300, str(info.value)[:400]


@pytest.mark.parametrize("text, message", [
    ("prune: {recover: {steps: -1}}", "prune.recover.steps: must be ≥ 0 (got -1)"),
    ("prune: {recover: {lr: .inf}}", "prune.recover.lr: input should be a finite number (got inf)"),
    ("prune: {recover: {targets: [logits, pixels]}}",
     "prune.recover.targets.1: must be one of 'logits' or 'tokens' (got 'pixels')"),
    ("prune: {recover: {data: test}}", "prune.recover.data: must be one of 'train' or 'probe' (got 'test')"),
    ("prune: {methods: [obs_jas], obs_jas: {alpha: -1}}", "prune.obs_jas.alpha: must be ≥ 0.0 (got -1)"),
    ("prune: {methods: [obs], obs: {group: 0}}", "prune.obs.group: must be ≥ 1 (got 0)"),
    ("prune: {attention: {heads: 1.5}}", "prune.attention.heads: must be < 1.0 (got 1.5)"),
    ("attribution: {units: [ffn, mlp]}", "attribution.units.1: must be one of 'ffn' or 'heads' (got 'mlp')"),
    ("data: {classes: 0}", "data.classes: must be ≥ 1 (got 0)"),
    ("report: {atlas: {images: 0}}", "report.atlas.images: must be ≥ 1 (got 0)"),
])
def test_settings_added_by_issues_18_to_23_refuse_bad_values(refused_recipe, text, message):
    """Each new setting is validated once, by its package's settings class: exit 2, one line."""
    assert refused_recipe(f"version: 1\n{text}\n") == f"jas-prune: error: {message}"
