"""Files of a repository: copying models and templates, external weight data, and replacing a
repository directory atomically (staging directory + rename)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from star_export.errors import UsageError

MARKER = "star_export_repository.json"
TEMPLATES = Path(__file__).resolve().parent.parent / "triton_models"  # package data of star_export


def external_data(onnx_path: Path) -> list[Path]:
    """Files an ONNX model's tensors point to (external data), e.g. ``weights.onnx.data`` (one file
    that every graph of an export shares)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    names = set()
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            names |= {e.value for e in t.external_data if e.key == "location"}
    return [onnx_path.parent / n for n in sorted(names)]


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` (metadata kept), creating ``dst``'s folder."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def link_or_copy(src: Path, dst: Path) -> bool:
    """``dst`` as a hard link to ``src`` where the filesystem allows (large weight and engine files
    stored once on disk), else a copy. True when linked. The export replaces its files by rename,
    never in place, so a re-export leaves a linked repository's files as they were."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return True
    except OSError:  # another filesystem, no hard links (EXDEV, EPERM, ...): copy
        shutil.copy2(src, dst)
        return False


def template(name: str) -> Path:
    """A Triton model file shipped as star_export package data (``triton_models/``)."""
    path = TEMPLATES / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: Triton model template missing from the star_export installation "
            "(package data star_export/triton_models/*.py)"
        )
    return path


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_repo_path(repo: Path) -> None:
    """``--repo`` must be absent, empty, or a repository star_export wrote, and writable."""
    if repo.exists() and not repo.is_dir():
        raise UsageError(f"--repo {repo}: exists and is not a directory")
    from star_export.atomic import check_target

    check_target(repo, "--repo")  # a file where a parent folder must be
    if repo.is_dir() and any(repo.iterdir()) and not (repo / MARKER).is_file():
        raise UsageError(
            f"--repo {repo}: exists, is not empty and was not written by star_export; "
            "choose a new path (the whole directory is replaced)"
        )
    probe = repo if repo.exists() else next((p for p in repo.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--repo {repo}: not writable")


def replace_dir(stage: Path, repo: Path) -> None:
    """Move ``stage`` to ``repo`` by rename; an old repository is moved aside first, then removed."""
    old = None
    if repo.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{repo.name}.old-", dir=repo.parent))
        old.rmdir()
        os.rename(repo, old)
    try:
        os.rename(stage, repo)
    except OSError:
        if old is not None:
            os.rename(old, repo)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
