"""The Hub in and out, against a real HTTP server on 127.0.0.1 (``tests/hub_server.py``).

The real ``huggingface_hub`` client talks HTTP to :class:`FakeHub`; nothing is mocked and no test
touches the internet. In-process tests point ``surgery.hub`` at the server through ``HF_ENDPOINT``
(read at call time); CLI tests run the real ``surgery`` console script in a subprocess with
``HF_ENDPOINT``/``HF_HOME`` set, so the client's import-time constants are right too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub
from safetensors.torch import load_file

from surgery import demo
from surgery.card import write_card
from surgery.checkpoint import Checkpoint, read_header
from surgery.errors import SurgeryError
from surgery.hub import download, push, remote_headers
from surgery.manifest import Manifest

TOKEN = "hf_testtoken_9f2c41d7e0b3a6c5"  # what the fake Hub accepts for user "alice"
BAD = "hf_wrongtoken_00000000000000"
SURGERY = [sys.executable, "-c", "import cli; cli.main()"]


@pytest.fixture
def hub():
    with FakeHub({TOKEN: "alice"}, orgs={"alice": ["team"]}) as h:
        yield h
        # The client needed no endpoint beyond the ones the server implements.
        assert h.unknown == []


@pytest.fixture
def hf_env(hub, tmp_path, monkeypatch):
    """Point the client at the fake Hub with an empty HF home (no saved login, fresh cache)."""
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_CACHE": str(tmp_path / "hf_home" / "hub"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE",
              "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):  # fmt: skip
        monkeypatch.delenv(k, raising=False)
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh interpreter (huggingface_hub constants come from ``env``)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    full.update(env)
    full["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return subprocess.run(
        SURGERY + args, env=full, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def folder_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny Llama checkpoints, built once per module (read-only in the tests)."""
    root = tmp_path_factory.mktemp("ckpts")
    return demo.tiny_llama(root / "v1", seed=0), demo.tiny_llama(root / "v2", seed=1, shards=2)


@pytest.fixture
def seeded(hub, checkpoints):
    """``org/base`` on the fake Hub: main (seed 0) and branch ``v2`` (seed 1), plus a pickle."""
    v1, v2 = checkpoints
    files = folder_files(v1)
    files["pytorch_model.bin"] = b"PICKLE" * 10  # must never be fetched
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n# base\n"
    main = hub.add_repo("org/base", files)
    dev = hub.add_repo("org/base", folder_files(v2), branch="v2")
    return {"main": main, "v2": dev, "v1_dir": v1, "v2_dir": v2}


def made_output(tmp_path: Path, base: Path, inputs: list[dict] | None = None) -> Path:
    """An output folder as a writing verb leaves it: weights, config, surgery.json, README.md."""
    out = tmp_path / "out"
    out.mkdir()
    for f in base.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    man = Manifest("merge", method="ties", method_reference="https://arxiv.org/abs/2306.01708",
                   params={"density": 0.2})  # fmt: skip
    man.inputs = inputs or [
        {"role": "model", "source": "org/a", "hub_id": "org/a", "revision": "a" * 40},
        {"role": "base", "source": "org/base", "hub_id": "org/base", "revision": "b" * 40},
    ]
    man.outputs["model"] = True
    man.tensors = [{"name": "model.layers.0.mlp.up_proj.weight", "action": "merged"}]
    man.write(out)
    write_card(out, man.to_dict())
    return out


# -- pull --------------------------------------------------------------------------------------
def test_pull_default_branch_revision_and_commit(hf_env, hub, seeded, tmp_path):
    ckpt = Checkpoint.open("org/base")
    assert ckpt.revision == seeded["main"]
    assert ckpt.source == "org/base"
    # Same bytes as the folder that was uploaded; the pickle was never requested or stored.
    assert (ckpt.root / "model.safetensors").read_bytes() == (
        seeded["v1_dir"] / "model.safetensors"
    ).read_bytes()
    assert not (ckpt.root / "pytorch_model.bin").exists()
    assert not any("pytorch_model.bin" in r[1] for r in hub.requests)
    assert (ckpt.root / "README.md").is_file() and (ckpt.root / "config.json").is_file()

    # A branch: a different (sharded) checkpoint and commit.
    v2 = Checkpoint.open("org/base@v2")
    assert v2.revision == seeded["v2"] != seeded["main"]
    assert len(v2.files) == 2
    name = "model.layers.0.self_attn.q_proj.weight"
    ref = load_file(str(seeded["v2_dir"] / v2.info(name).file.name))[name]
    assert torch.equal(v2.get(name), ref)
    assert not torch.equal(ckpt.get(name), v2.get(name))

    # A commit hash pins the revision (no branch lookup needed).
    pinned, commit = download("org/base", seeded["main"])
    assert commit == seeded["main"] and pinned == ckpt.root

    # A card for an output of this input inherits the license from the cached Hub card.
    out = made_output(tmp_path, seeded["v1_dir"],
                      [{"role": "src", "source": "org/base", "hub_id": "org/base",
                        "revision": commit}])  # fmt: skip
    assert "license: apache-2.0" in (out / "README.md").read_text()


