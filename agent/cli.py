"""Command line: podtap run | tap | check | version."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from agent.config import Config, ConfigError, load_config
from agent.logs import setup_logging


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in units else t
    try:
        value = int(digits) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="podtap", description="Kubernetes log shipper that captures stdout/stderr with eBPF"
    )
    parser.add_argument("--log-level", default=os.environ.get("PODTAP_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the node agent (kubelet discovery, sinks)")
    run.add_argument("--config", "-c", help="YAML configuration file")
    run.add_argument("--dry-run", action="store_true",
                     help="validate the configuration, print it (secrets masked) and exit")

    tap = sub.add_parser("tap", help="print what containers write to stdout/stderr")
    tap.add_argument("--cgroup", action="append", default=[], metavar="PATH",
                     help="cgroup v2 directory (absolute, or relative to the cgroup v2 mount)")
    tap.add_argument("--pid", action="append", default=[], type=int,
                     help="tap the cgroup of this process (its fds 1/2 are the streams)")
    tap.add_argument("--stdout", action="store_true", help="only stdout (with --stderr: both)")
    tap.add_argument("--stderr", action="store_true", help="only stderr (with --stdout: both)")
    tap.add_argument("--format", choices=("text", "json"), default="text")
    tap.add_argument("--max-write", type=_size, help="bytes copied per write (default 1M)")
    tap.add_argument("--max-line", type=_size, help="longer lines are split, marked partial")
    tap.add_argument("--ring-bytes", type=_size, help="ring buffer size (power of two)")
    tap.add_argument("--chunk", type=_size, help="bytes per ring-buffer record at most")
    tap.add_argument("--invalid-utf8", choices=("replace", "base64", "escape"),
                     help="JSON format: lines that are not UTF-8 (base64: exact bytes in "
                          "message_base64; escape: \\udcXX escapes)")
    tap.add_argument("--config", "-c", help="YAML configuration file")

    check = sub.add_parser("check", help="check the node's requirements")
    check.add_argument("--config", "-c", help="YAML configuration file (for "
                       "capture.headers_cache_dir and the PODTAP_* environment)")
    sub.add_parser("config-schema", help="print the JSON Schema of the configuration")
    sub.add_parser("version", help="print the version")
    return parser


def _tap_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    capture, lines = cfg.capture, cfg.lines
    import dataclasses

    if args.max_write is not None:
        capture = dataclasses.replace(capture, max_write=args.max_write)
    if args.ring_bytes is not None:
        capture = dataclasses.replace(capture, ring_bytes=args.ring_bytes)
    if args.chunk is not None:
        capture = dataclasses.replace(capture, chunk=args.chunk)
    if args.invalid_utf8 is not None:
        cfg = dataclasses.replace(
            cfg, records=dataclasses.replace(cfg.records, invalid_utf8=args.invalid_utf8)
        )
    if args.max_line is not None:
        lines = dataclasses.replace(lines, max_line=args.max_line)
    cfg = dataclasses.replace(cfg, capture=capture, lines=lines)
    cfg.validate()
    return cfg


def cmd_tap(args: argparse.Namespace) -> int:
    from agent.lifecycle import tune_runtime
    from agent.tap import TapPipeline, resolve_targets

    if not args.cgroup and not args.pid:
        print("podtap tap: give at least one --cgroup or --pid", file=sys.stderr)
        return 2
    cfg = _tap_config(args)
    targets = resolve_targets(args.cgroup, args.pid)
    both = args.stdout == args.stderr
    pipeline = TapPipeline(
        cfg, targets, stdout=both or args.stdout, stderr=both or args.stderr,
        fmt=args.format, out=sys.stdout.buffer,
    )
    tune_runtime()
    return asyncio.run(pipeline.run())


def cmd_check(args: argparse.Namespace) -> int:
    """Report what the node offers against what the BPF program uses; changes nothing."""
    from agent.capture.host import run_checks

    cfg = load_config(args.config)
    results = run_checks(cfg.capture.headers_cache_dir)
    for r in results:
        mark = "FAIL" if not r.ok else "warn" if r.warning else "ok  "
        print(f"[{mark}] {r.name}: {r.detail}")
        if not r.ok and r.remedy:
            print(f"       remedy: {r.remedy}")
    failed = [r for r in results if not r.ok]
    warned = sum(1 for r in results if r.ok and r.warning)
    print(f"{len(results) - len(failed)} passed ({warned} with warnings), {len(failed)} failed")
    return 1 if failed else 0


def cmd_version(_args: argparse.Namespace) -> int:
    try:
        print(f"podtap {version('podtap')}")
    except PackageNotFoundError:
        print("podtap (not installed)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    setup_logging(args.log_level, cfg.agent.log_format)
    if args.dry_run:
        import yaml

        from agent.config import effective_config

        sys.stdout.write(yaml.safe_dump(effective_config(cfg), sort_keys=False))
        return 0
    from agent.lifecycle import tune_runtime
    from agent.pipeline import AgentPipeline

    pipeline = AgentPipeline(cfg)
    tune_runtime()
    return asyncio.run(pipeline.run())


def cmd_config_schema(_args: argparse.Namespace) -> int:
    import json

    from agent.config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


COMMANDS = {
    "tap": cmd_tap,
    "check": cmd_check,
    "version": cmd_version,
    "run": cmd_run,
    "config-schema": cmd_config_schema,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        setup_logging(args.log_level, "text")
    except ValueError as e:
        print(f"podtap: {e}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"podtap: configuration error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"podtap: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # the known failure classes carry their own clear message
        from agent.capture.btf import BtfError
        from agent.capture.headers import HeadersError
        from agent.capture.host import HostError
        from agent.capture.probe import ProbeError
        from agent.kube.cgroups import CgroupError
        from agent.kube.kubelet import KubeletError
        from agent.sinks.stdout import StdoutBroken

        known = (HeadersError, HostError, ProbeError, BtfError, CgroupError, KubeletError,
                 StdoutBroken)
        if isinstance(e, known):
            print(f"podtap: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
