"""A sweep's directory in its storage: a local path or object storage (``s3://``, ``gs://``).

Everything a sweep is, beyond MLflow, lives here, so that any machine that can reach the storage
can resume, read or export it: Ray Tune's experiment (trials, checkpoints), ``sweep.json`` (the
spec as started, the MLflow ids), ``summary.json``, the Optuna study and every trial's ``run/``
(config, adapter, metrics). Reads and writes go through pyarrow's file systems, the ones Ray Tune
itself uses for ``storage_path``, so credentials and endpoints come from the same place
(``AWS_*`` variables, ``AWS_ENDPOINT_URL`` for an S3-compatible server, the GCS defaults).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

__all__ = ["SweepStore", "is_uri", "resolve_storage"]


def is_uri(where: str) -> bool:
    """True for object storage (``s3://``, ``gs://``, any ``scheme://``), False for a local path."""
    return "://" in str(where)


def resolve_storage(where: str) -> str:
    """A storage location as Ray Tune wants it: a URI as given (no trailing ``/``), else an absolute local path."""
    where = str(where)
    return where.rstrip("/") if is_uri(where) else str(Path(where).expanduser().resolve())


class SweepStore:
    """The directory ``STORAGE/NAME`` of one sweep, on a local disk or in object storage.

    Args:
        storage: a local path or a URI (``s3://bucket/prefix``).
        name: the sweep's name.

    Raises:
        ValueError: a URI pyarrow cannot open (unknown scheme, missing credentials module).
    """

    def __init__(self, storage: str, name: str):
        self.storage = resolve_storage(storage)
        self.name = name
        self.uri = f"{self.storage}/{name}"
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri if is_uri(self.storage) else Path(self.uri).as_uri())
        except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"cannot open storage {self.storage}: {str(err).splitlines()[0]}") from None

    @property
    def local_path(self) -> Path | None:
        """The directory on this machine's disk, None for object storage."""
        return None if is_uri(self.storage) else Path(self.uri)

    def path(self, relative: str = "") -> str:
        """The file system path of ``relative`` inside the sweep's directory."""
        return f"{self.root}/{relative}".rstrip("/")

    def location(self, relative: str = "") -> str:
        """``relative`` as a user reads it: a URI for object storage, else a local path."""
        return f"{self.uri}/{relative}".rstrip("/")

    def exists(self, relative: str = "") -> bool:
        """True when ``relative`` (a file or a directory) exists."""
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def read_text(self, relative: str) -> str:
        """The text of the file ``relative``.

        Raises:
            FileNotFoundError: no such file.
        """
        if self.fs.get_file_info(self.path(relative)).type != pafs.FileType.File:
            raise FileNotFoundError(self.location(relative))
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return stream.read().decode()

    def read_json(self, relative: str) -> Any:
        """The JSON file ``relative``, parsed."""
        return json.loads(self.read_text(relative))

    def write_text(self, relative: str, text: str) -> None:
        """Write ``text`` to the file ``relative`` (whole or not at all: a temporary name then a
        rename on a local disk; an object store's put is atomic)."""
        target = self.path(relative)
        self.fs.create_dir(target.rpartition("/")[0], recursive=True)
        if self.local_path is None:
            with self.fs.open_output_stream(target) as stream:
                stream.write(text.encode())
            return
        partial = Path(target).with_name(f".{Path(target).name}.partial")
        partial.write_text(text)
        partial.replace(target)

    def write_json(self, relative: str, data: Any) -> None:
        """``data`` as indented JSON in the file ``relative``."""
        self.write_text(relative, json.dumps(data, indent=2, default=str) + "\n")

    def upload(self, local: str | Path, relative: str) -> None:
        """Copy the local file or directory ``local`` to ``relative`` (a directory's files are
        added or replaced; files it no longer holds are left)."""
        local = Path(local)
        target = self.path(relative)
        if self.local_path is not None and Path(target).resolve() == local.resolve():
            return
        self.fs.create_dir(target if local.is_dir() else target.rpartition("/")[0], recursive=True)
        pafs.copy_files(str(local), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def download(self, relative: str, local: str | Path) -> Path:
        """Copy the file or directory ``relative`` to the local path ``local``; returns ``local``.

        Raises:
            FileNotFoundError: nothing at ``relative``.
        """
        local = Path(local)
        info = self.fs.get_file_info(self.path(relative))
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(self.location(relative))
        (local if info.type == pafs.FileType.Directory else local.parent).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(relative), str(local), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        return local

    def remove(self, relative: str) -> None:
        """Delete the file ``relative`` (nothing when it is not there)."""
        if self.exists(relative):
            self.fs.delete_file(self.path(relative))

    def listdir(self, relative: str = "") -> list[str]:
        """Names of the entries directly inside ``relative`` (empty when it does not exist)."""
        selector = pafs.FileSelector(self.path(relative), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))
