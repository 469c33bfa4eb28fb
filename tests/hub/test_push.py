"""`push_to_hub` and `hf-oscq push` on a real export folder; only the HfApi methods themselves are replaced."""

import importlib
import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from _export_fixture import BITS, build_export
from huggingface_hub import ModelCard, constants
from huggingface_hub.errors import Response
from huggingface_hub.utils import hf_raise_for_status

import hf_oscq
from hf_oscq import cli
from hf_oscq.hub import ACCURACY_PLOT, HISTOGRAM_PLOT
from hf_oscq.hub.push import NO_TOKEN_MESSAGE, HubPushError, plan_push, push_to_hub

REPO = "acme/tiny-resnet"
REPOS = [REPO] + [f"{REPO}-w{b}" for b in BITS]
TOKEN = "hf_test_secret_token_0123456789"
HTTP = importlib.import_module(Response.__module__.split(".")[0])  # the HTTP client huggingface_hub is built on


class FakeHub:
    """Stands in for `HfApi`: records each call and keeps what the Hub would hold (repos, files, commits, items).

    Like the Hub, `create_repo(exist_ok=True)` reuses a repo, a commit whose files are all unchanged is skipped,
    and `exists_ok=True` reuses a collection or an item. `fail` raises an exception at one call, once.
    """

    def __init__(self, token=TOKEN, fail=None):
        self.token = token
        self.fail = fail  # (method, target, exception)
        self.calls = []
        self.repos = {}
        self.collections = {}

    def _record(self, method, target, details):
        self.calls.append((method, target, details))
        if self.fail and self.fail[:2] == (method, target):
            error, self.fail = self.fail[2], None
            raise error

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False):
        self._record("create_repo", repo_id, {"repo_type": repo_type, "private": private, "exist_ok": exist_ok})
        if repo_id in self.repos and not exist_ok:
            raise AssertionError(f"409: {repo_id} exists")
        self.repos.setdefault(repo_id, {"private": private, "files": {}, "commits": 0})

    def create_commit(self, repo_id, operations, *, commit_message, repo_type=None):
        files = {}
        for operation in operations:
            with operation.as_file() as handle:
                files[operation.path_in_repo] = handle.read()
        self._record("create_commit", repo_id, {"files": files, "repo_type": repo_type, "message": commit_message})
        repo = self.repos[repo_id]  # KeyError: committed to a repo that was never created
        if any(repo["files"].get(path) != content for path, content in files.items()):
            repo["files"].update(files)
            repo["commits"] += 1

    def create_collection(self, title, *, namespace=None, description=None, private=False, exists_ok=False):
        self._record(
            "create_collection",
            f"{namespace}/{title}",
            {"description": description, "private": private, "exists_ok": exists_ok},
        )
        key = (namespace, title)
        if key in self.collections and not exists_ok:
            raise AssertionError("409: collection exists")
        self.collections.setdefault(key, {"slug": f"{namespace}/slug-{len(self.collections)}", "items": []})
        return SimpleNamespace(slug=self.collections[key]["slug"])

    def add_collection_item(self, collection_slug, item_id, item_type, *, note=None, exists_ok=False):
        self._record(
            "add_collection_item",
            item_id,
            {"slug": collection_slug, "type": item_type, "note": note, "exists_ok": exists_ok},
        )
        items = next(c["items"] for c in self.collections.values() if c["slug"] == collection_slug)
        if item_id in items and not exists_ok:
            raise AssertionError("409: item exists")
        if item_id not in items:
            items.append(item_id)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return build_export(tmp_path_factory.mktemp("export") / "tiny-resnet")


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """Parent and one bit-width: enough for the error paths, and quick to render."""
    return build_export(tmp_path_factory.mktemp("small") / "tiny-resnet", bits=(3,))


