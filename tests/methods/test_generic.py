"""Invariants every registered method must satisfy (timm style: parametrized over the registry).

A new adapter is covered without editing this file: it runs with its digits-track schedule on a small slice
of the digits training set, from a briefly trained dense small CNN.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bench.models import NormalizedModel
from bench.sparsity import measure_sparsity
from methods.base import PruneData, PruneResult, get_method, list_methods

METHODS = list_methods()
N_TRAIN = 64


@pytest.fixture(scope="module")
def dense(digits_cnn):
    return digits_cnn


def _run(method_key, dense, digits, sparsity, seed=0) -> tuple[PruneResult, object]:
    xtr, ytr, _, _ = digits
    method = get_method(method_key)
    cfg = method.digits_config()
    data = PruneData(xtr[:N_TRAIN], ytr[:N_TRAIN], eps=0.2)
    torch.manual_seed(seed)
    return method.prune(copy.deepcopy(dense), sparsity, data, cfg, seed=seed), method


def _sparsity_for(method_key) -> float:
    method = get_method(method_key)
    return method.sparsities[len(method.sparsities) // 2] if method.sparsities else 0.9


def test_registry_is_not_empty():
    assert METHODS, "no pruning method registered"


@pytest.mark.parametrize("key", METHODS)
def test_card_is_complete(key):
    card = get_method(key).card
    assert card.key == key
    assert card.structure in ("US", "S") and card.scope in ("local", "global") and card.pipeline in "ABD"
    assert card.criterion in ("LWM", "SOLWM", "RELWM", "LIS", "HGM", "BCS")
    assert card.paper_url.startswith("https://") and card.losses and card.native_sparsity


@pytest.mark.parametrize("key", METHODS)
def test_prune_gives_a_plain_pruned_module(key, dense, digits):
    sparsity = _sparsity_for(key)
    result, method = _run(key, dense, digits, sparsity)
    model = result.model
    assert isinstance(model, NormalizedModel)
    assert set(model.state_dict()) == set(dense.state_dict()), "the result must load into the dense architecture"
    _, _, xte, _ = digits
    with torch.no_grad():
        logits = model.eval()(xte[:5])
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    pruned = set(method.pruned_layers(dense, method.digits_config()))
    report = measure_sparsity(model)
    zeros = sum(report.per_layer[name][1] for name in pruned)
    numel = sum(report.per_layer[name][0] for name in pruned)
    # The method's own rule: `sparsity` of the weights of the layers it prunes (rounding: one weight per layer),
    # or within the declared tolerance for structured methods.
    if method.sparsity_tolerance is None:
        assert abs(zeros - sparsity * numel) <= len(pruned) + 1
    else:
        assert abs(zeros / numel - sparsity) <= method.sparsity_tolerance
    dense_report = measure_sparsity(dense)
    for name, (_, layer_zeros, _) in report.per_layer.items():
        if name not in pruned:
            assert layer_zeros == dense_report.per_layer[name][1], f"{key} must leave {name} dense"
    assert result.native_sparsity and result.config


@pytest.mark.parametrize("key", METHODS)
def test_same_seed_same_mask(key, dense, digits):
    sparsity = _sparsity_for(key)
    a, _ = _run(key, dense, digits, sparsity, seed=0)
    b, _ = _run(key, dense, digits, sparsity, seed=0)
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        if name.endswith("weight") and wa.dim() > 1:
            assert torch.equal(wa == 0, wb == 0), f"{key}: masks differ at {name}"
