"""Bad checkpoint files are refused before anything is read or stored, with one line naming the problem and the fix.

Non-finite weights (NaN/Inf, BatchNorm statistics included) on every loading path: plain files, ``--format``
converters, stored models, and through the CLI on SQLite and PostgreSQL with nothing stored. Symlinks (followed,
their target named), FIFOs (never opened), devices, directories, kernel files, empty files and files of no
checkpoint format at all, for ``bench evaluate --checkpoint``, ``bench prune --dense`` and ``bench zoo fetch --from``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from safetensors.torch import save_file
from torch import nn

from bench.checkpoints import (
    NonFiniteWeightsError,
    NotACheckpointError,
    check_finite,
    check_input_file,
    checkpoint_format,
    load_checkpoint_model,
    load_state_dict,
    load_weights,
    sha256_file,
)
from bench.formats import load_converted_model
from bench.models import build_model
from bench.store import Model, Store
from bench.store.registration import load_stored_model, register_model
from bench.zoo.fetch import NotACheckpoint, import_local_file, read_records
from tests.cli import invoke

FIX = "the checkpoint is corrupt or diverged; re-export it"
CLI_ARGS = ("--arch", "small_cnn", "--dataset", "digits", "--n-samples", "10")


def _small_cnn_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_model("small_cnn", "digits").state_dict().items()}


@pytest.fixture
def nan_checkpoint(tmp_path) -> Path:
    """small_cnn weights with 3 NaN in the first convolution and one +Inf in the last bias."""
    sd = _small_cnn_state()
    sd["net.features.0.weight"][0, 0, 0, :3] = float("nan")
    sd["net.classifier.3.bias"][1] = float("inf")
    path = tmp_path / "nan.pt"
    torch.save(sd, path)
    return path


def _assert_one_line(message: str, *parts: str) -> None:
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


# --------------------------------------------------------------------------------------------------------
# Non-finite weights


def test_nan_and_inf_are_refused_naming_file_tensors_and_counts(nan_checkpoint) -> None:
    with pytest.raises(NonFiniteWeightsError) as info:
        load_state_dict(nan_checkpoint)
    _assert_one_line(
        str(info.value),
        f"checkpoint {nan_checkpoint}",
        "4 non-finite entries in 2 tensors",
        "net.features.0.weight (3 NaN)",
        "net.classifier.3.bias (1 Inf)",
        FIX,
    )
    assert isinstance(info.value, ValueError)  # the CLI's one-line errors
    # The same weights, finite, load: the refusal is about the values and nothing else.
    finite = {k: torch.nan_to_num(v, nan=0.0, posinf=0.0) for k, v in torch.load(nan_checkpoint).items()}
    torch.save(finite, nan_checkpoint)
    assert set(load_state_dict(nan_checkpoint)) == set(finite)


def test_many_bad_tensors_are_summarised_and_float16_counts(tmp_path) -> None:
    sd = {f"layer{i}.weight": torch.full((2, 2), float("-inf"), dtype=torch.float16) for i in range(5)}
    sd["ok.weight"] = torch.ones(3)
    sd["counter"] = torch.tensor(7)  # integer tensors cannot be non-finite
    path = tmp_path / "half.safetensors"
    save_file(sd, str(path))
    with pytest.raises(NonFiniteWeightsError) as info:
        load_state_dict(path)
    _assert_one_line(str(info.value), "20 non-finite entries in 5 tensors", "layer0.weight (4 Inf)", "and 2 more")
    assert "layer3" not in str(info.value)


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


@pytest.mark.parametrize("stat", ["running_mean", "running_var"])
def test_batchnorm_running_statistics_count(tmp_path, stat: str) -> None:
    torch.manual_seed(0)
    sd = _BNNet().state_dict()
    sd[f"bn.{stat}"][2] = float("nan")
    path = tmp_path / "bn.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    with pytest.raises(NonFiniteWeightsError) as info:
        load_state_dict(path)
    _assert_one_line(str(info.value), str(path), f"bn.{stat} (1 NaN)", FIX)
    # load_weights checks what it loads whatever produced it, naming the file when told it; the model is untouched.
    model = _BNNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteWeightsError) as info:
        load_weights(model, sd, source="from_memory.pt")
    _assert_one_line(str(info.value), "checkpoint from_memory.pt", f"bn.{stat} (1 NaN)", FIX)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(NonFiniteWeightsError, match="^the weights hold"):
        check_finite({"w": torch.tensor([float("nan")])})
    sd[f"bn.{stat}"][2] = 1.0
    load_weights(model, sd)
    assert torch.equal(getattr(model.bn, stat), sd[f"bn.{stat}"])


def test_hydra_scores_are_checked_even_though_the_model_never_holds_them(tmp_path) -> None:
    sd = {k.removeprefix("net."): v for k, v in _small_cnn_state().items()}
    for key in [k for k in sd if k.endswith("weight")]:
        sd[key.removesuffix("weight") + "popup_scores"] = sd[key].abs()
    sd["features.0.popup_scores"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "subnet.pth.tar"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(NonFiniteWeightsError) as info:
        load_converted_model(path, "hydra-subnet", "small_cnn", "digits", k=0.5)
    _assert_one_line(str(info.value), str(path), "features.0.popup_scores (1 NaN)", FIX)


def test_a_converter_that_makes_weights_infinite_is_caught_after_conversion(tmp_path) -> None:
    # MAD's loader bypasses load_state_dict, and its conversion W * softplus(mask) overflows float32 here:
    # every value in the file is finite, the weights the model would get are not.
    sd = {k.removeprefix("net."): v for k, v in _small_cnn_state().items()}
    sd["features.0.weight"][0, 0, 0, 0] = 1e30
    sd["features.0.mask_weight"] = torch.full_like(sd["features.0.weight"], 1e30)
    path = tmp_path / "mad.t7"
    torch.save({"net": sd, "acc": 50.0}, path)
    assert all(torch.isfinite(v).all() for v in torch.load(path)["net"].values())
    with pytest.raises(NonFiniteWeightsError) as info:
        load_converted_model(path, "mad", "small_cnn", "digits")
    _assert_one_line(str(info.value), f"checkpoint {path}", "features.0.weight (1 Inf)", FIX)


def test_a_stored_model_whose_file_holds_nan_is_refused(nan_checkpoint) -> None:
    # A store written before this check could hold such a model: rebuilding it fails the same way.
    row = Model(
        name="old",
        checkpoint_sha256=sha256_file(nan_checkpoint),
        checkpoint_path=str(nan_checkpoint),
        arch="small_cnn",
        dataset="digits",
        provenance={},
    )
    with pytest.raises(NonFiniteWeightsError, match="net.features.0.weight"):
        load_stored_model(row)


def _stored_counts(url: str) -> dict[str, int]:
    """Rows in the store's models and evaluations tables, read without creating or migrating anything."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return {}
    engine = sa.create_engine(url)
    try:
        tables = set(sa.inspect(engine).get_table_names())
        with engine.connect() as conn:
            return {
                t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()
                for t in ("models", "evaluations")
                if t in tables
            }
    finally:
        engine.dispose()


