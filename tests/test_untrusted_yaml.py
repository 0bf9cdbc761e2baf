"""YAML and TOML from spec folders and training configs are untrusted: bounded, and every failure names the file."""

import time
from pathlib import Path

import pytest

from engine.errors import SpecError
from engine.spec import SpecLimits, load_spec_file
from engine.testing import tiny_models
from engine.training import apply_training_config, read_training_options


def billion_laughs(levels: int = 9) -> str:
    """Under 1 KB; nine levels of nine aliases each stand for 9**9 (387 million) scalars."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _spec_error(path: Path, **kwargs) -> str:
    with pytest.raises(SpecError) as err:
        load_spec_file(path, **kwargs)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    return message


def test_billion_laughs_is_refused_quickly(tmp_path):
    text = billion_laughs()
    assert len(text) < 1024
    start = time.perf_counter()
    message = _spec_error(_write(tmp_path, "laughs.yaml", text))
    assert "aliases" in message and time.perf_counter() - start < 2.0


def test_aliases_within_the_limit_still_work(tmp_path):
    text = (
        "name: a\nmodel_types: [llama]\nentries:\n"
        "  - {name: one, kernel: swiglu, target: {module_class: LlamaMLP}, when: &silu {hidden_act: silu}}\n"
        "  - {name: two, kernel: swiglu, target: {module_class: MistralMLP}, when: *silu}\n"
    )
    spec = load_spec_file(_write(tmp_path, "ok.yaml", text))[0]
    assert spec.entries[1].when == {"hidden_act": "silu"}


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("deep_flow.yaml", "name: " + "[" * 50_000 + "]" * 50_000, "nested deeper than 32"),
        ("deep_block.yaml", "".join("  " * i + f"k{i}:\n" for i in range(60)) + "  " * 60 + "v\n", "nested deeper"),
        ("deep.toml", "name = " + "[" * 5_000 + "]" * 5_000, "nested deeper than 32"),
        ("recursive.yaml", "name: x\nentries: &e [*e]\n", "recursive alias"),
        ("bigint.yaml", "name: " + "9" * 10_000 + "\n", "digits"),
        ("latin1.yaml", b"name: caf\xe9\nmodel_types: [x]\n", "not UTF-8 text (byte 9, line 1"),
        ("broken.yaml", "name: [unclosed\n", "line 2"),
        ("broken.toml", "name = [unclosed", "cannot parse TOML"),
        ("list.yaml", "- just\n- a list\n", "must be a mapping"),
    ],
)
def test_bad_documents_are_spec_errors_naming_the_file(tmp_path, name, content, fragment):
    assert fragment in _spec_error(_write(tmp_path, name, content))


def test_file_size_is_bounded(tmp_path):
    path = _write(tmp_path, "big.yaml", "# padding\n" * 200)
    assert "larger than 1000 bytes" in _spec_error(path, limits=SpecLimits(file_bytes=1000))


def test_missing_file_is_a_spec_error(tmp_path):
    assert "cannot read" in _spec_error(tmp_path / "missing.yaml")


def test_several_field_errors_stay_on_one_line(tmp_path):
    path = _write(
        tmp_path,
        "two.yaml",
        "name: t\nmodel_types: [x]\nentries:\n"
        "  - {name: a, kernel: nope, target: {module_class: A}}\n"
        "  - {name: b, kernel: rms_norm, target: {module_class: B}, devices: [tpu]}\n",
    )
    message = _spec_error(path)
    assert "entry 0 ('a'), field 'kernel'" in message and "entry 1 ('b'), field 'devices.0'" in message


# --- training YAML -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, fragment",
    [
        (billion_laughs() + "use_v1_kernels: true\n", "aliases"),
        ("use_v1_kernels: maybe\n", "key 'use_v1_kernels'"),
        ("kernel_device: tpu\nuse_v1_kernels: true\n", "key 'kernel_device'"),
        ("kernel_allow_modules: ['os;rm']\n", "key 'kernel_allow_modules'"),
        ("- use_v1_kernels\n", "must be a mapping"),
        ("use_v1_kernels: true\n---\nuse_v1_kernels: false\n", "one YAML document"),
        (b"use_v1_kernels: true # \xff\n", "not UTF-8"),
        ("use_v1_kernels: [\n", "cannot parse YAML"),
    ],
)
def test_bad_training_yaml_is_a_spec_error_naming_the_file(tmp_path, content, fragment):
    path = _write(tmp_path, "train.yaml", content)
    with pytest.raises(SpecError) as err:
        read_training_options(path)
    message = str(err.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message, message


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("use_v1_kernels: true\nkernel_spec: nosuch\n", "key 'kernel_spec': no spec named 'nosuch'"),
        ("use_v1_kernels: true\nkernel_spec_dirs: [/nonexistent/specs]\n", "key 'kernel_spec_dirs'"),
    ],
)
def test_training_yaml_naming_a_missing_spec_or_folder_names_the_key(tmp_path, content, fragment):
    path = _write(tmp_path, "train.yaml", content)
    with pytest.raises(SpecError) as err:
        apply_training_config(tiny_models.build("llama"), path)
    assert str(err.value).startswith(str(path)) and fragment in str(err.value)


def test_missing_training_yaml_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="train.yaml: cannot read"):
        read_training_options(tmp_path / "train.yaml")
