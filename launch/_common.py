"""Start-up shared by the launchers: devices, processes, logging, workdir.

Nothing here imports jax at module level: XLA reads its flags when jax is
first imported, so the device count must be set before that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings

from absl import flags
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_REPO, "configs", "inpaint_photos16.py")
if _REPO not in sys.path:  # experiment configs import configs.base
    sys.path.insert(0, _REPO)

flags.DEFINE_integer(
    "cpu_devices",
    None,
    "XLA devices on the CPU platform (default: one per core). Ignored by "
    "GPU/TPU platforms.",
)
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process)"
)
flags.DEFINE_integer("num_processes", None, "number of processes (default 1)")
flags.DEFINE_integer("process_id", None, "index of this process")
flags.DEFINE_string(
    "compilation_cache",
    None,
    "folder where compiled XLA programs are kept between runs: a resumed run "
    "or another sampling or evaluation of the same model and settings skips "
    "compiling them; '' turns the cache off (default: $JAX_COMPILATION_CACHE_DIR "
    "if set, else $XDG_CACHE_HOME/stochinterp/xla or ~/.cache/stochinterp/xla)",
)


def default_compilation_cache() -> str:
    """jax's own variable if set, else the XDG cache folder (absolute only)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # a relative value is to be ignored
        base = os.path.expanduser("~/.cache")
    return os.path.join(base, "stochinterp", "xla")


FLAGS = flags.FLAGS
_COUNT_FLAG = "xla_force_host_platform_device_count"


_BAD_FLAG_ERRORS = (
    flags.Error,
    AttributeError,
    IndexError,
    KeyError,
    TypeError,
    ValueError,
)


def _exit_with(error: Exception) -> None:
    message = error
    while isinstance(message, Exception) and message.args:  # unwrap re-raises
        first = message.args[0]
        if not isinstance(first, (str, Exception)):  # e.g. OSError(errno, text)
            message = str(message)
            break
        message = first
    sys.exit(f"error: {message}".replace("\n", " "))


def define_config_flag() -> None:
    """``--config`` (a config file, default the main job's) with overrides.

    ml_collections applies ``--config.x=...`` overrides while defining the
    flag; a misspelt field then ends the launcher with one clear line.
    """
    try:
        config_flags.DEFINE_config_file(
            "config", DEFAULT_CONFIG, "experiment config file"
        )
    except _BAD_FLAG_ERRORS as e:
        _exit_with(_unknown_field(e, sys.argv) or e)