@pytest.mark.parametrize("fmt", ["plain", "mad"])
def test_cli_refuses_nan_weights_and_stores_nothing(store_url, nan_checkpoint, fmt) -> None:
    result = invoke("evaluate", "--checkpoint", nan_checkpoint, *CLI_ARGS, "--format", fmt, "--db", store_url)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: checkpoint "), result.output
    _assert_one_line(lines[0], "nan.pt", "net.features.0.weight (3 NaN)", FIX)
    assert all(n == 0 for n in _stored_counts(store_url).values()), _stored_counts(store_url)


def test_stored_counts_sees_a_registered_model(store_url, tmp_path) -> None:
    # The check above would pass vacuously if _stored_counts could not see rows.
    path = tmp_path / "ok.pt"
    torch.save(_small_cnn_state(), path)
    store = Store(store_url)
    try:
        register_model(
            store, path, load_checkpoint_model(path, "small_cnn", "digits"), arch="small_cnn", dataset="digits"
        )
    finally:
        store.dispose()
    assert _stored_counts(store_url) == {"models": 1, "evaluations": 0}


def test_prune_refuses_a_nan_dense_checkpoint_before_any_work(tmp_path, nan_checkpoint) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    result = invoke(
        "prune", "--method", "hydra", "--sparsity", "0.5", "--dense", nan_checkpoint,
        "--arch", "small_cnn", "--dataset", "digits", "--out", tmp_path / "pruned", "--db", db,
    )  # fmt: skip
    assert result.exit_code == 1
    _assert_one_line(result.output.strip(), "Error: checkpoint", "nan.pt", FIX)
    assert not (tmp_path / "r.db").exists() and not (tmp_path / "pruned").exists()