@pytest.fixture
def token_env(monkeypatch, tmp_path):
    """A token from the environment, and no login file (so nothing from the machine leaks in)."""
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def _snapshot(folder):
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _local_files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _http_error(status, message, error_code=None):
    headers = {"X-Error-Code": error_code} if error_code else {}
    request = HTTP.Request("POST", "https://huggingface.co/api/repos/create")
    response = HTTP.Response(status, json={"error": message}, headers=headers, request=request)
    with pytest.raises(Exception) as raised:
        hf_raise_for_status(response)
    return raised.value


def test_push_sends_the_exact_sequence_of_repos_files_and_metadata(export_dir, token_env):
    hub = FakeHub()
    before = _snapshot(export_dir)
    push_to_hub(export_dir, REPO, api=hub)
    assert _snapshot(export_dir) == before  # nothing local was written

    expected = []
    for repo in REPOS:
        expected.append(("create_repo", repo))
        expected.append(("create_commit", repo))
    expected.append(("create_collection", "acme/tiny-resnet (hf_oscq)"))
    expected += [("add_collection_item", repo) for repo in REPOS]
    assert [call[:2] for call in hub.calls] == expected

    for method, target, details in hub.calls:
        if method == "create_repo":
            assert details == {"repo_type": "model", "private": False, "exist_ok": True}
        if method == "create_commit":
            variant = "fp" if target == REPO else target.rsplit("-", 1)[1]
            sent = details["files"]
            local = _local_files(export_dir / variant)
            # every local file, byte for byte, plus the rendered card and its two plots
            assert set(sent) == set(local) | {"README.md", ACCURACY_PLOT, HISTOGRAM_PLOT}
            assert all(sent[name] == content for name, content in local.items())
            card = ModelCard(sent["README.md"].decode())
            accuracy = json.loads((export_dir / "oscq_export.json").read_text())["metrics"][variant]["accuracy"]
            assert card.data.eval_results[0].metric_value == accuracy
            if variant == "fp":
                assert card.data.base_model is None
            else:
                assert (card.data.base_model, card.data.to_dict()["base_model_relation"]) == (REPO, "quantized")
                assert json.loads(sent["config.json"])["quantization_config"]["bits"] == int(variant[1:])
    collection = [c for c in hub.calls if c[0] == "create_collection"][0][2]
    assert collection == {
        "description": "tiny-resnet in full precision and at 2, 3, 4 bits, made with hf_oscq.",
        "private": False,
        "exists_ok": True,
    }
    items = [c[2] for c in hub.calls if c[0] == "add_collection_item"]
    assert all(item["type"] == "model" and item["exists_ok"] and item["slug"] == "acme/slug-0" for item in items)
    assert items[2]["note"].startswith("3-bit weights (PTQ), test accuracy")
    assert hub.collections[("acme", "tiny-resnet (hf_oscq)")]["items"] == REPOS
    assert {repo: state["commits"] for repo, state in hub.repos.items()} == dict.fromkeys(REPOS, 1)


def test_private_push_creates_private_repos_and_collection(small_export, token_env):
    hub = FakeHub()
    push_to_hub(small_export, REPO, private=True, collection_title="My family", api=hub)
    created = [details for method, _, details in hub.calls if method in ("create_repo", "create_collection")]
    assert len(created) == 3 and all(details["private"] for details in created)
    assert list(hub.collections) == [("acme", "My family")]


