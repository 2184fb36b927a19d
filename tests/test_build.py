"""The build helpers in setup.py and the extension loader's messages."""

import os
import stat
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module_helpers():
    # Import setup.py's helpers without running setup(): compile only the function definitions.
    source = (ROOT / "setup.py").read_text()
    head = source.split("\nsetup(\n")[0].replace("ROOT = Path(__file__)", f"ROOT = Path({str(ROOT / 'setup.py')!r})")
    module = types.ModuleType("graspext_setup_helpers")
    exec(compile(head, "setup.py", "exec"), module.__dict__)
    return module


def _fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho fake\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    (root / "include" / "cuda_runtime.h").write_text("")
    return nvcc


def test_finds_toolkit_behind_wrapper_script(tmp_path, monkeypatch, setup_module_helpers):
    real_nvcc = _fake_toolkit(tmp_path / "cuda-x")
    wrapper_dir = tmp_path / "wrapbin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real_nvcc} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    monkeypatch.setattr(setup_module_helpers.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(setup_module_helpers, "_is_cuda_toolkit",
                        lambda p: p is not None and str(Path(p).resolve()).startswith(str(tmp_path))
                        and (Path(p) / "include" / "cuda_runtime.h").is_file())
    assert setup_module_helpers.find_cuda_home() == str((tmp_path / "cuda-x").resolve())


def test_env_cuda_home_must_be_real_toolkit(tmp_path, monkeypatch, setup_module_helpers):
    """find_cuda_home() checks the folder CUDA_HOME names (bin/nvcc and include/cuda_runtime.h), never trusts it."""
    helpers = setup_module_helpers
    real_check = helpers._is_cuda_toolkit
    checked = []

    def only_under_tmp(p):
        # The machine's own toolkits (/usr/local/cuda, ...) must not answer for the folder under test.
        checked.append(str(p))
        return str(Path(p).resolve()).startswith(str(tmp_path.resolve())) and real_check(p)

    monkeypatch.setattr(helpers, "_is_cuda_toolkit", only_under_tmp)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))  # no nvcc on PATH

    bogus = tmp_path / "not-a-toolkit"
    (bogus / "include").mkdir(parents=True)
    (bogus / "include" / "cuda_runtime.h").write_text("")  # headers, but no bin/nvcc
    monkeypatch.setenv("CUDA_HOME", str(bogus))
    assert helpers.find_cuda_home() is None
    assert checked[0] == str(bogus)  # CUDA_HOME was read, checked first, and refused

    wrapper_dir = tmp_path / "wrapper-only"
    (wrapper_dir / "bin").mkdir(parents=True)
    (wrapper_dir / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (wrapper_dir / "bin" / "nvcc").chmod(0o755)  # an nvcc, but no runtime headers beside it
    monkeypatch.setenv("CUDA_HOME", str(wrapper_dir))
    assert helpers.find_cuda_home() is None

    _fake_toolkit(tmp_path / "tk")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "tk"))
    assert helpers.find_cuda_home() == str((tmp_path / "tk").resolve())

    # What the build does with a bogus CUDA_HOME: GRASPEXT_CUDA=1 stops with the toolkit message.
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # as if torch were a CUDA build
    monkeypatch.setenv("GRASPEXT_CUDA", "1")
    monkeypatch.setenv("CUDA_HOME", str(bogus))
    with pytest.raises(SystemExit, match="GRASPEXT_CUDA=1 but no CUDA toolkit found"):
        helpers._configure_cuda()
    monkeypatch.setenv("GRASPEXT_CUDA", "auto")
    assert helpers._configure_cuda() is False
    assert os.environ["CUDA_HOME"] == str(bogus)  # not replaced by anything

    # A CUDA_HOME that passes the check is the one whose nvcc is asked for its release.
    tk = tmp_path / "tk"
    monkeypatch.setenv("CUDA_HOME", str(tk))
    monkeypatch.setenv("GRASPEXT_CUDA", "1")
    with pytest.raises(SystemExit, match=r"toolkit at .*tk is release \? but torch was built with CUDA 12\.8"):
        helpers._configure_cuda()  # the fake nvcc prints no release
    (tk / "bin" / "nvcc").write_text('#!/bin/sh\necho "Cuda compilation tools, release 12.8, V12.8.93"\n')
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert helpers._configure_cuda() is True
    assert os.environ["CUDA_HOME"] == str(tk.resolve())


def test_cuda_switch_values(monkeypatch, setup_module_helpers):
    for value, want in [("0", "0"), ("cpu", "0"), ("1", "1"), ("", "auto"), ("auto", "auto")]:
        monkeypatch.setenv("GRASPEXT_CUDA", value)
        assert setup_module_helpers._cuda_mode() == want
    monkeypatch.setenv("GRASPEXT_CUDA", "maybe")
    with pytest.raises(SystemExit, match="GRASPEXT_CUDA must be one of"):
        setup_module_helpers._cuda_mode()


def test_torch_mismatch_message(monkeypatch):
    from graspext import _extension

    fake = types.SimpleNamespace(torch_version="1.0.0")
    monkeypatch.setattr(_extension, "_build_info", lambda: fake)
    with pytest.raises(_extension.ExtensionMismatchError, match=r"(?s)built against torch 1\.0\.0.*pip install --no-build-isolation"):
        _extension.load()


def test_build_info_recorded():
    import graspext
    from graspext import version

    assert version.torch_version == torch.__version__
    assert graspext.__version__ == version.__version__
    if version.built_with_cuda:
        assert torch._C._dispatch_has_kernel_for_dispatch_key("graspext::score_accumulate_", "CUDA")