# --------------------------------------------------------------------------------------------------------
# Symlinks, special files, other formats


@pytest.fixture
def good_checkpoint(tmp_path) -> Path:
    path = tmp_path / "good.pt"
    torch.save(_small_cnn_state(), path)
    return path


def test_a_symlink_to_a_checkpoint_is_followed(tmp_path, good_checkpoint) -> None:
    link = tmp_path / "latest.pt"
    link.symlink_to(good_checkpoint.name)  # relative, as `ln -s good.pt latest.pt` writes it
    loaded, direct = load_state_dict(link), load_state_dict(good_checkpoint)
    assert loaded.keys() == direct.keys() and all(torch.equal(loaded[k], direct[k]) for k in direct)


def test_a_symlink_to_etc_passwd_is_not_a_checkpoint(tmp_path) -> None:
    if not Path("/etc/passwd").is_file():
        pytest.skip("no /etc/passwd on this system")
    link = tmp_path / "weights.pt"
    link.symlink_to("/etc/passwd")
    with pytest.raises(NotACheckpointError) as info:
        load_state_dict(link)
    message = str(info.value)
    _assert_one_line(message, "(a symlink to /etc/passwd)", "is not a checkpoint", "torch.save", "safetensors")
    assert "root:" not in message and ":0:0:" not in message  # nothing of the file's content is shown
    result = invoke("evaluate", "--checkpoint", link, *CLI_ARGS, "--db", f"sqlite:///{tmp_path / 'r.db'}")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.count("\n") == 1 and "is not a checkpoint" in result.output
    assert not (tmp_path / "r.db").exists()


