"""Exports on the Hugging Face hub: loading `namespace/name[@revision]` from the standard HF cache
(offline), pushing with a generated model card, `inspect` of exports, and training provenance."""
import hashlib
import json
import os
import re
import sys
from importlib.metadata import version
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import CommitInfo, constants, scan_cache_dir

from ttt_speech import TTTConfig, hub, patch_moshi
from ttt_speech.checkpoint import ttt_state_dict
from ttt_speech.cli import main
from ttt_speech.export import Export, load_exported_lm, save_export
from ttt_speech.models import ModelConfig, load_lm
from train_utils import TINY_MODEL, make_corpus, write_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_local_checkpoint import cache_as_hub  # noqa: E402

TINY = ModelConfig(name="tiny", tiny=TINY_MODEL["tiny"], device="cpu")
PROVENANCE = {"steps": 12, "train_loss": 3.5, "eval": {"eval_loss": 4.25},
              "data": {"train_manifest": "corpus/train.jsonl", "entries": 6, "hours": 0.5, "eval_manifest": None}}
MAIN, V1 = hashlib.sha1(b"main").hexdigest(), hashlib.sha1(b"v1").hexdigest()


def trained_lm(seed: int, lora: bool = False):
    """A tiny LM with TTT layers whose weights are moved off their init (as training would)."""
    lm = load_lm(TINY)
    patch_moshi(lm, TTTConfig(mini_batch_size=4, gate_init=0.5))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ttt_state_dict(lm).values():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return lm


def make_export(path: Path, seed: int, model: ModelConfig = TINY) -> Path:
    return save_export(trained_lm(seed), model, path, "ttt", provenance=PROVENANCE)


def logits(lm) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, lm.card, (1, lm.num_codebooks, 12), generator=gen)
    codes[:, 0] = torch.randint(0, lm.text_card, (1, 12), generator=gen)
    with torch.no_grad():
        return lm(codes).logits.nan_to_num()


def cache_repo(cache: Path, repo_id: str, export: Path, commit: str, ref: str) -> None:
    """Lay `export` out in `cache` as huggingface_hub does (scripts/make_local_checkpoint.py)."""
    cache_as_hub(export, cache, repo_id, commit, ref)


