"""End to end: ``surgery decompose`` / ``surgery extract`` on tiny checkpoints, through real PEFT.

* residual + adapter loaded with ``PeftModel.from_pretrained(model, OUT, subfolder="adapter")``
  reproduces the original model's logits (PiSSA, CorDA; Llama and GPT-2 ``Conv1D``);
* ``merge_and_unload`` of an extracted adapter equals the optimal rank-r reconstruction of the task
  vector (float64 reference), for fixed ranks, energy thresholds, budgets and embeddings;
* bad input fails with one error listing every problem, and writes nothing;
* memory: the loop holds one module at a time (tracemalloc peak ≪ model size).
"""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ops.decompose import allocate_ranks, corda, ranks_for_energy
from surgery import demo
from surgery.checkpoint import Checkpoint
from surgery.decompose import decompose, extract
from surgery.errors import SurgeryError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

F64 = np.float64


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _logits(model, vocab=64, seed=0):
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _with_adapter(out, subfolder="adapter", base=None):
    model = _model(base if base is not None else out)
    kw = {"subfolder": subfolder} if subfolder else {}
    return peft.PeftModel.from_pretrained(model, str(out), **kw).eval()


def _best_rank_r(delta, r):
    u, s, vh = np.linalg.svd(np.asarray(delta, F64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


# --------------------------------------------------------------------------- decompose


@pytest.mark.parametrize("method", ["pissa", "corda"])
def test_decompose_roundtrip_llama_through_peft(tmp_path, method):
    src = demo.tiny_llama(tmp_path / "src")
    kw = {}
    if method == "corda":
        kw["stats"] = _write_stats(tmp_path, src)
        kw["params"] = ["mode=kpm"]
    out = decompose(str(src), method=method, rank=4, alpha=8, out=tmp_path / "out", **kw)
    ref = _logits(_model(src))
    residual_only = _logits(_model(out))
    assert not torch.allclose(residual_only, ref, atol=1e-3)  # the adapter carries real weight
    got = _logits(_with_adapter(out))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["base_model_name_or_path"] is None
    man = json.loads((out / "surgery.json").read_text())
    assert man["verb"] == "decompose" and man["method"] == method
    assert len(man["tensors"]) == 14 and man["summary"]["max_rel_error"] < 1e-6
    for t in man["tensors"]:
        assert len(t["sigma_kept"]) == 4 and t["energy_adapter"] > 0
        assert t["svd"] == "exact" and "sigma_dropped" not in t  # 32-wide: exact by the rule
    # untouched tensors are byte-identical copies
    a, b = Checkpoint.open(src), Checkpoint.open(out)
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert b"".join(a.read_bytes(n)) == b"".join(b.read_bytes(n))


def _write_stats(tmp_path, src):
    """A stats file with one random positive-definite ``<module>.cov`` per linear module."""
    ck = Checkpoint.open(src)
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for n in ck.names():
        if n.endswith("proj.weight"):
            d = ck.shape(n)[1]
            x = torch.randn(4 * d, d, generator=g)
            x[:, :2] *= 8  # outlier channels, as in real activations
            tensors[n[: -len(".weight")] + ".cov"] = x.T @ x / (4 * d)
    path = tmp_path / "stats.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_corda_adapter_equals_kernel(tmp_path):
    """The written factors are those of ops.decompose.corda on the same weight and covariance."""
    src = demo.tiny_llama(tmp_path / "src")
    stats = _write_stats(tmp_path, src)
    out = decompose(str(src), method="corda", rank=3, stats=stats, out=tmp_path / "o",
                    targets="q_proj", layers="0")  # fmt: skip
    ad = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    m = "model.layers.0.self_attn.q_proj"
    delta = ad[f"base_model.model.{m}.lora_B.weight"] @ ad[f"base_model.model.{m}.lora_A.weight"]
    w = load_file(str(src / "model.safetensors"))[f"{m}.weight"].numpy()
    cov = load_file(str(stats))[f"{m}.cov"].numpy()
    _, lr = corda(w, rank=3, rng=None, cov=cov.astype(F64))
    np.testing.assert_allclose(delta.numpy(), lr.delta(), atol=1e-6)
    res = _tensors(out)[f"{m}.weight"].numpy()
    np.testing.assert_allclose(res + delta.numpy(), w, atol=1e-6)


def test_decompose_roundtrip_gpt2_conv1d(tmp_path):
    src = demo.tiny_gpt2(tmp_path / "src")
    out = decompose(str(src), method="pissa", rank=4, out=tmp_path / "out")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    ref = _logits(_model(src))
    torch.testing.assert_close(_logits(_with_adapter(out)), ref, atol=2e-5, rtol=1e-4)
    # the residual keeps GPT-2's stored (in, out) layout
    a, b = _tensors(src), _tensors(out)
    assert all(a[k].shape == b[k].shape for k in a)


def test_kasa_truncates_once_and_adapter_is_zero(tmp_path):
    src = demo.tiny_llama(tmp_path / "src")
    out = decompose(str(src), method="kasa", rank=4, out=tmp_path / "out")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (
        "kasa_config" not in cfg and cfg["init_lora_weights"] is True
    )  # plain LoRA: no re-truncation
    ad = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert not any(t.any() for k, t in ad.items() if "lora_B" in k)
    assert all(t.any() for k, t in ad.items() if "lora_A" in k)
    # PEFT adds exactly nothing on top of the truncated base
    torch.testing.assert_close(_logits(_with_adapter(out)), _logits(_model(out)), atol=0, rtol=0)
    n = "model.layers.1.mlp.down_proj.weight"
    w = _tensors(src)[n].double().numpy()
    base = _tensors(out)[n].double().numpy()
    s = np.linalg.svd(w, compute_uv=False)
    sb = np.linalg.svd(base, compute_uv=False)
    k = min(w.shape)
    np.testing.assert_allclose(sb[: k - 4], s[: k - 4], rtol=1e-5)
    assert np.all(sb[k - 4 :] < 1e-5 * s[0])
    man = json.loads((out / "surgery.json").read_text())
    with pytest.raises(SurgeryError, match="already a kasa residual"):
        decompose(str(out), method="kasa", rank=4, out=tmp_path / "twice")
    row = next(t for t in man["tensors"] if t["name"] == n)
    assert row["rel_error"] == pytest.approx(
        math.sqrt((s[-4:] ** 2).sum() / (s**2).sum()), rel=1e-3
    )
    np.testing.assert_allclose(sorted(row["sigma_dropped"]), sorted(s[-4:]), rtol=1e-3)
    assert row["svd"] == "exact"


def test_decompose_bf16_reports_stored_error(tmp_path):
    src = demo.tiny_llama(tmp_path / "src", dtype="bfloat16")
    out = decompose(str(src), method="pissa", rank=4, out=tmp_path / "out")
    ck = Checkpoint.open(out)
    assert ck.dtype("model.layers.0.mlp.up_proj.weight") == "BF16"
    man = json.loads((out / "surgery.json").read_text())
    errs = [t["rel_error"] for t in man["tensors"]]
    # the bf16 rounding of the residual (≈ 2^-9 relative per entry), measured and reported
    assert all(0 < e < 2**-7 for e in errs)


def test_decompose_dry_run_writes_nothing(tmp_path):
    src = demo.tiny_llama(tmp_path / "src")
    plan = decompose(str(src), method="pissa", rank=4, out=tmp_path / "out", dry_run=True)
    assert plan.computed == 14 and not (tmp_path / "out").exists()


def test_decompose_bad_input_is_one_error(tmp_path):
    src = demo.tiny_llama(tmp_path / "src")
    t = _tensors(src)
    t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 32, dtype=torch.int8)
    cfg = json.loads((src / "config.json").read_text())
    bad = demo.save_checkpoint(t, tmp_path / "bad", cfg)
    out = tmp_path / "out"
    with pytest.raises(SurgeryError) as e:
        decompose(str(bad), method="corda", rank=40, out=out, targets="q_proj,k_proj")
    msg = str(e.value)
    assert "nothing was written" in msg
    assert "is I8; surgery computes only on" in msg  # the non-float target
    assert "rank 40 exceeds min(out, in) = 16 for model.layers.0.self_attn.k_proj.weight" in msg
    assert "corda needs the input covariance" in msg and "--stats" in msg
    assert not out.exists()
    # stats of the wrong shape, and targets that match nothing
    stats = tmp_path / "s.safetensors"
    save_file({"model.layers.0.self_attn.k_proj.cov": torch.eye(7)}, str(stats))
    with pytest.raises(SurgeryError) as e:
        decompose(str(src), method="corda", rank=2, stats=stats, out=out, targets="k_proj")
    msg = str(e.value)
    assert "covariance is [7, 7] but weight" in msg and "needs [32, 32]" in msg
    assert "model.layers.1.self_attn.k_proj: no 'model.layers.1.self_attn.k_proj.cov'" in msg
    with pytest.raises(SurgeryError, match="match no 2-D weight"):
        decompose(str(src), method="pissa", rank=2, out=out, targets="nope_proj")
    with pytest.raises(SurgeryError, match="damping must be a finite number > 0, got -1.0"):
        decompose(str(src), method="corda", rank=2, stats=stats, out=out, params=["damping=-1"])
    with pytest.raises(SurgeryError, match="use `surgery extract"):
        decompose(str(src), method="svd_extract", rank=2, out=out)
    assert not out.exists()


# --------------------------------------------------------------------------- extract


def _pair(tmp_path, kind="llama", **kw):
    make = demo.tiny_llama if kind == "llama" else demo.tiny_gpt2
    base = make(tmp_path / "base", **kw)
    tuned = demo.finetune(base, tmp_path / "tuned", seed=5, scale=0.05)
    return base, tuned


def _merged(base, out):
    model = _with_adapter(out, subfolder=None, base=base)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_extract_merge_equals_optimal_rank_r(tmp_path, kind):
    base, tuned = _pair(tmp_path, kind)
    out = extract(str(base), str(tuned), rank=3, out=tmp_path / "ad", include_embeddings=False)
    merged = _merged(base, out)
    b, t = Checkpoint.open(base), Checkpoint.open(tuned)
    man = json.loads((out / "surgery.json").read_text())
    names = [r["name"] for r in man["tensors"]]
    assert len(names) == (14 if kind == "llama" else 8)
    for n in names:
        delta = t.get(n).double().numpy() - b.get(n).double().numpy()  # (out, in)
        want = b.get(n).double().numpy() + _best_rank_r(delta, 3)
        got = merged[n].double().numpy()
        got = got.T if b.is_conv1d(n) else got
        np.testing.assert_allclose(got, want, atol=2e-6)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 3 and cfg["fan_in_fan_out"] is (kind == "gpt2")


def test_extract_embeddings(tmp_path):
    base, tuned = _pair(tmp_path)
    out = extract(str(base), str(tuned), rank=4, out=tmp_path / "ad", include_embeddings=True)
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 64)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 4)
    assert "base_model.model.lm_head.lora_A.weight" in keys
    merged = _merged(base, out)
    b, t = Checkpoint.open(base), Checkpoint.open(tuned)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        delta = t.get(n).double().numpy() - b.get(n).double().numpy()
        want = b.get(n).double().numpy() + _best_rank_r(delta, 4)
        np.testing.assert_allclose(merged[n].double().numpy(), want, atol=2e-6)


