"""One router vocabulary (audit 162): every function that takes a router, a layer of a router
or a ``(layer, router)`` pair reads it through `RoutingLayout.site` / `RoutingLayout.check`,
so one spelling means one router everywhere and a wrong one gets the same refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import LAYOUTS, tiny_model

from hooked_attnres.analysis.effects import plan_ablations
from hooked_attnres.analysis.schedule import recency_schedule
from hooked_attnres.interventions import check_routers, mask_hook, mask_sources, select_sites
from hooked_attnres.patching import depth_state_name

N_LAYERS = 2
NOT_LAYERS = [True, np.True_, 1.0, np.float64(1.0), "1"]


def small(layout: str):
    return tiny_model(n_layers=N_LAYERS, attnres_layout=layout, attnres_num_blocks=1)


def test_recency_schedule_weights_read_the_router_as_model_site_does():
    """``RecencySchedule.weights(layer, router)`` filtered its table with ``==``: ``True``
    and ``1.0`` read as layer 1, and a typo (``"attn_ress"``), a negative or an out-of-range
    layer gave an empty tensor without a word."""
    schedule = recency_schedule(3, 3)
    table = schedule.sources
    for layer in range(3):
        for router in ("attn_res", "mlp_res"):
            rows = table[(table.layer == layer) & (table.router == router)]
            expected = torch.tensor(rows.sort_values("source_index").weight.to_numpy())
            assert torch.equal(schedule.weights(layer, router), expected)
            assert torch.equal(schedule.weights(np.int64(layer), router), expected)
            assert torch.equal(schedule.weights(layer - 3, router), expected)  # from the end
    for bad in [*NOT_LAYERS, 3, -4, None]:
        with pytest.raises(ValueError, match=r"layer must be an integer in \[-3, 3\)"):
            schedule.weights(bad, "attn_res")
    with pytest.raises(ValueError, match=r"router must be one of .*got 'attn_ress'"):
        schedule.weights(1, "attn_ress")
    with pytest.raises(ValueError, match="'cumulative' layout has no final router"):
        schedule.weights(None, "final_res")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_depth_state_name_checks_the_layer_in_every_layout(layout):
    """In layout ``"none"`` `depth_state_name` formatted any layer into a hook name:
    ``-1`` gave ``"blocks.-1.hook_resid_pre"``, ``True`` ``"blocks.True.hook_resid_pre"``,
    ``n_layers`` a layer the model lacks; the routed layouts counted ``-1`` from the end."""
    model = small(layout)
    for sublayer in ("attn", "mlp"):
        for layer in range(N_LAYERS):
            name = depth_state_name(model, layer, sublayer)
            assert name in model.hook_dict
            assert depth_state_name(model, layer - N_LAYERS, sublayer) == name
        for bad in [*NOT_LAYERS, N_LAYERS, -N_LAYERS - 1]:
            with pytest.raises(ValueError, match=r"layer must be an integer in \[-2, 2\)"):
                depth_state_name(model, bad, sublayer)


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full"])
def test_layer_router_pairs_refuse_what_model_site_refuses(layout):
    """``model.source_labels(layer, router)`` (and ``source_families``, ``router``,
    ``norm_after``, ``routing_layout.n_sources``) raised ``TypeError("expected a RouterSite or
    a (layer, router) pair, got True")`` for a layer that ``model.site`` refuses with a
    ``ValueError`` saying what a layer is."""
    model = small(layout)
    layout_ = model.routing_layout
    calls = [
        model.source_labels,
        model.source_families,
        model.router,
        model.norm_after,
        layout_.n_sources,
    ]
    for bad in NOT_LAYERS:
        with pytest.raises(ValueError) as expected:
            model.site(bad, "attn_res")
        for call in calls:
            with pytest.raises(ValueError) as got:
                call(bad, "attn_res")
            assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full"])
def test_a_site_with_another_router_is_refused(layout):
    """``model.source_labels((0, "attn_res"), "mlp_res")`` returned layer 0's attention
    labels: the router argument was dropped without a word when the first argument was a
    pair or a `RouterSite`."""
    model = small(layout)
    site = model.site(0, "attn_res")
    for given in (site, (0, "attn_res")):
        for call in (model.source_labels, model.source_families, model.router):
            with pytest.raises(ValueError, match="names its router"):
                call(given, "mlp_res")
    assert model.source_labels(0, "mlp_res") == model.routing_layout.labels(
        model.site(0, "mlp_res")
    )


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full"])
def test_a_site_with_its_own_router_is_accepted(layout):
    """``model.source_labels((0, "attn_res"), "attn_res")`` was refused ("names its router,
    and router='attn_res' was given too") though the router given is the site's own: the
    same router, read by the one rule (`router_kind`: a NumPy string too, ``(-1, ...)``
    counted from the end), gives the site's answer; another router stays refused."""
    model = small(layout)
    layout_ = model.routing_layout
    sites = model.sites()
    for site in sites:
        given = [site, (site.layer, site.kind)]
        if site.layer is not None:
            given.append((site.layer - N_LAYERS, site.kind))
        expected = layout_.labels(site)
        for spelled in given:
            for kind in (site.kind, np.str_(site.kind)):
                assert model.source_labels(spelled, kind) == expected
                assert model.source_families(spelled, kind) == layout_.families(site)
                assert model.router(spelled, kind) is model.router(site)
                assert model.norm_after(spelled, kind) is model.norm_after(site)
                assert layout_.n_sources(spelled, kind) == len(expected)
            for other in (
                kind for kind in ("attn_res", "mlp_res", "final_res") if kind != site.kind
            ):
                with pytest.raises(ValueError, match=f"names its router.*router='{other}'"):
                    model.source_labels(spelled, other)
            with pytest.raises(ValueError, match=r"router must be one of .*got 'attn_ress'"):
                model.source_labels(spelled, "attn_ress")


@pytest.mark.parametrize("layout", ["kimi", "full"])
def test_the_final_router_layer_is_none_or_the_integer_n_layers(layout):
    """``model.site(2.0, "final_res")`` was the final router (``2.0 == n_layers``) while
    ``model.site(1.0, "attn_res")`` is refused: a float is no layer anywhere."""
    model = small(layout)
    final = model.site(None, "final_res")
    assert model.site(N_LAYERS, "final_res") == final
    assert model.site(np.int64(N_LAYERS), "final_res") == final
    for bad in (float(N_LAYERS), np.float64(N_LAYERS), True, -1, str(N_LAYERS)):
        with pytest.raises(ValueError, match="the final router has no layer"):
            model.site(bad, "final_res")
        with pytest.raises(ValueError, match="the final router has no layer"):
            model.source_labels((bad, "final_res"))


def test_mask_hook_refuses_a_pair_by_name():
    """`mask_hook` takes a `RouterSite` (it has no model to check a pair against); a pair
    failed with ``AttributeError: 'tuple' object has no attribute 'hook'``."""
    where = torch.tensor([True, False])
    for bad in [(1, "mlp_res"), "blocks.1.mlp_res.hook_weights"]:
        with pytest.raises(TypeError, match=r"mask_hook takes a RouterSite.*model\.site"):
            mask_hook(bad, where)


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full"])
def test_selections_take_layer_router_pairs_as_sites(layout):
    """``routers=`` of `select_sites` (and so of `mask_sources`, `set_weights`,
    `patch_sources`) took `RouterSite` s but refused the ``(layer, router)`` pair that
    ``model.source_labels`` and ``set_weights``' dict keys take, with "router must be one of
    (...), got (1, 'mlp_res')"."""
    model = small(layout)
    site = model.site(1, "mlp_res")
    for given in [(1, "mlp_res"), [(1, "mlp_res")], [(-1, "mlp_res")], [(np.int64(1), "mlp_res")]]:
        assert select_sites(model, given) == [site]
    both = select_sites(model, [(0, "attn_res"), "mlp_res"])
    assert both == [model.site(0, "attn_res"), *model.sites("mlp_res")]
    by_pair = [name for name, _ in mask_sources(model, "embedding", routers=[(-1, "mlp_res")])]
    by_site = [name for name, _ in mask_sources(model, "embedding", routers=site)]
    assert by_pair == by_site == [site.hook("logits")]
    for bad in NOT_LAYERS:
        with pytest.raises(ValueError, match=r"layer must be an integer in \[-2, 2\)"):
            select_sites(model, [(bad, "mlp_res")])
    with pytest.raises(ValueError, match="router must be one of .*got 'mlp_ress'"):
        select_sites(model, [(1, "mlp_ress")])


@pytest.mark.parametrize("layout", ["kimi", "cumulative"])
def test_layer_lists_refuse_a_non_layer_as_model_site_does(layout):
    """A layer of ``layers=`` / custom ``bands`` / ``groups`` that is no integer was refused
    as ``layer True is not in [-2, 2)`` (it is, as a number): the message of ``model.site``
    says what a layer is."""
    model = small(layout)
    for bad in (True, np.True_, 1.0, np.float64(1.0)):
        with pytest.raises(ValueError, match=r"layer must be an integer in \[-2, 2\), got"):
            select_sites(model, layers=[0, bad])
        with pytest.raises(ValueError, match=r"layer must be an integer in \[-2, 2\), got"):
            plan_ablations(model, "current", "attn_res", groups={"a": [bad]})
    assert select_sites(model, "attn_res", layers=[-1]) == [model.site(-1, "attn_res")]


@pytest.mark.parametrize("layout", ["kimi", "cumulative"])
def test_type_only_router_arguments_name_the_single_router_spelling(layout):
    """The sweeps take router types (rows by type and layer); a pair was refused as "router
    must be one of (...), got 1" and a `RouterSite` as "routers must be a list ... of items",
    neither saying that single routers go to `select_sites` and the interventions."""
    model = small(layout)
    site = model.site(1, "mlp_res")
    for given in [(1, "mlp_res"), [(1, "mlp_res")], site, [site], ["attn_res", site]]:
        with pytest.raises(ValueError, match="names single routers.*select_sites"):
            plan_ablations(model, "current", given)
        with pytest.raises(ValueError, match="names single routers.*select_sites"):
            check_routers(model, given)


@pytest.mark.parametrize("layout", ["kimi", "cumulative"])
def test_a_tuple_of_a_site_and_a_router_type_is_two_routers(layout):
    """``routers=(site, "mlp_res")`` (a tuple of a `RouterSite` and a router type) selected
    the site and the MLP routers, as the list ``[site, "mlp_res"]`` does, until the pair
    spelling (audit 162) read it as the pair ``(layer=site, router="mlp_res")`` and refused
    it: "layer must be an integer ..., got RouterSite(...)" (audit 165)."""
    model = small(layout)
    site = model.site(1, "attn_res")
    expected = [*model.sites("mlp_res"), site]
    expected.sort(key=lambda s: s.sublayer)
    for first in (site, (1, "attn_res")):
        assert select_sites(model, (first, "mlp_res")) == expected
        assert select_sites(model, [first, "mlp_res"]) == expected
        hooks = mask_sources(model, "embedding", routers=(first, "mlp_res"), layers=[1])
        listed = mask_sources(model, "embedding", routers=[first, "mlp_res"], layers=[1])
        assert [name for name, _ in hooks] == [name for name, _ in listed]
        assert [name for name, _ in hooks] == [
            site.hook("logits"),
            model.site(1, "mlp_res").hook("logits"),
        ]


@pytest.mark.parametrize("layout", ["kimi", "cumulative"])
def test_layers_beside_only_explicit_routers_is_refused_not_ignored(layout):
    """``layers=`` / ``bands=`` select layers of router types; explicit routers name their
    own layer. With only explicit routers, ``mask_sources(..., routers=[(1, "attn_res")],
    layers=[0])`` masked layer 1 and ignored ``layers`` without a word."""
    model = small(layout)
    for routers in ([(1, "attn_res")], model.site(1, "attn_res"), (1, "attn_res")):
        with pytest.raises(ValueError, match=r"names only single routers.*layers=\[0\]"):
            select_sites(model, routers, layers=[0])
        with pytest.raises(ValueError, match=r"names only single routers.*layers='early'"):
            mask_sources(model, "embedding", routers=routers, layers="early")
        with pytest.raises(ValueError, match=r"names only single routers"):
            select_sites(model, routers, layers=["a"], bands={"a": [0]})
        assert select_sites(model, routers) == [model.site(1, "attn_res")]
    # beside a router type, layers selects that type's layers: kept
    mixed = select_sites(model, [(1, "attn_res"), "mlp_res"], layers=[0])
    assert mixed == [model.site(0, "mlp_res"), model.site(1, "attn_res")]