def _config_path(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv``, if given."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _repeated_override(argv: list[str]) -> str | None:
    """The first ``--config.x`` override given more than once, and its values.

    ml_collections would keep the last value of a repeated scalar but append
    the values of a repeated tuple (``dim_mults=(1,2)`` twice gives
    ``(1, 2, 1, 2)``); neither is what two overrides of one field mean.
    """
    seen: dict[str, list[str]] = {}
    for i, arg in enumerate(argv):
        for prefix in ("--config.", "--noconfig."):
            if arg.startswith(prefix) and not arg.startswith("--config.="):
                name, has_value, value = arg[len(prefix) :].partition("=")
                if not has_value:
                    value = "false" if prefix == "--noconfig." else "(flag)"
                    following = argv[i + 1] if i + 1 < len(argv) else "--"
                    if prefix == "--config." and not following.startswith("--"):
                        value = following
                seen.setdefault(name, []).append(value)
    for name, values in seen.items():
        if len(values) > 1:
            return (
                f"--config.{name} is given {len(values)} times ({', '.join(values)}): "
                "give each override once"
            )
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """Parses flags; a bad flag or config override ends with one clear line."""
    repeated = _repeated_override(argv)
    if repeated is not None:
        sys.exit(f"error: {repeated}")
    path = _config_path(argv)
    if path is not None and not os.path.isfile(path.split(":", 1)[0]):
        sys.exit(f"error: --config file {path!r} does not exist")
    try:
        return FLAGS(argv)
    except _BAD_FLAG_ERRORS as e:
        if path is not None and "attribute 'get_config'" in str(e):
            sys.exit(
                f"error: --config file {path!r} defines no get_config(): not a "
                "config file (see configs/)"
            )
        _exit_with(_unknown_field(e, argv) or e)


_UNKNOWN_FIELD = re.compile(r"""'(\w+)'\s*(?:Did you mean "(\w+)")?""")


def _unknown_field(error: Exception, argv: list[str]) -> Exception | None:
    """An unknown ``--config.a.b`` override, named whole with its suggestion.

    ml_collections reports only the unknown part (``'methd' Did you mean
    "method" ...``, or just ``'zzz'``); this names the override as typed.
    """
    while error.args and isinstance(error.args[0], Exception):  # re-raises
        error = error.args[0]
    if not isinstance(error, KeyError) or not isinstance(error.args[0], str):
        return None
    match = _UNKNOWN_FIELD.match(error.args[0])
    if match is None:
        return None
    name, suggestion = match.groups()
    for arg in argv:
        path = arg.split("=", 1)[0]
        if path.startswith("--config.") and name in path.split(".")[1:]:
            hint = f"; did you mean {suggestion!r}?" if suggestion else ""
            return ValueError(
                f"{arg}: the config has no field {path[len('--config.') :]!r} "
                f"(no {name!r} there){hint}"
            )
    return None


def default_cpu_devices(splits: dict, processes: int = 1) -> int:
    """One XLA device per core, or fewer: the most that split every count.

    ``splits`` maps the name of a setting to a count that the devices of all
    ``processes`` must split evenly (a batch, a number of images). Values
    that are not positive integers are left to the launchers' own checks,
    which name them; when no count at all splits, one per core.
    """
    cores = os.cpu_count() or 1
    counts = [
        value
        for value in splits.values()
        if isinstance(value, int) and not isinstance(value, bool) and value > 0
    ]
    for count in range(cores, 0, -1):
        if all(value % (count * processes) == 0 for value in counts):
            return count
    return cores


def per_pass_batch(train_config) -> object:
    """``train.global_batch`` over ``train.micro_batches`` when that divides.

    The devices must split each micro-batch pass evenly; otherwise the
    global batch itself, and the training checks name the settings.
    """
    batch, passes = train_config.global_batch, train_config.micro_batches
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (batch, passes)):
        if passes > 0 and batch % passes == 0:
            return batch // passes
    return batch


def set_cpu_devices(splits: dict | None = None) -> str | None:
    """Sets the CPU device count in ``XLA_FLAGS`` before jax is imported.

    ``--cpu_devices`` wins over a count already in ``XLA_FLAGS``; without the
    flag an existing count is kept, else ``default_cpu_devices(splits)``.
    Returns a line to log when that default is below one device per core.
    """
    if "jax" in sys.modules:
        raise RuntimeError("set_cpu_devices must run before jax is imported")
    xla_flags = os.environ.get("XLA_FLAGS", "").split()
    has_count = any(f.startswith(f"--{_COUNT_FLAG}=") for f in xla_flags)
    if FLAGS.cpu_devices is None and has_count:
        return None
    note = None
    count = FLAGS.cpu_devices
    if count is None:
        splits = splits or {}
        count = default_cpu_devices(splits, _process_count())
        cores = os.cpu_count() or 1
        if count < cores:
            shown = ", ".join(f"{name}={value}" for name, value in splits.items())
            note = (
                f"CPU devices: {count} for {cores} cores, the most that split "
                f"{shown} evenly (--cpu_devices sets the count)"
            )
    if count < 1:
        raise ValueError(f"--cpu_devices must be >= 1, got {count}")
    kept = [f for f in xla_flags if not f.startswith(f"--{_COUNT_FLAG}=")]
    os.environ["XLA_FLAGS"] = " ".join([*kept, f"--{_COUNT_FLAG}={count}"])
    return note