def test_extract_exact_at_true_rank_and_skips_unchanged(tmp_path):
    base = demo.tiny_llama(tmp_path / "base")
    tuned = demo.finetune(base, tmp_path / "tuned", seed=2, scale=0.05, rank=2)
    t = _tensors(tuned)
    t["model.layers.1.mlp.up_proj.weight"] = _tensors(base)["model.layers.1.mlp.up_proj.weight"]
    tuned = demo.save_checkpoint(
        t, tmp_path / "tuned2", json.loads((base / "config.json").read_text())
    )
    out = extract(str(base), str(tuned), rank=2, out=tmp_path / "ad")
    man = json.loads((out / "surgery.json").read_text())
    rows = {r["name"]: r for r in man["tensors"]}
    assert rows["model.layers.1.mlp.up_proj.weight"]["rank"] == 0
    assert man["summary"]["modules"] == 13 and man["summary"]["modules_skipped"] == 1
    assert man["summary"]["rel_error"] < 1e-5  # rank-2 fine-tune, rank-2 adapter: exact
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert not any("layers.1.mlp.up_proj" in k for k in keys)


def test_extract_energy_ranks(tmp_path):
    base, tuned = _pair(tmp_path)
    out = extract(str(base), str(tuned), energy=0.6, out=tmp_path / "ad")
    b, t = Checkpoint.open(base), Checkpoint.open(tuned)
    man = json.loads((out / "surgery.json").read_text())
    cfg = json.loads((out / "adapter_config.json").read_text())
    merged = _merged(base, out)
    for row in man["tensors"]:
        n = row["name"]
        delta = t.get(n).double().numpy() - b.get(n).double().numpy()
        s = np.linalg.svd(delta, compute_uv=False)
        want_r = ranks_for_energy([s], 0.6)[0]
        assert row["rank"] == want_r
        module = n[: -len(".weight")]
        assert cfg["rank_pattern"].get(module, cfg["r"]) == want_r
        assert row["energy_adapter"] >= 0.6 - 1e-6
        want = b.get(n).double().numpy() + _best_rank_r(delta, want_r)
        np.testing.assert_allclose(merged[n].double().numpy(), want, atol=2e-6)


