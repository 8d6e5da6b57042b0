"""The run spec: a stable hash over every field, a protocol hash without device and batch, chunks, validation."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest

from bench.registry import UnknownNameError
from bench.spec import AA_ATTACKS, PROTOCOL_NAME, RunSpec

BASE = dict(
    dataset="digits",
    n_samples=360,
    norm="Linf",
    eps="0.2",
    eps_value=0.2,
    version="plus",
    fmn_steps=100,
    batch_size=60,
    seed=0,
    device="cpu",
)

# One valid change per field.
CHANGES = {
    "dataset": "cifar10",
    "n_samples": 359,
    "norm": "L2",
    "eps": "1/5",
    "eps_value": 0.2000001,
    "version": "standard",
    "fmn_steps": 99,
    "batch_size": 59,
    "seed": 1,
    "device": "cuda:0",
    "protocol": "apbench-2",
    "fmn_init": "none",
}
NOT_IN_PROTOCOL_HASH = {"device", "batch_size"}


def _spec(**kw) -> RunSpec:
    return RunSpec(**{**BASE, **kw})


def _changed(field: str) -> RunSpec:
    # eps_value is derived from eps: it changes when another budget is written.
    if field == "eps_value":
        return _spec(eps=repr(CHANGES["eps_value"]), eps_value=CHANGES["eps_value"])
    return _spec(**{field: CHANGES[field]})


def test_every_field_has_a_change_under_test():
    assert set(CHANGES) == {f.name for f in dataclasses.fields(RunSpec)}


def test_hash_is_stable_for_equal_specs():
    a, b = _spec(), _spec()
    assert a == b and a is not b
    assert a.hash == b.hash
    assert a.protocol_hash == b.protocol_hash
    assert len(a.hash) == 64 and int(a.hash, 16) >= 0


def test_hash_is_the_sha256_of_the_canonical_json():
    spec = _spec()
    fields = {**BASE, "protocol": PROTOCOL_NAME, "fmn_init": "autoattack"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    assert spec.hash == hashlib.sha256(canonical.encode()).hexdigest()


def test_hash_is_stable_across_processes():
    code = (
        "import json, sys\n"
        "from bench.spec import RunSpec\n"
        "s = RunSpec(**json.loads(sys.argv[1]))\n"
        "print(s.hash, s.protocol_hash)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(BASE)], capture_output=True, text=True, check=True, env=env
    )
    spec = _spec()
    assert out.stdout.split() == [spec.hash, spec.protocol_hash]


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_any_single_field_changes_the_hash(field):
    base, changed = _spec(), _changed(field)
    assert changed.hash != base.hash
    if field in NOT_IN_PROTOCOL_HASH:
        assert changed.protocol_hash == base.protocol_hash
    else:
        assert changed.protocol_hash != base.protocol_hash


def test_field_order_does_not_matter():
    reordered = RunSpec(**dict(reversed(list(BASE.items()))))
    assert reordered.hash == _spec().hash


def test_attacks_follow_the_version():
    assert _spec(version="plus").attacks == ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
    assert _spec(version="standard").attacks == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert set(AA_ATTACKS) == {"plus", "standard"}


def test_spec_is_frozen():
    spec = _spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("n", "batch"),
    [(25, 10), (20, 10), (7, 250), (1, 1), (360, 60), (361, 60), (10, 3)],
)
def test_chunks_cover_every_sample_once_in_order(n, batch):
    chunks = _spec(n_samples=n, batch_size=batch).chunks()
    ids = [i for chunk in chunks for i in chunk]
    assert ids == list(range(n))
    assert len(chunks) == math.ceil(n / batch)
    assert all(len(c) == batch for c in chunks[:-1])
    assert len(chunks[-1]) == (n % batch or batch)
    assert all(c.step == 1 for c in chunks)


def test_chunks_of_25_by_10():
    assert _spec(n_samples=25, batch_size=10).chunks() == [range(0, 10), range(10, 20), range(20, 25)]


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"norm": "linf"}, r"unknown norm 'linf'; use one of Linf, L2"),
        ({"norm": "L1"}, r"unknown norm 'L1'; use one of Linf, L2"),
        ({"version": "rand"}, r"unknown AutoAttack version 'rand'; use one of plus, standard"),
        ({"n_samples": 0}, r"n-samples must be at least 1, got 0"),
        ({"n_samples": -5}, r"n-samples must be at least 1, got -5"),
        ({"fmn_steps": 0}, r"fmn-steps must be at least 1, got 0"),
        ({"batch_size": 0}, r"batch-size must be at least 1, got 0"),
        ({"eps": "0", "eps_value": 0.0}, r"eps must be a finite positive number, got '0'"),
        ({"eps": "-0.1", "eps_value": -0.1}, r"eps must be a finite positive number, got '-0.1'"),
        ({"eps": "nan", "eps_value": math.nan}, r"eps must be a finite positive number"),
        # parse_eps refuses inf; a spec built directly must too.
        ({"eps": "inf", "eps_value": math.inf}, r"eps must be a finite positive number"),
    ],
)
def test_invalid_specs_are_refused_with_the_fix(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        _spec(**kw)


def test_to_dict_round_trips():
    spec = _spec(version="standard", seed=7)
    assert RunSpec(**spec.to_dict()) == spec
    assert RunSpec(**json.loads(json.dumps(spec.to_dict()))).hash == spec.hash
    for spec in (_spec(fmn_init="none"), _spec(fmn_init="autoattack")):
        assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# A spec dict as every evaluation stored before FMN's warm start wrote it, and the hashes the code of that time
# (commit 9cc88ae, bench/spec.py) gave it: stored evaluations are found by these values, so they must never move.
LEGACY_SPEC = {**BASE, "protocol": "apbench-1"}
LEGACY_HASH = "8e5d451b911dd04760ccbc712092eb0e4cb4e2152b1bbcf5953277d0fbafe436"
LEGACY_PROTOCOL_HASH = "c7f51e994562bb6a66b867b52d8cbc3812e7897697c5a4659b18c93a486c2f26"


def test_a_stored_spec_from_before_the_warm_start_keeps_its_hashes():
    legacy = RunSpec.from_dict(LEGACY_SPEC)
    assert legacy.fmn_init == "none"
    assert legacy.to_dict() == LEGACY_SPEC
    assert (legacy.hash, legacy.protocol_hash) == (LEGACY_HASH, LEGACY_PROTOCOL_HASH)
    assert _spec(fmn_init="none").hash == LEGACY_HASH


def test_the_warm_start_is_a_new_protocol():
    spec = _spec()
    assert spec.fmn_init == "autoattack"
    assert spec.to_dict()["fmn_init"] == "autoattack"
    assert spec.hash != LEGACY_HASH and spec.protocol_hash != LEGACY_PROTOCOL_HASH
    # Only the new field differs: device and batch size still stay out of the protocol hash.
    assert _spec(device="cuda:0", batch_size=7).protocol_hash == spec.protocol_hash


def test_an_unknown_fmn_start_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown FMN start 'aa'; use one of none, autoattack"):
        _spec(fmn_init="aa")


# --- One budget: eps as written, eps_value derived -------------------------------------------------------------

WITHOUT_VALUE = {k: v for k, v in BASE.items() if k != "eps_value"}


def test_eps_value_is_derived_from_eps_and_keeps_the_hash():
    spec = RunSpec(**WITHOUT_VALUE)
    assert spec.eps_value == 0.2
    assert spec == _spec() and spec.hash == _spec().hash
    legacy = {k: v for k, v in LEGACY_SPEC.items() if k != "eps_value"}
    assert RunSpec.from_dict(legacy).hash == LEGACY_HASH
    assert RunSpec(**{**WITHOUT_VALUE, "eps": "8/255"}).eps_value == 8 / 255
    assert RunSpec(**{**WITHOUT_VALUE, "eps": " 1/5 "}).eps_value == 0.2


@pytest.mark.parametrize(("eps", "value"), [("0.2", 0.3), ("8/255", 0.031), ("8/255", 0.2)])
def test_an_eps_value_that_disagrees_with_eps_is_refused_naming_both(eps, value):
    with pytest.raises(
        ValueError, match=rf"eps '{eps}' is .*, but eps_value {value} was given with it; give eps alone"
    ):
        _spec(eps=eps, eps_value=value)


def test_an_equal_eps_value_is_stored_as_the_parsed_float():
    # An int 1 and the float 1.0 are one budget; the hash must not depend on which was typed.
    assert _spec(eps="1", eps_value=1).to_dict()["eps_value"] == 1.0
    assert isinstance(_spec(eps="1", eps_value=1).eps_value, float)
    assert _spec(eps="1", eps_value=1).hash == RunSpec(**{**WITHOUT_VALUE, "eps": "1"}).hash


@pytest.mark.parametrize(
    ("eps", "pattern"),
    [(0.2, r"invalid eps 0.2: give it as a string"), ("abc", r"invalid eps 'abc'"), ("0", r"must be finite and > 0")],
)
def test_an_unreadable_eps_is_refused(eps, pattern):
    with pytest.raises(ValueError, match=pattern):
        RunSpec(**{**WITHOUT_VALUE, "eps": eps})


# --- for_dataset: the command line's defaults ---------------------------------------------------------------------


def test_for_dataset_applies_the_datasets_protocol_defaults():
    digits = RunSpec.for_dataset("digits")
    assert (digits.eps, digits.eps_value, digits.n_samples, digits.batch_size) == ("0.2", 0.2, 360, 180)
    assert (digits.norm, digits.version, digits.fmn_steps, digits.seed, digits.device) == (
        "Linf",
        "plus",
        100,
        0,
        "cpu",
    )
    cifar = RunSpec.for_dataset("cifar10")
    assert (cifar.eps, cifar.n_samples, cifar.batch_size) == ("8/255", 10000, 250)
    assert RunSpec.for_dataset("cifar10", norm="L2").eps == "0.5"
    # The pinned spec, built from the options the command line takes.
    assert RunSpec.for_dataset("digits", n_samples=360, batch_size=60) == _spec()


def test_for_dataset_writes_a_float_budget_as_the_command_line_reads_it():
    assert RunSpec.for_dataset("digits", eps=0.3).eps == "0.3"
    assert RunSpec.for_dataset("digits", eps=0.3) == RunSpec.for_dataset("digits", eps="0.3")
    assert RunSpec.for_dataset("digits", eps="8/255").eps_value == 8 / 255


@pytest.mark.parametrize(
    ("kw", "error", "pattern"),
    [
        ({"n_samples": 361}, ValueError, r"n_samples must be between 1 and 360 \(the digits test split\); got 361"),
        ({"n_samples": 0}, ValueError, r"n_samples must be between 1 and 360"),
        ({"eps": "8"}, ValueError, r"eps must be in \(0, 1\] under Linf .* e\.g\. 8/255"),
        ({"eps": "2/0"}, ValueError, r"invalid eps '2/0': division by zero"),
        ({"norm": "linf"}, ValueError, r"unknown norm 'linf'"),
        ({"dataset": "digit"}, UnknownNameError, r"did you mean 'digits'"),
    ],
)
def test_for_dataset_refuses_bad_options_with_the_fix(kw, error, pattern):
    kw = {"dataset": "digits", **kw}
    with pytest.raises(error, match=pattern):
        RunSpec.for_dataset(kw.pop("dataset"), **kw)


def test_an_l2_budget_above_one_is_allowed():
    assert RunSpec.for_dataset("digits", norm="L2", eps="2").eps_value == 2.0