def test_resume_after_a_network_failure_midway(export_dir, token_env):
    connect_error = HTTP.ConnectError("[Errno 101] Network is unreachable")
    hub = FakeHub(fail=("create_commit", f"{REPO}-w3", connect_error))
    before = _snapshot(export_dir)
    with pytest.raises(HubPushError) as raised:
        push_to_hub(export_dir, REPO, api=hub)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"Cannot reach the Hugging Face Hub while pushing {REPO}-w3 (ConnectError")
    assert "(2 of 4 repositories pushed)" in message and "run the same command again to resume" in message
    assert _snapshot(export_dir) == before
    first_commits = {target: d["files"] for m, target, d in hub.calls if m == "create_commit"}
    assert {repo: state["commits"] for repo, state in hub.repos.items()} == {REPO: 1, f"{REPO}-w2": 1, f"{REPO}-w3": 0}
    assert hub.collections == {}

    push_to_hub(export_dir, REPO, api=hub)  # the same command again
    second_commits = [(target, d["files"]) for m, target, d in hub.calls if m == "create_commit"][3:]
    # already-pushed repos get byte-identical files, so the Hub records no second commit there
    assert [target for target, _ in second_commits] == REPOS
    assert second_commits[0][1] == first_commits[REPO] and second_commits[1][1] == first_commits[f"{REPO}-w2"]
    assert {repo: state["commits"] for repo, state in hub.repos.items()} == dict.fromkeys(REPOS, 1)
    assert all(d["exist_ok"] for m, _, d in hub.calls if m == "create_repo")
    assert hub.collections[("acme", "tiny-resnet (hf_oscq)")]["items"] == REPOS

    clean = FakeHub()
    push_to_hub(export_dir, REPO, api=clean)
    assert hub.repos == clean.repos  # resuming ends exactly where an uninterrupted push does

    push_to_hub(export_dir, REPO, api=hub)  # a third run changes nothing
    assert hub.repos == clean.repos and hub.collections[("acme", "tiny-resnet (hf_oscq)")]["items"] == REPOS


def test_dry_run_sends_nothing_and_lists_repos_files_and_sizes(export_dir, token_env, monkeypatch, capsys, caplog):
    from huggingface_hub import HfApi

    def forbidden(*args, **kwargs):
        raise AssertionError("dry run called the Hub")

    for method in ("create_repo", "create_commit", "upload_folder", "create_collection", "add_collection_item"):
        monkeypatch.setattr(HfApi, method, forbidden)
    hub = FakeHub()
    before = _snapshot(export_dir)
    plan = push_to_hub(export_dir, REPO, dry_run=True, api=hub)
    assert hub.calls == []
    assert [repo.repo_id for repo in plan.repos] == REPOS

    assert cli.main(["push", str(export_dir), "--repo-id", REPO, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert _snapshot(export_dir) == before
    assert out.startswith("Dry run: nothing was created or uploaded.")
    assert TOKEN not in out and TOKEN not in caplog.text
    for repo, variant in zip(REPOS, ["fp", "w2", "w3", "w4"], strict=True):
        local = export_dir / variant
        files = sorted([p.name for p in local.iterdir()] + ["README.md", ACCURACY_PLOT, HISTOGRAM_PLOT])
        total = sum(p.stat().st_size for p in local.iterdir()) + sum(
            f.size for f in plan.repos[REPOS.index(repo)].files if f.source is None
        )
        assert f"repo {repo} (model, public): create if missing, commit {len(files)} files, {total:,} bytes" in out
        for path in local.iterdir():
            assert f"{path.stat().st_size:>14,} B  from {path}" in out
    assert "collection 'tiny-resnet (hf_oscq)' in acme (public): create if missing, add 4 models" in out


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            lambda: _http_error(403, 'You don\'t have the rights to create a model under the namespace "acme"'),
            "Pushing acme/tiny-resnet failed: permission denied (403): your token cannot write to 'acme'",
        ),
        (
            lambda: _http_error(401, "Invalid credentials in Authorization header"),
            "Pushing acme/tiny-resnet failed: the Hub rejected your token (401)",
        ),
        (
            lambda: _http_error(404, "Repository not found", "RepoNotFound"),
            "Pushing acme/tiny-resnet failed: not found (404): check that the user or organization 'acme' exists",
        ),
        (
            lambda: _http_error(500, "Internal error\nwith two lines"),
            "Pushing acme/tiny-resnet failed: the Hub refused the request (HTTP 500)",
        ),
        (lambda: HTTP.ConnectTimeout("timed out"), "Cannot reach the Hugging Face Hub while pushing acme/tiny-resnet"),
    ],
)
def test_hub_errors_become_one_line_messages(small_export, token_env, error, expected):
    hub = FakeHub(fail=("create_repo", REPO, error()))
    with pytest.raises(HubPushError) as raised:
        push_to_hub(small_export, REPO, api=hub)
    message = str(raised.value)
    assert message.startswith(expected)
    assert "\n" not in message and TOKEN not in message
    assert "(0 of 2 repositories pushed)" in message
    assert [call[0] for call in hub.calls] == ["create_repo"]


