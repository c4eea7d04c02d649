"""Plots: spectra and report maps are written as valid PNGs of sane size, from real runs' data."""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from surgery import api
from surgery.errors import SurgeryError
from surgery.plot import (
    _rank_at,
    energy_curve,
    module_type,
    plot_report,
    plot_spectra,
    report_fields,
    report_grid,
)

pytest.importorskip("matplotlib")


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; asserts the file really is a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def sane(path, lo=5_000, hi=600_000) -> tuple[int, int]:
    assert lo < path.stat().st_size < hi, path.stat().st_size
    return png_size(path)


def test_module_type_splits_layer_and_type():
    assert module_type("model.layers.3.self_attn.q_proj.weight") == (3, "self_attn.q_proj")
    assert module_type("transformer.h.11.attn.c_attn.weight") == (11, "attn.c_attn")
    assert module_type("encoder.layer.0.attention.self.query.weight") == (
        0,
        "attention.self.query",
    )
    assert module_type("lm_head.weight") == (None, "lm_head")


def test_energy_curve_and_marked_rank_match_numpy_and_inspect(tiny_ckpt):
    ckpt = api.open_checkpoint(str(tiny_ckpt(hidden=32, inter=48)))
    names = [n for n in ckpt.names() if n.endswith("proj.weight")]
    spec = api.spectra(ckpt, names)
    for row in spec.values():
        s = np.asarray(row["sigma"], dtype=np.float64)
        ref = np.cumsum(s**2) / (s**2).sum()
        np.testing.assert_allclose(energy_curve(row["sigma"]), ref, rtol=1e-12)
        # The rank marked on the plot is the one inspect reports.
        assert _rank_at(energy_curve(row["sigma"]), 0.90) == row["rank90"]
        assert _rank_at(energy_curve(row["sigma"]), 0.99) == row["rank99"]
    assert energy_curve([0.0, 0.0]) == [0.0, 0.0]


def test_plot_spectra_from_inspect_one_column_per_module_type(tiny_ckpt, tmp_path):
    d = tiny_ckpt(layers=3, hidden=32, inter=48)
    info = api.inspect(str(d), spectra_of="all-linear")
    out = plot_spectra(info, tmp_path / "sub" / "spectra.png", dpi=100)
    w, h = sane(out)
    # 7 Llama module types → figure width 2.6 in × 7 at 100 dpi.
    assert (w, h) == (1820, 520)
    # A bare spectra dict of one type gives the minimum width (one column).
    only_q = {n: r for n, r in info["spectra"].items() if n.endswith("q_proj.weight")}
    w1, _ = sane(plot_spectra(only_q, tmp_path / "q.png"), lo=2_000)
    assert w1 == 400


def test_plot_spectra_rejects_bad_input(tmp_path):
    with pytest.raises(SurgeryError, match="no spectra"):
        plot_spectra({}, tmp_path / "x.png")
    with pytest.raises(SurgeryError, match="no 'sigma'.*a.weight"):
        plot_spectra({"a.weight": {"rank90": 3}}, tmp_path / "x.png")
    with pytest.raises(SurgeryError, match="energy must be in"):
        plot_spectra({"a.weight": {"sigma": [1.0]}}, tmp_path / "x.png", energy=1.5)
    assert not (tmp_path / "x.png").exists()


def _manifest():
    rows = []
    for li in range(3):
        for t in ("self_attn.q_proj", "mlp.down_proj"):
            rows.append(
                {
                    "name": f"model.layers.{li}.{t}.weight",
                    "action": "extracted",
                    "rank": 4,
                    "rel_error": 0.1 * (li + 1) + (0.01 if t == "mlp.down_proj" else 0.0),
                    "ok": True,
                }
            )
    rows.append({"name": "lm_head.weight", "action": "extracted", "rel_error": "nan", "rank": 8})
    return {"verb": "extract", "method": "svd", "tensors": rows}


def test_report_fields_and_grid_place_every_value():
    man = _manifest()
    # Booleans and strings are not figures; error-like fields come first.
    assert report_fields(man) == ["rel_error", "rank"]
    rows, cols, grid = report_grid(man, "rel_error")
    assert rows == ["0", "1", "2", "-"]
    assert cols == ["self_attn.q_proj", "mlp.down_proj", "lm_head"]
    expect = np.array([[0.1, 0.11, np.nan], [0.2, 0.21, np.nan], [0.3, 0.31, np.nan], [np.nan] * 3])
    np.testing.assert_allclose(grid, expect, rtol=1e-12)
    _, _, ranks = report_grid(man, "rank")
    assert ranks[3, 2] == 8 and np.isnan(ranks[3, 0])


def test_plot_report_from_dict_folder_and_file(tmp_path):
    man = _manifest()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "surgery.json").write_text(json.dumps(man))
    w_all, _ = sane(plot_report(man, tmp_path / "a.png"), lo=3_000)
    w_one, _ = sane(plot_report(folder, tmp_path / "b.png", metric="rel_error"), lo=3_000)
    # Two panels (rel_error, rank) are twice as wide as one.
    assert w_all == 2 * w_one
    sane(plot_report(folder / "surgery.json", tmp_path / "c.png", log_scale=True), lo=3_000)


