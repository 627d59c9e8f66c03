"""The typed configuration (`hf_bomerge.specs`): each spec serializes once and reads itself back; a malformed
recipe or an impossible combination is refused with what to do."""

import dataclasses

import pytest
import yaml

from hf_bomerge.errors import BOMergeError, StudyError
from hf_bomerge.specs import EvalSpec, FixedSpec, HeldOutSpec, Recipe, SearchSpec, study_identity

SHAS = ["a" * 40, "b" * 40]


def test_a_recipe_reads_back_what_it_wrote_through_yaml(tmp_path):
    layered = Recipe("org/run", ["step1", "step2"], SHAS, [0.4, 0.6], "folder", "bfloat16", ["embed_out.weight"],
                     {"embeddings": [0.5, 0.5], "blocks 1-2": [0.3, 0.7], "head": [0.4, 0.6]},
                     {"groups": 1, "layers": 2})
    for recipe in (layered, Recipe("org/run", ["step1", "step2"], SHAS, [0.25, 0.75])):
        path = tmp_path / "bomerge_recipe.yaml"
        path.write_text(yaml.safe_dump(recipe.as_dict(), sort_keys=False))
        again = Recipe.load(path)
        assert again == dataclasses.replace(recipe, copied=recipe.copied if recipe.copied is not None else None)
    written = yaml.safe_load(path.read_text())
    assert written["revisions"] == [{"name": "step1", "sha": SHAS[0]}, {"name": "step2", "sha": SHAS[1]}]
    assert "copied" not in written  # an unknown rule stays unknown: `recipe` derives it again


