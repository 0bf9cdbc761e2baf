"""Command line: ``engine validate | list | plan | verify | schema``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "kernel_spec.schema.json"


def _cmd_validate(args: argparse.Namespace) -> int:
    from engine.catalog import BUILTIN_SPEC_DIR, spec_dirs, spec_files
    from engine.errors import SpecError
    from engine.spec import load_spec_file

    paths = [Path(p) for p in args.paths] or spec_files(spec_dirs())
    failures = 0
    for path in paths:
        files = spec_files([path]) if path.is_dir() else [path]
        for file in files:
            try:
                specs = load_spec_file(file)
            except SpecError as exc:
                failures += 1
                print(f"FAIL {exc}", file=sys.stderr)
                continue
            shown = file.relative_to(BUILTIN_SPEC_DIR.parent) if file.is_relative_to(BUILTIN_SPEC_DIR.parent) else file
            print(f"ok   {shown}: {', '.join(s.name for s in specs)}")
    return 1 if failures else 0


def _cmd_list(args: argparse.Namespace) -> int:
    from engine.catalog import load_catalog
    from engine.kernels.registry import REGISTRY

    print("kernels:")
    for kernel in REGISTRY.all():
        reason = kernel.unavailable_reason()
        print(f"  {kernel.describe()} -- {'available' if reason is None else 'unavailable: ' + reason}")
    print("specs:")
    for spec in load_catalog(args.spec_dir).values():
        print(f"  {spec.name} ({', '.join(spec.model_types)}) from {spec.source}")
        for entry in spec.entries:
            manual = " [manual]" if entry.auto_register is False else ""
            devices = ", ".join(entry.devices) if entry.devices else "every device with a kernel"
            print(f"    {entry.name}: {entry.kernel} -> {entry.target.label} on {devices}{manual}")
    return 0


def _load_model(args: argparse.Namespace) -> torch.nn.Module:
    from engine.testing.tiny_models import TINY_MODELS, build

    if args.config:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(args.config)
        with torch.device("meta"):
            try:
                return AutoModelForCausalLM.from_config(config)
            except ValueError:
                return AutoModel.from_config(config)
    if args.model not in TINY_MODELS:
        raise SystemExit(f"unknown model {args.model!r}; tiny models: {', '.join(TINY_MODELS)} (or use --config)")
    return build(args.model)


def _cmd_plan(args: argparse.Namespace) -> int:
    from engine.api import plan, preview

    model = _load_model(args)
    report = preview(plan(model, args.spec, args.device, include_manual=args.manual or None, spec_dirs=args.spec_dir))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from engine.verify import verify_family

    standin = contextlib.nullcontext()
    if args.device == "npu" and args.standin:
        from engine.testing.torch_npu_standin import torch_npu_standin

        standin = torch_npu_standin()
    with standin:
        result = verify_family(args.model, args.device, args.spec, dtype=getattr(torch, args.dtype))
    print(result.summary())
    return 0 if result.ok else 1


def _cmd_schema(args: argparse.Namespace) -> int:
    from engine.spec import json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if args.write:
        SCHEMA_PATH.parent.mkdir(exist_ok=True)
        SCHEMA_PATH.write_text(text)
        print(f"wrote {SCHEMA_PATH}")
        return 0
    if args.check:
        current = SCHEMA_PATH.read_text() if SCHEMA_PATH.exists() else ""
        if current != text:
            print(f"{SCHEMA_PATH} is stale: run `engine schema --write`", file=sys.stderr)
            return 1
        print("schema up to date")
        return 0
    print(text, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate spec files (default: every discoverable spec)")
    p.add_argument("paths", nargs="*")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("list", help="list registered kernels and specs")
    p.add_argument("--spec-dir", action="append", default=[])
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("plan", help="show what would be patched on a device")
    p.add_argument("model", nargs="?", default="qwen3", help="tiny model family (see engine.testing)")
    p.add_argument("--config", help="a model config.json folder or hub-style path: planned on meta weights")
    p.add_argument("--device", default=None, help="npu, cuda, xpu, mps or cpu (default: detected)")
    p.add_argument("--spec", default=None)
    p.add_argument("--spec-dir", action="append", default=[])
    p.add_argument("--manual", action="store_true", help="include manual (auto_register: false) entries")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("verify", help="forward+backward parity of a spec on a tiny model")
    p.add_argument("model")
    p.add_argument("--device", default=None)
    p.add_argument("--spec", default=None, help="spec to apply (default: the model's own, manual entries too)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--standin", action="store_true", help="npu: use the CPU stand-in of torch_npu")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("schema", help="print, write or check the JSON Schema of spec files")
    p.add_argument("--write", action="store_true")
    p.add_argument("--check", action="store_true")
    p.set_defaults(func=_cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
