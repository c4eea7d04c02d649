"""Real PEFT on tiny models built here: our adapters load exactly; PEFT's adapters read exactly.

Two directions:
1. adapters written by :class:`surgery.adapter.Adapter` load with ``PeftModel.from_pretrained``
   and give the logits of the hand-merged model ``W + ΔW``; ``merge_and_unload`` equals our delta;
2. adapters saved by PEFT's own ``save_pretrained`` (LoRA with patterns, rsLoRA, embeddings,
   AdaLoRA after pruning, KaSA, DoRA) read back, and ``Adapter.merge_weight`` equals PEFT's
   ``merge_and_unload`` weights.
"""

from __future__ import annotations

import logging

import pytest
import torch

from ops.lowrank import LowRank
from surgery import demo
from surgery.adapter import Adapter
from surgery.checkpoint import Checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import PeftModel, get_peft_model  # noqa: E402
from peft_helpers import ids, load_model  # noqa: E402
from peft_helpers import train_adalora as train_adalora_steps  # noqa: E402

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return demo.tiny_llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return demo.tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "base")


def random_lowrank(out, inp, r, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return LowRank(
        A=torch.randn(r, inp, generator=g) * 0.3,
        B=torch.randn(out, r, generator=g) * 0.3,
        scale=scale,
    )


def hand_merged(d, ad: Adapter, ckpt: Checkpoint):
    """The base model with W ← W + ΔW applied by hand (stored orientation)."""
    model = load_model(d)
    sd = model.state_dict()
    with torch.no_grad():
        for m in ad.modules:
            wn = ad.weight_name(m)
            sd[wn] += ckpt.to_stored(wn, ad.delta(m))
    model.load_state_dict(sd)
    return model


def check_merge_and_unload(peft_model, ad: Adapter, ckpt: Checkpoint, atol=2e-6):
    merged = peft_model.merge_and_unload().state_dict()
    for m in ad.modules:
        wn = ad.weight_name(m)
        ours = ckpt.to_stored(wn, ad.merge_weight(m, ckpt.get(wn)))
        assert torch.allclose(merged[wn], ours, atol=atol, rtol=0), (
            m,
            (merged[wn] - ours).abs().max(),
        )
    return merged


# -- 1. our writer → PEFT --------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loads_exactly_in_peft_llama(tmp_path, llama_dir, rslora, caplog):
    ckpt = Checkpoint.open(llama_dir)
    mods = {}
    for i, n in enumerate(n for n in ckpt.names() if n.endswith("_proj.weight")):
        out, inp = ckpt.shape(n)
        # mixed ranks and scales → rank_pattern and alpha_pattern (with rsLoRA too)
        mods[n[:-7]] = random_lowrank(out, inp, (2, 4, 4, 8)[i % 4], (1.0, 2.0, 0.5)[i % 3], i)
    mods["model.embed_tokens"] = random_lowrank(64, 32, 4, 2.0, 99)
    ad = Adapter(modules=mods, embeddings={"model.embed_tokens"}, config={"use_rslora": rslora})
    out = ad.save(tmp_path / "a", base=ckpt)
    cfg = ad.config
    assert cfg["rank_pattern"] and cfg["alpha_pattern"] and cfg["use_rslora"] is rslora
    with caplog.at_level(logging.WARNING):
        pm = PeftModel.from_pretrained(load_model(llama_dir), str(out)).eval()
    assert type(pm).__name__ == "PeftModelForCausalLM"
    x = ids()
    with torch.no_grad():
        got = pm(x).logits
        ref = hand_merged(llama_dir, ad, ckpt)(x).logits
        base = load_model(llama_dir)(x).logits
    assert (got - base).abs().max() > 1e-2  # the adapter is not a no-op
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got - ref).abs().max()
    check_merge_and_unload(pm, ad, ckpt)


def test_our_adapter_loads_exactly_in_peft_gpt2_conv1d(tmp_path, gpt2_dir):
    ckpt = Checkpoint.open(gpt2_dir)
    mods = {}
    for i, n in enumerate(
        n for n in ckpt.names() if n.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))
    ):
        out, inp = ckpt.shape(n)  # (out, in) although stored (in, out)
        mods[n[:-7]] = random_lowrank(out, inp, 2 + i % 3, 1.5, i)
    ad = Adapter(modules=mods)
    out = ad.save(tmp_path / "a", base=ckpt)
    assert ad.config["fan_in_fan_out"] is True
    assert ad.config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    pm = PeftModel.from_pretrained(load_model(gpt2_dir), str(out)).eval()
    x = ids()
    with torch.no_grad():
        got = pm(x).logits
        ref = hand_merged(gpt2_dir, ad, ckpt)(x).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
    merged = check_merge_and_unload(pm, ad, ckpt)
    m = "transformer.h.1.mlp.c_fc"
    assert torch.allclose(
        merged[m + ".weight"] - ckpt.raw(m + ".weight"), ad.delta(m, stored=True), atol=2e-6, rtol=0
    )


