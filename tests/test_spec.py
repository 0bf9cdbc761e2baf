import json
from pathlib import Path

import pytest

import engine
from engine.catalog import BUILTIN_SPEC_DIR, load_catalog, spec_files
from engine.errors import SpecError
from engine.spec import json_schema, load_spec_file
from engine.testing.tiny_models import TINY_MODELS

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = set(TINY_MODELS)  # every tiny model family has a built-in spec


def test_catalog_has_every_family_from_yaml_toml_and_jinja():
    catalog = load_catalog()
    assert set(catalog) >= FAMILIES
    sources = {Path(spec.source.split(" [")[0]).name for spec in catalog.values()}
    assert {"qwen3.toml", "qwen3_moe.yaml", "dense_decoders.yaml.j2"} <= sources


def test_committed_schema_is_current():
    committed = json.loads((ROOT / "schemas" / "kernel_spec.schema.json").read_text())
    assert committed == json_schema(), "schemas/ is stale: run `engine schema --write`"


@pytest.mark.parametrize("path", spec_files([BUILTIN_SPEC_DIR]), ids=lambda p: p.name)
def test_builtin_specs_validate_against_json_schema(path):
    jsonschema = pytest.importorskip("jsonschema")  # installed by the dev extra (CI); absent on the GPU image
    schema = json.loads((ROOT / "schemas" / "kernel_spec.schema.json").read_text())
    for spec in load_spec_file(path):
        jsonschema.validate(spec.model_dump(mode="json", exclude_none=True), schema)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD_ENTRY = "  - name: norm\n    kernel: rms_norm\n    target: {module_class: LlamaRMSNorm}\n"


def test_bad_field_error_names_file_entry_and_field(tmp_path):
    path = _write(
        tmp_path,
        "bad.yaml",
        "name: bad\nmodel_types: [llama]\nentries:\n"
        + GOOD_ENTRY
        + "  - name: broken\n    kernel: rms_norm\n    target: {module_class: X}\n    devices: [tpu]\n",
    )
    with pytest.raises(SpecError) as err:
        load_spec_file(path)
    message = str(err.value)
    assert str(path) in message and "entry 1 ('broken')" in message and "field 'devices.0'" in message


def test_unknown_kernel_is_named(tmp_path):
    path = _write(
        tmp_path,
        "bad.yaml",
        "name: bad\nmodel_types: [llama]\nentries:\n"
        "  - name: x\n    kernel: flash_magic\n    target: {module_class: X}\n",
    )
    with pytest.raises(SpecError, match="unknown kernel 'flash_magic'.*rms_norm"):
        load_spec_file(path)


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ("  - name: x\n    kernel: rope\n    target: {module_class: X}\n", "use target.function"),
        (
            "  - name: x\n    kernel: rms_norm\n    target: {module_class: X, function: transformers.a.b}\n",
            "exactly one",
        ),
        (
            "  - name: x\n    kernel: rms_norm\n    target: {module_class: X}\n    options: {offset: 1}\n",
            "offset",
        ),
        (
            "  - name: x\n    kernel: rms_norm\n    target: {module_class: X}\n    transformers: 'banana'\n",
            "not a version range",
        ),
        ("  - name: x\n    kernel: rms_norm\n    target: {module_class: X}\n    colour: red\n", "colour"),
    ],
)
def test_malformed_entries_are_rejected(tmp_path, entry, fragment):
    path = _write(tmp_path, "bad.yaml", "name: bad\nmodel_types: [llama]\nentries:\n" + entry)
    with pytest.raises(SpecError, match=fragment):
        load_spec_file(path)


def test_duplicate_entry_names_and_unparsable_files(tmp_path):
    dup = _write(tmp_path, "dup.yaml", "name: d\nmodel_types: [llama]\nentries:\n" + GOOD_ENTRY + GOOD_ENTRY)
    with pytest.raises(SpecError, match="duplicate entry name 'norm'"):
        load_spec_file(dup)
    broken = _write(tmp_path, "broken.toml", "name = [unclosed")
    with pytest.raises(SpecError, match="cannot parse"):
        load_spec_file(broken)
    with pytest.raises(SpecError, match="unsupported spec file type"):
        load_spec_file(_write(tmp_path, "spec.json", "{}"))


def test_jinja_template_renders_several_specs_and_reports_template_errors(tmp_path):
    good = _write(
        tmp_path,
        "fam.yaml.j2",
        "{% for n in ['a', 'b'] %}\n---\nname: {{ n }}\nmodel_types: [{{ n }}]\n"
        "entries:\n" + GOOD_ENTRY + "{% endfor %}\n",
    )
    assert [s.name for s in load_spec_file(good)] == ["a", "b"]
    bad = _write(tmp_path, "oops.yaml.j2", "name: {{ missing_variable }}\n")
    with pytest.raises(SpecError, match="template error"):
        load_spec_file(bad)


def test_user_spec_dir_is_discovered_and_overrides(tmp_path, monkeypatch):
    _write(
        tmp_path,
        "llama.yaml",
        "name: llama\ndescription: mine\nmodel_types: [llama]\nentries:\n" + GOOD_ENTRY,
    )
    monkeypatch.setenv("ENGINE_KERNEL_SPECS", str(tmp_path))
    assert load_catalog()["llama"].description == "mine"


def test_unknown_spec_name_lists_available():
    with pytest.raises(SpecError, match="no spec named 'nope'.*qwen3_moe"):
        engine.find_spec("nope")


def test_spec_given_as_a_dict_is_validated_like_a_file():
    from engine.testing import tiny_models

    model = tiny_models.build("llama")
    entry = {"name": "norms", "kernel": "rms_norm", "target": {"module_class": "LlamaRMSNorm"}}
    handle = engine.apply(model, spec={"name": "mine", "model_types": ["llama"], "entries": [entry]}, device="npu")
    assert [item.entry for item in handle.report.patched] + [s.entry for s in handle.report.skipped] == ["norms"]
    handle.revert()
    bad = {"name": "mine", "model_types": ["llama"], "entries": [{**entry, "kernel": "rms_nrom"}]}
    with pytest.raises(
        SpecError, match=r"^<spec dict>: spec 'mine': entry 0 \('norms'\), field 'kernel': unknown kernel 'rms_nrom'"
    ) as info:
        engine.apply(model, spec=bad)
    assert "\n" not in str(info.value)


def test_entry_options_changed_after_validation_are_parsed_again():
    """``model_copy(update=...)`` and assignment skip pydantic validation; the parsed options must follow."""
    from engine.catalog import find_spec

    entry = next(e for e in find_spec("qwen3").entries if e.kernel == "rms_norm")
    assert entry.parsed_options.weight_offset == 0.0
    copied = entry.model_copy(update={"options": {"weight_offset": 1.0, "casting": "gemma"}})
    assert (copied.parsed_options.weight_offset, copied.parsed_options.casting) == (1.0, "gemma")
    assert entry.parsed_options.weight_offset == 0.0  # the original keeps its own
    copied.options["casting"] = "mistral"
    with pytest.raises(SpecError, match=r"entry 'rms_norm' \(rms_norm\): field 'options.casting'"):
        copied.parsed_options  # noqa: B018