def test_bytes_of_no_checkpoint_format_name_the_formats_accepted(tmp_path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("epoch 12: loss 0.31\n" * 50)
    with pytest.raises(NotACheckpointError) as info:
        load_state_dict(path)
    _assert_one_line(str(info.value), "is not a checkpoint", "zip archive", "legacy pre-1.6 pickle", "safetensors")
    assert "symlink" not in str(info.value)


@pytest.mark.parametrize("protocol", [2, 3])  # torch.load reads no protocol-4 frames
def test_each_format_is_recognised_from_its_first_bytes(tmp_path, protocol) -> None:
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    zipped, legacy, safe = tmp_path / "a.pt", tmp_path / "b.pth.tar", tmp_path / "c.safetensors"
    torch.save(sd, zipped)
    torch.save(sd, legacy, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    save_file(sd, str(safe))
    assert [checkpoint_format(p) for p in (zipped, legacy, safe)] == ["zip", "legacy", "safetensors"]
    for path in (zipped, legacy, safe):
        assert torch.equal(load_state_dict(path)["w"], sd["w"])
    # The content decides how a file is read: safetensors saved under a torch name loads.
    renamed = tmp_path / "c.pt"
    renamed.write_bytes(safe.read_bytes())
    assert torch.equal(load_state_dict(renamed)["w"], sd["w"])


def _fifo_guard(fifo: Path) -> tuple[threading.Timer, list[bool]]:
    """If a reader blocks on ``fifo`` for 3 s, open it for writing so the test ends; record that it had to."""
    unblocked: list[bool] = []

    def unblock() -> None:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader: nothing is blocked
            return
        unblocked.append(True)
        os.close(fd)

    timer = threading.Timer(3.0, unblock)
    timer.start()
    return timer, unblocked


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_without_being_opened(tmp_path) -> None:
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    link = tmp_path / "link.pt"
    link.symlink_to(fifo)
    timer, unblocked = _fifo_guard(fifo)
    start = time.monotonic()
    try:
        with pytest.raises(NotACheckpointError) as direct:
            load_state_dict(fifo)
        with pytest.raises(NotACheckpointError) as linked:
            load_state_dict(link)
        cli = invoke("evaluate", "--checkpoint", link, *CLI_ARGS, "--db", f"sqlite:///{tmp_path / 'r.db'}")
        prune = invoke(
            "prune", "--method", "hydra", "--sparsity", "0.5", "--dense", fifo,
            "--arch", "small_cnn", "--dataset", "digits", "--db", f"sqlite:///{tmp_path / 'r.db'}",
        )  # fmt: skip
    finally:
        timer.cancel()
    assert not unblocked and time.monotonic() - start < 3
    _assert_one_line(str(direct.value), "is a FIFO (named pipe), not a regular file", "pass the checkpoint file itself")
    _assert_one_line(str(linked.value), f"(a symlink to {fifo})", "is a FIFO")
    for result in (cli, prune):
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert result.output.count("\n") == 1 and "is a FIFO" in result.output
    assert not (tmp_path / "r.db").exists()


def test_devices_directories_loops_and_dangling_links(tmp_path) -> None:
    cases = {}
    if Path("/dev/null").exists():
        (tmp_path / "null.pt").symlink_to("/dev/null")
        cases["null.pt"] = "is a character device"
    (tmp_path / "folder.pt").mkdir()
    cases["folder.pt"] = "is a directory"
    (tmp_path / "loop_a.pt").symlink_to("loop_b.pt")
    (tmp_path / "loop_b.pt").symlink_to("loop_a.pt")
    cases["loop_a.pt"] = "(a symlink to loop_b.pt)"
    (tmp_path / "empty.pt").touch()
    cases["empty.pt"] = "is empty (0 bytes)"
    for name, expected in cases.items():
        with pytest.raises(NotACheckpointError) as info:
            load_state_dict(tmp_path / name)
        _assert_one_line(str(info.value), name, expected, "pass the checkpoint file itself")
    (tmp_path / "dangling.pt").symlink_to("deleted.pt")
    with pytest.raises(FileNotFoundError) as info:
        load_state_dict(tmp_path / "dangling.pt")
    _assert_one_line(str(info.value), "(a symlink to deleted.pt) points to nothing")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="no /proc on this system")
def test_a_kernel_file_is_refused_by_where_it_lives(tmp_path) -> None:
    link = tmp_path / "status.pt"
    link.symlink_to("/proc/self/status")
    with pytest.raises(NotACheckpointError) as info:
        check_input_file(link)
    _assert_one_line(str(info.value), "(a symlink to /proc/self/status)", "is a kernel file under /proc")


# --------------------------------------------------------------------------------------------------------
# zoo fetch --from FILE: the same check, before anything is copied or recorded


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_zoo_import_refuses_what_is_no_checkpoint_and_records_nothing(tmp_path, good_checkpoint) -> None:
    root = tmp_path / "zoo-cache"
    text = Path("/etc/passwd")
    if not text.is_file():
        text = tmp_path / "passwd"
        text.write_text("root:x:0:0:root:/root:/bin/sh\n")
    passwd = tmp_path / "download.pt"
    passwd.symlink_to(text)
    with pytest.raises(NotACheckpoint) as info:
        import_local_file("E1", passwd, "model.pt", url=None, root=root)
    _assert_one_line(str(info.value), f"download.pt (a symlink to {text}) is not a checkpoint", "safetensors")
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    timer, unblocked = _fifo_guard(fifo)
    try:
        with pytest.raises(NotACheckpoint) as info:
            import_local_file("E1", fifo, "model.pt", url=None, root=root)
    finally:
        timer.cancel()
    assert not unblocked
    _assert_one_line(str(info.value), "checkpoint file", "is a FIFO")
    assert read_records(root) == {} and not (root / "E1" / "model.pt").exists()
    # A real checkpoint behind a symlink is copied (the file, not the link) and its hash recorded.
    link = tmp_path / "via_link.pt"
    link.symlink_to(good_checkpoint)
    result = import_local_file("E1", link, "model.pt", url=None, root=root)
    assert not result.path.is_symlink() and result.sha256 == sha256_file(good_checkpoint)
    assert read_records(root)["E1"]["sha256"] == result.sha256
