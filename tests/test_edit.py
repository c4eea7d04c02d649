"""End to end: ``surgery edit`` (Model Surgery probe edit, project_out) on tiny real checkpoints.

The reference is a float64 numpy computation from the input tensors (ALGORITHMS.md §5.2/§5.3):
global top ``rows`` by ``−cos`` over all layers, ``+alpha·w`` on those rows, nothing else changes.
Also: the ``compress`` registry entry (decompose kind) and its parameter schema.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from cli import cli
from surgery.checkpoint import Checkpoint
from surgery.edit import edit
from surgery.errors import SurgeryError
from surgery.methods import get, parse_params, schema

GATE = "model.layers.{}.mlp.gate_proj.weight"


def _probe_file(tmp_path, vec, name="probe.safetensors", key="probe"):
    path = tmp_path / name
    save_file({key: torch.as_tensor(vec).contiguous()}, str(path))
    return path


def _vec(hidden=32, seed=11, norm=2.08):
    v = np.random.default_rng(seed).standard_normal(hidden)
    return (v / np.linalg.norm(v) * norm).astype(np.float32)


def _reference(src, vec, rows, selection="most_negative", module="mlp.gate_proj"):
    """Global top rows by −cos (float64, brute force), as {tensor name: sorted rows}."""
    ck = Checkpoint.open(src)
    names = [n for n in ck.names() if n.endswith(module + ".weight")]
    v = vec.astype(np.float64)
    pairs = []
    for n in names:
        w = ck.get(n).double().numpy()
        cos = w @ v / (np.linalg.norm(w, axis=1) * np.linalg.norm(v))
        sign = -1.0 if selection == "most_negative" else 1.0
        for j, c in enumerate(cos):
            layer = int(n.split(".")[2])
            pairs.append((-(sign * c), layer, j, n))
    pairs.sort()
    out = {n: [] for n in names}
    for _, _, j, n in pairs[:rows]:
        out[n].append(j)
    return {n: sorted(v) for n, v in out.items()}, pairs


def _check_edit(src, out, vec, ref, alpha, atol):
    a, b = Checkpoint.open(src), Checkpoint.open(out)
    assert a.names() == b.names()
    for n in a.names():
        if n not in ref or not ref[n]:
            # Untouched tensors (incl. gate_proj with no chosen row) are byte-identical.
            assert b.raw(n).view(torch.uint8).equal(a.raw(n).view(torch.uint8)), n
            continue
        w0, w1 = a.get(n), b.get(n)
        assert w1.dtype == w0.dtype
        rows = ref[n]
        keep = [j for j in range(w0.shape[0]) if j not in set(rows)]
        assert w1[keep].view(torch.uint8).equal(w0[keep].view(torch.uint8)), n
        diff = w1[rows].double() - w0[rows].double()
        np.testing.assert_allclose(
            diff.numpy(), np.broadcast_to(alpha * vec.astype(np.float64), diff.shape), atol=atol
        )
        # The edit survives the cast: every chosen row changed.
        assert (w1[rows] != w0[rows]).any(dim=1).all()


def test_probe_edit_matches_float64_reference(tmp_path, tiny_ckpt):
    src = tiny_ckpt(layers=3, seed=1)
    vec = _vec()
    probe = _probe_file(tmp_path, vec)
    out = edit(str(src), probe=probe, params={"rows": 25, "alpha": 1.08}, out=tmp_path / "o")
    ref, pairs = _reference(src, vec, 25)
    _check_edit(src, out, vec, ref, 1.08, atol=1e-6)
    man = json.loads((out / "surgery.json").read_text())
    s = man["summary"]
    assert man["verb"] == "edit" and man["method"] == "probe"
    expected = sorted([p[1], p[2]] for p in pairs[:25])
    assert s["edited"] == expected and s["rows"] == 25
    assert s["rows_per_tensor"] == {n: len(r) for n, r in ref.items()}
    cos_sel = np.array([p[0] for p in pairs[:25]])  # most_negative: p[0] is the cosine
    np.testing.assert_allclose(s["cos_selected"]["mean"], cos_sel.mean(), atol=1e-9)
    np.testing.assert_allclose(s["threshold_cos"], cos_sel.max(), atol=1e-9)
    np.testing.assert_allclose(s["cos_all"]["min"], min(p[0] for p in pairs), atol=1e-9)
    assert s["probe"]["norm"] == pytest.approx(2.08, rel=1e-6)


def test_bf16_edit_within_dtype_tolerance(tmp_path, tiny_ckpt):
    src = tiny_ckpt(layers=2, dtype="bfloat16", seed=2)
    vec = _vec()
    out = edit(str(src), probe=_probe_file(tmp_path, vec), params=["rows=30"], out=tmp_path / "o")
    ref, _ = _reference(src, vec, 30)
    # bf16 keeps 8 significant bits: each entry may be off by half an ulp of its magnitude.
    w = Checkpoint.open(src).get(GATE.format(0)).double().abs().max().item()
    _check_edit(src, out, vec, ref, 1.0, atol=(w + 2.08) * 2**-8)
    assert Checkpoint.open(out).dtype(GATE.format(0)) == "BF16"


def test_default_rows_alpha_zero_and_most_positive(tmp_path, tiny_ckpt):
    src = tiny_ckpt(layers=2, hidden=16, inter=40, seed=3)
    vec = _vec(16)
    probe = _probe_file(tmp_path, vec)
    # rows=0 → 4·hidden = 64 of the 80 gate rows.
    out = edit(str(src), probe=probe, params={"selection": "most_positive"}, out=tmp_path / "a")
    ref, _ = _reference(src, vec, 64, selection="most_positive")
    _check_edit(src, out, vec, ref, 1.0, atol=1e-6)
    assert json.loads((out / "surgery.json").read_text())["summary"]["rows"] == 64
    # alpha = 0: the model is byte-identical.
    out0 = edit(str(src), probe=probe, params={"alpha": 0.0, "rows": 10}, out=tmp_path / "b")
    a, b = Checkpoint.open(src), Checkpoint.open(out0)
    for n in a.names():
        assert b.raw(n).view(torch.uint8).equal(a.raw(n).view(torch.uint8))


def test_result_independent_of_shard_layout(tmp_path, tiny_ckpt):
    # Different files and reading order (3 shards vs 1) give the same edited tensors.
    vec = _vec()
    probe = _probe_file(tmp_path, vec)
    one = tiny_ckpt("one", layers=4, seed=4)
    three = tiny_ckpt("three", layers=4, seed=4, shards=3)
    o1 = edit(str(one), probe=probe, params={"rows": 33}, out=tmp_path / "o1")
    o3 = edit(str(three), probe=probe, params={"rows": 33}, out=tmp_path / "o3")
    a, b = Checkpoint.open(o1), Checkpoint.open(o3)
    for n in a.names():
        assert a.get(n).equal(b.get(n)), n
    s1 = json.loads((o1 / "surgery.json").read_text())["summary"]
    s3 = json.loads((o3 / "surgery.json").read_text())["summary"]
    assert s1["edited"] == s3["edited"]


def test_two_row_probe_uses_probe_row(tmp_path, tiny_ckpt):
    src = tiny_ckpt(layers=2, seed=5)
    mat = np.stack([_vec(seed=1), _vec(seed=2)])
    two = _probe_file(tmp_path, mat, "two.safetensors")
    row0 = _probe_file(tmp_path, mat[0], "row0.safetensors")
    a = edit(str(src), probe=two, params={"rows": 9, "probe_row": 0}, out=tmp_path / "a")
    b = edit(str(src), probe=row0, params={"rows": 9}, out=tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    c = edit(str(src), probe=two, params={"rows": 9}, out=tmp_path / "c")  # default row 1
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_conv1d_module_of_gpt2(tmp_path, tiny_gpt2):
    # GPT-2 stores mlp.c_fc as Conv1D [in, out]; rows of the (out, in) view live in hidden space.
    src = tiny_gpt2()
    vec = _vec()
    out = edit(
        str(src), probe=_probe_file(tmp_path, vec), params={"rows": 12, "module": "mlp.c_fc"},
        out=tmp_path / "o",
    )  # fmt: skip
    ck = Checkpoint.open(src)
    names = [n for n in ck.names() if n.endswith("mlp.c_fc.weight")]
    v = vec.astype(np.float64)
    pairs = []
    for n in names:
        w = ck.get(n).double().numpy()  # (out, in) view
        cos = w @ v / (np.linalg.norm(w, axis=1) * np.linalg.norm(v))
        pairs += [(c, int(n.split(".")[2]), j, n) for j, c in enumerate(cos)]
    pairs.sort()
    ref = {n: sorted(j for _, _, j, m in pairs[:12] if m == n) for n in names}
    _check_edit(src, out, vec, ref, 1.0, atol=1e-6)


def test_project_out_end_to_end(tmp_path, tiny_ckpt):
    src = tiny_ckpt(layers=2, seed=6)
    vec = _vec()
    out = edit(
        str(src), method="project_out", probe=_probe_file(tmp_path, vec),
        targets="o_proj,down_proj", out=tmp_path / "o",
    )  # fmt: skip
    a, b = Checkpoint.open(src), Checkpoint.open(out)
    u = vec.astype(np.float64) / np.linalg.norm(vec)
    for n in a.names():
        if n.endswith(("o_proj.weight", "down_proj.weight")):
            w1 = b.get(n).double().numpy()
            assert np.abs(u @ w1).max() < 1e-5  # nothing written along the probe any more
            w0 = a.get(n).double().numpy()
            np.testing.assert_allclose(w1, w0 - np.outer(u, u @ w0), atol=1e-6)
        else:
            assert b.raw(n).view(torch.uint8).equal(a.raw(n).view(torch.uint8))


def test_cli_happy_path_and_dry_run(tmp_path, tiny_ckpt):
    src = tiny_ckpt(layers=2)
    probe = _probe_file(tmp_path, _vec())
    r = CliRunner().invoke(
        cli, ["edit", str(src), "--probe", str(probe), "-p", "rows=7", "-p", "alpha=1.08",
              "-o", str(tmp_path / "o"), "-q"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output
    s = json.loads((tmp_path / "o" / "surgery.json").read_text())["summary"]
    assert len(s["edited"]) == 7
    r = CliRunner().invoke(cli, ["edit", str(src), "--probe", str(probe), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "read-only pass over 2 tensors, then edit 96 of 96 rows" in r.output


def _err(args):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1, r.output
    return r.output


def test_error_messages(tmp_path, tiny_ckpt, tiny_gpt2):
    src = str(tiny_ckpt(layers=2))
    good = str(_probe_file(tmp_path, _vec()))
    out = str(tmp_path / "never")
    small = str(_probe_file(tmp_path, _vec(16), "small.safetensors"))
    msg = _err(["edit", src, "--probe", small, "-o", out])
    assert (
        "Error: the probe does not fit the edited weights (it must come from the same model family "
        "and hidden space):\n  model.layers.0.mlp.gate_proj.weight [48, 32]: input size (row "
        "length) 32 != probe size 16\n  model.layers.1.mlp.gate_proj.weight [48, 32]: input size "
        "(row length) 32 != probe size 16"
    ) in msg
    other = str(_probe_file(tmp_path, _vec(), "other.safetensors", key="weights"))
    assert (
        f"Error: probe file {other} has no tensor 'probe' (found: weights); save the vector "
        "[hidden] or matrix [classes, hidden] under the key 'probe'"
    ) in _err(["edit", src, "--probe", other, "-o", out])
    assert (
        "Error: probe: rows must be in [1, 96] (the rows of the 2 mlp.gate_proj tensors), got "
        "97; use -p rows=N" in _err(["edit", src, "--probe", good, "-p", "rows=97", "-o", out])
    )
    assert (
        "Error: unknown parameter 'alpah' for edit method 'probe'; did you mean 'alpha'?"
        in _err(["edit", src, "--probe", good, "-p", "alpah=2", "-o", out])
    )
    assert "Error: unknown edit method 'prob'; did you mean 'probe'?" in _err(
        ["edit", src, "-m", "prob", "--probe", good, "-o", out]
    )
    two = str(_probe_file(tmp_path, np.stack([_vec(), _vec(seed=3)]), "two.safetensors"))
    assert (
        f"Error: probe_row 2 is out of range for probe {two}:probe of shape [2, 32]; use -p "
        "probe_row=0..1"
    ) in _err(["edit", src, "--probe", two, "-p", "probe_row=2", "-o", out])
    assert "Error: -p module='mlp.gate_proj' matches no 2-D weight in" in _err(
        ["edit", str(tiny_gpt2()), "--probe", good, "-o", out]
    )
    pt = tmp_path / "probe.pt"
    pt.write_bytes(b"not loaded")
    assert "is a pickle file; surgery never loads pickle files" in _err(
        ["edit", src, "--probe", str(pt), "-o", out]
    )
    assert "Error: edit -m project_out needs --targets" in _err(
        ["edit", src, "-m", "project_out", "--probe", good, "-o", out]
    )
    zero = str(_probe_file(tmp_path, np.zeros(32, np.float32), "zero.safetensors"))
    assert "has norm 0.0; a finite non-zero vector is required" in _err(
        ["edit", src, "--probe", zero, "-o", out]
    )
    assert not (tmp_path / "never").exists()  # nothing written on any error


def test_api_requires_probe(tiny_ckpt, tmp_path):
    with pytest.raises(SurgeryError, match="edit -m probe needs --probe PROBE.safetensors"):
        edit(str(tiny_ckpt()), out=tmp_path / "o")


def test_compress_is_a_decompose_method_with_its_schema():
    m = get("compress", "decompose")
    sch = schema(m)
    # rank, rng and scale are supplied by the loop; the rest is the user schema.
    assert set(sch) == {"bits", "group_size", "scheme", "lowrank", "ratio", "loftq_iter", "niter"}
    p = parse_params(m, ["bits=8", "group_size=0", "scheme=int", "lowrank=pela", "ratio=3"])
    assert p["bits"] == 8 and p["group_size"] == 0 and p["ratio"] == 3.0
    assert p["lowrank"] == "pela" and p["loftq_iter"] == 1
    with pytest.raises(SurgeryError, match="'fp8'"):
        parse_params(m, ["scheme=fp8"])
    # The registered kernel honours the decompose contract on a real weight.
    from ops.backend import host_rng

    w = np.random.default_rng(0).standard_normal((48, 32)).astype(np.float32)
    res, lr = m.fn(w, rank=4, rng=host_rng(0, "x"), scale=2.0, **parse_params(m, ["bits=4"]))
    assert res.shape == w.shape and lr.A.shape == (4, 32) and lr.B.shape == (48, 4)
    assert np.linalg.norm(w - res - lr.delta()) < np.linalg.norm(w - res)


# --- surgery probe (extra calib: transformers) -----------------------------------------------


def _labelled(path, n=32, vocab=64, seed=0):
    # Two classes with disjoint token ranges: their mean-pooled states are linearly separable.
    import random

    rnd = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            lo, hi = (3, vocab // 2) if i % 2 == 0 else (vocab // 2, vocab)
            ids = [rnd.randrange(lo, hi) for _ in range(rnd.randint(4, 9))]
            f.write(json.dumps({"input_ids": ids, "label": i % 2 == 1}) + "\n")
    return path


def test_probe_features_are_the_final_normed_hidden_state(tmp_path, tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    from surgery.calibrate import build_model, read_calib
    from surgery.probe import probe_features

    src = tiny_ckpt(layers=2, seed=7)
    recs = read_calib(_labelled(tmp_path / "d.jsonl", n=5))
    model, _ = build_model(Checkpoint.open(src))
    got = probe_features(model, recs, batch_size=2)  # padded batches
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(src)).eval()
    for i, s in enumerate(recs):
        with torch.no_grad():
            hs = ref(torch.tensor([s.ids]), output_hidden_states=True).hidden_states
        # HF hidden_states[-1] is the last layer's output after the final norm (§5.1).
        torch.testing.assert_close(got[i], hs[-1][0].mean(0), atol=1e-5, rtol=1e-5)


def test_probe_cli_trains_a_probe_that_edit_accepts(tmp_path, tiny_ckpt):
    pytest.importorskip("transformers")
    src = str(tiny_ckpt(layers=2, seed=8))
    data = _labelled(tmp_path / "d.jsonl")
    pfile = tmp_path / "probe.safetensors"
    r = CliRunner().invoke(
        cli, ["probe", src, "--data", str(data), "-o", str(pfile), "--lr", "1e-2", "--epochs", "30"]
    )
    assert r.exit_code == 0, r.output
    from surgery.probe import probe_accuracy

    assert probe_accuracy(pfile) >= 0.75  # separable classes: the probe learned something
    out = edit(src, probe=pfile, params={"rows": 5}, out=tmp_path / "o")
    s = json.loads((out / "surgery.json").read_text())["summary"]
    assert s["probe"]["shape"] == [2, 32] and s["probe"]["row"] == 1 and len(s["edited"]) == 5


def test_probe_label_errors(tmp_path, tiny_ckpt):
    from surgery.probe import train_probe

    src = str(tiny_ckpt())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [3, 4], "label": 1}\n{"input_ids": [5]}\n\n'
                   '{"input_ids": [6], "label": "toxic"}\n')  # fmt: skip
    with pytest.raises(SurgeryError) as e:
        train_probe(src, bad, out=tmp_path / "p.safetensors")
    assert str(e.value) == (
        f"{bad}: 2 line(s) without a usable label:\n"
        "  bad.jsonl:2: 'label' must be a class index 0, 1, … (got None)\n"
        "  bad.jsonl:4: 'label' must be a class index 0, 1, … (got 'toxic')"
    )
    one = tmp_path / "one.jsonl"
    one.write_text('{"input_ids": [3, 4], "label": 1}\n{"input_ids": [5], "label": 1}\n')
    with pytest.raises(SurgeryError, match="every sample has label 1; a probe needs two classes"):
        train_probe(src, one, out=tmp_path / "p.safetensors")
    with pytest.raises(SurgeryError, match="the probe is written as a .safetensors file"):
        train_probe(src, one, out=tmp_path / "p.pt")


# --- compress through `surgery decompose` (the decompose verb is another module's; §7, §8) -----


def _merged_peft(out):
    """Load OUT (residual model) + OUT/adapter with real PEFT and merge: {name: (out, in) f64}."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(model, str(out), subfolder="adapter")
    merged = pm.merge_and_unload().state_dict()
    return {k: v.double().numpy() for k, v in merged.items()}


