"""``qmesh quant …`` and ``qmesh node …``: the daemon's planner and views from the shell.

For: ``quant plan MODEL [--node NODE] [--context N] [--target-tps X]
[--explain]``, which explains which quantization of MODEL to run on NODE
with the numbers (:mod:`qmesh.daemon.quant`) — with ``--explain`` also the
node's calibration, each candidate's predicted cost per token by cause, and
for files the node has served its measured decode speed beside the
prediction and the error; ``node telemetry`` and ``node catalog``, which
print what a daemon on this machine would report (NVML or CPU-only, the
measured memory bandwidth, the GGUF files of ``daemon.model_dirs`` and of
the model cache that ``scripts/setup.sh`` fills, as ``qmesh up``'s daemon
serves them).

MODEL is a ``.gguf`` path (its equivalent files in the same directory are
variants too), or a model id or equivalence key (``gemma3:270m``) among the
files of ``daemon.model_dirs`` and the model cache. NODE is ``local`` (this
machine's live telemetry, the default), a preset (``cpu``, ``gpu4``,
``gpu4-pcie3x4``, ``gpu8``, ``gpu8-pcie3x4``, ``gpu24``, ``gpu80``), a spec
(``vram=8GiB,gpu_bw=448,pcie=4.0x16,ram=32GiB,ram_bw=50``) or ``@FILE.json``
(a telemetry object, e.g. a node from ``GET /api/inventory``).

Not for: parsing the global options (:mod:`qmesh.cli`) or running models.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from qmesh.cmdline import EXIT_OK, EXIT_USAGE, Subcommands, add_command, print_err

if TYPE_CHECKING:
    from qmesh.config import Config
    from qmesh.daemon.catalog import ModelInfo
    from qmesh.daemon.quant import NodeSpec
    from qmesh.daemon.telemetry import Telemetry

__all__ = ["add_commands"]

DEFAULT_TARGET_TPS: Final = 10.0
"""Reading speed: below it a streamed answer feels slow. 0 disables the target."""


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    quant = add_command(
        commands,
        common,
        "quant",
        "hardware-aware quantization: which variant of a model to run where",
    )
    quant_commands = quant.add_subparsers(dest="quant_command", metavar="COMMAND", required=True)
    plan = quant_commands.add_parser(
        "plan",
        parents=[common],
        help="choose a model's quantization for a node, and explain the choice",
        description=__doc__.split("\n\n")[2] if __doc__ else None,
    )
    plan.add_argument("model", metavar="MODEL", help="a .gguf path, a model id or family:size")
    plan.add_argument("--node", default="local", help="local, a preset, a spec or @FILE.json")
    plan.add_argument(
        "--context", type=int, metavar="N", help="context tokens (default: daemon.context_length)"
    )
    plan.add_argument(
        "--target-tps",
        type=float,
        default=DEFAULT_TARGET_TPS,
        metavar="X",
        help="tokens/s the choice must reach (default %(default)g; 0: no target)",
    )
    plan.add_argument(
        "--no-quantize",
        action="store_true",
        help="only files that exist (no variants llama.cpp's quantize could make)",
    )
    plan.add_argument(
        "--explain",
        action="store_true",
        help="also the node's calibration, each candidate's cost per token, and what the "
        "node measured beside what was predicted",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=_cmd_plan)

    node = add_command(
        commands, common, "node", "this machine as a daemon sees it: telemetry and model catalog"
    )
    node_commands = node.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    telemetry = node_commands.add_parser(
        "telemetry", parents=[common], help="this machine as a daemon reports it"
    )
    telemetry.add_argument(
        "--remeasure", action="store_true", help="measure memory bandwidth again"
    )
    telemetry.add_argument("--json", action="store_true", help="print JSON")
    telemetry.set_defaults(handler=_cmd_telemetry)
    catalog = node_commands.add_parser(
        "catalog",
        parents=[common],
        help="the GGUF models in daemon.model_dirs and the model cache (or DIR…)",
    )
    catalog.add_argument("dirs", nargs="*", type=Path, metavar="DIR")
    catalog.add_argument("--json", action="store_true", help="print JSON")
    catalog.set_defaults(handler=_cmd_catalog)


def _local_node(
    config: Config, *, remeasure: bool = False, models: Sequence[ModelInfo] = ()
) -> NodeSpec:
    """This machine as its daemon plans for it: telemetry, the bandwidth at
    llama.cpp's thread count and the node calibration, with the block
    layouts of ``models`` probed (measured now if neither the data
    directory nor the machine has one: seconds)."""
    import os

    import attrs

    from qmesh.daemon.calibration import CalibrationKey, default_threads, obtain
    from qmesh.daemon.membench import cached_bandwidth
    from qmesh.daemon.quant import NodeSpec

    telemetry = _local_telemetry(config, remeasure=remeasure)
    threads = config.daemon.threads or default_threads(os.cpu_count())[0]
    directory = config.data_dir / "daemon"
    key = CalibrationKey.local(
        threads=config.daemon.threads,
        threads_batch=config.daemon.threads,
        gpus=[g.name for g in telemetry.gpus],
    )
    layouts = {m.layout for m in models if m.layout}
    files = [Path(m.path) for m in models]
    calibration = None if key is None else obtain(directory, key, models=files, layouts=layouts)
    node = NodeSpec.from_telemetry(
        telemetry, name="local", calibration=calibration, threads=threads
    )
    bandwidth = cached_bandwidth(directory)
    return attrs.evolve(node, host_bandwidth_gbps=bandwidth.at_threads(threads))


def _local_telemetry(config: Config, *, remeasure: bool = False) -> Telemetry:
    from qmesh.daemon.membench import cached_bandwidth
    from qmesh.daemon.telemetry import TelemetryReader

    bandwidth = cached_bandwidth(config.data_dir / "daemon", remeasure=remeasure)
    reader = TelemetryReader(host_bandwidth_gbps=bandwidth.gbps)
    reader.start()
    try:
        return reader.read()
    finally:
        reader.close()


def _resolve_models(config: Config, text: str) -> list[ModelInfo]:
    from qmesh.daemon.catalog import Catalog, CatalogError, describe_gguf, model_cache, serving_dirs
    from qmesh.daemon.quant import PlanError

    path = Path(text).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        try:
            chosen = describe_gguf(path)
        except (CatalogError, OSError) as exc:
            raise PlanError(str(exc)) from None
        catalog = Catalog([path.parent])
        catalog.scan()
        same = [m for m in catalog.models.values() if m.equivalence == chosen.equivalence]
        return same or [chosen]
    dirs = serving_dirs(config.daemon.model_dirs)
    catalog = Catalog(dirs)
    catalog.scan()
    by_id = catalog.models.get(text)
    key = by_id.equivalence if by_id is not None else text.lower()
    found = [m for m in catalog.models.values() if m.equivalence == key]
    if not found:
        known = ", ".join(sorted({m.equivalence for m in catalog.models.values()})) or "none"
        where = ", ".join(map(str, dirs)) or (
            f"no daemon.model_dirs configured and no model cache at {model_cache()}"
        )
        raise PlanError(f"no model {text!r} ({where}; known: {known}); give a .gguf path")
    return found


def _cmd_plan(args: argparse.Namespace, config: Config) -> int:
    from qmesh.daemon.quant import NodeSpec, PlanError, plan, variants_for
    from qmesh.daemon.speedbook import SpeedBook

    try:
        measured = None
        models = _resolve_models(config, args.model)
        if args.node == "local":
            node = _local_node(config, models=models)
            # What this node's daemon measured for its files (same data directory).
            measured = SpeedBook.load(config.data_dir / "daemon").models
        elif args.node.startswith("@"):
            node = NodeSpec.load(Path(args.node[1:]))
        else:
            node = NodeSpec.parse(args.node)
        context = args.context or config.daemon.context_length
        if context < 1:
            raise PlanError("--context must be at least 1")
        result = plan(
            models[0].equivalence,
            variants_for(models, produce=not args.no_quantize),
            node,
            context=context,
            target_tps=args.target_tps or None,
            measured=measured,
        )
    except PlanError as exc:
        print_err(f"error: {exc}")
        return EXIT_USAGE
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(result.explain(detail=args.explain))
    return EXIT_OK


def _cmd_telemetry(args: argparse.Namespace, config: Config) -> int:
    telemetry = _local_telemetry(config, remeasure=args.remeasure)
    if args.json:
        print(json.dumps(telemetry.to_json(), indent=2))
        return EXIT_OK
    host = telemetry.host
    print(f"host      {host.hostname}: {host.cpus_logical} CPUs, load {host.load_avg[0]:g}")
    print(f"RAM       {host.ram_available / 1e9:.1f} GB free of {host.ram_total / 1e9:.1f} GB")
    bandwidth = host.memory_bandwidth_gbps
    shown = "unmeasured" if bandwidth is None else f"{bandwidth:.1f} GB/s (read, measured)"
    print(f"bandwidth {shown}")
    print(f"NVML      {telemetry.nvml}")
    for gpu in telemetry.gpus:
        print(
            f"GPU {gpu.index}     {gpu.name}: {gpu.vram_free / 1e9:.1f} GB free of "
            f"{gpu.vram_total / 1e9:.1f} GB, {gpu.memory_bandwidth_gbps} GB/s, "
            f"PCIe {gpu.pcie_gen}.0 x{gpu.pcie_width} (max {gpu.pcie_max_gen}.0 "
            f"x{gpu.pcie_max_width} = {gpu.pcie_max_gbps} GB/s), {gpu.utilization_pct}% busy, "
            f"{gpu.temperature_c} °C, {gpu.power_w} W"
        )
    if telemetry.cpu_only:
        print("mode      CPU-only: models live in RAM")
    return EXIT_OK


def _cmd_catalog(args: argparse.Namespace, config: Config) -> int:
    from qmesh.daemon.catalog import Catalog, model_cache, serving_dirs

    dirs = args.dirs or list(serving_dirs(config.daemon.model_dirs))
    if not dirs:
        print_err(
            "error: no model directories: give DIR, set daemon.model_dirs, or fill the model "
            f"cache {model_cache()} (scripts/setup.sh does)"
        )
        return EXIT_USAGE
    catalog = Catalog(dirs)
    catalog.scan()
    models = sorted(catalog.models.values(), key=lambda m: m.id)
    if args.json:
        print(json.dumps([m.to_json() for m in models], indent=2))
        return EXIT_OK
    head = f"{'id':<32} {'family':<10} {'size':<6} {'class':<5} {'quant':<8} {'context':>8}"
    print(f"{head} {'file':>9} chat")
    for m in models:
        print(
            f"{m.id:<32} {m.family:<10} {m.size_label:<6} {m.size_class:<5} {m.quantization:<8} "
            f"{m.context_length or '-':>8} {m.file_size / 1e6:>7.0f}MB "
            f"{'yes' if m.chat_template else 'no'}"
        )
    return EXIT_OK
