"""Model cards: Hub front matter (base_model ids only, relation, library), body, validation.

Every card is parsed back with ``huggingface_hub`` and sent to the fake Hub's ``validate-yaml``
through the real client (``HfApi._validate_yaml``), which applies the Hub's rules for these keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hub_server import FakeHub
from huggingface_hub import HfApi, ModelCard

from surgery.card import MAX_ROWS, base_models, is_hub_id, relation, write_card


@pytest.fixture(scope="module")
def api():
    with FakeHub({}) as hub:
        yield HfApi(endpoint=hub.url, token=False)
        assert hub.unknown == []


def hub_input(role: str, repo: str) -> dict:
    return {"role": role, "source": repo, "hub_id": repo, "revision": "c" * 40}


def local_input(role: str, folder: Path, config: dict | None = None, name: str = "config.json"):
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / name).write_text(json.dumps(config))
    return {"role": role, "source": str(folder), "hub_id": None, "revision": None}


def card_of(tmp_path: Path, manifest: dict, api: HfApi, sub: str = "out") -> tuple[dict, str]:
    out = tmp_path / sub
    out.mkdir(exist_ok=True)
    path = write_card(out, manifest)
    text = path.read_text()
    api._validate_yaml(text)  # the Hub's metadata validation; raises ValueError when invalid
    return ModelCard.load(path).data.to_dict(), text


def test_merge_lists_every_hub_id_and_no_local_path(tmp_path, api):
    man = {
        "verb": "merge", "method": "ties", "method_reference": "https://arxiv.org/abs/2306.01708",
        "params": {"density": 0.2}, "outputs": {"model": True, "adapter": False},
        "inputs": [
            hub_input("model", "org/a"),
            # A local copy of a Hub model: its config names the Hub id.
            local_input("model", tmp_path / "secret" / "b", {"_name_or_path": "org/b-real"}),
            # A local model whose config points at another local folder: no id to claim.
            local_input("model", tmp_path / "secret" / "c", {"_name_or_path": "/data/ckpt/c"}),
            hub_input("base", "org/base"),
        ],
    }  # fmt: skip
    meta, text = card_of(tmp_path, man, api)
    assert meta["base_model"] == ["org/a", "org/b-real", "org/base"]
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers"
    assert meta["tags"][:2] == ["surgery", "ties"]
    assert str(tmp_path) not in text and "/data/ckpt" not in text  # no local paths anywhere
    assert "[`ties`](https://arxiv.org/abs/2306.01708)" in text
    assert "| density | 0.2 |" in text
    assert "local `b` (from [org/b-real]" in text


def test_no_hub_ids_means_no_base_model_and_no_relation(tmp_path, api):
    man = {"verb": "merge", "method": "ties",
           "inputs": [local_input("model", tmp_path / "x", {"_name_or_path": "./x"}),
                      local_input("base", tmp_path / "y", {})]}  # fmt: skip
    meta, _ = card_of(tmp_path, man, api)
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["tags"] == ["surgery", "ties", "merge"]


@pytest.mark.parametrize(
    "verb, method, outputs, roles, expect_rel, expect_lib, expect_base",
    [
        # extract: the adapter applies to the base, not to the tuned model
        ("extract", "svd_extract", (False, True), [("base", "org/base"), ("model", "org/tuned")],
         "adapter", "peft", "org/base"),
        # port: the adapter now applies to the new base
        ("port", None, (False, True),
         [("adapter", "org/lora"), ("old_base", "org/old"), ("new_base", "org/new")],
         "adapter", "peft", "org/new"),
        # port --merge: a full model derived from the new base
        ("port", None, (True, False),
         [("adapter", "org/lora"), ("old_base", "org/old"), ("new_base", "org/new")],
         "finetune", "transformers", "org/new"),
        # decompose: residual model + adapter (both from the source)
        ("decompose", "pissa", (True, True), [("src", "org/src")],
         "finetune", "transformers", "org/src"),
        # compression with low-rank recovery
        ("decompose", "compress", (True, True), [("src", "org/src")],
         "quantized", "transformers", "org/src"),
        ("edit", "probe", (True, False), [("src", "org/src")], "finetune", "transformers",
         "org/src"),
        ("apply", None, (True, False), [("base", "org/base"), ("adapter", "org/lora")],
         "finetune", "transformers", "org/base"),
        # an adapter merge: adapters of one base → an adapter on that base
        ("merge", "ties", (False, True),
         [("model0", "org/l1"), ("model1", "org/l2"), ("base", "org/base")],
         "adapter", "peft", "org/base"),
    ],
)  # fmt: skip
def test_relation_library_and_base_per_verb(
    tmp_path, api, verb, method, outputs, roles, expect_rel, expect_lib, expect_base
):
    man = {"verb": verb, "method": method, "outputs": {"model": outputs[0], "adapter": outputs[1]},
           "inputs": [hub_input(r, s) for r, s in roles]}  # fmt: skip
    meta, text = card_of(tmp_path, man, api)
    assert meta["base_model_relation"] == expect_rel == relation(man)
    assert meta["library_name"] == expect_lib
    assert meta["base_model"] == expect_base
    if outputs == (True, True):
        assert 'subfolder="adapter"' in text  # how to load the factors beside the residual
    if expect_lib == "peft":
        assert "lora" in meta["tags"] and "PeftModel.from_pretrained" in text


def test_convert_takes_the_base_from_the_adapter_config(tmp_path, api):
    lora = local_input("adapter", tmp_path / "lora",
                       {"base_model_name_or_path": "meta/llama-tiny", "peft_type": "LORA"},
                       name="adapter_config.json")  # fmt: skip
    man = {"verb": "convert", "outputs": {"model": False, "adapter": True}, "inputs": [lora]}
    meta, _ = card_of(tmp_path, man, api)
    assert (meta["base_model"], meta["base_model_relation"]) == ("meta/llama-tiny", "adapter")
    # A local base path in the adapter config is never claimed.
    (tmp_path / "lora" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tmp_path / "base")})
    )
    assert base_models(man) == []


def test_output_config_is_the_last_resort(tmp_path, api):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"_name_or_path": "org/from-config"}))
    man = {"verb": "edit", "outputs": {"model": True}, "inputs": []}
    meta, _ = card_of(tmp_path, man, api)
    assert meta["base_model"] == "org/from-config"
    assert meta["base_model_relation"] == "finetune"


def test_is_hub_id_rejects_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "llama").mkdir(parents=True)
    assert is_hub_id("meta-llama/Llama-3.1-8B") and is_hub_id("org/name@refs/pr/1")
    for bad in ("models/llama", "./a/b", "/abs/path", "~/x/y", "a/b/c", "a", "", None,
                "a/model.safetensors", "C:\\x\\y"):  # fmt: skip
        assert not is_hub_id(bad), bad


def test_per_layer_table_small_and_grouped(tmp_path, api):
    small = [{"name": f"model.layers.{i}.mlp.up_proj.weight", "action": "merged", "rel_err": 0.5}
             for i in range(10)]  # fmt: skip
    _, text = card_of(tmp_path, {"verb": "merge", "tensors": small}, api, "s")
    assert text.count("| merged |") == 10

    # 16 layers × 7 projections = 112 tensors → one row per group with the group mean.
    projs = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    big = [{"name": f"model.layers.{i}.x.{p}.weight", "action": "merged", "rel_err": float(i),
            "rank": 8} for i in range(16) for p in projs]  # fmt: skip
    _, text = card_of(tmp_path, {"verb": "merge", "tensors": big}, api, "b")
    rows = [ln for ln in text.splitlines() if ln.startswith("| model.layers.*.")]
    assert len(rows) == 7 <= MAX_ROWS
    assert "| model.layers.*.x.q_proj.weight | merged | 16 | 7.5 | 8 |" in rows
    assert "112 tensors in 7 groups" in text

    many = [{"name": f"t{i}.weight", "action": "copied"} for i in range(300)]  # no layer index
    _, text = card_of(tmp_path, {"verb": "edit", "tensors": many}, api, "m")
    table = [ln for ln in text.splitlines() if ln.startswith("| t") and ".weight" in ln]
    assert len(table) == MAX_ROWS and "… and 250 more groups" in text


def test_license_inherited_when_the_inputs_agree(tmp_path, api):
    a = local_input("model", tmp_path / "a", {})
    b = local_input("model", tmp_path / "b", {})
    (tmp_path / "a" / "README.md").write_text("---\nlicense: mit\n---\n")
    (tmp_path / "b" / "README.md").write_text("---\nlicense: mit\n---\n")
    meta, _ = card_of(tmp_path, {"verb": "merge", "inputs": [a, b]}, api, "same")
    assert meta["license"] == "mit"
    (tmp_path / "b" / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    meta, _ = card_of(tmp_path, {"verb": "merge", "inputs": [a, b]}, api, "differ")
    assert "license" not in meta


def test_missing_keys_and_tmp_title(tmp_path, api):
    meta, text = card_of(tmp_path, {}, api, ".my-model.surgery-tmp-1234")
    assert meta["tags"] == ["surgery"] and "base_model" not in meta
    assert "\n# my-model\n" in text  # titled after OUT, not the temporary folder
    with pytest.raises(Exception, match="no such output folder"):
        write_card(tmp_path / "absent", {})


def test_the_validator_can_fail(api):
    """The fake Hub's validate-yaml rejects what the Hub rejects (so passing means something)."""
    for bad, why in (
        ("base_model: ./local/path", "not a valid model id"),
        ("base_model_relation: merge", 'needs "base_model"'),
        ("base_model: org/a\nbase_model_relation: mixed", "must be one of"),
        ("tags: surgery", "list of strings"),
    ):
        with pytest.raises(ValueError, match=why):
            api._validate_yaml(f"---\n{bad}\n---\n# x\n")
