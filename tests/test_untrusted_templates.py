"""Spec templates are untrusted: sandboxed, alone (no other files), bounded in size, steps and time."""

from pathlib import Path

import pytest

from engine.errors import SpecError
from engine.spec import SpecLimits, load_spec_file

ENTRY = "entries:\n  - name: norm\n    kernel: rms_norm\n    target: {module_class: LlamaRMSNorm}\n"

ESCAPES = [
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ joiner.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "{{ namespace.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch MARKER') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ range.__self__.globals }}",
    "{% set x = cycler.__init__.__globals__.os %}{{ x.system('touch MARKER') }}",
]


def _template(tmp_path: Path, body: str, name: str = "t.yaml.j2") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(SpecError) as err:
        load_spec_file(path, **kwargs)
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    return message


@pytest.mark.parametrize("attack", ESCAPES)
def test_sandbox_escapes_run_nothing(tmp_path, monkeypatch, attack):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    _error(_template(tmp_path, attack.replace("MARKER", str(marker)) + "\nname: x\nmodel_types: [x]\n" + ENTRY))
    assert not marker.exists(), "a template ran a shell command"


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("{% include '/etc/hostname' %}", "include"),
        ("{% include 'sibling.yaml' %}", "include"),
        ("{% import 'sibling.yaml' as s %}", "import"),
        ("{% from 'sibling.yaml' import x %}", "import"),
        ("{% extends 'sibling.yaml' %}", "extends"),
        ("{% macro m() %}x{% endmacro %}{{ m() }}", "macros"),
        ("{% set x %}block{% endset %}", "block set"),
        ("{% for x in [1] recursive %}{{ loop([]) }}{% endfor %}", "recursive loop"),
        ("{% set ns = namespace(a=1) %}{% set ns.a = 2 %}", "calls"),
        ("{{ 'x'|center(1000000000) }}", "filter 'center'"),
        ("{{ 'x'.ljust(1000000000) }}", "calls"),
    ],
)
def test_features_beyond_spec_tables_are_refused_with_the_line(tmp_path, body, fragment):
    (tmp_path / "sibling.yaml").write_text("name: s\nmodel_types: [s]\n" + ENTRY)
    message = _error(_template(tmp_path, "# spec\n" + body))
    assert fragment in message and "line 2" in message, message


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "steps"),
        ("{% for a in range(200) %}{% for b in range(200) %}{{ 'y' * 100 }}{% endfor %}{% endfor %}", "output"),
        ("{{ 'a' * 1000000000 }}", "larger than"),
        ("{{ 10 ** 100000 }}", "integer"),
        ("{{ range(10 ** 12)|list }}", "range"),
        ("{% set a = 'x' * 1000 %}" + "{% set a = a ~ a %}" * 30 + "{{ a|length }}", "longer than"),
        ("{% set a = ['x'] %}" + "{% set a = [a, a] %}" * 40 + "{{ a == a }}", "larger than"),
        ("{% set s = 'x' * 10000 %}{{ s|replace('', s) }}", "longer than"),
        ("{% set s = 'x' * 20000 %}{{ ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i']|join(s) }}", "longer than"),
        ("{{ '%0999999999d' % 1 }}", "formatting"),
    ],
)
def test_runaway_templates_stop_at_a_limit(tmp_path, body, fragment):
    message = _error(_template(tmp_path, body), limits=SpecLimits(template_value=100_000, template_output=100_000))
    assert fragment in message, message


def test_render_time_is_bounded(tmp_path):
    body = "{% set s = 'x' * 100000 %}{% for i in range(100000) %}{% set t = s ~ s %}{% endfor %}"
    limits = SpecLimits(template_seconds=0.05, template_steps=10**9)
    assert "longer than 0.05 s" in _error(_template(tmp_path, body), limits=limits)


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("name: x\n{{ 1 / 0 }}\n", "line 2: ZeroDivisionError"),
        ("name: x\nmodel_types: [{{ missing }}]\n", "line 2: UndefinedError"),
        ("{% for x in %}", "line 1"),
        ("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}", "template error"),
    ],
)
def test_template_errors_name_file_and_line(tmp_path, body, fragment):
    assert fragment in _error(_template(tmp_path, body))


def test_non_utf8_template_is_a_spec_error(tmp_path):
    path = tmp_path / "t.yaml.j2"
    path.write_bytes(b"name: \xff\n")
    assert "not UTF-8" in _error(path)


def test_spec_tables_still_render(tmp_path):
    path = _template(
        tmp_path,
        "{%- set families = [{'name': 'a', 'cls': 'A'}, {'name': 'b', 'cls': 'B'}] -%}\n"
        "{%- for f in families if f.name != 'c' %}\n---\nname: {{ f.name ~ '_' ~ loop.index }}\n"
        "model_types: [{{ f.name|upper|lower }}]\n"
        "entries:\n  - name: norm\n    kernel: rms_norm\n"
        "    target: {module_class: {{ f.cls ~ 'RMSNorm' }}}\n"
        "{%- endfor %}\n",
    )
    specs = load_spec_file(path)
    assert [s.name for s in specs] == ["a_1", "b_2"]
    assert [s.entries[0].target.module_class for s in specs] == ["ARMSNorm", "BRMSNorm"]
