"""What the scripts share: flag parsing whose errors are one line, not a traceback."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging

from lightjax.runtime.packages import missing_module, missing_package_message


def run_script(main: Callable[[list[str]], Any], program: str) -> None:
    """`absl.app.run(main)` with one-line flag errors (one_line_flags_parser), and a package that is not
    installed named with its install command (status 2), wherever the script imported it."""
    try:
        app.run(main, flags_parser=one_line_flags_parser(program))
    except ModuleNotFoundError as e:
        if missing_module(e) is None:
            raise
        sys.stderr.write(f"{program}: {missing_package_message(missing_module(e))}\n")
        sys.exit(2)


def one_line_flags_parser(program: str) -> Callable[[list[str]], Any]:
    """A flags parser for `absl.app.run(main, flags_parser=...)`: an unknown config key, a value of the
    wrong type, a malformed flag or a config file that is missing or raises exits with
    `program: <what is wrong>` and status 2; a package that is not installed is named with its install
    command. Library INFO logs are hidden unless --verbosity is given."""

    def parse(argv: list[str]) -> Any:
        try:
            rest = flags.FLAGS(argv)
            for name in flags.FLAGS:  # ml_collections keeps a config file's load failure until it is used
                value = flags.FLAGS[name].value
                if type(value).__name__ == "_ErrorConfig":
                    value.to_dict()  # raises that failure
        except Exception as e:  # noqa: BLE001 (every way a command line can be wrong: one line)
            sys.stderr.write(f"{program}: {_flag_error(argv, e)}\n")
            sys.exit(2)
        skip_absent_tpu()
        if not any(a.startswith(("--verbosity", "-v")) for a in argv[1:]):
            logging.set_verbosity(logging.WARNING)  # TFDS and Orbax log progress at INFO level
        return rest

    return parse


def _flag_error(argv: list[str], error: Exception) -> str:
    missing = missing_module(error)
    if missing is not None:  # a package not installed, wherever the config file's imports reached it
        return missing_package_message(missing)
    path = _config_path(argv)
    inner = error
    while inner.__context__ is not None and not _raised_in(inner, path or ""):  # absl wraps get_config's error
        inner = inner.__context__
    if path and (not os.path.isfile(path) or _raised_in(inner, path) or isinstance(inner, SyntaxError)):
        return _config_file_error(path, inner)
    message = str(error)
    if isinstance(error, (AttributeError, KeyError)):  # ml_collections wraps a KeyError's text in reprs
        inner = error.args[0] if error.args else error
        while isinstance(inner, BaseException) and inner.args:
            inner = inner.args[0]
        message = f"unknown config key {inner}"
    elif not isinstance(error, (flags.Error, TypeError, ValueError)):
        message = f"{type(error).__name__}: {message}"
    return " ".join(message.split())


def _config_path(argv: list[str]) -> str | None:
    """The --config file named on the command line (without ml_collections' ':ARGUMENT' suffix)."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    return path.split(":")[0] if path else None


def _raised_in(error: BaseException, path: str) -> bool:
    return _line_in(error, path) is not None


def _line_in(error: BaseException, path: str) -> int | None:
    """The line of the deepest traceback frame inside `path`, if any."""
    line, tb = None, error.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _config_file_error(path: str, error: Exception) -> str:
    """'--config=FILE, line N: ErrorType: message' for a config file that is missing or raises."""
    if not os.path.isfile(path):
        return f"--config={path}: no such file."
    line = error.lineno if isinstance(error, SyntaxError) else _line_in(error, path)
    text = " ".join(str(error.msg if isinstance(error, SyntaxError) else error).split())
    return f"--config={path}{f', line {line}' if line else ''}: {type(error).__name__}: {text}"


def skip_absent_tpu() -> None:
    """On a machine with no accelerator but with the TPU compiler installed (`.[aot]`), run JAX on the CPU
    only: otherwise every start loads libtpu, which prints lines of warnings about the TPU it cannot find
    before the script's first line. A JAX_PLATFORMS of the user's own is left alone, as is any machine
    with a TPU or GPU attached. Compiling for TPU slices ahead of time loads libtpu by itself."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None or _accelerator_attached():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported, but its backends are not started until a device is used
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def _accelerator_attached() -> bool:
    """A TPU chip on the PCI bus (JAX's own test), an NVIDIA GPU or an AMD GPU."""
    try:
        from jax._src import hardware_utils

        if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
            return True
    except (ImportError, AttributeError, OSError):  # JAX's private module moved: assume a TPU may be there
        return True
    return any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")) or \
        bool(glob.glob("/dev/accel*"))


_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def simulate_host_devices(count: int) -> None:
    """Make the CPU backend expose `count` devices (a laptop's stand-in for 8 accelerators).
    Only effective before JAX initialises its backends, so scripts call it first thing in main()."""
    if count:
        _set_device_count(count)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the simulated devices, even where a TPU compiler is installed


def _set_device_count(count: int) -> None:
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT)]
    os.environ["XLA_FLAGS"] = " ".join([*kept, f"{_DEVICE_COUNT}={count}"])