def _tail(x, r):
    s = np.linalg.svd(x, compute_uv=False)
    return float(np.sqrt((s[r:] ** 2).sum()))


def test_decompose_compress_int4_recovers_the_svd_tail_through_peft(tmp_path, tiny_ckpt):
    from ops.quant import fake_quantize

    src = tiny_ckpt(layers=2, seed=9)
    out = tmp_path / "q"
    r = CliRunner().invoke(
        cli, ["decompose", str(src), "-m", "compress", "-p", "bits=4", "-p", "group_size=16",
              "-p", "niter=0", "-r", "4", "-o", str(out), "-q"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    a, res = Checkpoint.open(src), Checkpoint.open(out)
    merged = _merged_peft(out)
    man = json.loads((out / "surgery.json").read_text())
    assert man["method"] == "compress" and man["params"]["bits"] == 4
    reports = {t["name"]: t for t in man["tensors"]}
    for n in a.names():
        if not n.endswith("proj.weight"):
            assert res.raw(n).view(torch.uint8).equal(a.raw(n).view(torch.uint8))
            continue
        w = a.get(n).double().numpy()
        q = fake_quantize(a.get(n).float().numpy(), bits=4, group_size=16).astype(np.float64)
        np.testing.assert_array_equal(res.get(n).double().numpy(), q)  # residual = Q(W)
        # Q(W) + adapter leaves exactly the rank-4 SVD tail of W − Q(W) (Eckart–Young).
        err = np.linalg.norm(w - merged[n])
        np.testing.assert_allclose(err, _tail(w - q, 4), rtol=1e-4)
        assert err < np.linalg.norm(w - q)
        np.testing.assert_allclose(reports[n]["rel_error"], err / np.linalg.norm(w), rtol=1e-4)


def test_decompose_compress_pela_holds_the_weight_in_the_adapter(tmp_path, tiny_ckpt):
    from ops.compress import pela_rank

    src = tiny_ckpt(layers=1, seed=10)
    out = tmp_path / "p"
    from surgery.decompose import decompose

    decompose(str(src), method="compress", rank=4, params={"lowrank": "pela", "ratio": 2.0,
              "niter": 0}, out=out)  # fmt: skip
    a, res = Checkpoint.open(src), Checkpoint.open(out)
    merged = _merged_peft(out)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    for n in a.names():
        if not n.endswith("proj.weight"):
            continue
        n_out, n_in = a.shape(n)
        k = pela_rank(n_in, n_out, 2.0)
        assert not res.get(n).any()  # zero residual: the adapter carries the whole weight
        mod = n[: -len(".weight")]
        assert cfg["rank_pattern"].get(mod, cfg["r"]) == k
        assert k * (n_in + n_out) <= n_in * n_out / 2
        w = a.get(n).double().numpy()
        np.testing.assert_allclose(np.linalg.norm(w - merged[n]), _tail(w, k), rtol=1e-4)
