"""The Python API in one script: export the default model at two keep levels, then answer one
question per level from the exported graphs (onnxruntime) and from the PyTorch rewrite.

    python examples/python_api.py [OUT_DIR]        # default: a new temporary directory (printed)

The default model is the shipped demo checkpoint (a small LLaVA trained on synthetic scenes of
shapes: star_export/demo); pass a checkpoint directory or a hub id in the local Hugging Face cache
as ``model`` for a real one. The question is about a scene drawn by the demo's own code.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import star_export
from star_export.demo import scenes

EXAMPLE = 0  # the test split's first question


def main(out: Path) -> int:
    # One prefill graph per keep level, one decode graph, the weights stored once.
    result = star_export.export(None, keep=[32, 64], out=out, validate=False)
    print(f"exported {result.out}/: {', '.join(sorted(result.written))} (scans ok: {result.scan_ok})")

    sample = scenes.sample(seed=0, split="test", index=EXAMPLE)
    prompt = sample.question
    onnx = star_export.load_export(out)  # onnxruntime over the exported graphs
    torch = star_export.load_export(out, runtime="torch")  # the PyTorch rewrite of the same checkpoint
    with tempfile.TemporaryDirectory() as tmp:  # the example image, removed afterwards
        image = Path(tmp) / "api_example.png"
        scenes.render(sample.scene, 168).save(image)
        print(f"{prompt} (the scene's answer: {sample.answer})")
        for keep in (32, 64):
            a = onnx.generate([image], [prompt], max_new_tokens=6, keep=keep)
            b = torch.generate([image], [prompt], max_new_tokens=6, keep=keep)
            same = a.result.tokens == b.result.tokens
            print(f"keep {keep}: {a.answers[0]!r} (onnxruntime == PyTorch rewrite: {same})")
            if not same:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="star_api_out-"))))