@pytest.mark.parametrize("unit", ["rank", "params"])
def test_extract_budget(tmp_path, unit):
    base, tuned = _pair(tmp_path)
    budget = 40 if unit == "rank" else 40 * 80
    out = extract(str(base), str(tuned), budget=budget, budget_unit=unit, out=tmp_path / "ad")
    b, t = Checkpoint.open(base), Checkpoint.open(tuned)
    man = json.loads((out / "surgery.json").read_text())
    names = [r["name"] for r in man["tensors"]]
    spectra = [
        np.linalg.svd(t.get(n).double().numpy() - b.get(n).double().numpy(), compute_uv=False)
        for n in names
    ]
    costs = [sum(b.shape(n)) for n in names]
    want = allocate_ranks(spectra, budget, unit=unit, costs=costs)
    got = [r["rank"] for r in man["tensors"]]
    assert got == want
    used = sum(r * (c if unit == "params" else 1) for r, c in zip(got, costs))
    assert used <= budget and used == man["summary"]["budget_used"]
    # the global rank budget is exact: its summed squared error is the sum of the dropped σ²
    if unit == "rank":
        dropped = sum((s[r:] ** 2).sum() for s, r in zip(spectra, got))
        norm2 = sum((s**2).sum() for s in spectra)
        assert man["summary"]["rel_error"] == pytest.approx(math.sqrt(dropped / norm2), rel=1e-4)