@pytest.fixture(autouse=True)
def fresh_resolutions():
    """hub resolutions are cached per process (one commit per run): each test starts with none."""
    hub._snapshot.cache_clear()
    yield
    hub._snapshot.cache_clear()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An HF cache holding user/repo: main = export A, tag v1 = export B; offline; cwd without user/."""
    cache = tmp_path / "hf-cache"
    a, b = make_export(tmp_path / "a", seed=1), make_export(tmp_path / "b", seed=2)
    cache_repo(cache, "user/repo", a, MAIN, "main")
    cache_repo(cache, "user/repo", b, V1, "v1")
    # huggingface_hub reads these at import: the module constants, and the environment for subprocesses
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache, a, b


def test_the_cache_layout_is_huggingface_hubs(offline_cache):
    cache, a, _ = offline_cache
    (repo,) = scan_cache_dir(cache).repos
    assert repo.repo_id == "user/repo" and not scan_cache_dir(cache).warnings
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {MAIN: {"main"}, V1: {"v1"}}
    assert {f.file_name for r in repo.revisions for f in r.files} == {p.name for p in a.iterdir()}


def test_load_from_a_hub_repo_id(offline_cache):
    _, a, b = offline_cache
    local, pinned = logits(load_exported_lm(a)[0]), logits(load_exported_lm(b)[0])
    fresh = load_lm(TINY)
    patch_moshi(fresh, TTTConfig(mini_batch_size=4, gate_init=0.5))
    assert not torch.allclose(local, logits(fresh)) and not torch.allclose(local, pinned)  # the weights matter
    lm, model = load_exported_lm("user/repo")
    assert torch.equal(logits(lm), local) and model.tiny == TINY.tiny
    assert torch.equal(logits(load_exported_lm("user/repo@v1")[0]), pinned)
    assert torch.equal(logits(load_exported_lm(f"user/repo@{MAIN}")[0]), local)
    assert torch.equal(logits(load_exported_lm(Path("user/repo@v1"))[0]), pinned)  # configs hold Paths
    assert Export.open("user/repo@v1").ttt_config.mini_batch_size == 4


def test_an_export_resolves_a_hub_repo_id_once(offline_cache, monkeypatch):
    """One Export: one resolution and one model.json read, however many questions it answers; its
    configs, provenance and weights all come from the commit it resolved, even once main has moved."""
    import ttt_speech.export

    cache, a, _ = offline_cache
    expected = logits(load_exported_lm(a)[0])
    resolved, read = [], []
    resolve, read_json = ttt_speech.export.resolve_export, ttt_speech.export.read_json
    monkeypatch.setattr(ttt_speech.export, "resolve_export", lambda *args: resolved.append(args) or resolve(*args))
    monkeypatch.setattr(ttt_speech.export, "read_json", lambda path, *args: read.append(path) or read_json(path, *args))
    export = Export.open("user/repo")
    (cache / "models--user--repo" / "refs" / "main").write_text(V1)  # main now points at export B...
    hub._snapshot.cache_clear()  # ...and a new resolution would see it
    assert export.model_config.is_tiny and export.model_config.tiny == TINY.tiny
    assert export.ttt_config.mini_batch_size == 4 and export.has_ttt and export.lora is None
    assert export.provenance["steps"] == 12 and export.trainable == "ttt"
    assert export.files == ["model.json", "ttt_config.json", "ttt.safetensors"]
    assert export.label == f"user/repo (hub commit {MAIN})" and Export.open(a).label == str(a)
    lm, model = export.load()
    assert torch.equal(logits(lm), expected) and model == export.model_config
    assert [r[0] for r in resolved] == ["user/repo", a] and read == [export.directory / "model.json", a / "model.json"]


def test_one_run_reads_one_commit_even_if_the_branch_moves(offline_cache):
    """model.json and the weights of one export come from the same snapshot: main is resolved once."""
    cache = offline_cache[0]
    first = hub.resolve_export("user/repo", ["model.json"])
    (cache / "models--user--repo" / "refs" / "main").write_text(V1)  # main now points at export B
    assert hub.resolve_export("user/repo", ["model.json"]) == first and first.name == MAIN
    hub._snapshot.cache_clear()  # a new process sees the move
    assert hub.resolve_export("user/repo", ["model.json"]).name == V1


def test_a_local_folder_wins_over_the_hub(offline_cache):
    _, _, b = offline_cache
    os.makedirs("user")
    os.symlink(b, "user/repo")
    assert torch.equal(logits(load_exported_lm("user/repo")[0]), logits(load_exported_lm(b)[0]))


def test_hub_errors_are_one_line(offline_cache):
    with pytest.raises(ValueError, match=r"^user/other: no such local folder, and hub repo user/other \(its main "
                                         r"branch\) is not in the local cache .* while HF_HUB_OFFLINE is set") as e:
        load_exported_lm("user/other")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"revision 'v2'.*HF_HUB_OFFLINE is set"):
        Export.open("user/repo@v2")
    with pytest.raises(FileNotFoundError, match="no/such/export/model.json: missing .expected an export directory"):
        load_exported_lm("no/such/export")  # neither a folder nor a repo id: the readers' own error
    assert main(["inspect", "user/other"]) == 2


def test_each_hub_failure_is_explained_in_its_own_words(monkeypatch):
    """hub.hub_failure, shared by export resolution and checkpoint files: one sentence per failure,
    naming the repo, revision or file that is missing (errors built as huggingface_hub raises them)."""
    import httpx
    from huggingface_hub.utils import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/org/x"))
    cases = [
        (RevisionNotFoundError("404 Client Error", response=response), {"revision": "v1"},
         "the hub repo org/x has no revision 'v1' (expected a branch, tag or commit)"),
        (RepositoryNotFoundError("404 Client Error", response=response), {"filename": "config.json"},
         "no hub repo org/x that you can read (check the path or repo id; a private repo needs"),
        (EntryNotFoundError("404 Client Error"), {"filename": "model.safetensors"},
         "the hub repo org/x has no file model.safetensors"),
        (HfHubHTTPError("500 Server Error", response=response), {"revision": "v1"},
         "the hub refused hub repo org/x (revision 'v1') (500 Server Error)"),
        (httpx.ConnectError("[Errno -3] Temporary failure in name resolution"), {},
         "the hub cannot be reached ([Errno -3] Temporary failure in name resolution)"),
    ]
    for error, where, expected in cases:
        assert hub.hub_failure(error, "org/x", **where).startswith(expected), (type(error).__name__, expected)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.hub_failure(LocalEntryNotFoundError("not cached"), "org/x", filename="config.json").startswith(
        "config.json of hub repo org/x is not in the local cache (")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub.hub_failure(LocalEntryNotFoundError("not cached"), "org/x").startswith(
        "the hub cannot be reached while hub repo org/x (its main branch) is not (completely) in the local cache")
    assert hub.hub_failure(KeyError("x"), "org/x") is None  # not the hub's: re-raised by the callers


def test_inspect_prints_trainable_ttt_and_provenance(offline_cache, capsys):
    _, a, _ = offline_cache
    assert main(["inspect", "user/repo"]) == 0
    out = capsys.readouterr().out
    assert "trainable         ttt\n" in out and "LoRA              none" in out
    assert "steps trained     12" in out and "train data        corpus/train.jsonl (6 entries, 0.5 h)" in out
    assert "final eval        eval_loss=4.25" in out and f"ttt-speech        {version('ttt-speech')}, commit" in out
    assert "patched layers            0-1 (2 of 2)" in out and '"mini_batch_size": 4' in out
    assert main(["inspect", str(a)]) == 0 and capsys.readouterr().out == out


def test_an_export_without_provenance_still_loads(tmp_path, capsys):
    """Exports written before provenance was recorded: same VERSION, no `provenance` key."""
    export = make_export(tmp_path / "export", seed=1)
    expected = logits(load_exported_lm(export)[0])
    meta = json.loads((export / "model.json").read_text())
    del meta["provenance"]
    (export / "model.json").write_text(json.dumps(meta))
    assert torch.equal(logits(load_exported_lm(export)[0]), expected)
    assert main(["inspect", str(export)]) == 0
    assert "provenance  not recorded" in capsys.readouterr().out.replace("  " * 3, "")


def test_save_export_records_provenance(tmp_path, monkeypatch):
    provenance = Export.open(make_export(tmp_path / "export", seed=1)).provenance
    assert {k: provenance[k] for k in PROVENANCE} == PROVENANCE
    assert provenance["ttt_speech_version"] == version("ttt-speech")
    assert provenance["git_commit"] is None or len(provenance["git_commit"]) == 40
    import subprocess

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)  # no git installed: recorded as unknown, the save goes on
    assert Export.open(make_export(tmp_path / "export2", seed=1)).provenance["git_commit"] is None


def test_training_records_provenance(tmp_path):
    from ttt_speech_apps.finetune.cli import main as train_main

    corpus = make_corpus(tmp_path)
    path = write_config(tmp_path, corpus, trainable="ttt", steps=2, **{"data.eval_manifest": str(corpus["eval"])})
    assert train_main([str(path), "--quiet"]) == 0
    provenance = Export.open(tmp_path / "run" / "export").provenance
    entries = [json.loads(line) for line in Path(corpus["train"]).read_text().splitlines()]
    assert provenance["steps"] == 2 and provenance["data"]["entries"] == len(entries) > 1
    assert provenance["data"]["hours"] == pytest.approx(sum(e["duration"] for e in entries) / 3600)
    assert provenance["data"]["train_manifest"] == str(corpus["train"])
    assert provenance["data"]["eval_manifest"] == str(corpus["eval"])
    assert provenance["eval"]["eval_loss"] > 0 and provenance["train_loss"] > 0


@pytest.mark.parametrize("trainable, removed", [("full", "model.safetensors"), ("ttt", "ttt.safetensors"),
                                                  ("ttt", "ttt_config.json")])
def test_an_export_missing_a_file_its_model_json_declares_is_refused_by_every_reader(
        trainable, removed, tmp_path, hub_calls, capsys):
    """inspect, export card, export push and loading all read an export through Export.open,
    which checks its files against model.json: one line naming the missing file, exit 2, no upload."""
    export = save_export(trained_lm(seed=1), TINY, tmp_path / "export", trainable)
    (export / removed).unlink()
    message = f"{export / removed}: missing, and model.json declares it (an incomplete export"
    for command in (["inspect", str(export)], ["export", "card", str(export)],
                    ["export", "push", str(export), "me/moshi-ttt"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (command, err)
    assert not hub_calls
    with pytest.raises(ValueError, match="missing, and model.json declares it"):
        load_exported_lm(export)


def test_push_uploads_the_files_model_json_declares_not_strays(tmp_path, hub_calls):
    export = make_export(tmp_path / "export", seed=1)
    (export / "lora.safetensors").write_bytes(b"left over")  # not declared: this export has no LoRA
    assert main(["export", "push", str(export), "me/moshi-ttt"]) == 0
    assert set(uploaded(hub_calls)) == {"model.json", "ttt_config.json", "ttt.safetensors", "README.md"}


@pytest.mark.parametrize("source", ["org/name@", "@rev", "org/name@v1@v2"])
def test_a_malformed_hub_id_is_said_so_not_taken_for_a_missing_folder(source, offline_cache, capsys):
    expected = f"{source}: no such local folder, and a malformed hub id (expected namespace/name[@revision])"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        Export.open(source)
    for command in (["inspect", source], ["export", "card", source]):
        assert main(command) == 2
        assert capsys.readouterr().err == f"ttt-speech {command[0]}: error: {expected}\n"
    with pytest.raises(ValueError, match=rf"^model.name: '{re.escape(source)}' is a malformed hub id \(expected "
                                         "namespace/name: a base model is read from its repo's main branch"):
        ModelConfig(name=source)  # (no revision at all there)


@pytest.fixture
def hub_calls(monkeypatch):
    """HfApi's network calls replaced by recorders (the project's own code runs as it is)."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"] = (repo_id, kwargs)

    def create_commit(self, repo_id, operations, **kwargs):
        calls["create_commit"] = (repo_id, list(operations), kwargs)
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", commit_message="",
                          commit_description="", oid="abc", pr_url=None)

    for name, fake in (("create_repo", create_repo), ("create_branch", create_branch),
                       ("create_commit", create_commit)):
        monkeypatch.setattr(huggingface_hub.HfApi, name, fake)
    return calls


