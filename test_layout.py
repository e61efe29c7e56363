"""Tests of the project's layout: the import graph runs downward, every reference resolves, modules stay readable.

    python test_layout.py       # prints the import graph, layer by layer
"""
import ast
import os
import re

ROOT = os.path.dirname(os.path.abspath(__file__))

# The architecture, bottom up: a module imports only modules of lower layers. A new module gets a layer here.
LAYERS = [
    ["sde", "batching", "parallel", "files", "render", "plots", "world"],  # math, bookkeeping, I/O, the interface
    ["stepgrpo", "lora", "toy", "sd3", "tracking"],  # the method; the pieces and worlds it runs on
    ["clip_scorers", "imagereward", "unifiedreward", "ocr"],  # the reward models
    ["rewards", "evaluate"],  # the rewards by name; the held-out measurements
    ["config"],  # the flags
    ["runs"],  # a run: built from the flags, logged, checkpointed, evaluated
    ["train"],  # the loop
    ["bench", "bench_sd3", "snr"],  # scripts that run the loop
]


def modules():
    """The project's Python modules (tests and conftest aside), by name."""
    names = [f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")]
    return sorted(n for n in names if not n.startswith("test_") and n != "conftest")


def imports(name):
    """The project modules that `name` imports anywhere in its file, a function's body included."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(modules())


def test_every_module_imports_only_modules_below_it():
    """No import circle: each module sits in a layer of LAYERS and imports only modules of lower layers."""
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    assert set(layer) == set(modules()), f"give these modules a layer: {set(modules()) ^ set(layer)}"
    upward = [(name, other) for name in modules() for other in imports(name) if layer[other] >= layer[name]]
    assert not upward, f"imports at or above the importer's own layer (a circle, or one waiting): {upward}"


def method_sections_and_choices():
    """The § numbers of METHOD.md's sections and the numbers of its list of choices (§7)."""
    text = open(os.path.join(ROOT, "METHOD.md")).read()
    sections = {int(n) for n in re.findall(r"^## §(\d+)\.", text, re.M)}
    choices_part = text.split("## §7.")[1].split("## §8.")[0]
    choices = [int(n) for n in re.findall(r"^(\d+)\. \*\*", choices_part, re.M)]
    return sections, choices


def numbers(text):
    """2 -> [2]; 2-4 -> [2, 3, 4]; '1 and 2' or '1, 2' -> [1, 2]."""
    found = []
    for first, last in re.findall(r"(\d+)(?:-(\d+))?", text):
        found += range(int(first), int(last or first) + 1)
    return found


def references():
    """Every (file, line, kind, number) the project's code and documents cite: §n of METHOD.md, or choice n."""
    files = [f for f in os.listdir(ROOT) if f.endswith((".py", ".md"))]
    cited = []
    for f in files:
        for i, line in enumerate(open(os.path.join(ROOT, f), encoding="utf-8"), 1):
            for ref in re.findall(r"§(\d+(?:-\d+)?(?:, §\d+)*)", line):
                cited += [(f, i, "section", n) for n in numbers(ref.replace("§", ""))]
            for ref in re.findall(r"\bchoices? (\d+(?:-\d+)?(?:(?:, | and )\d+(?:-\d+)?)*)", line):
                cited += [(f, i, "choice", n) for n in numbers(ref)]
    return cited


def test_every_section_and_choice_cited_exists_in_method_md():
    """Each `§n` and `choice n` in the code and the documents names a section or a choice of METHOD.md: the
    project carries its own method, and one numbering of its choices."""
    sections, choices = method_sections_and_choices()
    assert choices == list(range(1, len(choices) + 1)), f"METHOD.md's choices are not numbered 1..n: {choices}"
    valid = {"section": sections, "choice": set(choices)}
    dangling = [ref for ref in references() if ref[3] not in valid[ref[2]]]
    assert not dangling, f"references to nothing in METHOD.md: {dangling[:5]}"


def test_every_choice_is_cited_where_the_code_makes_it():
    """Each of METHOD.md's choices is cited by at least one module: the list describes the code, not a wish."""
    _, choices = method_sections_and_choices()
    in_code = {n for f, _, kind, n in references() if f.endswith(".py") and kind == "choice"}
    assert set(choices) <= in_code, f"choices no module cites: {sorted(set(choices) - in_code)}"


def test_every_file_a_document_names_is_in_the_repo():
    """Every `name.py` or `NAME.md` the README and METHOD.md mention exists (a path into another repository, such
    as Flow-GRPO's scripts/train_sd3.py, starts with a folder this one lacks)."""
    for doc in ("README.md", "METHOD.md"):
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        named = set(re.findall(r"\b([\w/]+\.(?:py|md))\b", text))
        named = {n for n in named if "/" not in n or os.path.isdir(os.path.join(ROOT, n.split("/")[0]))}
        missing = [n for n in named if not os.path.exists(os.path.join(ROOT, n))]
        assert not missing, f"{doc} names files the repo lacks: {missing}"


def test_modules_stay_under_300_lines_of_at_most_119_characters():
    """A module of more than 300 lines holds two concepts; lines within diffusers' width."""
    for f in sorted(os.listdir(ROOT)):
        if f.endswith(".py"):
            lines = open(os.path.join(ROOT, f), encoding="utf-8").read().splitlines()
            if not f.startswith("test_"):
                assert len(lines) < 300, f"{f} has {len(lines)} lines: split it by concept"
            wide = [i for i, line in enumerate(lines, 1) if len(line) > 119]
            assert not wide, f"{f}: lines {wide} are wider than 119 characters"


if __name__ == "__main__":
    for i, names in enumerate(LAYERS):
        for name in names:
            print(f"layer {i}  {name:10} imports {', '.join(sorted(imports(name))) or '-'}")
