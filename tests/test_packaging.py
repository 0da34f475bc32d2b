"""Packaging: the sdist ships the CUDA C++ sources, a wheel built from it records the extensions it skipped
(transformer/_build_info.py), and that wheel installs into a fresh venv and runs (-m slow)."""
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import types
import zipfile

import pytest

from transformer import backends

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC_SUFFIXES = (".cu", ".cuh", ".cpp", ".h", ".py", ".md")


def _build(srcdir, outdir, *args, **env):
    pytest.importorskip("build")
    run = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(outdir), *args,
                          str(srcdir)], capture_output=True, text=True, env={**os.environ, **env})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdist")
    egg_info = ROOT / "tileformer.egg-info"
    made = not egg_info.exists()
    try:
        _build(ROOT, out, "--sdist")
    finally:
        if made:
            shutil.rmtree(egg_info, ignore_errors=True)
    (path,) = out.glob("tileformer-*.tar.gz")
    return path


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory):
    """A pure-Python wheel (TILEFORMER_SKIP_CUDA_BUILD=1) built from the unpacked sdist."""
    src = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(sdist) as tar:
        tar.extractall(src, filter="data")
    out = tmp_path_factory.mktemp("wheel")
    _build(src / sdist.name[:-len(".tar.gz")], out, "--wheel", TILEFORMER_SKIP_CUDA_BUILD="1")
    (path,) = out.glob("tileformer-*.whl")
    return path


def test_sdist_ships_the_cuda_sources(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    csrc = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.suffix in CSRC_SUFFIXES}
    assert {"csrc/bindings.cpp", "csrc/emu_bindings.cpp", "csrc/attention/fwd.cuh"} <= csrc
    assert csrc - names == set()
    assert {"pyproject.toml", "setup.py", "LICENSE", "README.md", "requirements.txt", "transformer/__init__.py",
            "triton_kernels/__init__.py"} <= names
    assert not [n for n in names if n.startswith(("benchmarks/", "build/", "tests/", ".venv/")) or n.endswith(".so")]
    assert "transformer/_build_info.py" not in names


def test_wheel_records_the_skipped_extensions(wheel):
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        info = whl.read("transformer/_build_info.py").decode()
        metadata = whl.read("tileformer-0.1.0.dist-info/METADATA").decode().splitlines()
    assert "tileformer-0.1.0.dist-info/licenses/LICENSE" in names
    assert [line for line in metadata if line.startswith("Requires-Dist:") and "extra ==" not in line] == [
        "Requires-Dist: torch>=2.11"]
    assert not [n for n in names if n.startswith(("benchmarks/", "tests/", "csrc/"))]
    skipped = {}
    exec(info, skipped)
    assert skipped["SKIPPED"] == dict.fromkeys(["transformer._C", "transformer._C_emu"],
                                               "TILEFORMER_SKIP_CUDA_BUILD=1 (pure-Python install)")


def test_missing_extension_reason_quotes_the_build_record(monkeypatch):
    record = types.ModuleType("transformer._build_info")
    record.SKIPPED = {"transformer._C_emu": "TILEFORMER_SKIP_EMU_BUILD=1"}
    monkeypatch.setitem(sys.modules, "transformer._build_info", record)
    monkeypatch.setitem(backends._import_errors, "transformer._build_info", "")
    monkeypatch.setitem(backends._import_errors, "transformer._C_emu", "transformer._C_emu could not be imported")
    monkeypatch.setenv("TILEFORMER_EMULATE_CUDA", "1")
    assert backends.available()["cuda"] == ("transformer._C_emu could not be imported; "
                                            "not built: TILEFORMER_SKIP_EMU_BUILD=1")


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(wheel, tmp_path):
    """pip installs the wheel and torch (from the configured index) into a new venv; the package imports
    and runs outside the repository."""
    venv = tmp_path / "venv"
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TILEFORMER_EMULATE_CUDA")}
    code = ("import transformer as tf, torch; q = torch.randn(1, 5, 2, 16); print(tf.__file__); "
            "print(*(tuple(tf.flash_attention(q, q, q, backend=b).shape) for b in ('reference', 'torch')))")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", str(wheel)], check=True, env=env)
        run = subprocess.run([py, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    finally:
        shutil.rmtree(venv, ignore_errors=True)   # torch and its CUDA libraries: gigabytes
    file, shapes = run.stdout.splitlines()
    assert file.startswith(str(venv)) and shapes == "(1, 5, 2, 16) (1, 5, 2, 16)"
