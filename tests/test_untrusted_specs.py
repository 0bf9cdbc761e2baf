"""Spec files are untrusted: a function target imports nothing outside ``transformers`` unless the user allows it."""

import sys
import textwrap
from pathlib import Path

import pytest

import engine
from engine.catalog import load_catalog, scan_catalog
from engine.errors import SpecError
from engine.kernels.kinds import KINDS
from engine.planner import Planner
from engine.spec import KernelSpec, SpecEntry, Target, load_spec_file
from engine.testing import tiny_models

MODULE = "engine_test_user_rope"


def _spec_text(function: str, name: str = "mine") -> str:
    return (
        f"name: {name}\nmodel_types: [llama]\nentries:\n"
        f"  - name: rope\n    kernel: rope\n    target: {{function: '{function}'}}\n"
    )


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """An importable module that records being imported by creating a marker file."""
    marker = tmp_path / "IMPORTED"
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / f"{MODULE}.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            Path({str(marker)!r}).touch()
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
            """
        )
    )
    monkeypatch.syspath_prepend(str(code_dir))
    yield marker
    sys.modules.pop(MODULE, None)


def _folder(tmp_path: Path, *files: tuple[str, str]) -> Path:
    folder = tmp_path / "specs"
    folder.mkdir(exist_ok=True)
    for name, text in files:
        (folder / name).write_text(text)
    return folder


def test_function_outside_transformers_is_a_validation_error_not_an_import(tmp_path, user_module):
    folder = _folder(tmp_path, ("mine.yaml", _spec_text(f"{MODULE}.apply_rotary_pos_emb")))
    with pytest.raises(SpecError) as err:
        load_spec_file(folder / "mine.yaml")
    message = str(err.value)
    assert str(folder / "mine.yaml") in message and "spec 'mine'" in message
    assert "entry 0 ('rope'), field 'target.function'" in message and "not allowed" in message
    with pytest.raises(SpecError):
        engine.apply(tiny_models.build("llama"), spec="mine", spec_dirs=[folder], device="cuda", verbose=False)
    assert not user_module.exists() and MODULE not in sys.modules


@pytest.mark.parametrize(
    "function",
    [
        "os.system",
        "subprocess.run",
        "transformers_evil.models.x",
        "transformers..models.x",
        "transformers.models.llama.modeling_llama.apply rotary",
        "transformers.models.llama.modeling_llama.apply_rotary_pos_emb()",
        "transformers.__builtins__.eval",
        "transformers/models/llama.py",
        "apply_rotary_pos_emb",
        ".transformers.x",
    ],
)
def test_disallowed_or_malformed_paths_name_file_spec_entry_and_field(tmp_path, function):
    folder = _folder(tmp_path, ("mine.yaml", _spec_text(function)))
    with pytest.raises(SpecError, match=r"spec 'mine': entry 0 \('rope'\), field 'target.function'"):
        load_spec_file(folder / "mine.yaml")


@pytest.mark.parametrize("module_class", ["Llama RMSNorm", "x.__class__", "a..b", "9Norm"])
def test_malformed_module_class_is_a_validation_error(tmp_path, module_class):
    text = (
        "name: mine\nmodel_types: [llama]\nentries:\n"
        f"  - name: norm\n    kernel: rms_norm\n    target: {{module_class: '{module_class}'}}\n"
    )
    with pytest.raises(SpecError, match="field 'target.module_class'"):
        load_spec_file(_folder(tmp_path, ("mine.yaml", text)) / "mine.yaml")


def test_allow_modules_in_the_api_opts_in(tmp_path, user_module):
    folder = _folder(tmp_path, ("mine.yaml", _spec_text(f"{MODULE}.apply_rotary_pos_emb")))
    model = tiny_models.build("llama")
    result = engine.plan(model, "mine", "cuda", spec_dirs=[folder], allow_modules=[MODULE])
    assert user_module.exists(), "the allowed module is imported by planning"
    assert any(item.entry == "rope" for item in result.skipped)  # the model never calls the user's copy


def test_allow_file_in_the_spec_folder_opts_in_for_that_folder_only(tmp_path, user_module):
    folder = _folder(
        tmp_path,
        ("mine.yaml", _spec_text(f"{MODULE}.apply_rotary_pos_emb")),
        ("engine-allow.toml", f'modules = ["{MODULE}"]\n'),
    )
    assert load_spec_file(folder / "mine.yaml")[0].entries[0].target.function.startswith(MODULE)
    assert "mine" in load_catalog([folder])
    other = tmp_path / "other"
    other.mkdir()
    (other / "theirs.yaml").write_text(_spec_text(f"{MODULE}.apply_rotary_pos_emb", name="theirs"))
    with pytest.raises(SpecError, match="theirs.yaml"):
        load_catalog([folder, other])
    assert not user_module.exists(), "loading imports nothing, even when allowed"


@pytest.mark.parametrize(
    "allow_text, fragment",
    [
        ('modules = ["os; rm -rf /"]\n', "not a dotted path"),
        ('modules = "mypkg"\n', "expected only"),
        ('modules = ["mypkg"]\nspecs = ["x"]\n', "expected only"),
        ("modules = [\n", "cannot parse TOML"),
    ],
)
def test_bad_allow_file_is_a_spec_error_naming_it(tmp_path, allow_text, fragment):
    folder = _folder(tmp_path, ("mine.yaml", _spec_text("transformers.x.y")), ("engine-allow.toml", allow_text))
    with pytest.raises(SpecError) as err:
        load_spec_file(folder / "mine.yaml")
    assert "engine-allow.toml" in str(err.value) and fragment in str(err.value)


def test_a_spec_file_cannot_widen_the_allow_list_itself(tmp_path):
    text = "allow_modules: [os]\n" + _spec_text("os.system")
    with pytest.raises(SpecError, match="allow_modules"):
        load_spec_file(_folder(tmp_path, ("mine.yaml", text)) / "mine.yaml")


def test_planner_refuses_hand_built_targets_outside_the_allow_list(user_module):
    """A spec built without validation (model_construct) still cannot make planning import a module."""
    target = Target.model_construct(function=f"{MODULE}.apply_rotary_pos_emb")
    entry = SpecEntry.model_construct(name="rope", kernel="rope", target=target, devices=None, auto_register=None)
    entry._parsed_options = KINDS["rope"].options()
    hand_built = KernelSpec.model_construct(name="mine", model_types=["llama"], entries=[entry], source=None)
    result = Planner(tiny_models.build("llama"), "cuda", include_manual=True).plan([hand_built])
    assert [s.reason for s in result.skipped if s.entry == "rope"][0].startswith(f"module {MODULE!r} is not allowed")
    assert not user_module.exists() and MODULE not in sys.modules


def test_catalog_lists_what_loads_and_reports_each_bad_file(tmp_path):
    folder = _folder(
        tmp_path,
        ("good.yaml", _spec_text("transformers.models.llama.modeling_llama.apply_rotary_pos_emb", name="good")),
        ("bad1.yaml", _spec_text("os.system", name="bad1")),
        ("bad2.toml", "name = [\n"),
    )
    catalog = scan_catalog([folder, tmp_path / "missing"])
    assert "good" in catalog.specs and "qwen3" in catalog.specs
    reported = " | ".join(str(e) for e in catalog.errors)
    assert "bad1.yaml" in reported and "bad2.toml" in reported and "missing" in reported
    with pytest.raises(SpecError, match=r"missing: spec folder does not exist.*and 2 more"):
        load_catalog([folder, tmp_path / "missing"])


def test_spec_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml: spec file not found"):
        engine.find_spec(tmp_path / "nope.yaml")