def test_pull_errors_are_one_clear_message(hf_env, hub, seeded, monkeypatch):
    hub.add_repo("org/pickles", {"pytorch_model.bin": b"x", "config.json": b"{}"})
    hub.add_repo("org/gated", folder_files(seeded["v1_dir"]), gated=True)
    hub.add_repo("alice/private", folder_files(seeded["v1_dir"]), private=True)
    cases = {
        "org/missing": ["org/missing not found", "hf auth login"],
        "org/base@nope": ["revision 'nope' not found", "org/base"],
        "org/gated": ["gated repo", "accept its conditions"],
        "alice/private": ["not found", "HF_TOKEN"],
        "org/pickles": ["no .safetensors weights", "never loads pickle"],
    }
    for src, needles in cases.items():
        with pytest.raises(SurgeryError) as e:
            Checkpoint.open(src)
        for needle in needles:
            assert needle in str(e.value), (src, str(e.value))
    # With the owner's token the private repo opens; the gated one only once its terms are
    # accepted.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert Checkpoint.open("alice/private").revision == hub.commit("alice/private").oid
    with pytest.raises(SurgeryError, match="gated repo"):
        Checkpoint.open("org/gated")
    hub.repos["org/gated"].allowed_users.add("alice")
    assert Checkpoint.open("org/gated").revision == hub.commit("org/gated").oid
    # A bad token is refused everywhere, with the way to log in.
    monkeypatch.setenv("HF_TOKEN", BAD)
    with pytest.raises(SurgeryError, match="authentication failed.*hf auth login") as e:
        Checkpoint.open("org/base")
    assert BAD not in str(e.value)


