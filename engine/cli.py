"""Command line: ``engine validate | list | plan | verify | schema``.

A user error (a bad argument, spec, path or environment variable) is one line on stderr and exit code 1
(2 for bad arguments), never a traceback; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import torch

from engine.errors import EngineError, SpecError
from engine.spec.documents import one_line


class UsageError(EngineError):
    """A command-line mistake the message explains."""


USER_ERRORS = (EngineError, ValueError, OSError)
"""What a user's input can cause: the engine's own errors, bad values (devices, verbosity) and unreadable paths."""


def _one_line(exc: BaseException) -> str:
    return one_line(exc) or type(exc).__name__


def _shown(path: Path) -> str:
    from engine.spec import BUILTIN_SPEC_DIR

    root = BUILTIN_SPEC_DIR.parent
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _report(path: Path, check: Callable[[], str]) -> bool:
    """Print ``ok`` with what ``check`` found, or ``FAIL`` with its :class:`SpecError`; whether it passed."""
    try:
        found = check()
    except SpecError as exc:
        print(f"FAIL {_one_line(exc)}", file=sys.stderr)
        return False
    print(f"ok   {_shown(path)}: {found}")
    return True


def _spec_names(file: Path, allow_modules: list[str]) -> str:
    from engine.spec import load_spec_file

    return ", ".join(spec.name for spec in load_spec_file(file, allow_modules=allow_modules))


def _allows(folder: Path) -> str:
    from engine.spec.allow import folder_allowance

    return "allows " + (", ".join(folder_allowance(folder)) or "nothing more")


def _cmd_validate(args: argparse.Namespace) -> int:
    """Validate spec files and folders, reporting every file. An empty folder is a warning; the exit code is 1
    when any file failed or when nothing at all was validated."""
    from engine.catalog import spec_dirs, spec_files
    from engine.spec import ALLOW_FILE, SPEC_SUFFIXES

    results: list[bool] = []
    for path in [Path(p) for p in args.paths] or spec_dirs():
        if not path.exists():
            print(f"FAIL {path}: no such file or folder", file=sys.stderr)
            results.append(False)
            continue
        files = spec_files([path]) if path.is_dir() else [path]
        if path.is_dir() and (path / ALLOW_FILE).is_file() and not _report(path / ALLOW_FILE, partial(_allows, path)):
            results.append(False)
        if not files:
            print(f"engine: warning: {path}: no spec files ({', '.join(SPEC_SUFFIXES)})", file=sys.stderr)
        results += [_report(file, partial(_spec_names, file, args.allow_module)) for file in files]
    failures = results.count(False)
    if failures and len(results) > 1:
        print(f"engine: error: {failures} of {len(results)} checked files failed", file=sys.stderr)
    return 1 if failures or not results else 0


def _cmd_list(args: argparse.Namespace) -> int:
    """Lists every kernel and every spec that loads; bad spec files go to stderr and make the exit code 1."""
    from engine.catalog import scan_catalog
    from engine.kernels.registry import REGISTRY

    print("kernels:")
    for kernel in REGISTRY.all():
        reason = kernel.unavailable_reason()
        print(f"  {kernel.describe()} -- {'available' if reason is None else 'unavailable: ' + reason}")
    catalog = scan_catalog(args.spec_dir, args.allow_module)
    print("specs:")
    for spec in catalog.specs.values():
        print(f"  {spec.name} ({', '.join(spec.model_types)}) from {spec.source}")
        for entry in spec.entries:
            devices = ", ".join(entry.devices) if entry.devices else "every device with a kernel"
            print(f"    {entry.name}: {entry.kernel} -> {entry.target.label} on {devices}{_manual_label(entry)}")
    for error in catalog.errors:
        print(f"engine: error: {_one_line(error)}", file=sys.stderr)
    return 1 if catalog.errors else 0


def _manual_label(entry: Any) -> str:
    """`` [manual]`` where the planner's one rule (``is_automatic``) leaves the entry to explicit use, per device."""
    from engine.kernels.registry import REGISTRY
    from engine.planner import is_automatic

    kernels = [
        kernel
        for device in REGISTRY.devices_for(entry.kernel)
        if (kernel := REGISTRY.get(entry.kernel, device)) is not None and (not entry.devices or device in entry.devices)
    ]
    manual_on = [str(kernel.device) for kernel in kernels if not is_automatic(entry, kernel)]
    if not manual_on:
        return ""
    return " [manual]" if len(manual_on) == len(kernels) else f" [manual on {', '.join(manual_on)}]"


def _tiny_model(name: str) -> torch.nn.Module:
    from engine.testing.tiny_models import TINY_MODELS, build

    if name not in TINY_MODELS:
        raise UsageError(f"unknown model {name!r}; tiny models: {', '.join(TINY_MODELS)}")
    return build(name)


