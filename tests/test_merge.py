"""``surgery merge`` end to end: API and CLI on tiny checkpoints (sharded, bf16), exact errors.

The kernels are checked against float64 references in ``test_ops_merge.py``; here the reference is
the same maths applied tensor by tensor from the checkpoints with numpy, so these tests prove the
plumbing: names, dtypes, seeds per (tensor, model), copy-through, whole-model PCB statistics.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import cli
from ops import merge as M
from ops.backend import host_rng
from surgery import demo
from surgery.checkpoint import Checkpoint
from surgery.errors import SurgeryError
from surgery.merge import merge, read_mergekit_config


@pytest.fixture
def family(tmp_path):
    """A bf16 base (2 shards, an int buffer) and three fine-tunes (dense, low-rank, sharded)."""
    base = demo.tiny_llama(tmp_path / "base", dtype="bfloat16", shards=2, int_buffer=True)
    fts = [
        demo.finetune(base, tmp_path / "ft0", seed=1),
        demo.finetune(base, tmp_path / "ft1", seed=2, rank=4),
        demo.finetune(base, tmp_path / "ft2", seed=3, shards=3),
    ]
    return base, fts


def f32(ckpt: Checkpoint, name: str) -> np.ndarray:
    return ckpt.get(name).to(torch.float32).numpy()


def reference(base, fts, fn, weights, seed=0, **params):
    """Per tensor: θ_0 + fn(θ_i − θ_0) in fp32, cast to the base dtype (bf16)."""
    b = Checkpoint.open(base)
    ms = [Checkpoint.open(f) for f in fts]
    out = {}
    for n in b.names():
        if not b.info(n).computable:
            continue
        t0 = f32(b, n)
        d = np.stack([f32(m, n) - t0 for m in ms])
        rng = [host_rng(seed, n, i) for i in range(len(ms))]
        out[n] = torch.from_numpy(t0 + fn(d, np.asarray(weights, np.float32), rng=rng, **params))
    return {n: t.to(torch.bfloat16) for n, t in out.items()}


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {"lambda_": 0.7}),
        ("ties", {"density": 0.3}),
        ("dare_linear", {"density": 0.5}),
        ("dare_ties", {"density": 0.5, "rescale": "density"}),
        ("pcb", {"density": 0.2, "scope": "tensor"}),
    ],
)
def test_api_merge_equals_the_kernels_tensor_by_tensor(family, tmp_path, method, params):
    base, fts = family
    w = [1.0, 0.6, 1.3]
    cli_params = {k.rstrip("_"): v for k, v in params.items()}
    out = merge([str(f) for f in fts], base=str(base), method=method, weights=w,
                params=cli_params, out=tmp_path / "out", seed=5)  # fmt: skip
    ref = reference(base, fts, getattr(M, method), w, seed=5, **params)
    got = Checkpoint.open(out)
    b = Checkpoint.open(base)
    assert sorted(got.names()) == sorted(b.names())
    for n in b.names():
        assert got.dtype(n) == b.dtype(n) and got.shape(n) == b.shape(n)
        if n in ref:
            assert torch.equal(got.raw(n), ref[n]), n
        else:  # the int buffer: copied from the base
            assert got.raw(n).numpy().tobytes() == b.raw(n).numpy().tobytes()
    man = json.loads((out / "surgery.json").read_text())
    assert man["verb"] == "merge" and man["method"] == method and man["summary"]["weights"] == w


def test_untouched_tensors_are_bit_identical(family, tmp_path):
    base, fts = family
    out = merge([str(f) for f in fts], base=str(base), method="ties", out=tmp_path / "o")
    b, got = Checkpoint.open(base), Checkpoint.open(out)
    same = [n for n in b.names() if b.info(n).computable and len(b.shape(n)) == 1]
    assert same  # finetune() leaves the 1-D norms alone
    for n in same:
        assert b"".join(got.read_bytes(n)) == b"".join(b.read_bytes(n)), n
    man = json.loads((out / "surgery.json").read_text())
    actions = {t["name"]: t["action"] for t in man["tensors"]}
    assert all(actions[n] == "same" for n in same)
    assert actions["model.layers.0.mlp.up_proj.weight"] == "merged"


def test_pcb_model_scope_on_sharded_checkpoints_equals_the_concatenated_vector(tmp_path):
    base = demo.tiny_llama(tmp_path / "base", dtype="float32", shards=3)
    fts = [demo.finetune(base, tmp_path / f"ft{i}", seed=i + 1, shards=2) for i in range(3)]
    w = [1.0, 0.9, 1.1]
    calls = []
    out = merge([str(f) for f in fts], base=str(base), method="pcb", weights=w,
                params={"density": 0.1, "clip": 0.01}, out=tmp_path / "out",
                progress=lambda *a: calls.append(a))  # fmt: skip
    b = Checkpoint.open(base)
    # The read-only passes report progress too: each pass over every tensor, then the write pass.
    n_merged = calls[-1][1]
    passes = {c[2].split(":")[0] for c in calls if c[2].startswith("pass ")}
    assert len(passes) >= 2 and all(c[1] == n_merged for c in calls)
    assert sum(1 for c in calls if not c[2].startswith("pass ")) == n_merged
    ms = [Checkpoint.open(f) for f in fts]
    names = b.names()
    t0 = np.concatenate([f32(b, n).ravel() for n in names])
    flat = np.stack([np.concatenate([f32(m, n).ravel() for n in names]) - t0 for m in ms])
    whole = M.pcb(flat, np.asarray(w, np.float32), density=0.1, clip=0.01)  # (D,) one vector
    got = Checkpoint.open(out)
    merged = np.concatenate([f32(got, n).ravel() for n in names]) - t0
    np.testing.assert_allclose(merged, whole, rtol=1e-5, atol=1e-7)
    # And against the official formulas in float64 on the concatenated model.
    from test_ops_merge import ref_pcb

    ref, _ = ref_pcb(flat.astype(np.float64), 0.1, 0.01, np.asarray(w))
    np.testing.assert_allclose(merged, ref, rtol=1e-4, atol=1e-7)
    tensor_scope = merge([str(f) for f in fts], base=str(base), method="pcb", weights=w,
                         params={"density": 0.1, "clip": 0.01, "scope": "tensor"},
                         out=tmp_path / "out2")  # fmt: skip
    ts = Checkpoint.open(tensor_scope)
    assert not np.allclose(np.concatenate([f32(ts, n).ravel() for n in names]) - t0, whole)


def test_same_seed_same_bytes_other_seed_differs(family, tmp_path):
    base, fts = family
    args = dict(base=str(base), method="dare_ties", params=["density=0.3"], shard_size="20KB")
    a = merge([str(f) for f in fts], out=tmp_path / "a", seed=1, **args)
    b = merge([str(f) for f in fts], out=tmp_path / "b", seed=1, **args)
    c = merge([str(f) for f in fts], out=tmp_path / "c", seed=2, **args)
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(files) >= 2  # a sharded output
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_cli_merge_with_weights_params_dtype_and_dry_run(family, tmp_path):
    base, fts = family
    r = CliRunner().invoke(cli, ["merge", *map(str, fts), "--base", str(base), "-m", "ties",
                                 "-w", "1", "-w", "0.5", "-w", "2", "-p", "density=0.4",
                                 "-p", "lambda=0.8", "--dtype", "fp32", "-o", str(tmp_path / "o"),
                                 "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"wrote {tmp_path / 'o'}" in r.output
    got = Checkpoint.open(tmp_path / "o")
    assert got.dtype("model.layers.0.mlp.up_proj.weight") == "F32"
    assert got.dtype("model.rotary_positions") == "I64"
    ref = reference(base, fts, M.ties, [1, 0.5, 2], density=0.4, lambda_=0.8)
    n = "model.layers.1.self_attn.q_proj.weight"
    b = Checkpoint.open(base)
    t0 = f32(b, n)
    d = np.stack([f32(Checkpoint.open(f), n) - t0 for f in fts])
    expect = t0 + M.ties(d, np.array([1, 0.5, 2], np.float32), density=0.4, lambda_=0.8)
    np.testing.assert_array_equal(got.raw(n).numpy(), expect)
    assert ref  # bf16 reference built too (covers the default dtype path)
    r = CliRunner().invoke(cli, ["merge", *map(str, fts), "--base", str(base), "-m", "pcb",
                                 "--dry-run", "-o", str(tmp_path / "dry")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "plan: surgery merge" in r.output and "pcb scope=model" in r.output
    assert not (tmp_path / "dry").exists()


def test_mergekit_yaml_maps_onto_the_same_merge(family, tmp_path):
    base, fts = family
    cfg = tmp_path / "ties.yaml"
    cfg.write_text(
        f"merge_method: ties\nbase_model: {base}\ndtype: bfloat16\n"
        "parameters:\n  normalize: true\n  int8_mask: true\n  lambda: 0.9\n"
        "models:\n"
        f"  - model: {base}\n"
        f"  - model: {fts[0]}\n    parameters:\n      weight: 1.0\n      density: 0.5\n"
        f"  - model: {fts[1]}\n    parameters:\n      weight: 0.5\n      density: 0.5\n"
    )
    m = read_mergekit_config(cfg)
    assert m["models"] == [str(fts[0]), str(fts[1])] and m["weights"] == [1.0, 0.5]
    assert m["params"] == {"density": 0.5, "lambda": 0.9, "normalize": True}
    r = CliRunner().invoke(cli, ["merge", "--config", str(cfg), "-o", str(tmp_path / "y"), "-q"])
    assert r.exit_code == 0, r.output
    direct = merge([str(fts[0]), str(fts[1])], base=str(base), method="ties", weights=[1, 0.5],
                   params=["density=0.5", "lambda=0.9"], out=tmp_path / "d")  # fmt: skip
    for f in sorted(p.name for p in direct.glob("*.safetensors")):
        assert (tmp_path / "y" / f).read_bytes() == (direct / f).read_bytes()
    # mergekit's defaults fill what the YAML leaves out: DARE rescale → l1, density → 1.0.
    dare = tmp_path / "dare.yaml"
    dare.write_text(
        f"merge_method: dare_linear\nbase_model: {base}\nmodels:\n  - model: {fts[0]}\n"
    )
    assert read_mergekit_config(dare)["params"] == {
        "density": 1.0, "lambda": 1.0, "normalize": False, "rescale": "l1"
    }  # fmt: skip


def test_mergekit_yaml_errors_list_every_problem(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "merge_method: slerp\nbase_model: b\nslices: []\nparameters:\n  t: [0, 1]\n"
        "models:\n  - model: x\n    parameters: {density: 0.5, epsilon: 0.1}\n"
        "  - model: y\n    parameters: {density: 0.3}\n"
    )
    with pytest.raises(SurgeryError) as e:
        read_mergekit_config(cfg)
    assert str(e.value) == (
        f"--config {cfg}: merge_method 'slerp' is not supported; choices: dare_linear, dare_ties, "
        "pcb, task_arithmetic, ties; slices: is not supported; list whole models under models:; "
        "parameters: t: gradients and filtered lists are not supported; give one value; "
        "models[0] x: per-model parameter 'epsilon' is not supported; per-model densities "
        "differ (x=0.5, y=0.3); surgery uses one density for all models"
    )


def run(args):
    return CliRunner().invoke(cli, ["merge", *args])


def test_cli_errors_exact_text_and_nothing_written(family, tmp_path):
    base, fts = family
    o = str(tmp_path / "never")
    ms = [str(f) for f in fts]
    cases = {
        "Error: unknown merge method 'tie'; did you mean 'ties'? choices: dare_linear, dare_ties, "
        "pcb, task_arithmetic, ties": [*ms, "--base", str(base), "-m", "tie", "-o", o],
        "Error: ties: density must be in (0, 1], got 1.5": [
            *ms, "--base", str(base), "-m", "ties", "-p", "density=1.5", "-o", o],
        "Error: unknown parameter 'dens' for merge method 'ties'; did you mean 'density'? valid: "
        "density, lambda, normalize": [*ms, "--base", str(base), "-m", "ties", "-p", "dens=1",
                                       "-o", o],
        "Error: pcb: clip must be in [0, 0.5), got 0.6": [
            *ms, "--base", str(base), "-m", "pcb", "-p", "clip=0.6", "-o", o],
        "Error: --base is required for ties (task vectors are model − base); got 1 weight(s) for "
        "3 model(s); give one -w per model": [*ms, "-m", "ties", "-w", "1", "-o", o],
        "Error: a merge method is required: --method ties (or --config FILE.yaml)": [*ms, "-o", o],
    }  # fmt: skip
    for msg, args in cases.items():
        r = run(args)
        assert r.exit_code == 1, r.output
        assert r.output.strip() == msg
    assert not (tmp_path / "never").exists()


def test_mismatched_models_one_error_listing_everything(family, tmp_path):
    base, _ = family
    t = {k: v.clone() for k, v in _load_all(base).items()}
    t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(40, 32, dtype=torch.bfloat16)
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"].half()
    del t["model.norm.weight"]
    t["extra.weight"] = torch.zeros(2, dtype=torch.bfloat16)
    bad = demo.save_checkpoint(t, tmp_path / "bad", None)
    r = run([str(bad), "--base", str(base), "-m", "ties", "-o", str(tmp_path / "never")])
    assert r.exit_code == 1
    assert r.output.strip() == (
        "Error: the models do not match the base (4 problem(s)); merge needs fine-tunes of one "
        "base with the same tensor names, shapes and dtypes:\n"
        f"  {bad}: missing model.norm.weight [32] (present in the base)\n"
        f"  {bad}: extra tensor extra.weight [2] (not in the base)\n"
        f"  {bad}: model.layers.0.mlp.up_proj.weight has shape [40, 32], the base [48, 32]\n"
        f"  {bad}: model.layers.1.mlp.up_proj.weight is F16, the base BF16"
    )
    assert not (tmp_path / "never").exists()


def _load_all(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
