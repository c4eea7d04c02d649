"""PEFT adapter format: round trips, config encoding, key-set validation, effective deltas."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ops.lowrank import LowRank
from surgery.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Adapter,
    pattern_key,
    targets_module,
    task_type_for,
)
from surgery.checkpoint import Checkpoint
from surgery.errors import SurgeryError

P = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
Q1 = "model.layers.1.self_attn.q_proj"
UP1 = "model.layers.1.mlp.up_proj"


def lr(out: int, inp: int, r: int, scale: float, seed: int) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(
        A=torch.randn(r, inp, generator=g), B=torch.randn(out, r, generator=g), scale=scale
    )


def mixed() -> Adapter:
    """Mixed ranks and scales on the tiny Llama's shapes (hidden 32, kv 16, inter 48)."""
    return Adapter(modules={
        Q0: lr(32, 32, 4, 2.0, 0), V0: lr(16, 32, 4, 2.0, 1),
        Q1: lr(32, 32, 2, 0.5, 2), UP1: lr(48, 32, 8, 2.0, 3),
    })  # fmt: skip


def write_raw(d, tensors: dict, config: dict):
    d.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(d / ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )
    (d / ADAPTER_CONFIG).write_text(json.dumps(config))
    return d


def cfg(**kw) -> dict:
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    base.update(kw)
    return base


def ab(m: str, r: int = 4, out: int = 32, inp: int = 32) -> dict:
    g = torch.Generator().manual_seed(len(m) + r)
    return {
        f"{P}{m}.lora_A.weight": torch.randn(r, inp, generator=g),
        f"{P}{m}.lora_B.weight": torch.randn(out, r, generator=g),
    }


# -- round trips and encoding ------------------------------------------------------------------
def test_round_trip_mixed_ranks_and_scales(tmp_path):
    ad = mixed()
    ad.save(tmp_path / "a")
    c = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    # r = most common rank (4), alpha = most common α_m = s·r (8); the rest in patterns
    assert (c["r"], c["lora_alpha"]) == (4, 8)
    assert c["rank_pattern"] == {Q1: 2, UP1: 8}
    assert c["alpha_pattern"] == {Q1: 1, UP1: 16}
    assert c["init_lora_weights"] is True and c["peft_type"] == "LORA"
    back = Adapter.load(tmp_path / "a")
    assert set(back.modules) == set(ad.modules)
    for m, x in ad.modules.items():
        y = back.modules[m]
        assert torch.equal(torch.as_tensor(y.A), x.A) and torch.equal(torch.as_tensor(y.B), x.B)
        assert y.scale == pytest.approx(x.scale, rel=1e-12)
        assert torch.allclose(back.delta(m), x.delta(), atol=1e-5)


def test_rslora_and_float_alpha_round_trip(tmp_path):
    ad = Adapter(
        modules={Q0: lr(32, 32, 4, 0.7, 0), Q1: lr(32, 32, 9, 0.7, 1)}, config={"use_rslora": True}
    )
    ad.save(tmp_path / "a")
    c = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert c["use_rslora"] is True
    back = Adapter.load(tmp_path / "a")
    for m in ad.modules:
        # rsLoRA: α_m = s·√r_m; the reader divides by √r again
        assert back.modules[m].scale == pytest.approx(0.7, rel=1e-12)
    assert c["alpha_pattern"] or c["lora_alpha"] == pytest.approx(0.7 * math.sqrt(4))


def test_deterministic_bytes(tmp_path):
    mixed().save(tmp_path / "a")
    mixed().save(tmp_path / "b")
    for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / ADAPTER_WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())


def test_numpy_factors_written_as_float32(tmp_path):
    rng = np.random.default_rng(0)
    ad = Adapter(
        modules={
            Q0: LowRank(A=rng.standard_normal((3, 32)), B=rng.standard_normal((32, 3)), scale=1.0)
        }
    )
    ad.save(tmp_path / "a")
    back = Adapter.load(tmp_path / "a")
    assert back.modules[Q0].A.dtype == np.float32  # read as numpy: no torch needed
    np.testing.assert_allclose(
        back.delta(Q0, torch.float64).numpy(), ad.modules[Q0].delta(), rtol=1e-5, atol=1e-5
    )


