"""Exceptions with messages meant for users: each names the offending input."""


class MedistillError(Exception):
    """Base class of every error medistill raises on bad input.

    A DataLoader worker's error reaches the main process re-created by torch from one string:
    "Caught DataError in DataLoader worker process 0. Original Traceback ...: <message>". Only the
    original message is kept, so a bad image read by a worker is the same one line as one read in
    the main process."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") \
                and "Original Traceback" in args[0]:
            lines = args[0].rstrip().split("\n")
            name = type(self).__name__
            for k in range(len(lines) - 1, -1, -1):     # the traceback's last line: "...DataError: message"
                head, sep, rest = lines[k].partition(": ")
                if sep and head.split(".")[-1] == name and " " not in head:
                    args = ("\n".join([rest, *lines[k + 1:]]),)
                    break
        super().__init__(*args)


class DataError(MedistillError):
    """A dataset, file, label or split is unusable."""


class ConfigError(MedistillError):
    """A configuration key or value is invalid."""


class ModelError(MedistillError):
    """A model name, checkpoint or tap is unusable."""


class NonFiniteLossError(MedistillError):
    """A loss became NaN or Inf; training stops and the last good checkpoint stays intact."""


class CacheMismatchError(MedistillError):
    """A teacher-output cache was built for other data, transforms or checkpoints."""


class CacheDamagedError(MedistillError):
    """A cache file or its manifest cannot be read (cut short, overwritten); derived data, so it is rebuilt."""


class ArgumentError(MedistillError, ValueError):
    """A command argument (method list, layer, model name) is invalid."""


class NotARunError(MedistillError, FileNotFoundError):
    """A path given as a run directory is not a finished medistill run."""


def crash_log(command: str) -> str:
    """Write the current exception's traceback to a log file (the user log folder, else the temp
    folder) headed by ``command``; return its path."""
    import tempfile
    import time
    import traceback
    from pathlib import Path

    from platformdirs import user_log_dir

    text = f"medistill {command}\n\n{traceback.format_exc()}"
    for d in (Path(user_log_dir("medistill")), Path(tempfile.gettempdir())):
        try:
            d.mkdir(parents=True, exist_ok=True)
            p = d / f"crash-{time.strftime('%Y%m%d-%H%M%S')}.log"
            p.write_text(text)
            return str(p)
        except OSError:
            continue
    return "(no writable log folder; rerun with --debug)"