def host_devices(requested: int, config: Any, multi_process: bool = False) -> None:
    """The CPU devices of a training script: `requested` (--host_devices) when given; else, for a
    single-process run on the default mesh (all devices data-parallel), one device per CPU core, as many
    as divide the batch. XLA runs each device's program on its own thread, so the element-wise work
    that runs single-threaded in one device's program is spread over the cores (the baseline's step
    1.14x faster on 2 cores, nanoGPT's CPU recipe 1.6x). The device count only concerns JAX's CPU
    platform: GPUs and TPUs, when present, are the devices used. An XLA_FLAGS that already sets a
    device count is left alone."""
    if requested:
        simulate_host_devices(requested)
        return
    if multi_process or _DEVICE_COUNT in os.environ.get("XLA_FLAGS", ""):
        return
    count = cpu_data_parallelism(config)
    if count > 1:
        _set_device_count(count)


def cpu_data_parallelism(config: Any) -> int:
    """How many per-core devices a run can train data-parallel over: 1 unless its mesh is the default
    (data=-1, fsdp=1, tensor=1); else the most, up to the core count, that divide the global batch into
    equal micro-batches."""
    mesh, t = config.mesh, config.train
    if (mesh.data, mesh.fsdp, mesh.tensor) != (-1, 1, 1):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    accum = max(t.grad_accum_steps, 1)
    return max(d for d in range(1, cores + 1) if t.global_batch_size % (d * accum) == 0)


def define_step_flag(what: str = "Checkpoint") -> flags.FlagHolder[str]:
    """--step: 'latest' (the default), 'best' (the lowest validation loss, see checkpoint.keep_best) or a
    step number; any other value is refused when the flags are parsed."""
    holder = flags.DEFINE_string("step", "latest", f"{what}: 'latest', 'best' (the lowest validation loss) or "
                                 "a step number.")
    flags.register_validator("step", lambda v: v in ("latest", "best") or v.isdigit(),
                             message="--step must be 'latest', 'best' or a step number")
    return holder


def define_overwrite_flag() -> flags.FlagHolder[bool]:
    """--overwrite: replace an --out folder that holds files lightjax did not write (never a training run)."""
    return flags.DEFINE_bool("overwrite", False, "Replace --out even where it holds files lightjax did not write "
                             "(a folder in or above a training run is refused regardless).")


def define_distributed_flags() -> Callable[[], None]:
    """--distributed and the explicit --coordinator_address / --num_processes / --process_id of a
    multi-process job; returns the function that joins it (a no-op without them), whose `requested()`
    says whether they were given."""
    distributed = flags.DEFINE_bool(
        "distributed", False, "Multi-host: join JAX's distributed runtime first. Without the three flags "
        "below, a SkyPilot job's node environment gives them, else the cluster is auto-detected (TPU VMs, Slurm).")
    address = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator.")
    count = flags.DEFINE_integer("num_processes", None, "How many processes the job has.")
    index = flags.DEFINE_integer("process_id", None, "This process's index, in [0, num_processes).")
    heartbeat = flags.DEFINE_integer("heartbeat_timeout_s", 60, "A process silent this long is taken as dead "
                                     "and the whole job stops.")

    def requested() -> bool:
        return distributed.value or any(f.value is not None for f in (address, count, index))

    def start() -> None:
        if not requested():
            return
        from lightjax.runtime.distributed import initialize  # imports JAX: only after the device flags are set

        initialize(address.value, count.value, index.value, heartbeat.value)

    start.requested = requested  # whether this is a multi-process job, before joining it
    return start
