"""Revision specs and training-progress ordering (pure, fast)."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_bomerge.errors import RevisionError
from hf_bomerge.sources.revisions import (
    Revision,
    naming_style,
    nearest,
    progress_key,
    resolve_revisions,
    select_revisions,
    sort_revisions,
)

PYTHIA = ["step0"] + [f"step{2**i}" for i in range(10)] + [f"step{n}" for n in range(1000, 143001, 1000)]
OLMO2 = ["stage1-step1000-tokens5B", "stage1-step928646-tokens3896B", "stage2-ingredient1-step1000-tokens5B",
         "stage2-ingredient1-step11931-tokens50B", "stage2-ingredient2-step1000-tokens5B"]


def shuffled(names, seed=0):
    names = list(names)
    random.Random(seed).shuffle(names)
    return names


def test_pythia_steps_sort_numerically_not_as_strings():
    assert sort_revisions(shuffled(PYTHIA + ["main"])) == PYTHIA
    assert sorted(PYTHIA) != PYTHIA  # string order would put step1000 before step2


def test_olmo_stage_first_then_ingredient_then_step_then_tokens():
    assert sort_revisions(shuffled(OLMO2)) == OLMO2
    olmo1 = ["step0-tokens0B", "step1000-tokens4B", "step2000-tokens8B", "step10000-tokens42B"]
    assert sort_revisions(shuffled(olmo1)) == olmo1
    assert progress_key("step1000-tokens4B") < progress_key("step1000-tokens5B")


def test_baichuan_token_counts_with_suffixes():
    names = ["train_00220B", "train_00440B", "train_02420B"]
    assert sort_revisions(shuffled(names)) == names
    assert progress_key("train_00220B") == ("tokens", 220 * 10**9)
    assert progress_key("train_500M") < progress_key("train_1B") < progress_key("train_1.5T")
    assert progress_key("train_2K") == ("tokens", 2000)


def test_trainer_checkpoints_and_generic_natural_order():
    trainer = ["checkpoint-5", "checkpoint-500", "checkpoint-1000"]
    assert sort_revisions(shuffled(trainer)) == trainer
    assert progress_key("checkpoint-500") == ("checkpoint", 500)
    assert sort_revisions(["ckpt_10", "ckpt_9", "ckpt_100"]) == ["ckpt_9", "ckpt_10", "ckpt_100"]
    assert sort_revisions(["ep2_it10", "ep1_it30", "ep2_it3"]) == ["ep1_it30", "ep2_it3", "ep2_it10"]


def test_main_and_names_without_numbers_have_no_key():
    assert progress_key("main") is None and progress_key("dev") is None
    assert sort_revisions(["main", "dev", "step1"]) == ["step1"]


def test_styles_are_distinguishable_and_keys_comparable():
    names = ["step1", "train_1B", "checkpoint-1", "ckpt_1", "stage1-step1-tokens1B"]
    assert {naming_style(n) for n in names} == {"step", "tokens", "checkpoint", "natural:ckpt_#"}
    assert len(sort_revisions(names)) == len(names)  # mixed families still sort without TypeError
    assert naming_style("ckpt_1") != naming_style("model_1")


def test_range_bounds_need_not_exist():
    names, note = select_revisions("step100000..step150000", PYTHIA + ["main"], max_checkpoints=0)
    assert names == [f"step{n}" for n in range(100000, 143001, 1000)] and note is None
    assert select_revisions("step3..step9", PYTHIA)[0] == ["step4", "step8"]


def test_open_ended_ranges():
    assert select_revisions("step140000..", PYTHIA)[0] == ["step140000", "step141000", "step142000", "step143000"]
    assert select_revisions("..step2", PYTHIA + ["main"])[0] == ["step0", "step1", "step2"]


def test_step_bound_without_tokens_covers_olmo_names():
    olmo1 = ["step1000-tokens4B", "step2000-tokens8B", "step3000-tokens12B"]
    assert select_revisions("step1000..step2000", olmo1)[0] == olmo1[:2]
    assert select_revisions("stage2-ingredient1-step0..stage2-ingredient1-step99999", OLMO2)[0] == OLMO2[2:4]


def test_reversed_range_is_an_error():
    with pytest.raises(RevisionError, match="comes after.*step2..step8"):
        select_revisions("step8..step2", PYTHIA)


def test_empty_range_names_nearest_on_each_side():
    with pytest.raises(RevisionError) as info:
        select_revisions("step1100..step1900", PYTHIA)
    assert "step1000 (before)" in str(info.value) and "step2000 (after)" in str(info.value)
    with pytest.raises(RevisionError, match=r"step143000 \(before\)"):
        select_revisions("step200000..", PYTHIA)


def test_mixed_style_range_is_an_error():
    with pytest.raises(RevisionError, match="mixes naming styles"):
        select_revisions("step1000..train_00220B", PYTHIA + ["train_00220B"])


def test_range_in_a_style_the_source_lacks():
    with pytest.raises(RevisionError, match="train_00220B"):
        select_revisions("step1..step5", ["train_00220B", "train_00440B"])


def test_range_bound_without_key_is_an_error():
    with pytest.raises(RevisionError, match="cannot be an end"):
        select_revisions("main..step1000", PYTHIA)


def test_comma_list_in_training_order_deduplicated_not_thinned():
    picked = ["step143000", "step1", "step8", "step1", "step64", "step2000", "step512", "step1000", "step4",
              "step2", "step16"]
    names, note = select_revisions(" , ".join(picked), PYTHIA, max_checkpoints=2)
    assert names == sort_revisions(picked) and note is None
    assert select_revisions("main,step2,step1", PYTHIA + ["main"])[0] == ["step1", "step2", "main"]


def test_unknown_revision_lists_nearest():
    with pytest.raises(RevisionError) as info:
        select_revisions("step1000,step1500", PYTHIA)
    message = str(info.value)
    assert "'step1500'" in message and "step1000" in message and "step2000" in message
    assert "'step1000' (nearest" not in message
    with pytest.raises(RevisionError, match="mian.*main"):
        select_revisions("mian", ["main", "step1"])


def test_nearest_helper():
    assert nearest("step1500", PYTHIA, k=2) == ["step1000", "step2000"]
    assert nearest("checkpont-5", ["checkpoint-5", "zzz"], k=1) == ["checkpoint-5"]
    assert nearest("step7", ["train_1B"]) == []


def test_single_name():
    assert select_revisions("step143000", PYTHIA) == (["step143000"], None)
    assert select_revisions("main", PYTHIA + ["main"]) == (["main"], None)


def test_last_n():
    assert select_revisions("last:3", PYTHIA + ["main"])[0] == ["step141000", "step142000", "step143000"]
    names, note = select_revisions("last:5", ["step1", "step2", "main"])
    assert names == ["step1", "step2"] and "more than the 2" in note
    names, note = select_revisions("last:1", ["step1", "step2", "step3", "v2"])
    assert names == ["step3"] and "ignored v2" in note
    for bad in ("last:0", "last:x", "last:"):
        with pytest.raises(RevisionError, match="N >= 1"):
            select_revisions(bad, PYTHIA)


def test_thinning_keeps_both_ends_and_k_items():
    names, note = select_revisions("step100000..step143000", PYTHIA)
    assert len(names) == 8 and names[0] == "step100000" and names[-1] == "step143000"
    assert note.startswith("kept 8 of 44 revisions evenly spaced by step: step100000, ")
    assert select_revisions("last:44", PYTHIA, max_checkpoints=8)[0] == names
    steps = [progress_key(n)[3] for n in names]
    assert all(abs(s - (100000 + i * 43000 / 7)) <= 500 for i, s in enumerate(steps))
    assert len(select_revisions("step0..", PYTHIA, max_checkpoints=0)[0]) == len(PYTHIA)


def test_thinning_across_stages_uses_training_order():
    names, note = select_revisions("stage1-step0..", OLMO2, max_checkpoints=3)
    assert names == [OLMO2[0], OLMO2[2], OLMO2[4]] and "training order" in note


def test_bad_max_checkpoints_and_unparseable_specs():
    for k in (-1, 1):
        with pytest.raises(RevisionError, match="at least 2"):
            select_revisions("step1..step4", PYTHIA, max_checkpoints=k)
    for spec in ("", "a..b..c", "..", "step1,,step2", "step1..step2,step4"):
        with pytest.raises(RevisionError, match=r"A\.\.B .*R1,R2"):
            select_revisions(spec, PYTHIA)


def test_resolve_pins_shas_in_the_same_order():
    refs = {name: f"{i:040x}" for i, name in enumerate(PYTHIA)}
    resolved = resolve_revisions("step142000,step2", refs)
    assert resolved.revisions == (Revision("step2", refs["step2"]), Revision("step142000", refs["step142000"]))
    assert resolved.names == ["step2", "step142000"] and resolved.shas == [refs["step2"], refs["step142000"]]


steps = st.sets(st.integers(0, 10**6), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(steps, st.integers(0, 10**6), st.integers(0, 10**6), st.sampled_from([0, 2, 3, 5, 8]), st.randoms())
def test_range_properties(numbers, a, b, k, rnd):
    lo, hi = min(a, b), max(a, b)
    available = [f"step{n}" for n in numbers] + ["main"]
    inside = sorted(n for n in numbers if lo <= n <= hi)
    try:
        names, note = select_revisions(f"step{lo}..step{hi}", available, max_checkpoints=k)
    except RevisionError:
        assert not inside
        return
    got = [progress_key(n)[3] for n in names]
    assert all(lo <= s <= hi for s in got)
    assert got == sorted(got) and len(set(got)) == len(got)
    assert len(got) == (min(k, len(inside)) if k else len(inside))
    assert got[0] == inside[0] and got[-1] == inside[-1]
    assert set(got) <= set(inside)
    assert (note is not None) == bool(k and len(inside) > k)
    rnd.shuffle(available)
    assert select_revisions(f"step{lo}..step{hi}", available, max_checkpoints=k) == (names, note)


@settings(max_examples=100, deadline=None)
@given(steps, st.integers(1, 70), st.randoms())
def test_last_and_list_properties(numbers, count, rnd):
    available = [f"step{n}" for n in numbers]
    names, _ = select_revisions(f"last:{count}", available, max_checkpoints=0)
    assert names == sort_revisions(available)[-count:]
    chosen = rnd.sample(available, rnd.randint(1, len(available)))
    rnd.shuffle(available)
    assert select_revisions(",".join(chosen), available)[0] == sort_revisions(chosen)
