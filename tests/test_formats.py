"""bench evaluate --format: author checkpoints are converted on the way in and the plain model is stored."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from click.testing import CliRunner

from bench.catalog import build_model
from bench.cli import main
from methods.convert import FORMATS, load_converted
from methods.hydra import hydra_mask


def _hydra_subnet_file(tmp_path):
    torch.manual_seed(0)
    net = build_model("small_cnn", "digits").net
    sd = {}
    for key, value in net.state_dict().items():
        sd[key] = value
        if key.endswith("weight") and value.dim() > 1:
            sd[key.removesuffix("weight") + "popup_scores"] = torch.randn_like(value)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 20, "arch": "small_cnn", "state_dict": sd, "best_prec1": 51.2}, path)
    return path, sd


def test_every_format_is_listed():
    result = CliRunner().invoke(main, ["formats"])
    assert result.exit_code == 0
    for name in FORMATS.list():
        assert name in result.output


def test_hydra_subnet_through_the_cli(tmp_path):
    path, sd = _hydra_subnet_file(tmp_path)
    db = tmp_path / "r.db"
    args = [
        "evaluate",
        "--checkpoint",
        str(path),
        "--format",
        "hydra-subnet",
        "--arch",
        "small_cnn",
        "--dataset",
        "digits",
        "--n-samples",
        "6",
        "--version",
        "standard",
        "--fmn-steps",
        "5",
        "--workers",
        "1",
        "--db",
        f"sqlite:///{db}",
        "--no-progress",
    ]
    missing_k = CliRunner().invoke(main, args)
    assert missing_k.exit_code != 0 and "--k" in missing_k.output and "not stored" in missing_k.output
    ok = CliRunner().invoke(main, [*args, "--k", "0.1"])
    assert ok.exit_code == 0, ok.output
    con = sqlite3.connect(db)
    sparsity, provenance = con.execute("SELECT measured_sparsity, provenance FROM models").fetchone()
    con.close()
    # HYDRA's rule per layer: int((1 - k) * numel) removed, from |popup_scores|.
    expected_zero = sum(int(0.9 * v.numel()) for k, v in sd.items() if k.endswith("popup_scores"))
    total = sum(v.numel() for k, v in sd.items() if k.endswith("popup_scores"))
    assert sparsity == pytest.approx(expected_zero / total, abs=1e-6)
    assert '"native_format": "hydra-subnet"' in provenance


def test_converted_weights_are_the_masked_weights(tmp_path):
    path, sd = _hydra_subnet_file(tmp_path)
    converted = load_converted(path, "hydra-subnet", k=0.1)
    for key, w in converted.items():
        if key.endswith("weight") and w.dim() > 1:
            mask = hydra_mask(sd[key.removesuffix("weight") + "popup_scores"], 0.1)
            assert torch.equal(w, sd[key] * mask)
    assert not any(key.endswith("popup_scores") for key in converted)


def test_k_with_a_format_that_has_no_k_is_refused(tmp_path):
    path, _ = _hydra_subnet_file(tmp_path)
    with pytest.raises(ValueError, match="only used with --format hydra-subnet"):
        load_converted(path, "admm", k=0.1)