def test_embedding_transposed_semantics(tmp_path):
    # weight (vocab=64, dim=32): LowRank in the weight orientation
    e = lr(64, 32, 4, 2.0, 5)
    ad = Adapter(
        modules={"model.embed_tokens": e, Q0: lr(32, 32, 4, 2.0, 0)},
        embeddings={"model.embed_tokens"},
    )
    ad.save(tmp_path / "a")
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    A_e, B_e = (
        t[f"{P}model.embed_tokens.lora_embedding_A"],
        t[f"{P}model.embed_tokens.lora_embedding_B"],
    )
    assert A_e.shape == (4, 64) and B_e.shape == (32, 4)
    # PEFT: ΔW = (B_e A_e)ᵀ · s
    ref = (B_e.double() @ A_e.double()).T * 2.0
    back = Adapter.load(tmp_path / "a")
    assert back.embeddings == {"model.embed_tokens"}
    assert torch.allclose(back.delta("model.embed_tokens", torch.float64), ref, atol=1e-12, rtol=0)


def test_pattern_keys_are_unambiguous_for_layer_1_and_11(tmp_path):
    m1, m11 = "model.layers.1.mlp.up_proj", "model.layers.11.mlp.up_proj"
    ad = Adapter(
        modules={
            m1: lr(48, 32, 2, 1.0, 0),
            m11: lr(48, 32, 4, 1.0, 1),
            "x.model.layers.1.mlp.up_proj": lr(48, 32, 4, 1.0, 2),
        }
    )
    ad.save(tmp_path / "a")
    back = Adapter.load(tmp_path / "a")
    assert {m: back.rank(m) for m in back.modules} == {m: ad.rank(m) for m in ad.modules}
    assert pattern_key([m1], "x.model.layers.1.mlp.up_proj") == m1  # PEFT's suffix rule


def test_config_from_base(tmp_path, tiny_ckpt, tiny_gpt2):
    base = Checkpoint.open(tiny_ckpt())
    # every q_proj and v_proj adapted → leaf list
    mods = {
        f"model.layers.{i}.self_attn.{p}": lr(32 if p == "q_proj" else 16, 32, 2, 1.0, i)
        for i in range(2)
        for p in ("q_proj", "v_proj")
    }
    c = Adapter(modules=mods).save(tmp_path / "a", base=base)
    cj = json.loads((c / ADAPTER_CONFIG).read_text())
    assert cj["target_modules"] == ["q_proj", "v_proj"]
    assert cj["task_type"] == "CAUSAL_LM" and cj["fan_in_fan_out"] is False
    # only layer 0 → an exact regex that selects exactly the adapted modules in the base
    c = Adapter(modules={Q0: mods[Q0]}).save(tmp_path / "b", base=base)
    cj = json.loads((c / ADAPTER_CONFIG).read_text())
    assert isinstance(cj["target_modules"], str)
    hits = [n[:-7] for n in base.names() if n.endswith(".weight") and targets_module(cj, n[:-7])]
    assert hits == [Q0]
    # GPT-2 Conv1D → fan_in_fan_out
    g = Checkpoint.open(tiny_gpt2())
    m = "transformer.h.0.attn.c_attn"
    c = Adapter(modules={m: lr(96, 32, 2, 1.0, 0)}).save(tmp_path / "c", base=g)
    cj = json.loads((c / ADAPTER_CONFIG).read_text())
    assert cj["fan_in_fan_out"] is True and cj["task_type"] == "CAUSAL_LM"