def test_plot_report_errors_list_what_exists(tmp_path):
    with pytest.raises(SurgeryError, match="unknown metric 'drift'.*rel_error, rank"):
        plot_report(_manifest(), tmp_path / "x.png", metric="drift")
    with pytest.raises(SurgeryError, match="no per-tensor numeric figures"):
        plot_report(
            {"verb": "merge", "tensors": [{"name": "a", "action": "x"}]}, tmp_path / "x.png"
        )
    with pytest.raises(SurgeryError, match="surgery.json not found"):
        plot_report(tmp_path, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_says_how_to_install(monkeypatch, tmp_path, tiny_ckpt):
    d = tiny_ckpt()
    # None in sys.modules makes `import matplotlib` raise ImportError, like an absent package.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(SurgeryError, match=r"pip install 'ckpt-surgery\[plot\]'"):
        plot_report(_manifest(), tmp_path / "x.png")
    r = CliRunner().invoke(cli, ["inspect", str(d), "--plot", str(tmp_path / "s.png")])
    assert r.exit_code == 1
    assert "Error: plotting needs matplotlib: pip install 'ckpt-surgery[plot]'" in r.output


def test_cli_inspect_plot_implies_spectra(tiny_ckpt, tmp_path):
    d = tiny_ckpt()
    out = tmp_path / "spectra.png"
    r = CliRunner().invoke(
        cli, ["inspect", str(d), "--targets", "q_proj,v_proj", "--plot", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output
    assert "r90" in r.output  # the spectra table was printed too
    w, _ = sane(out, lo=3_000)
    assert w == 2 * 260  # two module types


def test_report_of_real_extract_and_port_runs(tmp_path):
    from surgery import demo

    base = demo.tiny_llama(tmp_path / "base", layers=2)
    tuned = demo.finetune(base, tmp_path / "tuned", seed=1, scale=0.05, rank=3)
    new = demo.finetune(base, tmp_path / "new", seed=7, scale=0.05)
    from surgery.decompose import extract

    lora = extract(str(base), str(tuned), rank=2, out=tmp_path / "lora")
    man = json.loads((lora / "surgery.json").read_text())
    fields = report_fields(man)
    assert fields[:2] == ["rel_error", "rank"], fields
    rows, cols, grid = report_grid(man, "rel_error")
    for t in man["tensors"]:  # every extracted module lands in its cell
        layer, mtype = module_type(t["name"])
        assert grid[rows.index(str(layer)), cols.index(mtype)] == pytest.approx(t["rel_error"])
    sane(plot_report(lora, tmp_path / "extract.png"), lo=3_000)

    ported = api.port(str(lora), to=str(new), from_=str(base), out=tmp_path / "ported")
    man = json.loads((ported / "surgery.json").read_text())
    assert report_fields(man)[:2] == ["drift", "cos_drift_patch"]
    _, _, drift = report_grid(man, "drift")
    assert np.isfinite(drift).sum() == len(man["tensors"]) and (drift[np.isfinite(drift)] > 0).all()
    sane(plot_report(ported, tmp_path / "drift.png"), lo=3_000)


def test_cli_extract_and_port_plot(tmp_path):
    from surgery import demo

    base = demo.tiny_llama(tmp_path / "base", layers=2)
    tuned = demo.finetune(base, tmp_path / "tuned", seed=1, scale=0.05, rank=3)
    run = lambda *a: CliRunner().invoke(cli, [str(x) for x in a])  # noqa: E731
    r = run(
        "extract", base, tuned, "-r", 2, "-o", tmp_path / "lora", "-q", "--plot", tmp_path / "e.png"
    )
    assert r.exit_code == 0, r.output
    assert f"wrote {tmp_path / 'e.png'}" in r.output
    sane(tmp_path / "e.png", lo=3_000)
    r = run("port", tmp_path / "lora", "--to", tuned, "--from", base, "-o", tmp_path / "p", "-q",
            "--plot", tmp_path / "p.png")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "drift over" in r.output
    sane(tmp_path / "p.png", lo=3_000)
    # --dry-run plans and plots nothing.
    r = run(
        "extract",
        base,
        tuned,
        "-r",
        2,
        "-o",
        tmp_path / "x",
        "--dry-run",
        "--plot",
        tmp_path / "x.png",
    )
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "x.png").exists()


def test_cli_plot_without_matplotlib_fails_before_the_run(monkeypatch, tmp_path):
    from surgery import demo

    base = demo.tiny_llama(tmp_path / "base", layers=1)
    tuned = demo.finetune(base, tmp_path / "tuned", seed=1, scale=0.05, rank=2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    args = [
        "extract",
        str(base),
        str(tuned),
        "-r",
        "2",
        "-o",
        str(tmp_path / "lora"),
        "--plot",
        "e.png",
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1
    assert "pip install 'ckpt-surgery[plot]'" in r.output
    assert not (tmp_path / "lora").exists()  # nothing was written