def uploaded(calls) -> dict[str, bytes]:
    _, operations, _ = calls["create_commit"]
    return {op.path_in_repo: op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes)
            else Path(op.path_or_fileobj).read_bytes() for op in operations}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_push_uploads_the_export_with_a_model_card(tmp_path, hub_calls, capsys):
    base = ModelConfig(name="kyutai/moshiko-pytorch-bf16", dtype="bfloat16", device="cpu")  # the card reads meta only
    export = make_export(tmp_path / "export", seed=1, model=base)
    assert main(["export", "push", str(export), "me/moshi-ttt", "--branch", "v1", "--private",
                 "--license", "cc-by-4.0"]) == 0
    assert "pushed model.json, ttt_config.json, ttt.safetensors and README.md (generated) to me/moshi-ttt@v1: " \
           "https://huggingface.co/me/moshi-ttt/commit/abc" in capsys.readouterr().out
    assert hub_calls["create_repo"] == ("me/moshi-ttt", {"repo_type": "model", "private": True, "exist_ok": True})
    assert hub_calls["create_branch"][1]["branch"] == "v1"
    repo_id, _, kwargs = hub_calls["create_commit"]
    assert repo_id == "me/moshi-ttt" and kwargs["revision"] == "v1"
    assert kwargs["commit_message"] == "Upload ttt-speech export (12 steps)"
    files = uploaded(hub_calls)
    assert set(files) == {"model.json", "ttt_config.json", "ttt.safetensors", "README.md"}
    for name in ("model.json", "ttt_config.json", "ttt.safetensors"):
        assert files[name] == (export / name).read_bytes()
    card = files["README.md"].decode()
    assert front_matter(card) == {"library_name": "ttt-speech", "base_model": "kyutai/moshiko-pytorch-bf16",
                                  "license": "cc-by-4.0", "tags": ["moshi", "test-time-training", "speech"]}
    assert "| base model | kyutai/moshiko-pytorch-bf16, bfloat16 |" in card and "| trainable | ttt |" in card
    assert "| `mini_batch_size` | `4` |" in card and "| `gate_init` | `0.5` |" in card
    assert "| steps trained | 12 |" in card and "| `eval_loss` | 4.2500 |" in card
    assert 'load_exported_lm("me/moshi-ttt")' in card and "applies the weights of this repo (the TTT layers)" in card