def test_a_malformed_recipe_says_what_a_recipe_is(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(BOMergeError, match="not a YAML mapping.*bomerge_recipe.yaml"):
        Recipe.load(path)
    path.write_text(yaml.safe_dump({"source": "org/run", "weights": [1.0]}))
    with pytest.raises(BOMergeError, match="'revisions'.*missing"):
        Recipe.load(path)
    with pytest.raises(BOMergeError, match="Cannot read the recipe"):
        Recipe.load(tmp_path / "absent.yaml")


def test_search_spec_round_trips_and_ignores_keys_it_does_not_know():
    spec = SearchSpec("schedule", 40, 3, 0.1, 0.3, 0, True, ("a.txt", "b.txt"))
    stored = spec.as_dict()
    assert stored["eval_datasets"] == ["a.txt", "b.txt"]  # JSON-able, as a study attribute must be
    assert SearchSpec.from_dict({**stored, "from_a_newer_version": 1}) == spec


def test_impossible_specs_are_refused_when_built():
    with pytest.raises(StudyError, match="cannot combine with --search pairwise"):
        SearchSpec(space="pairwise", layer_groups=1)
    with pytest.raises(BOMergeError, match=r"--confirm-fraction must be in \[0, 1\), got 1.0"):
        EvalSpec(confirm_fraction=1.0)


def test_eval_spec_reads_a_hub_split_or_a_local_file(tmp_path):
    hub = EvalSpec.from_options("org/data:cfg@test", split="validation")
    assert hub.data == HeldOutSpec("org/data", "cfg", "validation", "text")  # --split wins over @SPLIT
    local = tmp_path / "notes.txt"
    local.write_text("hello\n")
    assert EvalSpec.from_options(str(local), split="validation").data == HeldOutSpec(str(local), None, "train")
    assert EvalSpec.from_options(None, text_column="body").data.text_column == "body"


def test_fixed_spec_turns_a_rule_or_explicit_weights_into_one_vector():
    names = ["step100", "step200", "step300"]
    assert FixedSpec(method="wsm-linear", window=100).weights_for(names) == [0.0, 0.5, 0.5]
    assert FixedSpec((0.2, 0.3, 0.5)).weights_for(names) == [0.2, 0.3, 0.5]
    with pytest.raises(BOMergeError, match="sum to 1"):
        FixedSpec((0.2, 0.3, 0.6)).weights_for(names)
    assert FixedSpec((-0.5, 0.5, 1.0), allow_extrapolation=True).weights_for(names) == [-0.5, 0.5, 1.0]


def test_the_study_identity_changes_with_every_input_that_changes_a_trials_value():
    pins = Recipe("org/run", ["step1", "step2"], SHAS)
    evaluation = {"dataset": "d@validation", "objective": "loss", "data": "digest"}
    base = study_identity(pins, SearchSpec(), "simplex", evaluation)
    changed = [study_identity(dataclasses.replace(pins, shas=["c" * 40, SHAS[1]]), SearchSpec(), "simplex", evaluation),
               study_identity(dataclasses.replace(pins, dtype="float32"), SearchSpec(), "simplex", evaluation),
               study_identity(pins, SearchSpec(lambda_min=0.1), "simplex", evaluation),
               study_identity(pins, SearchSpec(ema_alpha=0.5), "simplex", evaluation),
               study_identity(pins, SearchSpec(), "schedule", evaluation),
               study_identity(pins, SearchSpec(), "simplex", {**evaluation, "data": "other"})]
    assert all(c != base for c in changed)
    # the budget and the seed do not change a trial's value: more trials extend the same study
    assert study_identity(pins, SearchSpec(trials=80, seed=5), "simplex", evaluation) == base


def test_a_study_that_does_not_record_the_specs_is_refused_with_what_to_do(tmp_path):
    """A study made before the specs (session-3 attributes: a flat recipe, no search/evaluation) is not guessed at."""
    import optuna

    from hf_bomerge import from_study

    url = f"sqlite:///{tmp_path / 'old.db'}"
    study = optuna.create_study(study_name="old", storage=url)
    study.set_user_attr("recipe", {"source": "org/run", "revisions": ["step1", "step2"], "shas": SHAS})
    study.set_user_attr("inputs", {"source": "org/run"})
    with pytest.raises(StudyError, match="older hf-bomerge made it.*re-run the search"):
        from_study("old", url)


GOOD = Recipe("org/run", ["step1", "step2"], SHAS, [0.25, 0.75]).as_dict()


@pytest.mark.parametrize("field, value", [
    ("weights", "abc"), ("weights", [1.0]), ("weights", [0.5, float("nan")]), ("weights", [0.5, "0.5"]),
    ("weights", [True, False]), ("copied", 5), ("copied", [5]), ("dtype", "int8"), ("source", ["org/run"]),
    ("source_kind", "ftp"),
    ("revisions", [{"name": "step1", "sha": "--output=/tmp/x"}, {"name": "step2", "sha": SHAS[1]}]),
    ("revisions", [{"name": "step1", "sha": SHAS[0][:12]}, {"name": "step2", "sha": SHAS[1]}]),
    ("revisions", [{"name": 7, "sha": SHAS[0]}, {"name": "step2", "sha": SHAS[1]}]), ("revisions", "step1,step2"),
    ("layer_weights", {"embeddings": [0.5]}), ("layer_weights", [0.5, 0.5]), ("layer_groups", {"groups": "2"}),
])
def test_every_recipe_field_is_checked_by_type_and_value_naming_the_field_and_the_file(tmp_path, field, value):
    path = tmp_path / "bomerge_recipe.yaml"
    path.write_text(yaml.safe_dump({**GOOD, field: value}))
    with pytest.raises(BOMergeError, match=rf"Cannot read the recipe {path}: `{field}` must be .*, got .*"
                                           "bomerge_recipe.yaml that hf-bomerge writes") as err:
        Recipe.load(path)
    assert "\n" not in str(err.value)


def test_a_recipe_that_is_not_yaml_text_is_one_paragraph(tmp_path):
    path = tmp_path / "r.yaml"
    for content in (b"weights: [0.5,\nsource: {\n", b"\xff\xfe\x00binary"):
        path.write_bytes(content)
        with pytest.raises(BOMergeError, match=rf"Cannot read the recipe {path}: .*A recipe is") as err:
            Recipe.load(path)
        assert "\n" not in str(err.value)


def test_a_recipes_dtype_is_one_the_merge_accepts():
    from hf_bomerge.merging.engine import DTYPES

    for dtype in DTYPES:
        assert Recipe.from_dict({**GOOD, "dtype": dtype}).dtype == dtype
    study = Recipe.from_dict({**GOOD, "weights": []}, weighted=False)  # a study's recipe: its trials hold weights
    assert study.weights == []


def test_a_studys_recorded_search_of_the_wrong_type_is_refused():
    with pytest.raises(StudyError, match=r"search setting layer_groups as '2' \(a str, not int\).*re-run the search"):
        SearchSpec.from_dict({**SearchSpec().as_dict(), "layer_groups": "2"})


def test_a_studys_recorded_recipe_is_checked_like_a_file(tmp_path):
    """Its shas reach the source (git) as pins: a pin `--output=FILE` is refused before any source is opened."""
    import optuna

    from hf_bomerge import from_study

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="edited", storage=url)
    recipe = Recipe(str(tmp_path), ["step1", "step2"], [f"--output={tmp_path / 'planted'}", SHAS[1]], source_kind="git")
    for key, value in {"recipe": recipe.as_dict(), "search": SearchSpec().as_dict(),
                       "evaluation": {"objective": "loss"}}.items():
        study.set_user_attr(key, value)
    with pytest.raises(BOMergeError, match="Cannot read the recipe of study 'edited': `revisions` must be"):
        from_study("edited", url)
    assert not (tmp_path / "planted").exists()
