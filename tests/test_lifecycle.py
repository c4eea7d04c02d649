"""apply / port / convert / adapter merges: float64 references, real PEFT, bad inputs."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ops.lowrank import LowRank
from surgery import demo
from surgery.adapter import Adapter
from surgery.checkpoint import Checkpoint
from surgery.errors import SurgeryError
from surgery.lifecycle import apply, convert, merge_adapters, port, servable_problems

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import PeftModel, get_peft_model  # noqa: E402
from peft_helpers import ids, load_model, train_adalora  # noqa: E402

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
UP0 = "model.layers.0.mlp.up_proj"
EMB = "model.embed_tokens"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    return {
        "old": demo.tiny_llama(d / "old", seed=0),
        "new": demo.finetune(demo.tiny_llama(d / "tmp", seed=0), d / "new", seed=7, scale=0.05),
        "big": demo.tiny_llama(d / "big", seed=3, vocab=72),
        "wide": demo.tiny_llama(d / "wide", seed=3, hidden=40, heads=4, kv_heads=2),
        "gpt2": demo.tiny_gpt2(d / "gpt2"),
        "bf16": demo.tiny_llama(d / "bf16", seed=0, dtype="bfloat16"),
    }


def lr(out, inp, r, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return LowRank(A=torch.randn(r, inp, generator=g) * 0.3,
                   B=torch.randn(out, r, generator=g) * 0.3, scale=scale)  # fmt: skip


def our_adapter(tmp_path, base, name="a", rslora=False, emb=True):
    mods = {Q0: lr(32, 32, 4, 2.0, 0), V1: lr(16, 32, 2, 0.5, 1), UP0: lr(48, 32, 8, 1.0, 2)}
    if emb:
        mods[EMB] = lr(64, 32, 4, 2.0, 3)
    ad = Adapter(modules=mods, embeddings={EMB} if emb else set(), config={"use_rslora": rslora})
    return ad.save(tmp_path / name, base=Checkpoint.open(base))


def model(d):
    return load_model(d)


def peft_merged(base, adapter):
    return PeftModel.from_pretrained(model(base), str(adapter)).merge_and_unload().state_dict()


def assert_model_equals(out, ref_sd, names, atol):
    ck = Checkpoint.open(out)
    for n in names:
        got = ck.raw(n).float()
        assert torch.allclose(got, ref_sd[n], atol=atol, rtol=0), (n, (got - ref_sd[n]).abs().max())


def rb(ck, n):
    return b"".join(ck.read_bytes(n))


# -- apply ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True])
def test_apply_equals_peft_and_float64(tmp_path, bases, rslora):
    a = our_adapter(tmp_path, bases["old"], rslora=rslora)
    out = apply(bases["old"], a, out=tmp_path / "m")
    ad = Adapter.load(a)
    names = [f"{m}.weight" for m in ad.modules]
    assert_model_equals(out, peft_merged(bases["old"], a), names, atol=2e-6)
    base, got = Checkpoint.open(bases["old"]), Checkpoint.open(out)
    for m, x in ad.modules.items():  # float64 reference W + s·B A
        b, a = torch.as_tensor(x.B).double(), torch.as_tensor(x.A).double()
        ref = base.get(f"{m}.weight").double() + x.scale * b @ a
        assert torch.allclose(got.get(f"{m}.weight").double(), ref, atol=2e-6, rtol=0)
    for n in base.names():  # everything else byte for byte
        if n not in names:
            assert rb(got, n) == rb(base, n)
    man = json.loads((out / "surgery.json").read_text())
    assert man["verb"] == "apply" and any(i["role"] == "adapter" for i in man["inputs"])


def test_apply_gpt2_conv1d_and_bf16(tmp_path, bases):
    g = Checkpoint.open(bases["gpt2"])
    m = "transformer.h.1.attn.c_attn"
    ad = Adapter(modules={m: lr(96, 32, 4, 2.0, 0)})
    a = ad.save(tmp_path / "a", base=g)
    out = apply(bases["gpt2"], a, out=tmp_path / "m")
    assert_model_equals(out, peft_merged(bases["gpt2"], a), [m + ".weight"], atol=2e-6)
    # bf16 base: fp32 compute, one cast at the end
    b = Checkpoint.open(bases["bf16"])
    a2 = our_adapter(tmp_path, bases["bf16"], name="b")
    out2 = apply(bases["bf16"], a2, out=tmp_path / "m2")
    ad2 = Adapter.load(a2)
    got = Checkpoint.open(out2)
    for mod in ad2.modules:
        n = f"{mod}.weight"
        assert got.dtype(n) == "BF16"
        want = (b.get(n).float() + ad2.delta(mod)).to(torch.bfloat16)
        assert torch.equal(got.get(n), want)


_FLAVOURS: dict = {}


def _peft_flavour(tmp_path, base, kind):
    """A PEFT-saved adapter of ``kind`` (built once per session: PEFT training is the slow part)."""
    key = (str(base), kind)
    if key not in _FLAVOURS:
        _FLAVOURS[key] = _make_peft_flavour(tmp_path, base, kind)
    return _FLAVOURS[key]


def _make_peft_flavour(tmp_path, base, kind):
    if kind == "adalora":
        cfg = peft.AdaLoraConfig(init_r=6, target_r=2, total_step=4, tinit=0, tfinal=1, deltaT=1,
                                 lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                 task_type="CAUSAL_LM")  # fmt: skip
    elif kind == "kasa":
        cfg = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "down_proj"],
            kasa_config=peft.tuners.lora.config.KasaConfig(),
        )
    elif kind == "dora":
        cfg = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True
        )
    else:
        cfg = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "embed_tokens"],
            rank_pattern={"q_proj": 2},
            alpha_pattern={"embed_tokens": 3},
        )
    pm = get_peft_model(model(base), cfg)
    if kind == "adalora":
        train_adalora(pm)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(
                    p * (1 + 0.1 * torch.randn(p.shape, generator=g))
                    if "magnitude" in n
                    else torch.randn(p.shape, generator=g) * 0.2
                )
    pm.save_pretrained(str(tmp_path / kind))
    return tmp_path / kind


@pytest.mark.parametrize("kind", ["adalora", "kasa", "dora", "patterns_embedding"])
def test_apply_peft_flavours_equal_merge_and_unload(tmp_path, bases, kind):
    a = _peft_flavour(tmp_path, bases["old"], kind)
    out = apply(bases["old"], a, out=tmp_path / "m")
    ad = Adapter.load(a)
    names = [f"{m}.weight" for m in ad.modules]
    assert_model_equals(
        out, peft_merged(bases["old"], a), names, atol=1e-5 if kind in ("kasa", "dora") else 2e-6
    )


# -- port -----------------------------------------------------------------------------------------
def test_port_identities(tmp_path, bases):
    a = our_adapter(tmp_path, bases["old"])
    ad = Adapter.load(a)
    new = Checkpoint.open(bases["new"])
    # port(new, patch) − new == s·B A (exactly in fp32 compute)
    out = port(str(a), to=bases["new"], merge=True, out=tmp_path / "p")
    got = Checkpoint.open(out)
    for m in ad.modules:
        n = f"{m}.weight"
        assert torch.allclose(got.get(n) - new.get(n), ad.delta(m), atol=1e-6, rtol=0)
    # new == old: the port is the fine-tune itself (= apply, byte for byte)
    same = port(str(a), to=bases["old"], merge=True, out=tmp_path / "same")
    ft = apply(bases["old"], a, out=tmp_path / "ft")
    s, f = Checkpoint.open(same), Checkpoint.open(ft)
    assert all(rb(s, n) == rb(f, n) for n in f.names())


def test_port_adapter_retarget_with_drift_report(tmp_path, bases):
    a = our_adapter(tmp_path, bases["old"])
    out = port(str(a), to=bases["new"], from_=bases["old"], out=tmp_path / "p")
    ad, ported = Adapter.load(a), Adapter.load(out)
    for m in ad.modules:
        assert torch.allclose(ported.delta(m), ad.delta(m), atol=1e-6, rtol=0)
    assert ported.config["base_model_name_or_path"] is None  # local bases: no path leaks
    man = json.loads((out / "surgery.json").read_text())
    rows = {t["module"]: t for t in man["tensors"]}
    old, new = Checkpoint.open(bases["old"]), Checkpoint.open(bases["new"])
    for m in ad.modules:  # float64 references
        wo, wn = old.get(f"{m}.weight").double(), new.get(f"{m}.weight").double()
        d, p = wn - wo, ad.delta(m, torch.float64)
        assert rows[m]["drift"] == pytest.approx(float(d.norm() / wo.norm()), rel=1e-6)
        cos = float((d * p).sum() / (d.norm() * p.norm()))
        assert rows[m]["cos_drift_patch"] == pytest.approx(cos, rel=1e-4, abs=1e-7)
    # the ported adapter loads in PEFT on the new base and means new + ΔW
    assert_model_equals(
        port(str(out), to=bases["new"], merge=True, out=tmp_path / "pm"),
        peft_merged(bases["new"], out),
        [f"{m}.weight" for m in ad.modules],
        atol=2e-6,
    )
    from cli import cli

    r = CliRunner().invoke(
        cli,
        [
            "port",
            str(a),
            "--to",
            str(bases["new"]),
            "--from",
            str(bases["old"]),
            "-o",
            str(tmp_path / "c"),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "drift over 4 modules" in r.output


def test_port_vocab_growth_pads_with_zeros(tmp_path, bases, caplog):
    a = our_adapter(tmp_path, bases["old"])
    with caplog.at_level(logging.WARNING, logger="surgery"):
        out = port(str(a), to=bases["big"], out=tmp_path / "p")
    assert "vocabulary growth" in caplog.text
    ported = Adapter.load(out)
    d = ported.delta(EMB)
    assert d.shape == (72, 32) and not d[64:].any()
    assert torch.allclose(d[:64], Adapter.load(a).delta(EMB), atol=1e-6)
    pm = PeftModel.from_pretrained(model(bases["big"]), str(out))  # loads on the grown base
    assert pm(ids()).logits.shape[-1] == 72


def test_port_full_finetune(tmp_path, bases):
    tuned = demo.finetune(bases["old"], tmp_path / "tuned", seed=3, scale=0.05, rank=2)
    old, new, t = (Checkpoint.open(x) for x in (bases["old"], bases["new"], tuned))
    # extracting at rank ≥ the patch rank recovers the patch
    out = port(str(tuned), to=bases["new"], from_=bases["old"], rank=3, out=tmp_path / "p")
    ad = Adapter.load(out)
    assert len(ad.modules) == 14 and ad.config["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    for m in ad.modules:
        n = f"{m}.weight"
        ref = t.get(n).double() - old.get(n).double()
        assert torch.allclose(ad.delta(m, torch.float64), ref, atol=2e-6, rtol=0), m
    # --merge without -r adds the dense patch exactly: new + (tuned − old)
    out = port(str(tuned), to=bases["new"], from_=bases["old"], merge=True, out=tmp_path / "m")
    got = Checkpoint.open(out)
    n = f"{UP0}.weight"
    ref = new.get(n) + (t.get(n) - old.get(n))
    assert torch.allclose(got.get(n), ref, atol=1e-6, rtol=0)
    assert rb(got, f"{EMB}.weight") == rb(new, f"{EMB}.weight")
    # --energy picks per-module ranks
    out = port(str(tuned), to=bases["new"], from_=bases["old"], energy=0.999, out=tmp_path / "e")
    assert max(Adapter.load(out).rank(m) for m in ad.modules) <= 2


def test_port_refusals_and_mismatches(tmp_path, bases):
    dora = _peft_flavour(tmp_path, bases["old"], "dora")
    with pytest.raises(SurgeryError, match="DoRA.*surgery convert|DoRA.*apply"):
        port(str(dora), to=bases["new"], out=tmp_path / "x")
    kasa = _peft_flavour(tmp_path, bases["old"], "kasa")
    with pytest.raises(SurgeryError, match="KaSA.*convert ADAPTER --base"):
        port(str(kasa), to=bases["new"], out=tmp_path / "x")
    # an adapter written by `surgery decompose` belongs to its residual base
    dec = tmp_path / "dec"
    our_adapter(dec, bases["old"], name="adapter")
    (dec / "surgery.json").write_text(json.dumps({"verb": "decompose", "method": "pissa"}))
    with pytest.raises(SurgeryError, match="decompose -m pissa.*--init"):
        port(str(dec / "adapter"), to=bases["new"], out=tmp_path / "x")
    # shapes: every mismatch in one error, nothing written
    a = our_adapter(tmp_path, bases["old"])
    with pytest.raises(SurgeryError) as e:
        port(str(a), to=bases["wide"], out=tmp_path / "x")
    assert str(e.value).count("\n  - ") == 4 and "[32, 32] but" in str(e.value)
    with pytest.raises(SurgeryError, match="'llama' model but --to is a 'gpt2'"):
        port(str(a), to=bases["gpt2"], from_=bases["old"], out=tmp_path / "x")
    with pytest.raises(SurgeryError, match="pass --from"):
        port(str(bases["new"]), to=bases["new"], out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -- convert --------------------------------------------------------------------------------------
def _pissa(tmp_path, base, r=4, scale=2.0):
    """A PiSSA run by hand: init adapter (top-r SVD), residual base, trained adapter."""
    ck = Checkpoint.open(base)
    init, trained, residual = {}, {}, {}
    g = torch.Generator().manual_seed(5)
    for m in (Q0, V1, UP0):
        w = ck.get(f"{m}.weight").double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = (s[:r] / scale).sqrt()
        a0, b0 = (root[:, None] * vh[:r]).float(), (u[:, :r] * root).float()
        init[m] = LowRank(A=a0, B=b0, scale=scale)
        residual[f"{m}.weight"] = (w - scale * b0.double() @ a0.double()).float()
        trained[m] = LowRank(
            A=a0 + 0.05 * torch.randn(a0.shape, generator=g),
            B=b0 + 0.05 * torch.randn(b0.shape, generator=g),
            scale=scale,
        )
    Adapter(modules=init).save(tmp_path / "init", base=ck)
    Adapter(modules=trained).save(tmp_path / "trained", base=ck)
    tensors = {n: (residual[n] if n in residual else ck.get(n)) for n in ck.names()}
    res = demo.save_checkpoint(
        tensors, tmp_path / "residual", json.loads((base / "config.json").read_text())
    )
    return tmp_path / "init", tmp_path / "trained", res


def test_convert_pissa_rank_2r_identity(tmp_path, bases):
    init, trained, residual = _pissa(tmp_path, bases["old"])
    out = convert(str(trained), init=str(init), out=tmp_path / "plain")
    plain = Adapter.load(out)
    assert {plain.rank(m) for m in plain.modules} == {8}
    assert servable_problems(out) == []
    # the converted LoRA on the ORIGINAL base == the residual base + the trained adapter
    merged_plain = apply(bases["old"], out, out=tmp_path / "a1")
    merged_res = apply(residual, trained, out=tmp_path / "a2")
    x, y = Checkpoint.open(merged_plain), Checkpoint.open(merged_res)
    for m in plain.modules:
        n = f"{m}.weight"
        assert torch.allclose(x.get(n), y.get(n), atol=2e-6, rtol=0)
    # and through PEFT: the same logits
    with torch.no_grad():
        l1 = PeftModel.from_pretrained(model(bases["old"]), str(out))(ids()).logits
        l2 = PeftModel.from_pretrained(model(residual), str(trained))(ids()).logits
    assert torch.allclose(l1, l2, atol=1e-5, rtol=0)


def test_convert_kasa_with_and_without_base(tmp_path, bases):
    kasa = _peft_flavour(tmp_path, bases["old"], "kasa")
    ad = Adapter.load(kasa)
    ref = peft_merged(bases["old"], kasa)  # truncated base + s·B diag(d) A
    out = convert(str(kasa), base=bases["old"], out=tmp_path / "full")
    plain = Adapter.load(out)
    assert plain.flavour == "lora" and {plain.rank(m) for m in plain.modules} == {8}
    assert servable_problems(out) == []
    # on the ORIGINAL base the plain LoRA reproduces PEFT's KaSA model
    merged = apply(bases["old"], out, out=tmp_path / "m")
    assert_model_equals(merged, ref, [f"{m}.weight" for m in ad.modules], atol=1e-5)
    # without --base: diag folded, applies on the truncated base
    out2 = convert(str(kasa), out=tmp_path / "trunc")
    man = json.loads((out2 / "surgery.json").read_text())
    assert man["summary"]["requires_base"] == "kasa-truncated"
    p2 = Adapter.load(out2)
    base = Checkpoint.open(bases["old"])
    from surgery.adapter import kasa_truncate

    for m in ad.modules:
        w = base.get(f"{m}.weight")
        got = kasa_truncate(w, 4).float() + p2.delta(m)
        assert torch.allclose(got, ref[f"{m}.weight"], atol=1e-5, rtol=0)


def test_convert_adalora_pad_rank_and_rslora_patterns(tmp_path, bases):
    ada = _peft_flavour(tmp_path, bases["old"], "adalora")
    ref = peft_merged(bases["old"], ada)
    out = convert(str(ada), out=tmp_path / "a")
    assert servable_problems(out) == []
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["alpha_pattern"] == {} and not cfg["use_rslora"]
    names = [f"{m}.weight" for m in Adapter.load(ada).modules]
    assert_model_equals(apply(bases["old"], out, out=tmp_path / "m"), ref, names, atol=2e-6)
    # --pad-rank: uniform rank 8 with zero columns, same update
    out = convert(str(ada), pad_rank=True, out=tmp_path / "p")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["rank_pattern"] == {} and cfg["lora_alpha"] == 8
    assert_model_equals(apply(bases["old"], out, out=tmp_path / "m2"), ref, names, atol=2e-6)
    # rsLoRA with per-module ranks → no rsLoRA, no alpha_pattern, same deltas
    rs = our_adapter(tmp_path, bases["old"], name="rs", rslora=True)
    out = convert(str(rs), out=tmp_path / "r")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert not cfg["use_rslora"] and cfg["alpha_pattern"] == {} and servable_problems(out) == []
    x, y = Adapter.load(rs), Adapter.load(out)
    for m in x.modules:
        assert torch.allclose(x.delta(m), y.delta(m), atol=1e-6, rtol=0)


def test_convert_refusals(tmp_path, bases):
    dora = _peft_flavour(tmp_path, bases["old"], "dora")
    with pytest.raises(SurgeryError, match="DoRA.*surgery apply"):
        convert(str(dora), out=tmp_path / "x")
    a = our_adapter(tmp_path, bases["old"])
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa_niter_4"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SurgeryError, match="--init INITIAL_ADAPTER"):
        convert(str(a), out=tmp_path / "x")
    init, trained, _ = _pissa(tmp_path, bases["old"])
    other = Adapter(modules={Q0: lr(32, 32, 4, 2.0, 0)}).save(tmp_path / "o")
    with pytest.raises(SurgeryError) as e:
        convert(str(trained), init=str(other), out=tmp_path / "x")
    assert str(e.value).count("only in the adapter") == 2
    biased = Adapter(modules={Q0: lr(32, 32, 4, 2.0, 0)}, bias={Q0: torch.ones(32)})
    with pytest.raises(SurgeryError, match="lora_B.bias.*surgery apply"):
        convert(str(biased.save(tmp_path / "bias")), out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -- adapter merges -------------------------------------------------------------------------------
def test_adapter_merge_task_arithmetic_exact_union(tmp_path, bases):
    ck = Checkpoint.open(bases["old"])
    a1 = Adapter(modules={Q0: lr(32, 32, 4, 2.0, 0), UP0: lr(48, 32, 2, 1.0, 1)}).save(
        tmp_path / "a1", base=ck
    )
    a2 = Adapter(modules={Q0: lr(32, 32, 3, 0.5, 2), V1: lr(16, 32, 2, 1.0, 3)}).save(
        tmp_path / "a2", base=ck
    )
    from surgery.merge import merge  # the `surgery merge` verb hands adapters over

    out = merge(
        [str(a1), str(a2)], method="task_arithmetic", weights=[0.7, 0.4], out=tmp_path / "m"
    )
    x, y, mg = Adapter.load(a1), Adapter.load(a2), Adapter.load(out)
    assert set(mg.modules) == {Q0, UP0, V1} and mg.rank(Q0) == 7
    zero = torch.zeros(1, dtype=torch.float64)
    for m in mg.modules:
        ref = 0.7 * (x.delta(m, torch.float64) if m in x.modules else zero) + 0.4 * (
            y.delta(m, torch.float64) if m in y.modules else zero
        )
        assert torch.allclose(mg.delta(m, torch.float64), ref, atol=2e-6, rtol=0), m
    man = json.loads((out / "surgery.json").read_text())
    assert man["summary"]["max_rel_error"] < 1e-5


def test_adapter_merge_ties_truncated_rank_reports_error(tmp_path, bases):
    from ops.merge import ties

    ck = Checkpoint.open(bases["old"])
    ads = [
        Adapter(modules={Q0: lr(32, 32, 4, 1.0, i)}).save(tmp_path / f"a{i}", base=ck)
        for i in range(3)
    ]
    out = merge_adapters(
        [str(a) for a in ads], method="ties", params=["density=0.5"], rank=3, out=tmp_path / "m"
    )
    loaded = [Adapter.load(a) for a in ads]
    deltas = np.stack([a.delta(Q0).numpy() for a in loaded])
    full = ties(deltas, np.ones(3, np.float32), density=0.5).astype(np.float64)
    s = np.linalg.svd(full, compute_uv=False)
    opt = float(np.sqrt((s[3:] ** 2).sum()) / np.linalg.norm(full))  # Eckart–Young
    mg = Adapter.load(out)
    err = float(np.linalg.norm(full - mg.delta(Q0, torch.float64).numpy()) / np.linalg.norm(full))
    assert mg.rank(Q0) == 3 and err == pytest.approx(opt, rel=1e-3)
    man = json.loads((out / "surgery.json").read_text())
    assert man["tensors"][0]["rel_error"] == pytest.approx(opt, rel=1e-3)


def test_adapter_merge_bad_inputs(tmp_path, bases):
    a1 = Adapter(
        modules={Q0: lr(32, 32, 4, 2.0, 0)}, config={"base_model_name_or_path": "org/base-a"}
    ).save(tmp_path / "a1")
    a2 = Adapter(
        modules={Q0: lr(48, 32, 4, 2.0, 0)}, config={"base_model_name_or_path": "org/base-b"}
    ).save(tmp_path / "a2")
    with pytest.raises(SurgeryError) as e:
        merge_adapters([str(a1), str(a2)], method="ties", out=tmp_path / "x")
    assert "different bases" in str(e.value) and "[48, 32] in" in str(e.value)
    from surgery.merge import merge

    with pytest.raises(SurgeryError, match="mix of adapters"):
        merge(
            [str(a1), str(bases["old"])], base=str(bases["old"]), method="ties", out=tmp_path / "x"
        )


def test_cli_apply_and_convert(tmp_path, bases):
    from cli import cli

    a = our_adapter(tmp_path, bases["old"])
    r = CliRunner().invoke(cli, ["apply", str(bases["old"]), str(a), "-o", str(tmp_path / "m")])
    assert r.exit_code == 0 and "wrote" in r.output, r.output
    r = CliRunner().invoke(cli, ["convert", str(a), "--pad-rank", "-o", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["apply", str(bases["wide"]), str(a), "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "Error: cannot apply" in r.output
    (tmp_path / "pk").mkdir()
    (tmp_path / "pk" / "adapter_model.bin").write_bytes(b"x")
    r = CliRunner().invoke(cli, ["apply", str(bases["old"]), str(tmp_path / "pk"), "-o",
                                 str(tmp_path / "x")])  # fmt: skip
    assert r.exit_code == 1 and "pickle" in r.output


def test_apply_lora_bias_and_modules_to_save_equal_peft(tmp_path, bases):
    bert = demo.tiny_bert(tmp_path / "bert")
    cases = [
        (bert, transformers.BertModel,
         peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_bias=True)),
        (bases["old"], transformers.LlamaForCausalLM,
         peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                         modules_to_save=["lm_head"])),
    ]  # fmt: skip
    for i, (base, cls, cfg) in enumerate(cases):
        pm = get_peft_model(cls.from_pretrained(str(base)), cfg)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n or "modules_to_save" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        pm.save_pretrained(str(tmp_path / f"a{i}"))
        ad = Adapter.load(tmp_path / f"a{i}")
        assert ad.bias if i == 0 else ad.full  # lora_B.bias / the full lm_head copy were read
        out = apply(base, tmp_path / f"a{i}", out=tmp_path / f"m{i}")
        ref = PeftModel.from_pretrained(cls.from_pretrained(str(base)), str(tmp_path / f"a{i}"))
        ref = ref.merge_and_unload().state_dict()
        ck = Checkpoint.open(out)
        changed = [n for n in ck.names() if n in ref and not torch.equal(
            ck.get(n).float(), Checkpoint.open(base).get(n).float())]  # fmt: skip
        assert len(changed) >= 2
        assert_model_equals(out, ref, [n for n in ck.names() if n in ref], atol=2e-6)


def test_cli_adapter_merge_with_rank(tmp_path, bases):
    from cli import cli

    ck = Checkpoint.open(bases["old"])
    a = [Adapter(modules={Q0: lr(32, 32, 4, 1.0, i)}).save(tmp_path / f"a{i}", base=ck)
         for i in range(2)]  # fmt: skip
    r = CliRunner().invoke(cli, ["merge", str(a[0]), str(a[1]), "-m", "task_arithmetic", "-r",
                                 "2", "-o", str(tmp_path / "m"), "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert Adapter.load(tmp_path / "m").rank(Q0) == 2


def test_checkpoint_without_wrapper_prefix_gpt2(tmp_path, bases):
    """Hub ``gpt2`` stores ``h.0.attn.c_attn.weight``; PEFT's module is ``transformer.h.0…``.

    Keys written under the checkpoint's names would be silently ignored by PEFT (a no-op
    adapter); the writer adds the prefix, and apply resolves PEFT names back to the tensors.
    """
    src = Checkpoint.open(bases["gpt2"])
    t = {n.removeprefix("transformer."): src.raw(n) for n in src.names()}
    cfg = json.loads((bases["gpt2"] / "config.json").read_text())
    stripped = demo.save_checkpoint(t, tmp_path / "gpt2", cfg)
    ck = Checkpoint.open(stripped)
    m = "h.1.mlp.c_fc"
    a = Adapter(modules={m: lr(128, 32, 4, 2.0, 0)}).save(tmp_path / "a", base=ck)
    keys = Adapter.load(a).modules
    assert list(keys) == ["transformer.h.1.mlp.c_fc"]
    pm = PeftModel.from_pretrained(model(stripped), str(a)).eval()
    with torch.no_grad():
        base_logits = model(stripped)(ids()).logits
        assert (pm(ids()).logits - base_logits).abs().max() > 1e-3  # not a silent no-op
    ref = pm.merge_and_unload().state_dict()
    out = apply(stripped, a, out=tmp_path / "m")
    got = Checkpoint.open(out)
    assert torch.allclose(got.raw(m + ".weight"), ref["transformer." + m + ".weight"], atol=2e-6)


def test_decompose_outputs_through_the_lifecycle(tmp_path, bases):
    """`surgery decompose` outputs: KaSA converts to a LoRA of the original base; PiSSA is
    refused by port (its adapter belongs to the residual); apply(residual, adapter) == base."""
    from surgery.decompose import decompose

    old = Checkpoint.open(bases["old"])
    k = decompose(str(bases["old"]), method="kasa", rank=4, out=tmp_path / "kasa", seed=1)
    # a "trained" KaSA adapter: perturb B (B = 0 at init) and keep it beside the residual
    ad = Adapter.load(k / "adapter")
    g = torch.Generator().manual_seed(0)
    for m, x in ad.modules.items():
        ad.modules[m] = LowRank(A=x.A, B=torch.randn(x.B.shape, generator=g) * 0.1, scale=x.scale)
    ad.save(k / "adapter")
    out = convert(str(k / "adapter"), base=bases["old"], out=tmp_path / "plain")
    ref = Checkpoint.open(apply(k, k / "adapter", out=tmp_path / "r1"))  # truncated base + ΔW
    got = Checkpoint.open(apply(bases["old"], out, out=tmp_path / "r2"))  # original + plain
    for m in ad.modules:
        n = f"{m}.weight"
        assert torch.allclose(got.get(n), ref.get(n), atol=5e-6, rtol=0), n
    p = decompose(str(bases["old"]), method="pissa", rank=4, out=tmp_path / "pissa")
    with pytest.raises(SurgeryError, match="decompose -m pissa"):
        port(str(p / "adapter"), to=bases["new"], out=tmp_path / "x")
    back = Checkpoint.open(apply(p, p / "adapter", out=tmp_path / "r3"))
    for m in Adapter.load(p / "adapter").modules:
        n = f"{m}.weight"
        assert torch.allclose(back.get(n), old.get(n), atol=1e-5, rtol=0), n
