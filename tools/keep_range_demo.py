"""Issue #24's measurement on the shipped demo model (N = 144): ``llava --keep 16:128`` exports ONE
prefill graph; at keep 16, 64 and 128 its greedy answers through the ``generate`` command, the Python
API and a real tritonserver must equal, token for token, those of the constant-K export of that keep.

    python tools/keep_range_demo.py --out /tmp/krd --json bench/results/keep_range_demo.json

Prints one row per (keep, path) and exits 1 on any mismatch. The tests check the same at 8:16:32 on
llava-tiny (tests/test_keep_range.py, tests/test_triton.py); this is the range the issue names, on
the model that answers.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

KEEPS = (16, 64, 128)
QUESTIONS = 6  # test-split questions, one per kind
MAX_NEW = 8


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="work directory (exports, repository, logs)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)

    from star_export.bench.load import Request, run_requests
    from star_export.demo import scenes
    from star_export.deploy import write_repository
    from star_export.deploy.server import TritonServer, free_port
    from star_export.session import load_export

    out = args.out
    exports = {"range": out / "range", "levels": out / "levels"}
    for name, keep in (("range", "16:128"), ("levels", ",".join(map(str, KEEPS)))):
        if not (exports[name] / "manifest.json").is_file():
            cmd = [sys.executable, "-m", "star_export", "llava", "--keep", keep, "--out", str(exports[name])]
            cmd += [] if name == "range" else ["--skip-validation"]
            subprocess.run(cmd, check=True)
    samples = list(scenes.samples(0, "test", QUESTIONS))
    images = [scenes.render(s.scene, 168) for s in samples]
    prompts = [s.question for s in samples]
    ranged, fixed = load_export(exports["range"]), load_export(exports["levels"])
    rows, ok = [], True

    def row(keep: int, path: str, got: list[list[int]], want: list[list[int]], answers: list[str]) -> None:
        nonlocal ok
        same = got == want
        ok &= same
        rows.append({"keep": keep, "path": path, "token_exact": same, "answers": answers})
        print(f"keep {keep:4d}  {path:34s} token-exact with the constant-K export: {same}  {answers}")

    expected = {}
    for keep in KEEPS:
        want = fixed.generate(images, prompts, max_new_tokens=MAX_NEW, keep=keep)
        expected[keep] = want.result.tokens
        got = ranged.generate(images, prompts, max_new_tokens=MAX_NEW, keep=keep)
        row(keep, "Python API (load_export)", got.result.tokens, want.result.tokens, got.answers)
        image_file = out / "q0.png"
        images[0].save(image_file)
        cli = []
        for src in (exports["range"], exports["levels"]):
            r = subprocess.run(
                [sys.executable, "-m", "star_export", "generate", "--from", str(src), "--keep", str(keep),
                 "--image", str(image_file), "--prompt", prompts[0], "--max-new-tokens", str(MAX_NEW), "--json"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            cli.append(json.loads(r.stdout)["tokens"][0])
        row(keep, "generate command (first question)", [cli[0]], [cli[1]], [])

    repo = out / "repository"
    write_repository(exports["range"], repo, "python", MAX_NEW)
    server = TritonServer(repo, out / "triton")
    port = free_port()
    server.start({"http": free_port(), "grpc": port, "metrics": free_port()})
    try:
        pngs = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            pngs.append(buf.getvalue())
        for keep in KEEPS:
            requests = [Request(png, q, MAX_NEW, keep) for png, q in zip(pngs, prompts, strict=True)]
            outcomes = run_requests(port, requests, 1)
            got = [o.tokens for o in outcomes]
            want = [[t for t in row_tokens if t >= 0] for row_tokens in expected[keep]]
            row(
                keep,
                "tritonserver (one prefill model)",
                got,
                want,
                [o.error or "" for o in outcomes if o.error],
            )
    finally:
        server.stop()
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")
    print("all token-exact" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
