"""verify in CI: JUnit XML, JSON on stdout, deterministic reports, no network."""

import json
import socket
import xml.etree.ElementTree as ET

import pytest
import torch

from conftest import TINY, invoke

MODEL = ["--model", TINY["tiny"]]


@pytest.fixture(scope="module")
def normalized(photos, checkpoints, tmp_path_factory):
    d = tmp_path_factory.mktemp("ci")
    ckpt, stats, out = checkpoints["tiny"], d / "s.h5", d / "n.pth"
    size = ["--resize", "40", "--crop", "32", "--workers", 0, "--no-progress"]
    assert invoke("compute-stats", photos, *MODEL, "--weights", ckpt, "-o", stats, *size).exit_code == 0
    assert invoke("apply", ckpt, "--stats", stats, "-o", out, *MODEL).exit_code == 0
    return {"ckpt": ckpt, "stats": stats, "out": out, "dir": d}


def cases(path):
    root = ET.parse(path).getroot()
    return {
        c.get("name"): (
            "failure" if c.find("failure") is not None else "skipped" if c.find("skipped") is not None else "pass"
        )
        for c in root.iter("testcase")
    }


def test_junit_lists_every_check_and_layer(normalized, photos, tmp_path):
    n = normalized
    args = ["verify", n["out"], "--original", n["ckpt"], "--stats", n["stats"], *MODEL, "--no-progress"]
    r = invoke(*args, "--data", photos, "--workers", 0, "--junit-xml", tmp_path / "v.xml")
    assert r.exit_code == 0, r.output
    got = cases(tmp_path / "v.xml")
    assert {k: v for k, v in got.items() if "[" not in k} == {
        "activations": "pass",
        "logits": "pass",
        "fold": "pass",
        "means": "pass",
    }
    assert got["activations[features.3 (conv2_1)]"] == "pass" and got["means[features.0 (conv1_1)]"] == "pass"
    suite = ET.parse(tmp_path / "v.xml").getroot().find("testsuite")
    assert suite.get("failures") == "0" and int(suite.get("tests")) == len(got)
    # without --data the means check is skipped, not passed
    r = invoke(*args, "--junit-xml", tmp_path / "w.xml")
    assert r.exit_code == 0 and cases(tmp_path / "w.xml")["means"] == "skipped"


def test_a_tampered_checkpoint_fails_the_test_case_of_its_layer(normalized, tmp_path):
    n = normalized
    sd = torch.load(n["out"], weights_only=True)
    sd["features.3.weight"][5] *= 1.02
    torch.save(sd, tmp_path / "t.pth")
    r = invoke(
        "verify",
        tmp_path / "t.pth",
        "--original",
        n["ckpt"],
        "--stats",
        n["stats"],
        *MODEL,
        "--junit-xml",
        tmp_path / "t.xml",
    )
    assert r.exit_code == 1
    got = cases(tmp_path / "t.xml")
    assert got["fold"] == "failure" and got["fold[features.3.weight]"] == "failure"
    assert got["fold[features.0.weight]"] == "pass" and got["activations[features.3 (conv2_1)]"] == "failure"
    failure = next(
        c for c in ET.parse(tmp_path / "t.xml").getroot().iter("testcase") if c.get("name") == "fold[features.3.weight]"
    ).find("failure")
    assert "features.3.weight" in failure.get("message")


def test_json_on_stdout_equals_the_report_and_runs_are_identical(normalized, photos, tmp_path):
    n = normalized
    args = [
        "verify",
        n["out"],
        "--original",
        n["ckpt"],
        "--stats",
        n["stats"],
        "--data",
        photos,
        "--workers",
        0,
        *MODEL,
        "--no-progress",
        "--format",
        "json",
    ]
    r1 = invoke(*args, "--report", tmp_path / "a")
    first = (tmp_path / "a.json").read_bytes()
    r2 = invoke(*args, "--report", tmp_path / "a", "--force")
    assert r1.exit_code == r2.exit_code == 0
    assert json.loads(r1.stdout) == json.loads(first)
    assert r1.stdout == first.decode() + "\n"
    assert (tmp_path / "a.json").read_bytes() == first and r2.stdout == r1.stdout  # no timestamps in verify's


def test_no_network_is_attempted_when_every_input_is_a_file(normalized, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("verify tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    n = normalized
    r = invoke("verify", n["out"], "--original", n["ckpt"], "--stats", n["stats"], *MODEL)
    assert r.exit_code == 0, r.output


def test_verify_without_data_imports_neither_torchvision_nor_dynamo(normalized):
    """Each costs about a second of every CI run: VGGs are built without torchvision, shapes
    come from formulas, not meta kernels that import torch._dynamo."""
    import subprocess
    import sys

    n = normalized
    code = (
        "import sys; from vggnorm.cli import cli\n"
        "try: cli(sys.argv[1:], standalone_mode=False)\n"
        "except SystemExit as e: assert not e.code, e.code\n"
        "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))"
    )
    args = ["verify", n["out"], "--original", n["ckpt"], "--stats", n["stats"], *MODEL, "--format", "json"]
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
