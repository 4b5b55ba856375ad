"""Where a run lives: a local directory or an fsspec URL (s3://, gs://, memory://, ...).

Shared by the recorder and the analyses (no torch here). Local paths keep zarr's
LocalStore (atomic file replaces, see docs/STORE.md); URLs go through zarr's FsspecStore,
so any filesystem fsspec knows works, with credentials in `storage_options`. A string
that looks like a URL is always treated as one: it never becomes a local folder named
`s3:`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# pathlib collapses "s3://bucket/run" to "s3:/bucket/run": catch it before it becomes a folder
_MANGLED = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]{1,}):/(?!/)")

# protocols whose fsspec implementation lives in an optional package
EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
          "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure")}


class StorageError(ValueError):
    """A location that cannot be used, with what to do about it."""


def _known_protocol(name: str) -> bool:
    import fsspec

    return name.lower() in fsspec.available_protocols()


def is_url(path) -> bool:
    return isinstance(path, str) and bool(_URL.match(path))


class Location:
    """A run's root: `.local` (a Path) for plain paths, `.url` + fsspec filesystem otherwise."""

    def __init__(self, path, storage_options: dict | None = None):
        if isinstance(path, Location):
            path, storage_options = (path.url or path.local), storage_options or path.storage_options
        self.storage_options = dict(storage_options or {})
        self.url: str | None = None
        self.local: Path | None = None
        text = str(path)
        if is_url(text) and text.startswith("file://"):
            text = text[len("file://"):]
        elif is_url(text):
            self.url = text.rstrip("/")
        elif _MANGLED.match(text) and _known_protocol(text.split(":")[0]) and not Path(text.split(":")[0]).exists():
            raise StorageError(f"{text!r} looks like a URL that pathlib.Path collapsed (one slash after "
                               f"'{text.split(':')[0]}:'); pass the URL as a plain string, e.g. "
                               f"'{text.split(':')[0]}://{text.split(':/', 1)[1]}'")
        if self.url is None:
            if self.storage_options:
                raise StorageError(f"storage_options were given for the local path {text!r}; they apply "
                                   f"to URLs only (s3://bucket/run.zarr, gs://..., memory://...)")
            self.local = Path(text)
        self._fs = None

    # -- naming ------------------------------------------------------------------
    @property
    def is_remote(self) -> bool:
        return self.url is not None

    @property
    def name(self) -> str:
        return self.local.name if self.local is not None else PurePosixPath(self.url.split("://", 1)[1]).name

    def __str__(self) -> str:
        return str(self.local) if self.local is not None else self.url

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __fspath__(self) -> str:
        if self.local is None:
            raise TypeError(f"{self.url} is a URL, not a local path")
        return str(self.local)

    def __truediv__(self, part: str) -> "Location":
        if self.local is not None:
            return Location(self.local / part)
        return Location(f"{self.url}/{part}", self.storage_options)

    # -- filesystem --------------------------------------------------------------------
    @property
    def fs(self):
        """The fsspec filesystem and the path inside it (remote locations only)."""
        if self._fs is None:
            import fsspec

            protocol = self.url.split("://", 1)[0]
            try:
                self._fs = fsspec.core.url_to_fs(self.url, **self.storage_options)
            except ImportError as e:
                pkg, extra = EXTRAS.get(protocol, (None, None))
                hint = (f"pip install 'dynascope[{extra}]' (or {pkg})" if pkg
                        else "install the fsspec implementation for it")
                raise StorageError(f"{protocol}:// needs a filesystem package that is not installed "
                                   f"({e}); {hint}") from None
            except ValueError as e:
                raise StorageError(f"{self.url}: {e}; fsspec knows no such protocol") from None
        return self._fs

    def _fresh(self):
        # listings are cached per filesystem instance, and zarr writes through another one
        fs, root = self.fs
        fs.invalidate_cache()
        return fs, root

    def exists(self, sub: str = "") -> bool:
        if self.local is not None:
            return (self.local / sub).exists() if sub else self.local.exists()
        fs, root = self._fresh()
        return fs.exists(f"{root}/{sub}" if sub else root)

    def read_json(self, sub: str) -> dict:
        """Parse a JSON file under the root (FileNotFoundError if absent)."""
        if self.local is not None:
            return json.loads((self.local / sub).read_text())
        fs, root = self.fs
        return json.loads(fs.cat_file(f"{root}/{sub}"))

    def children(self) -> list[str]:
        """Names of the direct children that are zarr nodes."""
        if self.local is not None:
            return sorted(p.name for p in self.local.iterdir() if (p / "zarr.json").exists())
        fs, root = self._fresh()
        out = []
        for entry in fs.ls(root, detail=True):
            name = PurePosixPath(entry["name"]).name
            if entry.get("type") == "directory" and fs.exists(f"{root}/{name}/zarr.json"):
                out.append(name)
        return sorted(out)

    def remove(self) -> None:
        if self.local is not None:
            import shutil

            shutil.rmtree(self.local)
        else:
            fs, root = self.fs
            fs.rm(root, recursive=True)

    def zarr_store(self, read_only: bool = False):
        """What zarr.open_group / xarray.open_zarr take for this location."""
        if self.local is not None:
            return str(self.local.absolute())   # dask workers may run in another directory
        from zarr.storage import FsspecStore

        self.fs  # noqa: B018 - raises the clear missing-package error first
        return FsspecStore.from_url(self.url, storage_options=self.storage_options or None,
                                    read_only=read_only)


def location(path, storage_options: dict | None = None) -> Location:
    return Location(path, storage_options)


def create_remote(loc: Location, overwrite: bool, exists_error=FileExistsError):
    """An empty zarr v3 group at a URL; an existing run there is replaced only with `overwrite`."""
    import zarr

    if loc.exists():
        if not overwrite:
            raise exists_error(f"{loc} already exists; pass overwrite=True (CLI: --overwrite) to replace "
                               f"it, or choose another URL")
        if not loc.exists("zarr.json"):
            raise exists_error(f"{loc} exists and is not a Zarr store; refusing to delete it even with "
                               f"overwrite. Choose another URL")
        loc.remove()
    return zarr.open_group(loc.zarr_store(), mode="w-", zarr_format=3)
