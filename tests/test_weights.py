"""Weight rules: every rule is a valid weight vector, oldest first; the search spaces map onto them."""

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from hf_bomerge.errors import WeightsError
from hf_bomerge.merging import weights as W
from hf_bomerge.searching.weight_spaces import SPACES, SearchSpace, make_space, register


@given(st.integers(1, 64), st.floats(0.01, 1.0))
def test_every_rule_sums_to_one_and_is_non_negative(n, alpha):
    for w in (W.uniform(n), W.ema(n, alpha), W.wma(n)):
        assert len(w) == n
        assert math.isclose(sum(w), 1.0, abs_tol=1e-9)
        assert all(x >= 0 for x in w)
        W.check(w, n)


def test_ema_follows_pma_and_the_oldest_takes_the_remainder():
    w = W.ema(4, 0.2)
    assert w[1:] == pytest.approx([0.2 * 0.8**2, 0.2 * 0.8, 0.2])
    assert w[0] == pytest.approx(0.8**3)


def test_wma_weights_grow_with_training_progress():
    assert W.wma(4) == pytest.approx([0.1, 0.2, 0.3, 0.4])


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=10))
@example([0.9999999999999999, 1.0])  # a stick of 1e-8 left: once dropped by the inverse
def test_simplex_coordinates_always_give_valid_weights_and_invert(z):
    w = W.from_simplex_coords(z)
    assert len(w) == len(z) + 1
    assert math.isclose(sum(w), 1.0, abs_tol=1e-9) and all(x >= -1e-12 for x in w)
    assert W.from_simplex_coords(W.to_simplex_coords(w)) == pytest.approx(w, abs=1e-9)


@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=10), st.sampled_from([0.0, math.exp(-6.0)]))
def test_ratio_coordinates_always_give_valid_weights_and_invert(x, floor):
    x = [floor + (1 - floor) * v for v in x]
    w = W.from_ratio_coords(x, floor)
    assert len(w) == len(x)
    assert math.isclose(sum(w), 1.0, abs_tol=1e-9) and all(v >= 0 for v in w)
    back = W.to_ratio_coords(w, floor)
    assert all(floor <= v <= 1.0 for v in back) and max(back) == 1.0
    assert W.from_ratio_coords(back, floor) == pytest.approx(w, abs=1e-9)


def test_ratio_coordinates_hit_every_corner_exactly():
    floor = math.exp(-6.0)
    for n in range(2, 9):
        for i in range(n):
            x = W.to_ratio_coords(W.one_hot(n, i), floor)
            assert x == [1.0 if j == i else floor for j in range(n)]
            assert W.from_ratio_coords(x, floor) == W.one_hot(n, i)
    assert W.from_ratio_coords([floor] * 3, floor) == W.uniform(3)  # no weight anywhere: the uniform average


@given(st.integers(2, 50), st.integers(1, 50), st.floats(0.0, 1.0))
def test_window_decay_family_is_valid_and_covers_the_baselines(n, window, decay):
    w = W.window_decay(n, window, decay)
    assert math.isclose(sum(w), 1.0, abs_tol=1e-9) and all(x >= 0 for x in w)
    assert W.window_decay(n, n, 0.0) == pytest.approx(W.uniform(n))
    assert W.window_decay(n, n, 1.0) == W.one_hot(n, n - 1)


@pytest.mark.parametrize("bad, match", [([0.5], "2 checkpoints"), ([-0.5, 1.5], "--allow-extrapolation"),
                                        ([0.3, 0.3], "sum to"), ([float("nan"), 1.0], "finite")])
def test_invalid_weights_are_refused_with_the_fix(bad, match):
    with pytest.raises(WeightsError, match=match):
        W.check(bad, 2)


def test_extrapolation_only_when_asked():
    assert W.check([-0.5, 1.5], 2, allow_extrapolation=True) == [-0.5, 1.5]


@pytest.mark.parametrize("n, kind", [(2, "pairwise"), (4, "simplex"), (8, "simplex"), (9, "schedule"),
                                     (44, "schedule")])
def test_auto_picks_the_space_by_number_of_checkpoints(n, kind):
    assert make_space("auto", n, progress=[100.0 * (i + 1) for i in range(n)]).kind == kind


@pytest.mark.parametrize("n", range(2, 9))
def test_simplex_seeds_map_back_exactly_to_their_weights(n):
    simplex = make_space("simplex", n)
    for label, w in simplex.seeds([f"s{i}" for i in range(n)]):
        params = simplex.params_for(w)
        assert params is not None and set(params) == set(simplex.param_names()), label
        assert all(math.exp(-6.0) <= v <= 1.0 for v in params.values()), label  # inside the box
        assert simplex.weights(params) == pytest.approx(w, abs=1e-12), label
        if max(w) == 1.0:
            assert simplex.weights(params) == w, label  # a single checkpoint exactly, not ~99% of it


def test_seeds_are_in_their_space():
    labels = ["a", "b", "c", "d"]
    simplex = make_space("simplex", 4)
    for label, w in simplex.seeds(labels):
        assert simplex.params_for(w) is not None, label
    pair = make_space("pairwise", 2)
    first = [w for _, w in pair.seeds(["old", "new"])][:2]
    assert first == [[0.0, 1.0], [1.0, 0.0]]  # both bounds of λ first
    family = make_space("family", 20)
    names = [label for label, w in family.seeds([f"s{i}" for i in range(20)]) if family.params_for(w) is not None]
    assert names == ["s19", "uniform"]  # PMA's EMA is not in the window/decay family: evaluated beside it


def test_a_new_search_space_is_one_registered_class():
    @register
    class Latest(SearchSpace):  # the latest checkpoint plus a share λ of the one before
        name = "latest-test"

        def suggest(self, trial):
            return self.weights({"share": trial.suggest_float("share", 0.0, 0.5)})

        def weights(self, params):
            return [0.0] * (self.n - 2) + [params["share"], 1.0 - params["share"]]

        def param_names(self):
            return ["share"]

        def raw_params(self, weights):
            return {"share": weights[-2]}

        def singles(self, labels):
            return [(labels[-1], W.one_hot(self.n, self.n - 1))]

    try:
        space = make_space("latest-test", 3)
        assert space.kind == "latest-test" and space.params_for([0.0, 0.25, 0.75]) == {"share": 0.25}
        assert space.params_for(W.uniform(3)) is None  # not in this space: evaluated beside the study
        assert [label for label, _ in space.seeds(["a", "b", "c"])] == ["c", "uniform", "ema"]
    finally:
        del SPACES["latest-test"]
    with pytest.raises(Exception, match="latest-test"):
        make_space("latest-test", 3)


def test_fixed_rules_are_one_registry():
    assert W.METHODS == ("sma", "ema", "wma", "wsm-linear", "wsm-cosine", "wsm-sqrt")
    assert W.rule("uniform", 4) == W.rule("sma", 4) == W.uniform(4)
    assert W.rule("ema", 3, 0.5) == W.ema(3, 0.5)
    with pytest.raises(WeightsError, match="sma, ema, wma"):
        W.rule("median", 3)
