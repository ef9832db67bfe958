"""python -m fxdisag dump: region table and tagged graph; clear errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from fxdisag.cli import main


def test_dump_tiny_family(capsys):
    assert main(["dump", "--model", "olmoe", "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "OlmoeForCausalLM (olmoe), input 1x8" in out
    assert "experts[1]" in out and "router[0]" in out
    assert "call_module[target=model.layers.1.mlp.experts]" in out  # the tagged graph follows the table


def test_dump_registry_model_on_meta(capsys):
    assert main(["dump", "--model", "deepseek-v3", "--layers", "4", "--no-code"]) == 0
    out = capsys.readouterr().out
    assert "input 1x4096" in out and "dense_mlp[2]" in out and "experts[3]" in out and "4096x7168" in out
    assert "call_module" not in out


@pytest.mark.skipif(importlib.util.find_spec("pydot") is not None, reason="pydot installed: the error path is moot")
def test_svg_without_pydot_names_the_package(capsys, tmp_path):
    assert main(["dump", "--model", "mixtral", "--svg", str(tmp_path / "g.svg")]) == 2
    assert "pip install 'fxdisag[dot]'" in capsys.readouterr().err


def test_unknown_model_lists_the_valid_names(capsys):
    assert main(["dump", "--model", "llama-7b"]) == 2
    err = capsys.readouterr().err
    assert "unknown name 'llama-7b'" in err and "deepseek-v3" in err and "qwen3_moe" in err


def test_module_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "fxdisag", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("dump", "plan", "simulate"):
        assert command in out.stdout


def test_svg_is_drawn_colored_by_region(tmp_path):
    pytest.importorskip("pydot")
    import shutil

    if shutil.which("dot") is None:
        pytest.skip("graphviz's dot program is not installed")
    path = tmp_path / "g.svg"
    assert main(["dump", "--model", "mixtral", "--no-code", "--svg", str(path)]) == 0
    svg = path.read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "experts[1]" in svg and "#fd8d3c" in svg  # the experts node in the experts color