def test_extract_bad_input_is_one_error(tmp_path):
    base, _ = _pair(tmp_path)
    other = demo.tiny_llama(tmp_path / "other", vocab=80)
    with pytest.raises(SurgeryError) as e:
        extract(str(base), str(other), rank=20, out=tmp_path / "ad", include_embeddings=True)
    msg = str(e.value)
    assert "model.embed_tokens.weight: shape [64, 32]" in msg and "vocabulary changed?" in msg
    assert "rank 20 exceeds min(out, in) = 16 for model.layers.0.self_attn.k_proj.weight" in msg
    with pytest.raises(SurgeryError, match="exactly one of -r RANK, --energy E or --budget N"):
        extract(str(base), str(other), rank=2, energy=0.5, out=tmp_path / "ad")
    assert not (tmp_path / "ad").exists()


def test_memory_one_module_at_a_time(tmp_path):
    """tracemalloc peak of numpy allocations stays ≪ the model (the bound in the module doc)."""
    src = demo.tiny_llama(tmp_path / "src", layers=6, hidden=128, inter=256)
    model_bytes = sum(t.numel() * 4 for t in _tensors(src).values())
    largest = 256 * 128 * 4
    tracemalloc.start()
    decompose(str(src), method="pissa", rank=4, out=tmp_path / "out", params=["niter=0"])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 12 * largest < model_bytes / 2, (peak, largest, model_bytes)


def test_cli_decompose_and_extract(tmp_path):
    from click.testing import CliRunner

    from cli import cli

    base, tuned = _pair(tmp_path)
    r = CliRunner().invoke(cli, ["decompose", str(base), "-m", "pissa", "-r", "2", "-p",
                                 "niter=0", "-o", str(tmp_path / "d"), "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (tmp_path / "d" / "adapter" / "adapter_model.safetensors").is_file()
    r = CliRunner().invoke(cli, ["extract", str(base), str(tuned), "--budget", "30",
                                 "-o", str(tmp_path / "e"), "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["decompose", str(base), "-m", "corda", "-r", "2", "-o",
                                 str(tmp_path / "f")])  # fmt: skip
    assert r.exit_code == 1 and "Error: cannot decompose" in r.output and "--stats" in r.output