def test_collection_permission_error_names_the_collection(small_export, token_env):
    error = _http_error(403, "You cannot create a collection in acme")
    hub = FakeHub(fail=("create_collection", "acme/tiny-resnet (hf_oscq)", error))
    with pytest.raises(HubPushError, match=r"^Pushing acme/collection 'tiny-resnet \(hf_oscq\)' failed: permission"):
        push_to_hub(small_export, REPO, api=hub)
    assert {repo: state["commits"] for repo, state in hub.repos.items()} == {REPO: 1, f"{REPO}-w3": 1}


def test_no_token_fails_before_any_call(small_export, monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    hub = FakeHub(token=None)
    with pytest.raises(HubPushError) as raised:
        push_to_hub(small_export, REPO, api=hub)
    assert str(raised.value) == NO_TOKEN_MESSAGE
    assert hub.calls == []


def test_incomplete_export_fails_before_any_call_and_cli_prints_one_line(small_export, tmp_path, token_env, capsys):
    damaged = shutil.copytree(small_export, tmp_path / "damaged")
    (damaged / "w3" / "model.safetensors").unlink()
    hub = FakeHub()
    with pytest.raises(HubPushError, match=r"is incomplete: w3/ has no complete model\.safetensors"):
        push_to_hub(damaged, REPO, api=hub)
    assert hub.calls == []
    assert cli.main(["push", str(damaged), "--repo-id", REPO]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hf-oscq push: error: Export folder") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("repo_id", "message"),
    [
        ("tiny-resnet", r"repo_id must be ORG/NAME"),
        ("acme/tiny resnet", r"Invalid Hub repository name 'acme/tiny resnet'"),
        ("acme/" + "x" * 94, r"Invalid Hub repository name 'acme/x+-w3'"),  # the parent fits, its -w3 child does not
    ],
)
def test_invalid_repo_ids_are_rejected_before_any_call(small_export, token_env, repo_id, message):
    hub = FakeHub()
    with pytest.raises(HubPushError, match=message):
        push_to_hub(small_export, repo_id, api=hub)
    assert hub.calls == []


def test_an_existing_local_card_is_replaced_by_the_hub_card(small_export, tmp_path, token_env):
    copy = shutil.copytree(small_export, tmp_path / "with-card")
    (copy / "w3" / "README.md").write_text("---\nlicense: mit\n---\nlocal card\n")
    hub = FakeHub()
    push_to_hub(copy, REPO, api=hub)
    sent = next(d["files"] for m, target, d in hub.calls if m == "create_commit" and target == f"{REPO}-w3")
    assert ModelCard(sent["README.md"].decode()).data.base_model == REPO
    assert (copy / "w3" / "README.md").read_text() == "---\nlicense: mit\n---\nlocal card\n"


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-64])


def _invalid_codes(path):
    """Codes no export writes (the all-ones pattern), in a file whose checksum is recomputed: a faulty writer."""
    from safetensors.torch import load_file

    from hf_oscq.export.checkpoint import read_config, serialize_checkpoint

    tensors = load_file(str(path))
    key = next(k for k, t in tensors.items() if t.dtype == torch.uint8)
    tensors[key] = torch.full_like(tensors[key], 0xFF)
    path.write_bytes(serialize_checkpoint(tensors, 3, read_config(path.parent)))


