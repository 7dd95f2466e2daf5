"""star_export.deploy checks that need no Triton server: the tensorrt_plan repository refuses engines
whose optimization profile does not start at batch 1 (Triton sends batch-1 requests); `triton`
refuses a bf16 export (the pipeline cannot carry bfloat16)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import as_bf16_copy

from star_export import deploy
from star_export.contract import contract_from_dict
from star_export.engines import profile_json, profile_shapes
from star_export.errors import UsageError


def _engines(source: Path, manifest: dict, min_batch: int | None) -> dict:
    """Engine entries as ``build`` records them (profile 0 from the contract, batch from
    ``min_batch``), pointing at stand-in files that are NOT engines (the repository is never served)."""
    engines = {}
    for g in ("prefill", "decode"):
        fake = source / f"FAKE-{g}-not-an-engine.plan"
        fake.write_bytes(b"stand-in for a profile check, not a TensorRT engine\n")
        contract = contract_from_dict(manifest["graphs"][g])
        entry = {"path": fake.name, "graph": g, "tensorrt": "none (fake)", "sha256": "0" * 64}
        if min_batch is not None:
            over = {"batch": (min_batch, max(min_batch, 2), 4)}
            entry["profiles"] = [{"inputs": profile_json(profile_shapes(contract, over))}]
        engines[g] = entry
    return engines


@pytest.fixture(scope="module")
def export(cli_export) -> Path:
    return cli_export("llava-keep16", "--keep", "16")


def _with_engines(export: Path, target: Path, min_batch: int | None) -> Path:
    shutil.copytree(export, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["engines"] = _engines(target, manifest, min_batch)
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


def test_tensorrt_repository_refuses_a_profile_above_batch_1(export, tmp_path):
    source = _with_engines(export, tmp_path / "export", min_batch=2)
    with pytest.raises(UsageError) as e:
        deploy.write_repository(source, tmp_path / "repo", "tensorrt")
    msg = str(e.value)
    assert "\n" not in msg and "prefill engine's optimization profile 0 starts at batch 2" in msg
    assert "--min-batch 1" in msg and not (tmp_path / "repo").exists()


def test_cli_exit_code_2_one_line(export, tmp_path, capsys):
    from star_export.cli import main

    source = _with_engines(export, tmp_path / "export", min_batch=3)
    code = main(["triton", "--from", str(source), "--repo", str(tmp_path / "r"), "--backend", "tensorrt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "starts at batch 3" in err[0]


@pytest.mark.parametrize("min_batch", [1, None])  # None: an older manifest without profiles
def test_tensorrt_repository_with_batch_1_profiles(export, tmp_path, min_batch):
    source = _with_engines(export, tmp_path / "export", min_batch=min_batch)
    repo = deploy.write_repository(source, tmp_path / "repo", "tensorrt")
    if min_batch is not None:
        assert repo.limits["batch"] == 4  # the profile's max batch
    assert (tmp_path / "repo" / "prefill" / "1" / "model.plan").is_file()


def _as_bf16(export: Path, target: Path) -> Path:
    return as_bf16_copy(export, target)


def test_triton_refuses_a_bf16_export_in_one_line(cli_export, tmp_path, capsys):
    """The Triton pipeline cannot carry bfloat16 (pb_utils.Tensor; numpy has no bfloat16): ``triton``
    refuses a bf16 export, exit 2, one line, nothing written; the same export in fp16 is served."""
    from star_export.cli import main

    fp16 = cli_export("llava-keep16-fp16", "--keep", "16", "--dtype", "fp16")  # shared with test_half
    source = _as_bf16(fp16, tmp_path / "bf16")
    code = main(["triton", "--from", str(source), "--repo", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "a bf16 export cannot be served by the Triton pipeline" in err[0] and "--dtype fp16" in err[0]
    assert "graphs decode, prefill" in err[0] and not (tmp_path / "r").exists()
    with pytest.raises(UsageError, match="bf16 export"):
        deploy.write_repository(source, tmp_path / "r", "onnxruntime")
    repo = deploy.write_repository(fp16, tmp_path / "r16", "python")
    config = (tmp_path / "r16" / "prefill" / "config.pbtxt").read_text()
    assert repo.backend == "python" and "TYPE_FP16" in config