def test_task_types():
    assert task_type_for({"architectures": ["LlamaForCausalLM"]}) == "CAUSAL_LM"
    assert task_type_for({"architectures": ["GPT2LMHeadModel"]}) == "CAUSAL_LM"
    assert task_type_for({"architectures": ["BertForSequenceClassification"]}) == "SEQ_CLS"
    assert (
        task_type_for({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"})
        == "SEQ_2_SEQ_LM"
    )
    assert task_type_for({"architectures": ["BertModel"]}) == "FEATURE_EXTRACTION"
    assert task_type_for({}) is None


def test_base_model_name_never_a_local_path(tmp_path, tiny_ckpt):
    base_dir = tiny_ckpt()
    ad = Adapter(
        modules={Q0: lr(32, 32, 2, 1.0, 0)},
        config={
            "base_model_name_or_path": str(base_dir),
            "corda_config": {"cache_file": "/home/me/cache.pt"},
        },
    )
    ad.save(tmp_path / "a")
    c = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert c["base_model_name_or_path"] is None and "corda_config" not in c
    ad = Adapter(
        modules={Q0: lr(32, 32, 2, 1.0, 0)},
        config={"base_model_name_or_path": "meta-llama/Llama-3.2-1B"},
    )
    ad.save(tmp_path / "b")
    c = json.loads((tmp_path / "b" / ADAPTER_CONFIG).read_text())
    assert c["base_model_name_or_path"] == "meta-llama/Llama-3.2-1B"
    assert "/" not in json.dumps(
        {k: v for k, v in c.items() if k != "base_model_name_or_path" and k != "target_modules"}
    )


def test_kasa_diag_round_trip_and_delta(tmp_path):
    x = lr(32, 32, 4, 2.0, 0)
    d = torch.randn(4, generator=torch.Generator().manual_seed(9))
    ad = Adapter(modules={Q0: x}, diag={Q0: d})
    ad.save(tmp_path / "a")
    c = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert c["kasa_config"] == {"beta": 1e-4, "gamma": 1e-3}
    back = Adapter.load(tmp_path / "a")
    assert back.flavour == "kasa"
    ref = 2.0 * x.B.double() @ torch.diag(d.double()) @ x.A.double()
    assert torch.allclose(back.delta(Q0, torch.float64), ref, atol=1e-12, rtol=0)
    f = back.fold()
    folded = torch.from_numpy(f.modules[Q0].delta()).double()
    assert not f.diag and torch.allclose(folded, ref, atol=1e-4)
    # merge_weight also truncates the base: W_base + ΔW, W_base = W minus its 4 smallest σ
    w = torch.randn(32, 32, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w)
    wb = (u[:, :28] * s[:28]) @ vh[:28]
    assert torch.allclose(back.merge_weight(Q0, w, torch.float64), wb + ref, atol=1e-10, rtol=0)


def test_adalora_read_fold_and_scale(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {
        f"{P}{Q0}.lora_A": torch.randn(3, 32, generator=g),
        f"{P}{Q0}.lora_B": torch.randn(32, 3, generator=g),
        f"{P}{Q0}.lora_E": torch.tensor([[0.5], [0.0], [-1.5]]),
    }
    c = {
        "peft_type": "ADALORA",
        "r": 8,
        "init_r": 6,
        "lora_alpha": 16,
        "target_modules": ["q_proj"],
        "rank_pattern": {f"{Q0}.lora_E": [True, False, True, False, True, False]},
    }
    ad = Adapter.load(write_raw(tmp_path / "a", t, c))
    assert ad.flavour == "adalora" and ad.rank(Q0) == 3
    A, B, E = (t[f"{P}{Q0}.lora_{k}"].double() for k in "ABE")
    ref = B @ (A * E) * 16 / (6 + 1e-5)  # ranknum = init_r, not the pruned rank
    assert torch.allclose(ad.delta(Q0, torch.float64), ref, atol=1e-12, rtol=0)
    f = ad.fold()
    assert f.rank(Q0) == 2  # the E == 0 triplet is dropped
    assert torch.allclose(torch.from_numpy(f.modules[Q0].delta()).double(), ref, atol=1e-4)
    f.save(tmp_path / "b")
    assert torch.allclose(Adapter.load(tmp_path / "b").delta(Q0).double(), ref, atol=1e-4)
    with pytest.raises(SurgeryError, match="read-only"):
        ad.save(tmp_path / "c")


def test_fan_in_fan_out_stored_layout(tmp_path, tiny_gpt2):
    g = Checkpoint.open(tiny_gpt2())
    m = "transformer.h.0.mlp.c_fc"
    x = lr(128, 32, 2, 1.5, 0)
    Adapter(modules={m: x}).save(tmp_path / "a", base=g)
    back = Adapter.load(tmp_path / "a")
    assert back.delta(m).shape == (128, 32)
    assert back.delta(m, stored=True).shape == g.info(m + ".weight").shape == (32, 128)
    assert torch.allclose(back.delta(m, stored=True), x.delta().T, atol=1e-5)


# -- validation --------------------------------------------------------------------------------
def test_read_lists_every_problem_in_one_error(tmp_path):
    t = {**ab(Q0), **ab(Q1, r=2)}
    t[f"{P}{Q0}.lora_B.bias"] = torch.zeros(32)  # lora_bias not set → PEFT ignores silently
    t[f"{P}{V0}.lora_A.weight"] = torch.randn(4, 32)  # no lora_B
    t[f"{Q1}.lora_A.weight"] = torch.randn(2, 32)  # unprefixed
    t[f"{P}{UP1}.lora_A.weight"] = torch.randn(4, 32)  # not targeted
    t[f"{P}{UP1}.lora_B.weight"] = torch.randn(48, 4)
    t[f"{P}{Q0}.lora_diag"] = torch.randn(4)  # no kasa_config
    t[f"{P}{Q0}.hada_w1_a"] = torch.randn(4, 4)  # not LoRA
    d = write_raw(tmp_path / "bad", t, cfg())
    with pytest.raises(SurgeryError) as e:
        Adapter.load(d)
    msg = str(e.value)
    for needle in (
        "lora_bias",
        "lora_B is missing",
        "prefix",
        "not selected by target_modules",
        "rank 2 but the config gives r=4",
        "kasa_config",
        "hada_w1_a",
    ):
        assert needle in msg, needle
    assert msg.count("\n  - ") == 7


def test_read_layers_to_transform_and_dora(tmp_path):
    t = {**ab(Q0), **ab(Q1)}
    t[f"{P}{Q0}.lora_magnitude_vector"] = torch.ones(32)
    d = write_raw(tmp_path / "a", t, cfg(layers_to_transform=[0]))
    with pytest.raises(SurgeryError) as e:
        Adapter.load(d)
    assert Q1 in str(e.value) and "layers_to_transform" in str(e.value)
    assert "use_dora" in str(e.value)


def test_read_valid_patterns(tmp_path):
    t = {**ab(Q0), **ab(Q1, r=2)}
    d = write_raw(
        tmp_path / "a",
        t,
        cfg(
            rank_pattern={"layers.1.self_attn.q_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 1},
        ),
    )
    ad = Adapter.load(d)
    assert ad.modules[Q1].scale == 0.5 and ad.modules[Q0].scale == 2.0


def test_refuses_pickle_and_unknown_types(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    (d / ADAPTER_CONFIG).write_text(json.dumps(cfg()))
    with pytest.raises(SurgeryError, match="pickle.*save_pretrained"):
        Adapter.load(d)
    with pytest.raises(SurgeryError, match="pickle"):
        Adapter.load(d / "adapter_model.bin")
    d2 = write_raw(tmp_path / "ia3", ab(Q0), {"peft_type": "IA3", "target_modules": ["q_proj"]})
    with pytest.raises(SurgeryError, match="unknown adapter type.*IA3"):
        Adapter.load(d2)
    d3 = write_raw(tmp_path / "nt", ab(Q0), {"r": 4})
    with pytest.raises(SurgeryError, match="no peft_type"):
        Adapter.load(d3)


def test_write_errors_listed_before_writing(tmp_path, tiny_ckpt):
    base = Checkpoint.open(tiny_ckpt())
    bad = Adapter(
        modules={
            Q0 + ".weight": lr(32, 32, 2, 1.0, 0),  # tensor name instead of module
            V0: LowRank(A=torch.randn(2, 32), B=torch.randn(16, 3)),  # rank mismatch
            Q1: LowRank(A=torch.full((2, 32), float("nan")), B=torch.randn(32, 2)),
        }
    )
    with pytest.raises(SurgeryError) as e:
        bad.save(tmp_path / "x", base=base)
    assert str(e.value).count("\n  - ") == 3
    assert not (tmp_path / "x").exists()
    wrong = Adapter(
        modules={Q0: lr(48, 32, 2, 1.0, 0), "model.layers.9.mlp.up_proj": lr(48, 32, 2, 1.0, 0)}
    )
    with pytest.raises(SurgeryError) as e:
        wrong.save(tmp_path / "y", base=base)
    assert "(48, 32) but model.layers.0.self_attn.q_proj.weight is (32, 32)" in str(e.value)
    assert "no tensor 'model.layers.9.mlp.up_proj.weight'" in str(e.value)
    assert not (tmp_path / "y").exists()


def test_decompose_output_folder_resolves_to_adapter(tmp_path):
    mixed().save(tmp_path / "out" / "adapter")
    assert Adapter.load(tmp_path / "out").path == tmp_path / "out" / "adapter"
    assert Adapter.load(tmp_path / "out" / "adapter" / ADAPTER_WEIGHTS).rank(UP1) == 8


def test_read_target_modules_fallbacks(tmp_path):
    # no target_modules: PEFT uses its per-architecture default; "all-linear": every linear layer
    for i, tm in enumerate((None, "all-linear")):
        c = {k: v for k, v in cfg(target_modules=tm).items() if v is not None}
        ad = Adapter.load(write_raw(tmp_path / f"a{i}", {**ab(Q0), **ab(UP1, out=48)}, c))
        assert set(ad.modules) == {Q0, UP1}
