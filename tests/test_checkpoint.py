"""vggnorm.io.checkpoint: loading (prefixes, wrappers, refusals), atomic writes, output checks, representability
and the content hash, called directly on small in-memory state_dicts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import safe_open
from safetensors.torch import save_file as save_safetensors

from vggnorm.errors import (
    CheckpointError,
    InvalidValuesError,
    NoSpaceError,
    OutputExistsError,
    OutputFolderMissingError,
    OutputNotWritableError,
    WriteError,
)
from vggnorm.io.checkpoint import (
    atomic_write,
    atomic_writes,
    check_finite,
    check_floating,
    check_representable,
    check_writable,
    half_dtypes,
    load_state_dict,
    same_file,
    save_state_dict,
    state_dict_sha256,
    strip_prefixes,
    upcast_half,
)

GONE_PID = 2**31 - 2  # above any pid_max: no process has it


def small_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "features.0.weight": torch.randn(4, 3, 3, 3, generator=g),
        "features.0.bias": torch.randn(4, generator=g),
        "features.1.running_var": torch.rand(4, generator=g) + 0.5,
        "features.1.num_batches_tracked": torch.tensor(5),
        "classifier.0.weight": torch.randn(2, 4, generator=g),
    }


def assert_same(a, b) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---- loading ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_strip_prefixes_removes_what_dataparallel_and_compile_add(prefix):
    sd = small_state_dict()
    out = strip_prefixes({prefix + k: v for k, v in sd.items()})
    assert list(out) == list(sd)
    assert all(out[k] is sd[k] for k in sd)


def test_strip_prefixes_keeps_a_name_that_only_contains_a_prefix():
    sd = {"features.module.weight": torch.ones(1), "my_orig_mod.bias": torch.ones(1)}
    assert list(strip_prefixes(sd)) == list(sd)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module."])
def test_load_takes_a_state_dict_wrapped_or_prefixed(tmp_path, wrap):
    sd = small_state_dict()
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd},
        "model": {"model": sd},
        "module.": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    torch.save(obj, tmp_path / "w.pth")
    assert_same(load_state_dict(tmp_path / "w.pth"), sd)
    assert_same(load_state_dict(tmp_path / "w.pth", mmap=False), sd)


def test_load_reads_safetensors(tmp_path):
    sd = small_state_dict()
    save_safetensors(sd, str(tmp_path / "w.safetensors"))
    assert_same(load_state_dict(tmp_path / "w.safetensors"), sd)


def test_load_refuses_a_missing_file_and_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match="not a file"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize("name", ["junk.pth", "junk.safetensors"])
def test_load_refuses_junk_in_one_error(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not a checkpoint at all\n" * 10)
    with pytest.raises(CheckpointError, match="not a"):
        load_state_dict(tmp_path / name)


def test_load_never_unpickles_a_whole_model(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_state_dict(tmp_path / "model.pth")


def test_a_training_checkpoint_is_refused_naming_the_key_that_holds_the_weights(tmp_path):
    torch.save({"model_state_dict": small_state_dict(), "epoch": 3}, tmp_path / "train.pth")
    with pytest.raises(CheckpointError, match="'model_state_dict'") as e:
        load_state_dict(tmp_path / "train.pth")
    assert "epoch" in str(e.value)


@pytest.mark.parametrize("obj", [{}, [torch.ones(1)], {"a": torch.ones(1), "b": 3}])
def test_what_is_no_state_dict_is_refused(tmp_path, obj):
    torch.save(obj, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="does not hold a state_dict"):
        load_state_dict(tmp_path / "w.pth")


# ---- saving and atomic writes ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["out.pth", "out.safetensors"])
def test_save_then_load_gives_the_same_tensors(tmp_path, name):
    sd = small_state_dict()
    save_state_dict(sd, tmp_path / name, force=False)
    assert_same(load_state_dict(tmp_path / name), sd)
    assert leftovers(tmp_path) == []


def test_safetensors_carry_the_metadata(tmp_path):
    save_state_dict(small_state_dict(), tmp_path / "o.safetensors", force=False, metadata={"policy": '{"a": 1}'})
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        assert f.metadata() == {"policy": '{"a": 1}'}


def test_an_existing_output_is_kept_without_force_and_replaced_with_it(tmp_path):
    out = tmp_path / "o.pth"
    out.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="--force"):
        save_state_dict(small_state_dict(), out, force=False)
    assert out.read_bytes() == b"old"
    save_state_dict(small_state_dict(), out, force=True)
    assert_same(load_state_dict(out), small_state_dict())


def test_a_failure_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "o.pth"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(out, force=True) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert out.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_a_refused_write_is_a_write_error_that_says_nothing_was_written(tmp_path):
    out = tmp_path / "o.pth"
    out.write_bytes(b"old")
    with pytest.raises(WriteError, match="nothing was written") as e, atomic_write(out, force=True):
        raise OSError(28, "No space left on device")
    assert "No space left on device" in str(e.value) and str(out) in str(e.value)
    assert out.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_outputs_of_one_block_appear_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "a.md"
    with pytest.raises(RuntimeError), atomic_writes([a, b], force=False) as (ta, tb):
        ta.write_text("a")
        raise RuntimeError
    assert not a.exists() and not b.exists() and leftovers(tmp_path) == []
    with atomic_writes([a, b], force=False) as (ta, tb):
        ta.write_text("a")
        assert not a.exists()  # nothing under the final name before the block succeeds
        tb.write_text("b")
    assert (a.read_text(), b.read_text()) == ("a", "b")
    assert leftovers(tmp_path) == []


def test_an_output_that_appears_while_being_written_is_not_overwritten(tmp_path):
    out = tmp_path / "o.pth"
    with pytest.raises(OutputExistsError, match="appeared"), atomic_write(out, force=False) as tmp:
        tmp.write_bytes(b"new")
        out.write_bytes(b"theirs")
    assert out.read_bytes() == b"theirs"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=oct)
def test_outputs_get_the_mode_open_gives_under_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_state_dict(small_state_dict(), tmp_path / "o.pth", force=False)
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(old)
    mode = (tmp_path / "o.pth").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777 == 0o666 & ~umask


# ---- check_writable --------------------------------------------------------------------------------------


def test_an_input_is_never_an_output_even_with_force_nor_through_a_link(tmp_path):
    src = tmp_path / "in.pth"
    src.write_bytes(b"x")
    os.link(src, tmp_path / "hard.pth")
    (tmp_path / "sym.pth").symlink_to(src)
    for out in (src, tmp_path / "hard.pth", tmp_path / "sym.pth", tmp_path / "." / "in.pth"):
        with pytest.raises(OutputExistsError, match="input"):
            check_writable(out, force=True, inputs=[src])
        assert same_file(out, src)
    assert not same_file(tmp_path / "other.pth", src)


def test_check_writable_refuses_a_folder_a_missing_folder_and_a_full_disk(tmp_path):
    with pytest.raises(OutputExistsError, match="folder"):
        check_writable(tmp_path, force=True)
    with pytest.raises(OutputFolderMissingError, match="does not exist"):
        check_writable(tmp_path / "missing" / "o.pth", force=False)
    with pytest.raises(NoSpaceError, match="MB free"):
        check_writable(tmp_path / "o.pth", force=False, size=2**62)
    check_writable(tmp_path / "o.pth", force=False, size=1)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputNotWritableError, match="permission denied"):
            check_writable(folder / "o.pth", force=True)
    finally:
        folder.chmod(0o700)


def test_temporaries_of_a_killed_run_are_removed_and_a_running_ones_kept(tmp_path):
    out = tmp_path / "o.pth"
    dead = tmp_path / f".o.pth.{GONE_PID}.abc.tmp"
    alive = tmp_path / f".o.pth.{os.getpid()}.abc.tmp"
    other = tmp_path / f".other.pth.{GONE_PID}.abc.tmp"
    for p in (dead, alive, other):
        p.write_bytes(b"")
    check_writable(out, force=False)
    assert not dead.exists() and alive.exists() and other.exists()


# ---- values ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_naming_the_tensor(bad):
    sd = small_state_dict()
    sd["features.0.bias"][2] = bad
    with pytest.raises(InvalidValuesError, match=r"src: tensor features\.0\.bias has 1 non-finite"):
        check_finite(sd, "src")
    check_finite(small_state_dict(), "src")


def test_integer_weights_are_refused_but_batchnorms_counter_is_not():
    sd = small_state_dict()
    check_floating(sd, "src")
    sd["features.0.weight"] = sd["features.0.weight"].to(torch.int8)
    with pytest.raises(CheckpointError, match=r"features\.0\.weight \(int8\)") as e:
        check_floating(sd, "src")
    assert "num_batches_tracked" not in str(e.value)


def test_half_precision_is_named_and_upcast_to_float32_exactly():
    sd = small_state_dict()
    sd["features.0.weight"] = sd["features.0.weight"].half()
    sd["features.0.bias"] = sd["features.0.bias"].bfloat16()
    assert half_dtypes(sd) == ["bfloat16", "float16"]
    up = upcast_half(sd)
    assert half_dtypes(up) == []
    for k in ("features.0.weight", "features.0.bias"):
        assert up[k].dtype == torch.float32 and torch.equal(up[k].double(), sd[k].double())
    assert up["features.1.num_batches_tracked"].dtype == torch.int64


def test_rescaled_weights_that_underflow_or_overflow_are_refused():
    old = {"w": torch.tensor([1e-30, 1.0]), "b": torch.tensor([2.0])}
    check_representable({"w": old["w"] * 2, "b": old["b"]}, old, "src")
    with pytest.raises(InvalidValuesError, match=r"tensor w underflows torch\.float32: 1 of its 2"):
        check_representable({"w": old["w"] * 1e-10, "b": old["b"]}, old, "src")
    with pytest.raises(InvalidValuesError, match="non-finite"):
        check_representable({"w": old["w"] * 1e39, "b": old["b"]}, old, "src")
    # a value that was already zero or subnormal did not underflow
    tiny = {"w": torch.tensor([0.0, 1e-40])}
    check_representable({"w": tiny["w"] * 0.5}, tiny, "src")


def test_underflows_counted_during_an_in_place_fold_are_refused():
    t = torch.tensor([1.0, 2.0])  # the fold overwrote it: old and new are the same tensor
    check_representable({"w": t}, {"w": t}, "src")
    with pytest.raises(InvalidValuesError, match="3 of its 2"):
        check_representable({"w": t}, {"w": t}, "src", lost={"w": 3})


# ---- content hash ----------------------------------------------------------------------------------------


def test_the_hash_is_of_the_tensors_not_the_file_format_or_prefix(tmp_path):
    sd = small_state_dict()
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "a.pth")
    save_safetensors(sd, str(tmp_path / "b.safetensors"))
    digest = state_dict_sha256(sd)
    assert state_dict_sha256(load_state_dict(tmp_path / "a.pth")) == digest
    assert state_dict_sha256(load_state_dict(tmp_path / "b.safetensors")) == digest
    assert state_dict_sha256(dict(reversed(sd.items()))) == digest
    assert digest != hashlib.sha256((tmp_path / "a.pth").read_bytes()).hexdigest()


@pytest.mark.parametrize("change", ["value", "dtype", "shape", "name"])
def test_the_hash_changes_with_any_value_dtype_shape_or_name(change):
    sd = small_state_dict()
    other = dict(sd)
    w = sd["features.0.weight"]
    if change == "value":
        other["features.0.weight"] = w.clone()
        other["features.0.weight"][0, 0, 0, 0] += 1e-6
    elif change == "dtype":
        other["features.0.weight"] = w.double()
    elif change == "shape":
        other["features.0.weight"] = w.reshape(4, 27)
    else:
        other["features.9.weight"] = other.pop("features.0.weight")
    assert state_dict_sha256(other) != state_dict_sha256(sd)
