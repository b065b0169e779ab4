"""The shape of the codebase: no import cycles, no upward imports into the scripts, one
field-to-flag map that matches ModelConfig and the parsers, one error base, no references to
files outside the repository, and a short README."""
import argparse
import ast
import dataclasses
import importlib
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import import_graph  # noqa: E402

from errors import UserError  # noqa: E402
from models.config import CROP_SWITCH, DERIVED_FIELDS, FLAGS, ModelConfig, flag_dest, given_flags  # noqa: E402

SCRIPTS = {"train", "generate", "probe", "demo"}  # entry points: nothing in a package imports them
LIBRARIES = ("models", "training", "sampling", "evaluator", "preprocessing", "loss", "dataset", "samplers",
             "fileio", "seeding", "errors", "provenance", "posthoc_ema", "flagcheck", "devices")
# function-local imports of project modules that stay, each for start-up time or an optional stack
ALLOWED_LOCAL = {
    ("models", "models.sit"), ("models", "models.config"),  # `import models` without timm
    ("models.checkpoint", "models.sit"),  # checkpoint tools (posthoc_ema, dataset checks) load without timm
    ("models.flops", "models.encoders"),  # FLOP counts of SiT alone need no timm
    ("preprocessing.dataset_tools", "preprocessing.convert"),  # convert runs without torch
    ("preprocessing.dataset_tools", "preprocessing.encode"),  # encode alone needs torch + diffusers
    ("benchmarks.bench_sampling", "models.vae"), ("benchmarks.bench_train", "models.encoders"),
    ("benchmarks.reference_paths", "models.sit"),
    ("demo", "generate"), ("experiments.digits_evidence", "probe"),  # scripts imported by scripts, when used
    ("experiments.digits_evidence", "models.checkpoint"), ("experiments.digits_evidence", "models.vae"),
}


@pytest.fixture(scope="module")
def graph():
    return import_graph.graph(ROOT)


def test_no_import_cycles(graph):
    _, edges = graph
    assert import_graph.cycles(edges) == []


def test_cycle_finder_finds_a_planted_cycle():
    edges = {"a": [("b", "top", 1)], "b": [("c", "local", 3)], "c": [("a", "top", 2)], "d": [("a", "top", 1)]}
    assert import_graph.cycles(edges) == [["a", "b", "c"]]
    assert import_graph.cycles(edges, kinds=("top",)) == []


def test_libraries_never_import_the_scripts(graph):
    _, edges = graph
    upward = [(m, t) for m, e in edges.items() for t, _, _ in e
              if m.split(".")[0] in LIBRARIES and t in SCRIPTS]
    assert upward == []


def test_function_local_imports_are_the_listed_ones(graph):
    _, edges = graph
    local = {(m, t) for m, e in edges.items() for t, kind, _ in e if kind == "local"}
    assert local - ALLOWED_LOCAL == set(), "import at module level, or list it here with its reason"
    assert ALLOWED_LOCAL - local == set(), "no longer local: drop it from ALLOWED_LOCAL"


def _parser_flags(parser):
    return {opt for action in parser._actions for opt in action.option_strings}


def _capture_parser(module_name, func="parse_args"):
    """The ArgumentParser a module's parse_args builds (its parse_args call is intercepted)."""
    module = importlib.import_module(module_name)
    captured = {}

    def grab(self, *a, **k):
        captured["parser"] = self
        raise SystemExit(0)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            getattr(module, func)([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


def test_every_config_field_has_its_flag_and_every_flag_its_field():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(FLAGS) == fields
    assert set(DERIVED_FIELDS) <= fields
    train_flags = _parser_flags(_capture_parser("train"))
    for field, flag in FLAGS.items():
        assert flag is None or flag in train_flags, f"{field}: {flag} is not a train.py flag"
    assert CROP_SWITCH[1] in train_flags
    # generate.py and probe.py pass on exactly the config flags they define (the old per-tool maps)
    for tool, argv, expected in [("generate", [], {"model", "num_classes", "qk_norm", "path_type", "encoder_depth"}),
                                 ("probe", ["--ckpt", "c", "--data-dir", "d"], {"model", "path_type"})]:
        parser = _capture_parser(tool)
        defined = {field for field, flag in FLAGS.items()
                   if flag and field not in DERIVED_FIELDS and flag in _parser_flags(parser)}
        assert defined == expected, tool
        assert set(given_flags(argparse.ArgumentParser.parse_args(parser, argv))) == expected, tool


def test_given_flags_reads_exactly_the_direct_fields():
    every = argparse.Namespace(**{flag_dest(f): f"value of {f}" for f in FLAGS.values() if f},
                               random_crop=True, unrelated=1)
    given = given_flags(every)
    direct = {k for k, v in FLAGS.items() if v is not None and k not in DERIVED_FIELDS}
    assert set(given) == direct | {"random_crop"}
    assert given["class_dropout_prob"] == "value of --cfg-prob"
    assert given_flags(argparse.Namespace(model="SiT-B/2", path_type=None)) == {"model": "SiT-B/2",
                                                                              "path_type": None}


def _exception_classes():
    """(module, class name) of every exception class defined outside tests."""
    found = []
    for module, path in import_graph.project_modules(ROOT).items():
        if module.startswith(("benchmarks", "experiments", "scripts")):
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and any(
                    (getattr(b, "id", None) or getattr(b, "attr", "")).endswith(("Error", "Exception", "Missing",
                                                                                 "Full", "Diverged"))
                    for b in node.bases):
                found.append((module, node.name))
    return found


def test_every_exception_a_user_can_cause_derives_from_user_error():
    classes = _exception_classes()
    assert len(classes) >= 15
    for module, name in classes:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, UserError), f"{module}.{name}"


def _project_text_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in import_graph.SKIP_DIRS and not d.startswith(".")]
        for name in files:
            if name.endswith((".py", ".sh", ".md", ".ini", ".txt")):
                yield os.path.join(folder, name)


def test_no_reference_to_files_outside_the_repository_or_issue_numbers():
    pattern = re.compile(r"LSEP[_]SPEC|spec section|\bissues? #?\d+\b", re.IGNORECASE)  # [_]: not itself a hit
    bad = []
    for path in _project_text_files():
        for i, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):
            if pattern.search(line) and os.path.abspath(path) != os.path.abspath(__file__):
                bad.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()[:80]}")
    assert bad == []


def test_docs_pages_named_in_the_code_exist():
    missing = set()
    for path in _project_text_files():
        for page in re.findall(r"docs/[a-z_]+\.md", open(path, encoding="utf-8", errors="replace").read()):
            if not os.path.isfile(os.path.join(ROOT, page)):
                missing.add(page)
    assert missing == set()


def test_readme_is_short_and_train_py_is_wiring():
    assert len(open(os.path.join(ROOT, "README.md")).read().splitlines()) <= 250
    assert len(open(os.path.join(ROOT, "train.py")).read().splitlines()) < 300