def _process_count() -> int:
    """The process count from the flag or the environment; 1 when unreadable.

    The distributed set-up checks and names a bad value later.
    """
    if FLAGS.num_processes is not None:
        return max(FLAGS.num_processes, 1)
    try:
        return max(int(os.environ.get("STOCHINTERP_NUM_PROCESSES", "1")), 1)
    except ValueError:
        return 1


def check_workdir(workdir: str, must_exist: bool) -> str:
    """Checks ``workdir`` without creating it; returns its absolute path.

    Training creates it once its config has been checked, so a bad config
    leaves no empty folder behind; sampling and evaluation need an existing
    one.
    """
    from stochinterp.workdir import check_usable  # no jax import

    if not workdir:
        raise SystemExit(
            "error: --workdir is required: the folder for checkpoints and outputs"
        )
    try:
        return check_usable(workdir, must_exist)
    except OSError as e:
        raise SystemExit(f"error: {e}") from None


def one_line_input_errors(main):
    """Wraps a launcher's ``main``: input errors end with one line.

    An error raised by a check before any work (``stochinterp.input_errors``)
    is printed as ``error: ...`` without a traceback, unless
    ``STOCHINTERP_TRACEBACK=1``; every other exception keeps its traceback.
    A Ctrl-C that reaches it ends with ``error: interrupted by Ctrl-C`` and
    exit status 130.
    """

    def wrapped(argv):
        try:
            return main(argv)
        except KeyboardInterrupt:
            # Training handles Ctrl-C itself once its loop runs; before that
            # (building data, loading, sampling) there is nothing to save.
            if _traceback_wanted():
                raise
            print("error: interrupted by Ctrl-C", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as e:
            from stochinterp.input_errors import is_input_error  # no jax import

            if is_input_error(e) and not _traceback_wanted():
                _exit_with(e)
            raise

    return wrapped


def _traceback_wanted() -> bool:
    wanted = os.environ.get("STOCHINTERP_TRACEBACK", "")
    return wanted.lower() not in ("", "0", "false", "no")


_TAG_CHARACTERS = re.compile(r"[A-Za-z0-9._-]*")


def define_output_flags() -> None:
    """``--tag`` for the launchers that write sampling outputs."""
    flags.DEFINE_string(
        "tag",
        "",
        "appended to the output names, to keep runs with other settings apart "
        "(letters, digits, '.', '_', '-')",
    )


def check_tag(tag: str) -> None:
    if not _TAG_CHARACTERS.fullmatch(tag):
        raise SystemExit(
            f"error: --tag may hold only letters, digits, '.', '_' and '-', got {tag!r}"
        )


def output_name(
    config,
    step: int,
    tag: str,
    seed: int | None = None,
    count: int | None = None,
    batch: int | None = None,
) -> str:
    """The part of the output file names that tells runs apart.

    ``<method>_step<N>``, then ``_raw`` for the raw (not EMA) weights,
    ``_w<scale>`` for a guidance scale other than 1, ``_train`` for images
    of the training split (``data.eval_split='train'``), ``_n<count>`` and
    ``_seed<k>`` when given, ``_b<batch>`` for a batch smaller than the
    count, and ``_<tag>``: sampling another checkpoint, weights, guidance
    scale, split, number of images, seed or batch writes new files instead
    of replacing the earlier ones.
    """
    parts = [config.sampler.method, f"step{step}"]
    if not config.eval.use_ema:
        parts.append("raw")
    if config.sampler.guidance_scale != 1:  # written in full: 1.0000001 != 1
        parts.append(f"w{float(config.sampler.guidance_scale) + 0.0!r}")  # -0.0: 0.0
    if config.data.eval_split == "train":
        parts.append("train")
    if count is not None:
        parts.append(f"n{count}")
    if seed is not None:
        parts.append(f"seed{seed}")
    if batch and count is not None and batch < count:
        parts.append(f"b{batch}")
    if tag:
        parts.append(tag)
    return "_".join(parts)


def use_compilation_cache(folder: str) -> bool:
    """Keeps compiled programs in ``folder`` (jax's persistent cache).

    Programs that took at least a second to compile are stored; a program
    found there is loaded instead of compiled (an unreadable entry is
    compiled again, with a warning). A folder that cannot be created or
    written turns the cache off with a warning instead of stopping the run.
    Returns whether the cache is on.

    XLA cannot store a CPU program whose temporary buffers it split into
    several heaps (``--xla_multiheap_size_constraint_per_heap``, which the
    host memory settings add): such a program (the training step, as a
    rule) is compiled on every start, and one log line says so instead of
    jax's warning.
    """
    if not folder:
        return False
    folder = os.path.abspath(os.path.expanduser(folder))
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{folder!r} is not writable")
    except OSError as e:
        logging.getLogger("launch").warning(
            "compilation cache off (--compilation_cache=%r): %s", folder, e
        )
        return False
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    _watch_cache_warnings(folder)
    return True


_DAMAGED_ENTRY = re.compile(
    r"Error reading persistent compilation cache entry for '([^']+)'"
)
_SPLIT_HEAPS = re.compile(
    r"Error writing persistent compilation cache entry for '([^']+)'.*"
    r"Multiple temp buffer allocations",
    re.DOTALL,
)


def _watch_cache_warnings(folder: str) -> None:
    """Acts on two of jax's cache warnings.

    - An entry that jax could not read (e.g. a run killed while writing
      it): jax warns and compiles, but never replaces an existing entry, so
      all entries of that program (``<name>-<hash>-cache`` files) are
      removed, and the program compiled instead is stored again (others of
      that name are compiled again once).
    - A program XLA cannot store because its buffers are split into heaps:
      logged once per program, as what it is, instead of the warning.
    """
    show = warnings.showwarning
    unstored = set()

    def showwarning(message, *args, **kwargs):
        text = str(message)
        split = _SPLIT_HEAPS.search(text)
        if split:
            if split.group(1) not in unstored:
                unstored.add(split.group(1))
                logging.getLogger("launch").info(
                    "%s not stored in the compilation cache: XLA split its "
                    "buffers into heaps (--xla_multiheap_size_constraint_per_heap,"
                    " for faster CPU steps) and cannot save such a program; it is "
                    "compiled again on the next start",
                    split.group(1),
                )
            return
        damaged = _DAMAGED_ENTRY.search(text)
        if damaged:
            for name in os.listdir(folder):
                if name.startswith(damaged.group(1) + "-"):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(folder, name))
        show(message, *args, **kwargs)

    warnings.showwarning = showwarning


def start(
    argv: list[str], workdir_must_exist: bool = True, splits: dict | None = None
) -> str:
    """Arguments, workdir, devices, processes and logging; returns the workdir.

    Every launcher defines ``--workdir``; stray positional arguments are an
    error. ``splits``: the counts the devices must split (see
    ``default_cpu_devices``).
    """
    if len(argv) > 1:
        sys.exit(
            f"error: unexpected arguments {argv[1:]}: every setting is a flag "
            "(--help lists them)"
        )
    path = check_workdir(FLAGS.workdir, workdir_must_exist)
    from stochinterp.host_memory import restart_with_huge_pages  # no jax import

    restart_with_huge_pages()  # once, before any work: faster CPU steps
    try:
        note = set_cpu_devices(splits)
    except ValueError as e:
        _exit_with(e)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if note:
        logging.getLogger("launch").warning(note)  # slower than one per core
    for noisy in ("absl", "jax._src", "orbax", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    cache = FLAGS.compilation_cache
    use_compilation_cache(default_compilation_cache() if cache is None else cache)

    from stochinterp import sharding

    sharding.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    return path