def test_card_is_reviewed_then_pushed_as_written(tmp_path, hub_calls, capsys):
    export = make_export(tmp_path / "export", seed=1)
    assert main(["export", "card", str(export)]) == 0
    printed = capsys.readouterr().out
    assert "base_model" not in front_matter(printed) and "tiny (random-init, seed 0" in printed
    assert main(["export", "card", str(export), "--out", str(export / "README.md")]) == 0
    assert (export / "README.md").read_text() == printed
    (export / "README.md").write_text(printed + "\nEdited by hand.\n")
    assert main(["export", "push", str(export), "me/moshi-ttt", "--message", "first"]) == 0
    assert uploaded(hub_calls)["README.md"].decode().endswith("Edited by hand.\n")
    assert hub_calls["create_commit"][2] == {"commit_message": "first", "repo_type": "model", "revision": None}
    assert "create_branch" not in hub_calls


def test_push_refuses_bad_input_before_the_hub(tmp_path, hub_calls, capsys):
    export = make_export(tmp_path / "export", seed=1)
    assert main(["export", "push", str(export), "not a repo"]) == 2
    assert "REPO_ID: expected a hub repo id namespace/name" in capsys.readouterr().err
    assert main(["export", "push", str(export), "me/repo@v1"]) == 2
    assert main(["export", "push", "me/moshi-ttt", "me/moshi-ttt"]) == 2
    assert "me/moshi-ttt: not a folder" in capsys.readouterr().err
    assert not hub_calls


def test_push_warns_when_the_export_names_local_base_files(tmp_path, hub_calls, capsys):
    weights = tmp_path / "mimi.safetensors"
    weights.write_bytes(b"")
    base = ModelConfig(name="kyutai/moshiko-pytorch-bf16", mimi_weights=weights, device="cpu")
    export = make_export(tmp_path / "export", seed=1, model=base)
    assert main(["export", "push", str(export), "me/moshi-ttt"]) == 0
    err = capsys.readouterr().err
    assert "warning: model.json names local files (mimi_weights=" in err and "create_commit" in hub_calls


def test_push_without_a_network_is_one_line(tmp_path, monkeypatch, capsys):
    import httpx

    def unreachable(self, repo_id, **kwargs):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    export = make_export(tmp_path / "export", seed=1)
    assert main(["export", "push", str(export), "me/moshi-ttt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ttt-speech export: error: me/moshi-ttt: the hub cannot be reached ([Errno -3] Temporary failure "
                   "in name resolution); pushing needs the network")
