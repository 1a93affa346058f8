"""The package a user installs: the wheel declares what the engine needs, holds no top-level module besides
frugal_loraga, and once installed its CLI runs from any folder, with --help answered without importing torch."""
import email
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the tree: setuptools builds in the source folder, whose build/ could hold stale modules."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "runs", "*.egg-info", "__pycache__",
                                                                 ".whl", "bench", "tests", "docs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, cwd=out)
    return next(out.glob("frugal_loraga-*.whl"))


def test_the_wheel_declares_the_engines_needs_and_only_our_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.message_from_bytes(archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"frugal_loraga"}  # no `kernels` shadowing Hugging Face's, which bitsandbytes imports
    assert "frugal_loraga/kernels/lora.py" in names
    required = {re.split(r"[<>=;\[ ]", r, maxsplit=1)[0].lower() for r in metadata.get_all("Requires-Dist")
                if "extra ==" not in r}
    assert {"torch", "transformers", "peft", "bitsandbytes", "safetensors"} <= required
    assert "triton" not in required  # torch brings the one it was built with
    app = {re.split(r"[<>=;\[ ]", r, maxsplit=1)[0].lower() for r in metadata.get_all("Requires-Dist")
           if "extra == \"app\"" in r}
    assert {"gradio", "pandas"} <= app


def test_installed_cli_runs_from_any_folder_and_help_needs_no_torch(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                    str(target), str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = ("import sys; from frugal_loraga.cli import main\n"
             "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch imported:', 'torch' in sys.modules, 'from:', sys.modules['frugal_loraga'].__file__)")
    shown = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True,
                           check=True).stdout
    assert "--estimation-samples" in shown and "--overwrite" in shown
    assert f"torch imported: False from: {target}" in shown
    module = subprocess.run([sys.executable, "-m", "frugal_loraga", "--help"], cwd=elsewhere, env=env,
                            capture_output=True, text=True)
    script = subprocess.run([str(target / "bin" / "frugal-loraga"), "train", "--lr", "-1", "--data", "x"],
                            cwd=elsewhere, env=env, capture_output=True, text=True)
    assert module.returncode == 0 and "usage: frugal-loraga" in module.stdout
    assert script.returncode == 2
    assert "error: lr must be a positive finite number (at most 3.403e+38), got -1.0" in script.stderr
    api = subprocess.run([sys.executable, "-c", "from frugal_loraga import Config, finetune; "
                          "from frugal_loraga.kernels.lora import lora_add; print(finetune.__module__)"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert api.stdout.strip() == "frugal_loraga.api"
