"""A sweep's directory: the manifest, the chunk files and their checksums.

Layout of ``out/``::

    manifest.json                  configuration, model identities, versions, finished chunks
    chunks/00-tiny-gpt2/00000.json one file per (model, chunk of prompts)
    .lock                          held while a process writes the sweep

Every file is written atomically (a temporary file in the same directory, fsync, ``os.replace``,
fsync of the directory), so a crash leaves either the old file or the new one, never half of
one; files get the permissions the umask gives new files. A chunk counts as finished only once
the manifest lists it with its sha256: a chunk file without a manifest entry, or whose bytes no
longer match the recorded checksum, is recomputed.

Each chunk file also verifies itself: it records the sha256 of its own content, the hash of the
sweep's configuration and its model's identity, so that a lost or damaged manifest can be
rebuilt from the chunks (:func:`rebuild_manifest`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.errors import (
    SweepBusyError,
    SweepConfigError,
    SweepError,
    SweepIntegrityError,
    SweepWarning,
    SweepWeightsChangedError,
)

MANIFEST = "manifest.json"
CHUNKS = "chunks"
LOCK = ".lock"
#: Key under which a chunk file records the sha256 of the rest of its content.
CONTENT_SHA256 = "content_sha256"
#: Written into the manifest and every chunk; bumped when the layout changes incompatibly.
FORMAT = "anylens-sweep/1"


# -- atomic files -------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old bytes or the new ones, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it what an ordinary new file gets under the umask.
        if hasattr(os, "fchmod"):
            os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_dir(path.parent)


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux), else set
    and restored at once."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    # The rename itself must reach the disk too; directories cannot be opened on Windows.
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def remove_stale_temporaries(root: Path) -> int:
    """Delete temporary files a killed writer left behind; returns how many."""
    removed = 0
    for leftover in root.rglob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            removed += 1
    return removed


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys: equal values give equal bytes, hence equal hashes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True).encode()


# -- naming -------------------------------------------------------------------------------------
def model_dirname(index: int, source: str) -> str:
    """``00-tiny-gpt2``: the index keeps two sources with the same slug apart."""
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", source).strip("-.")[:60] or "model"
    return f"{index:02d}-{slug}"


def chunk_key(model_dir: str, chunk: int) -> str:
    return f"{model_dir}/{chunk:05d}"


def chunk_path(root: Path, key: str) -> Path:
    return root / CHUNKS / f"{key}.json"


# -- frames as exact JSON -----------------------------------------------------------------------
def frame_to_payload(frame: pd.DataFrame) -> dict[str, Any]:
    """Columns as Python lists: ``json`` writes floats with ``repr``, so they read back bit-exact
    (``DataFrame.to_json`` rounds to 10 digits)."""
    return {
        "columns": [str(c) for c in frame.columns],
        "dtypes": {str(c): str(t) for c, t in frame.dtypes.items()},
        "data": {str(c): [_plain(v) for v in frame[c].tolist()] for c in frame.columns},
    }


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()  # numpy scalars
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None  # NaN is not JSON; the recorded dtype restores it
    return value


def payload_to_frame(payload: dict[str, Any]) -> pd.DataFrame:
    columns = payload["columns"]
    frame = pd.DataFrame({c: payload["data"][c] for c in columns}, columns=columns)
    for column, dtype in payload["dtypes"].items():
        if str(frame[column].dtype) != dtype and dtype != "object":
            frame[column] = frame[column].astype(dtype)
    return frame


# -- the sweep directory ------------------------------------------------------------------------
class Store:
    """Reads and writes one sweep directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads(self.manifest_path.read_bytes())
        except FileNotFoundError:
            if self.chunk_files():
                raise SweepConfigError(
                    f"the manifest of the sweep in {self.root} ({MANIFEST}) is missing; rerun the sweep with its own "
                    "arguments to rebuild it from the checksummed chunk files"
                ) from None
            raise SweepConfigError(f"{self.root} holds no sweep ({MANIFEST} is missing)") from None
        except (OSError, ValueError) as error:
            raise SweepConfigError(
                f"{self.manifest_path} cannot be read ({error}): the sweep's record is damaged; rerun the "
                "sweep with its own arguments to rebuild it from the checksummed chunk files, or start "
                "over with fresh=True (anylens run --fresh), or choose another out"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise SweepConfigError(
                f"{self.manifest_path} is not a {FORMAT} manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}); "
                f"choose another out or delete {self.root}"
            )
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_atomic(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True, default=str).encode() + b"\n")

    # chunks
    def write_chunk(self, key: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Write a chunk file; returns its manifest entry (file, sha256, bytes).

        The file records the sha256 of its own content (``content_sha256``, over the canonical
        JSON of everything else in it), so that it can be verified without the manifest.
        """
        body = json.loads(json.dumps(dict(payload, format=FORMAT), default=str))  # as it reads back
        body.pop(CONTENT_SHA256, None)
        body[CONTENT_SHA256] = sha256_bytes(canonical_json(body))
        data = json.dumps(body, sort_keys=True, default=str).encode()
        path = chunk_path(self.root, key)
        write_atomic(path, data)
        return {"file": path.relative_to(self.root).as_posix(), "sha256": sha256_bytes(data), "bytes": len(data)}

    def check_chunk(self, entry: dict[str, Any]) -> str | None:
        """``None`` when the chunk file matches its entry, else what is wrong with it."""
        path = self.root / entry["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return "its file is missing"
        except OSError as error:
            return f"its file cannot be read ({error})"
        if len(data) != entry.get("bytes", len(data)):
            return f"its file has {len(data)} bytes, {entry['bytes']} were written (truncated?)"
        if sha256_bytes(data) != entry["sha256"]:
            return "its sha256 does not match the one recorded when it was written"
        try:
            _parse_chunk(data)
        except (ValueError, KeyError, TypeError) as error:
            return f"it cannot be parsed ({error})"
        return None

    def chunk_files(self) -> list[Path]:
        """Every chunk file under ``chunks/`` (not temporaries), in name order."""
        directory = self.root / CHUNKS
        return sorted(p for p in directory.glob("*/*.json") if not p.name.startswith(".")) if directory.is_dir() else []

    def holds_sweep(self) -> bool:
        """Whether there is anything of a sweep here: a manifest (readable or not) or a chunks folder."""
        return self.manifest_path.exists() or (self.root / CHUNKS).exists()

    def discard(self) -> int:
        """Remove the sweep's own files (manifest, chunks, temporaries), nothing else; returns how
        many chunk files were removed."""
        removed = len(self.chunk_files())
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path.unlink()
        shutil.rmtree(self.root / CHUNKS, ignore_errors=True)
        remove_stale_temporaries(self.root)
        return removed

    def read_chunk(self, entry: dict[str, Any]) -> pd.DataFrame:
        problem = self.check_chunk(entry)
        if problem is not None:
            raise SweepIntegrityError(
                f"chunk {entry['file']} in {self.root} is damaged: {problem}; rerun the same sweep to recompute it"
            )
        return _parse_chunk((self.root / entry["file"]).read_bytes())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the directory; the OS releases it if the process dies."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks, run unguarded
            yield
            return
        with open(self.root / LOCK, "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise SweepBusyError(
                    f"another process is writing the sweep in {self.root}; wait for it or choose another out"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def load_results(out: str | os.PathLike) -> pd.DataFrame:
    """Every finished chunk of the sweep in ``out`` as one tidy frame, in model then prompt order.

    Columns: ``model`` (the source string), ``chunk``, ``prompt`` (index in the model's prompt
    list), then the experiment's own (``layer``, ``head``, ``pos``, ``value``, ...). Every chunk's
    checksum is verified; a damaged one raises :class:`SweepIntegrityError`. An unfinished sweep
    gives the chunks it has, with a :class:`SweepWarning`.
    """
    store = Store(out)
    manifest = store.read_manifest()
    entries = sorted(manifest["chunks"].values(), key=lambda e: (e["model_index"], e["chunk"]))
    if not manifest.get("complete"):
        warnings.warn(
            f"the sweep in {store.root} is unfinished ({len(entries)} chunks so far): rerun it to complete it",
            SweepWarning,
            stacklevel=2,
        )
    if not entries:
        return pd.DataFrame(columns=["model", "chunk", "prompt"])
    return pd.concat([store.read_chunk(entry) for entry in entries], ignore_index=True)


def _parse_chunk(data: bytes) -> pd.DataFrame:
    return payload_to_frame(verified_payload(data)["frame"])


def verified_payload(data: bytes) -> dict[str, Any]:
    """A chunk file's content, checked against the format and the content hash it records
    (chunks written before the hash was recorded carry none); ValueError if it does not match."""
    payload = json.loads(data)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise ValueError(f"format {found!r}, expected {FORMAT}")
    recorded = payload.get(CONTENT_SHA256)
    if recorded is not None:
        rest = {k: v for k, v in payload.items() if k != CONTENT_SHA256}
        if sha256_bytes(canonical_json(rest)) != recorded:
            raise ValueError("its content does not match the content_sha256 it records")
    return payload


# -- a lost manifest, rebuilt from the chunks -----------------------------------------------------
def rebuild_manifest(store: Store, config: dict[str, Any], config_sha256: str) -> tuple[dict[str, Any], list[str]]:
    """The manifest of the sweep in ``store`` rebuilt from its chunk files, for ``config``.

    A chunk is kept if it verifies itself (format, content hash) and records ``config_sha256``
    and the identity of its model; chunks that do not verify are left to be recomputed (the
    returned lines say which, and why). Chunks that verify but record another configuration, or
    carry no hashes to verify (written by an older anylens), raise :class:`SweepConfigError`:
    they are not this sweep's, and only a fresh start may remove them. Run history (versions,
    times) is not in the chunks and starts anew.
    """
    chunks: dict[str, dict[str, Any]] = {}
    models: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    foreign: list[str] = []
    for path in store.chunk_files():
        name = path.relative_to(store.root).as_posix()
        data = path.read_bytes()
        try:
            payload = verified_payload(data)
            identity, recorded = payload.get("identity"), payload.get("config_sha256")
            if recorded is None or not isinstance(identity, dict) or CONTENT_SHA256 not in payload:
                foreign.append(f"{name} (records no configuration hash to check it against)")
                continue
            if recorded != config_sha256:
                foreign.append(f"{name} (computed with another configuration)")
                continue
            key = chunk_key(path.parent.name, int(path.stem))
            where = model_dirname(payload["model_index"], payload["model"]), payload["chunk"]
            if where != (path.parent.name, int(path.stem)) or chunk_path(store.root, key) != path:
                raise ValueError("its name does not match the model and chunk it records")
            payload_to_frame(payload["frame"])
        except (ValueError, KeyError, TypeError) as error:
            skipped.append(f"{name}: {error}")
            continue
        dirname = path.parent.name
        known = models.setdefault(dirname, identity)
        if known != identity:
            skipped.append(f"{name}: computed with another load of its model than the chunks before it")
            continue
        chunks[key] = {
            "file": name,
            "sha256": sha256_bytes(data),
            "bytes": len(data),
            "model": payload["model"],
            "model_index": payload["model_index"],
            "chunk": payload["chunk"],
            "prompts": payload["prompts"],
            "rows": len(payload["frame"]["data"][payload["frame"]["columns"][0]]) if payload["frame"]["columns"] else 0,
            "seconds": None,
            "run": None,
        }
    if foreign:
        raise SweepConfigError(
            f"{store.root} holds chunk files that are not this sweep's and no readable manifest:\n  "
            + "\n  ".join(foreign[:10])
            + ("\n  ..." if len(foreign) > 10 else "")
            + "\nResume it with its own arguments, choose another out, or start over with fresh=True (anylens run --fresh)."
        )
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest = {
        "format": FORMAT,
        "config": config,
        "models": models,
        "chunks": chunks,
        "runs": [],
        "created": now,
        "rebuilt": now,
        "complete": False,
    }
    return manifest, skipped


__all__ = [
    "FORMAT",
    "MANIFEST",
    "Store",
    "SweepBusyError",
    "SweepConfigError",
    "SweepError",
    "SweepIntegrityError",
    "SweepWarning",
    "SweepWeightsChangedError",
    "canonical_json",
    "chunk_key",
    "frame_to_payload",
    "load_results",
    "model_dirname",
    "payload_to_frame",
    "rebuild_manifest",
    "sha256_bytes",
    "verified_payload",
    "write_atomic",
]
