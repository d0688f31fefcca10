"""The README runs as written: every code block is executed here, on the bundled models.

* ``python`` blocks run as they are (they use ``models/micro-llava``).
* ``bash`` blocks: ``make X`` must be a target (``make -n X``); each ``vtprune ...`` command runs in-process
  with ``path/to/...`` placeholders replaced by the bundled or tiny model of the same family and ``cat.jpg``
  by a real image file; the commands that take minutes (a whole sweep, a 0.5 B preset, lmms-eval) run until
  the point where they would start that work, which proves their arguments are accepted; ``python -m
  lmms_eval`` / ``accelerate launch`` lines (checkpoints, GPUs) are checked for what they reference here: the
  ``vtprune`` lmms-eval model and the task directory (tests/test_lmms_eval.py runs that CLI on a bundled model).
* Blocks without a language (the file layout) are not code.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.M | re.S)
PLACEHOLDERS = {
    "path/to/llava-1.5-7b-hf": str(ROOT / "models" / "micro-llava"),
    "path/to/llava-1.5": str(ROOT / "models" / "micro-llava"),
    "path/to/llava-next": "tiny:llava_next",
    "path/to/qwen2.5-vl-3b": "tiny:qwen2_5_vl",
    "path/to/llava-onevision": "tiny:llava_onevision",
}
#: ``clip.mp4`` in a command stands for a shipped synthetic clip (64 frames at 8 fps)
CLIP = ROOT / "eval" / "data" / "clips" / "moving_square.mp4"


class _WouldStartWork(Exception):
    """Raised where a long command would start its real work (its arguments were all accepted)."""


def _commands(language: str) -> list[str]:
    """Commands of the README's blocks in ``language`` (continuation lines joined, comments dropped)."""
    out = []
    for lang, body in BLOCKS:
        if lang != language:
            continue
        joined = body.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _skip_video_without_torchvision(text: str) -> None:
    """README examples with videos need the HF video processors, which need torchvision (the video extra)."""
    if "video" in text:
        try:
            import torchvision  # noqa: F401
        except ImportError:
            pytest.skip("a video example: HF video processors need torchvision (pip install 'vtprune[video]')")


def test_readme_has_the_blocks_this_test_runs():
    assert [lang for lang, _ in BLOCKS].count("python") >= 1
    assert any(c.startswith("vtprune ") for c in _commands("bash"))


@pytest.mark.parametrize("index", range(sum(1 for lang, _ in BLOCKS if lang == "python")))
def test_python_block_runs(index, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = [body for lang, body in BLOCKS if lang == "python"][index]
    _skip_video_without_torchvision(code)
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip()  # the example prints its answer and stats


def _vtprune_commands() -> list[str]:
    return [c for c in _commands("bash") if c.startswith("vtprune ")]


@pytest.fixture
def image_file(tmp_path):
    from vtprune.testing import tiny_image

    path = tmp_path / "cat.jpg"
    tiny_image(3, size=(96, 128)).save(path)
    return path


def _argv(command: str, image: Path, tmp: Path) -> list[str]:
    for placeholder, replacement in PLACEHOLDERS.items():
        command = command.replace(placeholder, replacement)
    argv = shlex.split(command)[1:]
    argv = [str(image) if a == "cat.jpg" else str(CLIP) if a == "clip.mp4" else a for a in argv]
    argv = [str(ROOT / a) if a.startswith("eval/data/") else a for a in argv]  # commands run in a scratch dir
    # the README plots a sweep's output; the command runs in the scratch dir, where there is none: use the committed one
    if argv[0] == "plot" and not (tmp / argv[1]).exists():
        argv[1] = str(ROOT / "eval" / "results" / "micro-bench" / "results.jsonl")
    if argv[0] in ("plot",) and "--out" not in argv:
        argv += ["--out", str(tmp / "plots")]
    return argv


def _is_long(argv: list[str]) -> bool:
    return argv[0] == "eval" or (argv[0] == "bench" and "--list-presets" not in argv)


@pytest.mark.parametrize("command", _vtprune_commands())
def test_vtprune_command_runs(command, image_file, tmp_path, monkeypatch, capsys):
    import vtprune.bench.lmms as lmms
    import vtprune.bench.sweep as sweep
    import vtprune.cli as cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _skip_video_without_torchvision(command)
    argv = _argv(command, image_file, tmp_path)
    # a sweep config names repository paths (run from the repository root, as the README says); other
    # commands run in a scratch directory
    monkeypatch.chdir(ROOT if "--config" in argv else tmp_path)
    if _is_long(argv):
        def would_start(*args, **kwargs):
            raise _WouldStartWork

        monkeypatch.setattr(sweep, "run_sweep", would_start)
        monkeypatch.setattr(cli, "run_sweep", would_start, raising=False)
        monkeypatch.setattr(lmms.subprocess, "call", would_start)
        with pytest.raises(_WouldStartWork):
            cli.main(argv)
        return
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("target", sorted({c.split()[1] for c in _commands("bash") if c.startswith("make ")}))
def test_make_targets_exist(target):
    done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_lmms_eval_lines_reference_what_exists():
    lines = [c for c in _commands("bash") if "lmms_eval" in c]
    assert lines
    pytest.importorskip("lmms_eval")
    from lmms_eval.models import get_model

    from vtprune.bench.lmms import VTPruneLMM

    assert get_model("vtprune") is VTPruneLMM
    import lmms_eval

    package_tasks = Path(lmms_eval.__file__).parent / "tasks"
    for line in lines:
        include = re.search(r"--include_path (\S+)", line)
        for task in re.search(r"--tasks (\S+)", line).group(1).split(","):
            if include:  # the project's own task
                assert (ROOT / include.group(1) / task).is_dir(), (include.group(1), task)
            else:  # one of lmms-eval's task configs (a task name, or a yaml file of that name)
                assert any(package_tasks.glob(f"*/{task}.yaml")) or (package_tasks / task).is_dir(), task


def test_methods_table_is_the_registrys():
    """`vtprune methods` and the README print one table, generated from the registry."""
    from vtprune.registry import methods_markdown

    assert methods_markdown() in README


def test_methods_command_prints_the_table_and_reachable_budgets(capsys):
    import vtprune.cli as cli
    from vtprune.registry import methods_markdown

    assert cli.main(["methods"]) == 0
    assert capsys.readouterr().out == methods_markdown()
    assert cli.main(["methods", "--model", "tiny:llava"]) == 0
    out = capsys.readouterr().out
    assert "reachable budgets" in out and "| `divprune` |" in out
    rows = {line.split("|")[1].strip(" `"): line.split("|")[-2].strip() for line in out.splitlines()
            if line.startswith("| `")}
    tokens = int(rows["divprune"].split("–")[1])
    assert rows["divprune"] == f"1–{tokens}"
    lowest_fastv = int(rows["fastv"].split("–")[0])
    assert 1 < lowest_fastv < tokens  # layer 2 keeps every token before it
    assert rows["framefusion"].startswith("decided per input")  # adaptive: no range is claimed