def _config_model(path: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if path.startswith((".", "~", "/")) and not Path(path).expanduser().is_dir():
        raise UsageError(f"--config {path}: no such folder (give a folder holding config.json, or a hub model id)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--config {path}: cannot load a model config: {reason}") from exc
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            return AutoModel.from_config(config)


def _cmd_plan(args: argparse.Namespace) -> int:
    from engine.api import plan, preview

    model = _config_model(args.config) if args.config else _tiny_model(args.model)
    result = plan(
        model,
        args.spec,
        args.device,
        include_manual=args.manual or None,
        spec_dirs=args.spec_dir,
        allow_modules=args.allow_module,
    )
    report = preview(result)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0


def _nothing_to_verify(args: argparse.Namespace) -> str | None:
    """Why verifying would patch nothing (each skipped entry's reason), or ``None`` when something patches."""
    from engine.api import plan

    result = plan(_tiny_model(args.model), args.spec or args.model, args.device, include_manual=True)
    if result.patches:
        return None
    by_reason: dict[str, list[str]] = {}
    for skipped in result.skipped:
        by_reason.setdefault(skipped.reason, []).append(skipped.entry)
    reasons = "; ".join(f"{', '.join(entries)}: {reason}" for reason, entries in by_reason.items()) or "no entries"
    hint = " (pass --standin for the CPU stand-in of torch_npu)" if args.device == "npu" and not args.standin else ""
    return f"verify {args.model} on {result.device}: nothing would be patched{hint}: {reasons}"


def _cmd_verify(args: argparse.Namespace) -> int:
    from engine.verify import verify_family

    standin: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if args.device == "npu" and args.standin:
        from engine.testing.torch_npu_standin import torch_npu_standin

        standin = torch_npu_standin()
    with standin:
        reason = _nothing_to_verify(args)
        if reason:
            raise UsageError(reason)
        result = verify_family(args.model, args.device, args.spec, dtype=getattr(torch, args.dtype))
    print(result.summary())
    return 0 if result.ok else 1


def _cmd_schema(args: argparse.Namespace) -> int:
    from engine.spec import SCHEMA_PATH, json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if args.write:
        SCHEMA_PATH.parent.mkdir(exist_ok=True)
        SCHEMA_PATH.write_text(text)
        print(f"wrote {SCHEMA_PATH}")
        return 0
    if args.check:
        current = SCHEMA_PATH.read_text() if SCHEMA_PATH.exists() else ""
        if current != text:
            raise UsageError(f"{SCHEMA_PATH} is stale: run `engine schema --write`")
        print("schema up to date")
        return 0
    print(text, end="")
    return 0


def _device(value: str) -> str:
    from engine.device import validate_device

    try:
        return str(validate_device(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("device: ")) from None


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line (argparse would print the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=(func.__doc__ or help).strip())
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
        p.set_defaults(func=func)
        return p

    def allow(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--allow-module",
            action="append",
            default=[],
            metavar="MODULE",
            help="also allow function targets in this module and its submodules (default: transformers only)",
        )

    p = command("validate", _cmd_validate, "validate spec files (default: every discoverable spec folder)")
    p.add_argument("paths", nargs="*", help="spec files or folders; an empty folder warns and fails")
    allow(p)

    p = command("list", _cmd_list, "list registered kernels and specs")
    p.add_argument("--spec-dir", action="append", default=[])
    allow(p)

    p = command("plan", _cmd_plan, "show what would be patched on a device")
    p.add_argument("model", nargs="?", default="qwen3", help="tiny model family (see engine.testing)")
    p.add_argument("--config", help="a model config.json folder or hub-style path: planned on meta weights")
    p.add_argument("--device", type=_device, default=None, help="npu, cuda, xpu, mps or cpu (default: detected)")
    p.add_argument("--spec", default=None)
    p.add_argument("--spec-dir", action="append", default=[])
    p.add_argument("--manual", action="store_true", help="include manual (auto_register: false) entries")
    p.add_argument("--json", action="store_true")
    allow(p)

    p = command("verify", _cmd_verify, "forward+backward parity of a spec on a tiny model")
    p.add_argument("model")
    p.add_argument("--device", type=_device, default=None)
    p.add_argument("--spec", default=None, help="spec to apply (default: the model's own, manual entries too)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--standin", action="store_true", help="npu: use the CPU stand-in of torch_npu")

    p = command("schema", _cmd_schema, "print, write or check the JSON Schema of spec files")
    p.add_argument("--write", action="store_true")
    p.add_argument("--check", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine import log

    args = build_parser().parse_args(argv)
    try:
        log.threshold()  # a bad ENGINE_VERBOSITY fails here, in one line, before any work
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"engine: error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
