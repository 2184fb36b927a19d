"""The build helpers in setup.py and the extension loader's messages."""

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
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # no bin/nvcc there
    assert not setup_module_helpers._is_cuda_toolkit(tmp_path)
    _fake_toolkit(tmp_path / "tk")
    assert setup_module_helpers._is_cuda_toolkit(tmp_path / "tk")


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