def test_pull_network_down(hf_env, monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(SurgeryError, match="unreachable.*not in the local cache"):
        download("org/base", None)


def test_offline_warm_and_cold_cache(hf_env, hub, seeded, monkeypatch, tmp_path):
    online, commit = download("org/base", None)
    online_v2, commit_v2 = download("org/base", "v2")
    before = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Warm cache: same snapshots and commits, without a single request to the Hub.
    assert download("org/base", None) == (online, commit)
    assert download("org/base", "v2") == (online_v2, commit_v2)
    ckpt = Checkpoint.open("org/base@v2")
    assert ckpt.revision == commit_v2 and len(ckpt) > 0
    assert len(hub.requests) == before
    # Cold cache: a clear error naming HF_HUB_OFFLINE, still no request.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cold"))
    with pytest.raises(SurgeryError, match="not in the local Hub cache.*HF_HUB_OFFLINE"):
        download("org/base", None)
    assert len(hub.requests) == before


def test_offline_cli_subprocess(hf_env, hub, seeded, tmp_path):
    """HF_HUB_OFFLINE read by huggingface_hub at import (fresh interpreter): warm and cold."""
    download("org/base", "v2")  # fill the cache online
    before = len(hub.requests)
    off = {**hf_env, "HF_HUB_OFFLINE": "1"}
    r = run_cli(["inspect", "org/base@v2", "--json"], off, tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["revision"] == seeded["v2"]
    cold = run_cli(["inspect", "org/base", "--json"], {**off, "HF_HUB_CACHE": str(tmp_path / "c")},
                   tmp_path)  # fmt: skip
    assert cold.returncode == 1
    assert "Error:" in cold.stderr and "HF_HUB_OFFLINE" in cold.stderr
    assert len(hub.requests) == before


# -- remote headers -----------------------------------------------------------------------------
def test_remote_headers_match_local_without_downloading_weights(hf_env, hub, seeded):
    for rev, folder in ((None, seeded["v1_dir"]), ("v2", seeded["v2_dir"])):
        remote = remote_headers("org/base", rev)
        assert remote.revision == seeded[rev or "main"]
        local = Checkpoint.open(folder)
        assert remote.names() == local.names()
        for n in local.names():
            r, li = remote.info(n), local.info(n)
            assert (r.shape, r.dtype, r.offsets, r.file.name) == (
                li.shape, li.dtype, li.offsets, li.file.name
            )  # fmt: skip
        assert remote.config["model_type"] == "llama"
    # Safetensors files were only ever read with range requests; none landed in the cache.
    st = [r for r in hub.requests if r[1].endswith(".safetensors") and r[0] == "GET"]
    assert st and all(r[3] and r[3].startswith("bytes=0-") for r in st)
    assert not list(Path(hf_env["HF_HUB_CACHE"]).rglob("*.safetensors"))
    # `inspect` of a Hub id goes through the same path.
    from surgery import api

    info = api.inspect("org/base@v2")
    assert info["revision"] == seeded["v2"] and len(info["files"]) == 2
    assert info["num_params"] == Checkpoint.open(seeded["v2_dir"]).num_params
    assert not list(Path(hf_env["HF_HUB_CACHE"]).rglob("*.safetensors"))


def test_remote_headers_errors(hf_env, hub, seeded):
    files = folder_files(seeded["v2_dir"])
    index = json.loads(files["model.safetensors.index.json"])
    files.pop(sorted(set(index["weight_map"].values()))[-1])  # a shard the index names is gone
    hub.add_repo("org/broken", files)
    hub.add_repo("org/pickles", {"pytorch_model.bin": b"x", "config.json": b"{}"})
    for src, rev, needle in (
        ("org/broken", None, "a file is missing from org/broken"),
        ("org/pickles", None, "has no .safetensors files"),
        ("org/missing", None, "org/missing not found"),
        ("org/base", "nope", "revision 'nope' not found"),
    ):
        with pytest.raises(SurgeryError, match=needle):
            remote_headers(src, rev)


# -- push ----------------------------------------------------------------------------------------
def test_push_cli_creates_repo_and_uploads_in_one_commit(hf_env, hub, seeded, tmp_path):
    out = made_output(tmp_path, seeded["v1_dir"])
    r = run_cli(["push", str(out), "alice/merged"], {**hf_env, "HF_TOKEN": TOKEN}, tmp_path)
    assert r.returncode == 0, r.stderr
    commit = hub.commit("alice/merged")
    assert r.stdout.strip() == f"{hub.url}/alice/merged/commit/{commit.oid}"
    # Every file, byte for byte, in a single commit on top of the repo's initial commit.
    got = dict(commit.files)
    got.pop(".gitattributes")
    assert got == folder_files(out)
    assert hub.commit("alice/merged", commit.parent).files.keys() == {".gitattributes"}
    # The message says what was done (from surgery.json).
    assert commit.summary == "surgery merge (ties): org/a onto org/base"
    assert "density=0.2" in commit.description
    # The card was validated by the Hub before the upload.
    assert hub.validated and "base_model_relation: merge" in hub.validated[-1]
    # Pushing again reuses the repo (exist_ok) and adds one commit.
    r2 = run_cli(["push", str(out), "alice/merged", "--commit-message", "again"],
                 {**hf_env, "HF_TOKEN": TOKEN}, tmp_path)  # fmt: skip
    assert r2.returncode == 0, r2.stderr
    assert hub.commit("alice/merged").summary == "again"
    assert hub.commit("alice/merged").parent == commit.oid


def test_push_writes_a_missing_card_from_the_manifest(hf_env, hub, seeded, tmp_path):
    out = made_output(tmp_path, seeded["v1_dir"])
    (out / "README.md").unlink()
    push(out, "alice/m", token=TOKEN)
    card = hub.files("alice/m")["README.md"].decode()
    assert "base_model:\n- org/a\n- org/base\n" in card and "base_model_relation: merge" in card


def test_push_private_org_and_saved_login(hf_env, hub, seeded, tmp_path):
    out = made_output(tmp_path, seeded["v1_dir"])
    # `hf auth login` stores the token in $HF_HOME/token: no HF_TOKEN, no --token needed.
    home = Path(hf_env["HF_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "token").write_text(TOKEN)
    r = run_cli(["push", str(out), "team/merged", "--private"], hf_env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert hub.repos["team/merged"].private
    assert "model.safetensors" in hub.files("team/merged")
    # In-process too: the saved login is looked up under the HF_HOME of the moment.
    assert push(out, "alice/again").startswith(f"{hub.url}/alice/again/commit/")


def test_push_revision_branch(hf_env, hub, seeded, tmp_path):
    out = made_output(tmp_path, seeded["v1_dir"])
    url = push(out, "alice/m", token=TOKEN, revision="experiment")
    repo = hub.repos["alice/m"]
    assert url.endswith(repo.branches["experiment"])
    assert "model.safetensors" in hub.files("alice/m", "experiment")
    assert hub.files("alice/m", "main").keys() == {".gitattributes"}  # main untouched
    # The branch exists now: a second push commits on top of it.
    push(out, "alice/m", token=TOKEN, revision="experiment", commit_message="second")
    assert hub.commit("alice/m", "experiment").summary == "second"


def test_push_create_pr(hf_env, hub, seeded, tmp_path):
    out = made_output(tmp_path, seeded["v1_dir"])
    url = push(out, "alice/m", token=TOKEN, create_pr=True)
    assert url == f"{hub.url}/alice/m/discussions/1"
    assert "model.safetensors" in hub.files("alice/m", "refs/pr/1")
    assert hub.files("alice/m", "main").keys() == {".gitattributes"}
    assert hub.repos["alice/m"].prs[0]["title"].startswith("surgery merge")
    # A pull request against another branch (created from main when missing).
    url = push(out, "alice/m", token=TOKEN, create_pr=True, revision="dev")
    assert url == f"{hub.url}/alice/m/discussions/2"
    assert hub.repos["alice/m"].prs[1]["target"] == "dev"
    assert "model.safetensors" in hub.files("alice/m", "refs/pr/2")
    assert hub.files("alice/m", "dev").keys() == {".gitattributes"}


def test_push_auth_failures_say_how_to_log_in(hf_env, hub, seeded, tmp_path):
    out = made_output(tmp_path, seeded["v1_dir"])
    # No token anywhere (empty HF_HOME, no HF_TOKEN).
    r = run_cli(["push", str(out), "alice/m"], hf_env, tmp_path)
    assert r.returncode == 1
    assert "Error: cannot push" in r.stderr and "no Hugging Face token" in r.stderr
    assert "hf auth login" in r.stderr and "huggingface-cli login" in r.stderr
    assert "HF_TOKEN" in r.stderr and "Traceback" not in r.stderr
    # A rejected token, given with --token and through HF_TOKEN.
    for args, env in (
        (["--token", BAD], hf_env),
        ([], {**hf_env, "HF_TOKEN": BAD}),
    ):
        r = run_cli(["-vv", "push", str(out), "alice/m", *args], env, tmp_path)
        assert r.returncode == 1
        assert "authentication failed" in r.stderr and "hf auth login" in r.stderr
        assert BAD not in r.stdout + r.stderr
    # No write access to someone else's namespace.
    with pytest.raises(SurgeryError, match="may not write bob/m.*write access"):
        push(out, "bob/m", token=TOKEN)
    assert set(hub.repos) == {"org/base"}  # nothing was created


def test_push_refuses_before_any_request(hf_env, hub, seeded, tmp_path, monkeypatch):
    out = made_output(tmp_path, seeded["v1_dir"])
    before = len(hub.requests)
    (out / "notes.txt").write_text(f"my token is {TOKEN}\n")
    with pytest.raises(SurgeryError, match="notes.txt.*contain.*your Hub token"):
        push(out, "alice/m", token=TOKEN)
    (out / "notes.txt").unlink()
    with pytest.raises(SurgeryError, match="no such folder"):
        push(tmp_path / "nope", "alice/m", token=TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SurgeryError, match="HF_HUB_OFFLINE=1.*unset it"):
        push(out, "alice/m", token=TOKEN)
    assert len(hub.requests) == before


def test_push_invalid_card_is_rejected_before_upload(hf_env, hub, seeded, tmp_path):
    out = made_output(tmp_path, seeded["v1_dir"])
    (out / "README.md").write_text("---\nbase_model: ./my/local/model\n---\n# x\n")
    with pytest.raises(SurgeryError, match="README.md was rejected.*base_model"):
        push(out, "alice/m", token=TOKEN)
    assert hub.files("alice/m").keys() == {".gitattributes"}  # created, nothing committed


def test_token_is_in_no_output_and_no_file(hf_env, hub, seeded, tmp_path):
    """Pull a private repo and push with debug logs: the token is nowhere but where we put it."""
    hub.add_repo("alice/private", folder_files(seeded["v1_dir"]), private=True)
    env = {**hf_env, "HF_TOKEN": TOKEN}
    r1 = run_cli(["-vv", "inspect", "alice/private"], env, tmp_path)
    assert r1.returncode == 0, r1.stderr
    out = made_output(tmp_path, seeded["v1_dir"])
    r2 = run_cli(["-vv", "push", str(out), "alice/pushed"], env, tmp_path)
    r3 = run_cli(["-vv", "push", str(out), "alice/pushed", "--token", TOKEN], hf_env, tmp_path)
    assert r2.returncode == 0 and r3.returncode == 0, r2.stderr + r3.stderr
    # Download the private repo into the cache too (the subprocess above only read headers).
    os.environ["HF_TOKEN"] = TOKEN
    try:
        download("alice/private", None)
    finally:
        del os.environ["HF_TOKEN"]
    for proc in (r1, r2, r3):
        assert TOKEN not in proc.stdout + proc.stderr
    scanned = 0
    for root in (out, Path(hf_env["HF_HOME"]), tmp_path):
        for p in root.rglob("*"):
            if p.is_file():
                assert TOKEN.encode() not in p.read_bytes(), p
                scanned += 1
    assert scanned > 10
    for repo in ("alice/pushed", "alice/private"):
        for path, data in hub.files(repo).items():
            assert TOKEN.encode() not in data, (repo, path)
    # The card and manifest carry no local paths either.
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card


def test_read_header_of_downloaded_file_is_valid(hf_env, hub, seeded):
    """The cache holds real safetensors files (blobs behind symlinks), readable header-only."""
    local, _ = download("org/base", "v2")
    for f in sorted(local.glob("*.safetensors")):
        meta, infos = read_header(f)
        assert infos and meta.get("format") == "pt"


# -- the whole story: pull three Hub models, merge, push ------------------------------------------
def test_merge_hub_inputs_and_push_end_to_end(hf_env, hub, checkpoints, tmp_path):
    """`surgery merge org/a org/b --base org/base -m pcb -o out --push alice/merged`."""
    from huggingface_hub import ModelCard

    base = checkpoints[0]
    oids = {
        "org/base": hub.add_repo("org/base", base),
        "org/a": hub.add_repo("org/a", demo.finetune(base, tmp_path / "a", seed=1)),
        "org/b": hub.add_repo("org/b", demo.finetune(base, tmp_path / "b", seed=2)),
    }
    out = tmp_path / "out"
    args = ["merge", "org/a", "org/b", "--base", "org/base", "-m", "pcb", "-o", str(out), "-q"]
    # Without a token the run refuses before computing anything.
    r = run_cli([*args, "--push", "alice/merged"], hf_env, tmp_path)
    assert r.returncode == 1 and "--push alice/merged cannot work" in r.stderr
    assert "hf auth login" in r.stderr and not out.exists()

    r = run_cli([*args, "--push", "alice/merged"], {**hf_env, "HF_TOKEN": TOKEN}, tmp_path)
    assert r.returncode == 0, r.stderr
    commit = hub.commit("alice/merged")
    assert r.stdout.strip().splitlines()[-1] == f"{hub.url}/alice/merged/commit/{commit.oid}"
    files = dict(commit.files)
    files.pop(".gitattributes")
    assert files == folder_files(out)  # weights, config, card, manifest: all of it, one commit
    assert "model.safetensors" in files and "config.json" in files
    assert commit.summary.startswith("surgery merge") and "pcb" in commit.summary
    # The card draws the model tree: all three Hub ids, relation merge.
    data = ModelCard(files["README.md"].decode()).data
    assert data.base_model == ["org/a", "org/b", "org/base"]
    assert data.base_model_relation == "merge" and data.library_name == "transformers"
    assert {"surgery", "pcb"} <= set(data.tags)
    # The manifest records the resolved commits of the inputs.
    man = json.loads(files["surgery.json"])
    assert {i["hub_id"]: i["revision"] for i in man["inputs"]} == oids
    # Nothing secret, nowhere.
    assert TOKEN not in r.stdout + r.stderr
    for name, blob in files.items():
        assert TOKEN.encode() not in blob, name
    assert str(tmp_path) not in files["README.md"].decode()
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
