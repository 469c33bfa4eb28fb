"""Publishing an export folder on the Hugging Face Hub: the parent repo, one repo per bit-width, one collection.

`ORG/NAME` gets `fp/`, `ORG/NAME-w{b}` gets `w{b}/` with a card declaring `base_model: ORG/NAME` and
`base_model_relation: quantized`, and a collection in `ORG` groups them. Everything local (checking the folder,
rendering the cards and plots) happens before the first network call, and nothing is written to disk: the cards
are uploaded from memory. Every Hub call is idempotent (`exist_ok`, unchanged files are skipped by the Hub), so
running the same push again after a failure resumes it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from ..errors import OscqError, OscqValueError
from ..export.folder import ExportFolderError, folder_files, read_export_manifest, verify_checkpoint_folder
from ..quantization.variants import FULL_PRECISION, variant_bits, variant_names, variant_repo_id
from . import DEFAULT_LICENSE
from .card_facts import format_size, variant_accuracy
from .model_card import render_all_card_files
from .repo_ids import check_repo_id

logger = logging.getLogger(__name__)

NO_TOKEN_MESSAGE = (
    "No Hugging Face token found: log in with `hf auth login` or set the HF_TOKEN environment variable to a token "
    "with write access, then run the same command again."
)
_TITLE_MAX = 60  # the Hub's limit on collection titles
_DESCRIPTION_MAX = 150  # the Hub's limit on collection descriptions


def _network_errors() -> tuple[type[BaseException], ...]:
    # Transport failures surface as the HTTP client's own exceptions (httpx in huggingface_hub 1.x, its httpx2 fork
    # in 2.x, requests before), after huggingface_hub's retries.
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


class HubPushError(OscqError, RuntimeError):
    """A push that cannot start or did not finish; the message is one line saying what to do."""


@dataclass(frozen=True)
class PlannedFile:
    """One file of a commit: from the export folder (`source`) or rendered in memory (`content`)."""

    path_in_repo: str
    size: int
    source: Path | None = None
    content: bytes | None = field(default=None, repr=False)

    def operation(self) -> CommitOperationAdd:
        return CommitOperationAdd(self.path_in_repo, str(self.source) if self.source else self.content)


@dataclass(frozen=True)
class PlannedRepo:
    """One Hub model repository and the single commit that fills it."""

    repo_id: str
    variant: str
    files: tuple[PlannedFile, ...]
    note: str


@dataclass(frozen=True)
class PushPlan:
    """Everything a push creates and uploads, decided locally before any network call."""

    repos: tuple[PlannedRepo, ...]
    collection_namespace: str
    collection_title: str
    collection_description: str
    private: bool

    def describe(self) -> str:
        """A plain-text listing of the repositories, files (with sizes) and collection, as `--dry_run` prints it."""
        visibility = "private" if self.private else "public"
        lines = []
        for repo in self.repos:
            total = sum(f.size for f in repo.files)
            lines.append(
                f"repo {repo.repo_id} (model, {visibility}): create if missing, commit {len(repo.files)} files, "
                f"{total:,} bytes ({format_size(total)})"
            )
            for planned in repo.files:
                origin = f"from {planned.source}" if planned.source else "rendered model card file"
                lines.append(f"  {planned.path_in_repo:<40} {planned.size:>14,} B  {origin}")
        lines.append(
            f"collection {self.collection_title!r} in {self.collection_namespace} ({visibility}): create if missing, "
            f"add {len(self.repos)} models"
        )
        lines += [f"  {repo.repo_id}: {repo.note}" for repo in self.repos]
        return "\n".join(lines)


def _check_repo_id(repo_id: str, bits: list[int]) -> None:
    try:
        check_repo_id(repo_id, variant_names(bits))
    except OscqValueError as error:
        raise HubPushError(str(error)) from None


def _note(manifest: dict, variant: str) -> str:
    accuracy = variant_accuracy(manifest, variant)
    what = "full precision (parent)" if variant == FULL_PRECISION else f"{variant_bits(variant)}-bit weights (PTQ)"
    return what + (f", test accuracy {100 * accuracy:.1f} %" if accuracy is not None else "")


def plan_push(
    export_dir: str | Path,
    repo_id: str,
    private: bool = False,
    license: str = DEFAULT_LICENSE,
    collection_title: str | None = None,
) -> PushPlan:
    """Checks the export folder, renders every card in memory and lists what a push would send. No network.

    Args: see `push_to_hub`.

    Returns:
        The `PushPlan`.

    Raises:
        HubPushError: for an incomplete export folder or an invalid `repo_id`.
    """
    export_dir = Path(export_dir)
    try:
        manifest = read_export_manifest(export_dir)
    except ExportFolderError as error:
        raise HubPushError(str(error)) from None
    for variant in variant_names(manifest["bits"]):  # every file checked as loading it would, before anything is sent
        try:
            verify_checkpoint_folder(export_dir / variant)
        except ExportFolderError as error:
            raise HubPushError(
                f"Not pushing {str(export_dir)!r}: {variant}/ fails the loader's checks: {error}"
            ) from None
    _check_repo_id(repo_id, manifest["bits"])
    repos = []
    for variant, rendered in render_all_card_files(export_dir, repo_id, license, manifest).items():
        files = [PlannedFile(name, len(content), content=content) for name, content in rendered.items()]
        for relative in folder_files(export_dir / variant):
            if relative.as_posix() not in rendered:  # a card written locally is replaced by the Hub-specific one
                source = export_dir / variant / relative
                files.append(PlannedFile(relative.as_posix(), source.stat().st_size, source=source))
        files.sort(key=lambda planned: planned.path_in_repo)
        repos.append(PlannedRepo(variant_repo_id(repo_id, variant), variant, tuple(files), _note(manifest, variant)))
    namespace, name = repo_id.split("/")
    description = f"{name} in full precision and at {', '.join(map(str, manifest['bits']))} bits, made with hf_oscq."
    return PushPlan(
        repos=tuple(repos),
        collection_namespace=namespace,
        collection_title=(collection_title or f"{name} (hf_oscq)")[:_TITLE_MAX],
        collection_description=description[:_DESCRIPTION_MAX],
        private=private,
    )


def _flat(text: str | None) -> str:
    return " ".join(str(text or "").split())[:300]


@contextlib.contextmanager
def _hub_errors(target: str, progress: str) -> Iterator[None]:
    """Turns huggingface_hub / network exceptions into one-line `HubPushError`s that say how to go on."""
    resume = f"{progress}; fix this, then run the same command again to resume (finished steps are reused)"
    try:
        yield
    except LocalTokenNotFoundError as error:
        raise HubPushError(NO_TOKEN_MESSAGE) from error
    except OfflineModeIsEnabled as error:
        raise HubPushError(f"HF_HUB_OFFLINE is set, so {target} cannot be pushed: unset it{resume}.") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        said = f" The Hub said: {_flat(error.server_message)}" if error.server_message else ""
        namespace = target.split("/")[0]
        if status == 401:
            message = "the Hub rejected your token (401): log in again with `hf auth login` or set a valid HF_TOKEN"
        elif status == 403:
            message = (
                f"permission denied (403): your token cannot write to {namespace!r} (the repository or namespace "
                "belongs to someone else, or the token is read-only); use a namespace you own or a write token"
            )
        elif isinstance(error, RepositoryNotFoundError) or status == 404:
            message = f"not found (404): check that the user or organization {namespace!r} exists and you belong to it"
        else:
            message = f"the Hub refused the request (HTTP {status})"
        raise HubPushError(f"Pushing {target} failed: {message}{resume}.{said}") from error
    except _network_errors() as error:
        raise HubPushError(
            f"Cannot reach the Hugging Face Hub while pushing {target} ({type(error).__name__}: {_flat(str(error))}): "
            f"check the network connection and HF_ENDPOINT{resume}."
        ) from error


def push_to_hub(
    export_dir: str | Path,
    repo_id: str,
    private: bool = False,
    dry_run: bool = False,
    license: str = DEFAULT_LICENSE,
    collection_title: str | None = None,
    api: HfApi | None = None,
    token: str | None = None,
) -> PushPlan:
    """Publishes an export folder: `fp/` to `repo_id`, each `w{b}/` to `{repo_id}-w{b}`, grouped in a collection.

    Each repository gets one commit with its folder's files and its rendered model card (README.md and plots).
    Nothing local is modified, whether the push succeeds or fails. Running it again resumes a failed push:
    repositories and the collection are reused and unchanged files are not uploaded again.

    Args:
        export_dir: the folder `export_quantized` wrote (checked before anything is sent).
        repo_id: the parent repository `ORG/NAME`.
        private: create the repositories and the collection as private (existing ones keep their visibility).
        dry_run: only check and render, and return the plan; nothing is sent and no token is needed.
        license: the license identifier in the cards' metadata.
        collection_title: title of the collection (default `"NAME (hf_oscq)"`); pushing again to the same title
            reuses the collection.
        api: the `HfApi` to use; by default `HfApi(token=token)`.
        token: the Hub token (never logged or written); by default the one of `hf auth login` or `HF_TOKEN`.

    Returns:
        The `PushPlan` that was (or, with `dry_run`, would be) executed.

    Raises:
        HubPushError: with a one-line message, for an incomplete export folder, an invalid `repo_id`, a missing
            or rejected token, a permission error, or an unreachable Hub.
    """
    plan = plan_push(export_dir, repo_id, private, license, collection_title)
    if dry_run:
        return plan
    api = api or HfApi(token=token)
    if not (api.token or get_token()):
        raise HubPushError(NO_TOKEN_MESSAGE)
    total = len(plan.repos)
    for done, repo in enumerate(plan.repos):
        with _hub_errors(repo.repo_id, f" ({done} of {total} repositories pushed)"):
            api.create_repo(repo.repo_id, repo_type="model", private=private, exist_ok=True)
            api.create_commit(
                repo.repo_id,
                [planned.operation() for planned in repo.files],
                commit_message=f"Upload {repo.variant} of an hf_oscq export",
                repo_type="model",
            )
        logger.info("Pushed %s (%d files)", repo.repo_id, len(repo.files))
    target = f"{plan.collection_namespace}/collection {plan.collection_title!r}"
    with _hub_errors(target, f" (all {total} repositories pushed, collection not complete)"):
        collection = api.create_collection(
            plan.collection_title,
            namespace=plan.collection_namespace,
            description=plan.collection_description,
            private=private,
            exists_ok=True,
        )
        for repo in plan.repos:
            api.add_collection_item(collection.slug, repo.repo_id, "model", note=repo.note, exists_ok=True)
    logger.info("Collection: https://huggingface.co/collections/%s", collection.slug)
    return plan
