"""Every code block of README.md and docs/ as written (issue 20, item 2).

Shell blocks: each command parses with the parser that would run it (the CLI, a script in
scripts/, a make target, the package's extras); nothing runs. Python blocks: each compiles,
and each file's blocks run in order in one fresh process, with a tiny random-weight FLUX
pipeline standing in for the hub id ``black-forest-labs/FLUX.1-dev`` (offline), and CUDA
read as the CPU. Blocks that need weights no test can have are named in ``NOT_RUN`` with
the reason, and still compile.
"""

import argparse
import runpy
import subprocess
import sys
import textwrap
from importlib.metadata import metadata

import pytest

from docs_blocks import DOC_FILES, ROOT, blocks, commands

SHELL = {"bash", "sh", "shell", "console"}
KNOWN = {"ertacache", "python", "torchrun", "make", "pip"}
ALL = [b for f in DOC_FILES for b in blocks(f)]
NOT_RUN = {
    "OpenSoraVelocity(stdit": "needs Open-Sora 1.2's STDiT3 and its weights",
}
"""A marker in a Python block's text, and why the block only compiles."""


class Parsed(Exception):
    """Raised once a command's arguments parsed: the command would run as written."""


def shell_commands():
    out = []
    for path, line, lang, text in ALL:
        if lang in SHELL or lang == "":
            for args in commands(text):
                if lang in SHELL or args[0].rsplit("/", 1)[-1] in KNOWN:
                    out.append(pytest.param(args, id=f"{path.name}:{line}:{' '.join(args[:3])}"))
    return out


def python_files():
    return sorted({path for path, _, lang, _ in ALL if lang == "python"})


def test_the_docs_have_blocks_of_each_kind():
    langs = {lang for _, _, lang, _ in ALL}
    assert {"python", "bash"} <= langs and len(shell_commands()) >= 20


@pytest.mark.parametrize("args", shell_commands())
def test_shell_command_parses_as_written(args, monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse(self, argv=None, namespace=None):
        original(self, argv, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    while "=" in args[0] and not args[0].startswith("-"):  # VAR=value before the command
        args = args[1:]
    if args[0].endswith(("/ertacache", "/python")):  # .venv/bin/ertacache
        args = [args[0].rsplit("/", 1)[1], *args[1:]]
    if args[0] == "torchrun":
        assert "-m" in args, args
        args = args[args.index("-m") + 1:]
    if args[:2] == ["python", "-m"]:
        args = args[2:]
    prog = args[0]
    if prog == "ertacache":
        from ertacache.app.cli import main

        with pytest.raises((Parsed, SystemExit)) as done:  # --help exits 0 once parsed
            main(args[1:])
        assert done.type is Parsed or done.value.code == 0, f"{args}: exit {done.value}"
    elif prog.startswith(("ertacache.", "training.")):  # python -m training.train_digits ...
        monkeypatch.setattr(sys, "argv", [prog, *args[1:]])
        with pytest.raises(Parsed):
            runpy.run_module(prog, run_name="__main__")
    elif prog == "python":
        script = ROOT / args[1]
        assert script.is_file() and script.parent.name == "scripts", f"not a script of the repository: {args[1]}"
        monkeypatch.setattr(sys, "argv", [str(script), *args[2:]])
        monkeypatch.syspath_prepend(str(script.parent))  # as `python scripts/x.py` puts the script's folder first
        with pytest.raises(Parsed):
            runpy.run_path(str(script), run_name="__main__")
    elif prog == "make":
        targets = {line.split(":")[0] for line in (ROOT / "Makefile").read_text().splitlines()
                   if line and not line[0].isspace() and ":" in line}
        assert all(t in targets for t in args[1:]), f"make targets {args[1:]} not all in {sorted(targets)}"
    elif prog == "pip":
        assert args[1] == "install", args
        extras = set(metadata("ertacache").get_all("Provides-Extra") or [])
        for spec in args[2:]:
            if spec.startswith(".["):
                asked = set(spec[2:spec.index("]")].split(","))
                assert asked <= extras, f"extras {sorted(asked - extras)} are not among the package's {sorted(extras)}"
    else:
        pytest.fail(f"unknown command in a shell block: {' '.join(args)}")


PRELUDE = '''
import torch, diffusers
import docs_blocks
# the stand-in stays float32: bfloat16 matmuls and convolutions are emulated on a CPU (5x slower here); the hooks'
# bfloat16 path is tested on the bundled pipeline (test_diffusers_flux.py)
diffusers.FluxPipeline.from_pretrained = classmethod(
    lambda cls, name, torch_dtype=None, **kw: docs_blocks.tiny_flux_text_pipeline())
_to = diffusers.DiffusionPipeline.to
diffusers.DiffusionPipeline.to = lambda self, *a, **kw: _to(self, *[("cpu" if x == "cuda" else x) for x in a],
                                                          **{k: ("cpu" if v == "cuda" else v) for k, v in kw.items()})
pipe = docs_blocks.tiny_flux_text_pipeline()          # what a guide's `pipe` stands for
prompts = ["a red fox in fresh snow", "a lighthouse at dusk"]
prompt = "a sailing boat on a calm lake"
'''


@pytest.mark.parametrize("path", python_files(), ids=lambda p: p.name)
def test_python_blocks_run_as_written(path, tmp_path):
    """One process per file, the blocks in order (later blocks use what earlier ones made)."""
    parts = [PRELUDE]
    for _, line, lang, text in blocks(path):
        if lang != "python":
            continue
        compile(text, f"{path.name}:{line}", "exec")
        why = next((reason for marker, reason in NOT_RUN.items() if marker in text), None)
        parts.append(f"# {path.name}:{line}" + (f" not run: {why}\n" if why else "\n" + text + "\n"))
    program = tmp_path / "blocks.py"
    program.write_text("\n".join(parts))
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "tests"), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(program)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, textwrap.shorten(done.stderr[-4000:], 4000)


def test_the_options_reference_is_the_code():
    """docs/options.md's tables of CalibrationConfig fields and CLI flags are what scripts/options_reference.py makes
    from the dataclass and the parser: a field or flag added, removed or changed shows here."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from options_reference import BEGIN, END, PAGE, reference

    text = PAGE.read_text()
    assert text[text.index(BEGIN):text.index(END) + len(END)] == reference(), \
        "docs/options.md is stale: run python scripts/options_reference.py"