def _edit_config(path):
    config = json.loads(path.read_text())
    config["hidden_sizes"] = [8, 8]
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("file", "damage", "message"),
    [
        ("w3/model.safetensors", _truncate, r"w3/ fails the loader's checks: .*w3/model.safetensors .*truncated"),
        ("w3/model.safetensors", _flip_last_byte, r"w3/ fails the loader's checks: .*w3/model.safetensors .*checksum"),
        ("w3/model.safetensors", _invalid_codes, r"w3/ fails the loader's checks: .* in .*w3/model.safetensors"),
        ("w3/config.json", _edit_config, r"w3/ fails the loader's checks: .*w3/config.json field 'hidden_sizes"),
        ("fp/model.safetensors", _truncate, r"fp/ fails the loader's checks: .*fp/model.safetensors .*truncated"),
    ],
    ids=["truncated", "byte_flipped", "invalid_codes", "config_edited", "fp_truncated"],
)
def test_push_refuses_any_corrupted_file_and_sends_nothing(small_export, tmp_path, token_env, file, damage, message):
    damaged = shutil.copytree(small_export, tmp_path / "damaged")
    damage(damaged / file)
    hub = FakeHub()
    with pytest.raises(HubPushError, match=message):
        push_to_hub(damaged, REPO, api=hub)
    assert hub.calls == []
    with pytest.raises(HubPushError, match=message):
        push_to_hub(damaged, REPO, dry_run=True)


def _torch_save(path):
    import torch

    torch.save({"w": torch.zeros(2)}, path)  # a zip archive holding data.pkl


def _pickle_bytes(path):
    import pickle

    path.write_bytes(pickle.dumps({"w": [0.0]}, protocol=4))


def _gzip_pickle(path):
    import gzip
    import pickle

    path.write_bytes(gzip.compress(pickle.dumps([1], protocol=2)))


def _tar_of_pickles(path):
    import io
    import tarfile

    with tarfile.open(path, "w") as archive:
        data = b"\x80\x04N."
        info = tarfile.TarInfo("inner/state.pkl")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("model.PT", lambda path: path.write_bytes(b"x")),
        ("weights.Bin", lambda path: path.write_bytes(b"x")),
        ("extra.pkl.gz", lambda path: path.write_bytes(b"x")),
        ("optimizer.CKPT.zip", lambda path: path.write_bytes(b"x")),
        ("state.zip", _torch_save),
        ("weights.data", _pickle_bytes),
        ("extra.gz", _gzip_pickle),
        ("states.tar", _tar_of_pickles),
    ],
    ids=["upper_pt", "mixed_bin", "pkl_gz", "compound", "torch_save_zip", "renamed_pickle", "gzip", "tar"],
)
def test_push_plan_refuses_pickles_in_any_spelling_and_sends_nothing(small_export, tmp_path, name, write):
    """The pickle rule (`folder.pickle_reason`) at every place an export folder is checked: the push plan (dry run
    and real push) and `read_export_manifest`. Names in any case and with compound suffixes, pickle bytes under
    another name, and zip / gzip / tar archives holding pickles; never by unpickling."""
    from hf_oscq.export.folder import read_export_manifest

    folder = shutil.copytree(small_export, tmp_path / "export")
    write(folder / "w3" / name)
    for attempt in (lambda: push_to_hub(folder, REPO, dry_run=True), lambda: push_to_hub(folder, REPO, api=FakeHub())):
        with pytest.raises(HubPushError, match=rf"w3/ in .* holds pickle files \['{re.escape(name)}'\]"):
            attempt()
    with pytest.raises(hf_oscq.ExportFolderError, match="only safetensors are published"):
        read_export_manifest(folder)


def test_files_that_only_look_like_pickles_are_published(small_export, tmp_path):
    """A safetensors file whose header length starts with the bytes of a pickle protocol, and a zip without pickles,
    are not refused."""
    import zipfile

    folder = shutil.copytree(small_export, tmp_path / "export")
    (folder / "w3" / "extra.safetensors").write_bytes((0x0380).to_bytes(8, "little") + b"{}" + b" " * 894)
    with zipfile.ZipFile(folder / "w3" / "examples.zip", "w") as archive:
        archive.writestr("image.png", b"png")
    files = {planned.path_in_repo for repo in plan_push(folder, REPO).repos for planned in repo.files}
    assert {"extra.safetensors", "examples.zip"} <= files