def test_our_kasa_adapter_matches_peft(tmp_path, llama_dir):
    ckpt = Checkpoint.open(llama_dir)
    m = "model.layers.0.self_attn.q_proj"
    ad = Adapter(
        modules={m: random_lowrank(32, 32, 4, 2.0, 0)},
        diag={m: torch.randn(4, generator=torch.Generator().manual_seed(1))},
    )
    out = ad.save(tmp_path / "a", base=ckpt)
    pm = PeftModel.from_pretrained(load_model(llama_dir), str(out)).eval()
    # PEFT truncated the base at load; merge_weight reproduces truncation + s·B diag(d) A
    check_merge_and_unload(pm, ad, ckpt, atol=1e-5)


# -- 2. PEFT's save_pretrained → our reader ----------------------------------------------------
def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and "magnitude" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "magnitude" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def _peft_saved(tmp_path, d, config, train_adalora=False):
    pm = get_peft_model(load_model(d), config)
    if train_adalora:
        train_adalora_steps(pm)
    _randomize(pm)
    pm.save_pretrained(str(tmp_path / "peft"))
    return tmp_path / "peft"


CASES = {
    "lora_patterns": lambda: peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(LLAMA_TARGETS),
        task_type="CAUSAL_LM",
        rank_pattern={"layers.1.mlp.up_proj": 2, "o_proj": 6},
        alpha_pattern={"layers.0.self_attn.q_proj": 3},
    ),
    "rslora_patterns": lambda: peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 8},
        alpha_pattern={"v_proj": 2},
        task_type="CAUSAL_LM",
    ),
    "embedding": lambda: peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM"
    ),
    "dora": lambda: peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "up_proj"],
        use_dora=True,
        task_type="CAUSAL_LM",
    ),
    "kasa": lambda: peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        task_type="CAUSAL_LM",
        kasa_config=peft.tuners.lora.config.KasaConfig(),
    ),
    "adalora": lambda: peft.AdaLoraConfig(
        init_r=6,
        target_r=2,
        total_step=4,
        tinit=0,
        tfinal=1,
        deltaT=1,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_read_peft_saved_adapters(tmp_path, llama_dir, case):
    if case == "kasa" and not hasattr(peft.tuners.lora.config, "KasaConfig"):
        pytest.skip("this PEFT has no KaSA")
    ckpt = Checkpoint.open(llama_dir)
    d = _peft_saved(tmp_path, llama_dir, CASES[case](), train_adalora=case == "adalora")
    ad = Adapter.load(d)
    expected = {"dora": "dora", "kasa": "kasa", "adalora": "adalora"}.get(case, "lora")
    assert ad.flavour == expected
    if case == "adalora":
        assert ad.config.get("rank_pattern") and any(ad.rank(m) < 6 for m in ad.modules)
    if case == "embedding":
        assert "model.embed_tokens" in ad.embeddings
    # what is on disk, loaded by PEFT into a fresh base, then merged
    pm = PeftModel.from_pretrained(load_model(llama_dir), str(d)).eval()
    check_merge_and_unload(pm, ad, ckpt, atol=1e-5 if case in ("kasa", "dora") else 2e-6)
    if case in ("lora_patterns", "rslora_patterns", "adalora", "embedding"):
        # foldable flavours: a re-written plain LoRA loads in PEFT to the same merged weights
        f = ad.fold()
        f.full.clear()
        out = f.save(tmp_path / "ours", base=ckpt)
        pm2 = PeftModel.from_pretrained(load_model(llama_dir), str(out)).eval()
        merged2 = pm2.merge_and_unload().state_dict()
        for m in ad.modules:
            wn = ad.weight_name(m)
            assert torch.allclose(
                merged2[wn], ad.merge_weight(m, ckpt.get(wn)), atol=2e-6, rtol=0
            ), m
