"""CLI: help speed, inspect (text, JSON, spectra), methods, and exact error lines."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

import cli as cli_module
import ops
from cli import cli


def test_top_level_modules_are_ours():
    root = Path(__file__).resolve().parents[1]
    assert Path(ops.__file__).resolve().is_relative_to(root)
    assert Path(cli_module.__file__).resolve().is_relative_to(root)


def test_help_is_fast_and_lazy():
    code = (
        "import sys, time; t=time.perf_counter(); from cli import cli; "
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: cli(['--help'])\n"
        "    except SystemExit: pass\n"
        "print(time.perf_counter()-t, 'torch' in sys.modules, 'numpy' in sys.modules, "
        "'cupy' in sys.modules)"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    secs, torch_loaded, numpy_loaded, cupy_loaded = out.stdout.split()
    assert torch_loaded == "False" and cupy_loaded == "False" and numpy_loaded == "False"
    assert float(secs) < 1.0 and wall < 3.0


def test_inspect_text_and_json(tiny_ckpt):
    d = tiny_ckpt(dtype="bfloat16", shards=2, int_buffer=True)
    r = CliRunner().invoke(cli, ["inspect", str(d)])
    assert r.exit_code == 0, r.output
    assert "LlamaForCausalLM" in r.output and "model.layers.*.mlp.up_proj.weight" in r.output
    assert "BF16×21" in r.output and "I64×1" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(d), "--json"])
    info = json.loads(r.output)
    assert info["num_tensors"] == 22 and len(info["files"]) == 2
    assert {"name", "shape", "dtype", "shard"} <= set(info["tensors"][0])
    assert info["num_params"] == sum(__import__("math").prod(t["shape"]) for t in info["tensors"])


def test_inspect_spectra(tiny_ckpt):
    import numpy as np

    from surgery.checkpoint import Checkpoint

    d = tiny_ckpt()
    r = CliRunner().invoke(cli, ["inspect", str(d), "--spectra", "--targets", "q_proj", "--json"])
    assert r.exit_code == 0, r.output
    sp = json.loads(r.output)["spectra"]
    assert len(sp) == 2
    n = "model.layers.0.self_attn.q_proj.weight"
    s = np.linalg.svd(Checkpoint.open(d).get(n).double().numpy(), compute_uv=False)
    assert abs(sp[n]["top_sigma"] - s[0]) < 1e-5
    e = np.cumsum(s**2) / (s**2).sum()
    assert sp[n]["rank90"] == int(np.searchsorted(e, 0.9) + 1)
    assert abs(sp[n]["stable_rank"] - (s**2).sum() / s[0] ** 2) < 1e-4
    r = CliRunner().invoke(cli, ["inspect", str(d), "--spectra", "--targets", "q_proj"])
    assert "r90" in r.output and "stable" in r.output


def test_inspect_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing")])
    assert r.exit_code == 1
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1
    p = tmp_path / "pytorch_model.bin"
    p.write_bytes(b"x")
    r = CliRunner().invoke(cli, ["inspect", str(p)])
    assert r.exit_code == 1 and "pickle checkpoint" in r.output and "Traceback" not in r.output


def test_methods_lists_registry():
    r = CliRunner().invoke(cli, ["methods", "--json"])
    assert r.exit_code == 0
    rows = json.loads(r.output)
    for row in rows:
        assert row["reference"].startswith("https://")
        assert row["kind"] in ("merge", "decompose", "edit")


def test_readme_method_table_is_current():
    from surgery.methods import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "run `python -m surgery.methods` to refresh README.md"


def test_package_reexports_are_lazy_and_resolve():
    code = (
        "import sys, surgery; assert 'torch' not in sys.modules; "
        "import surgery.api as api; "
        "assert surgery.extract is api.extract and surgery.apply_adapter is api.apply; "
        "assert callable(api.merge) and callable(api.decompose) and callable(api.calibrate)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ruff_lint_and_format_clean():
    """The style gate (DESIGN.md: ruff at line length 100) runs with the suite."""
    import shutil

    ruff = shutil.which("ruff")
    if ruff is None:  # the `test` extra installs it; a bare environment may not have it
        import pytest

        pytest.skip("ruff not installed")
    root = Path(__file__).resolve().parents[1]
    for args in (["check", "."], ["format", "--check", "."]):
        r = subprocess.run([ruff, *args], cwd=root, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
