"""A history of finished images: files in a folder, indexed in SQLite; or, without a folder, the last few
in memory. Nothing here knows HTTP (the server, a GUI or a script use it alike).

The files are the truth: each is an image as `zimage-mlx generate` writes it (PNG with its recipe in its
text chunks; JPEG or WebP with A1111's infotext in EXIF), written through a temporary file and a rename, so
a kill mid-write leaves a `.tmp` file (removed on the next open) and never a half image. The index
(`history.sqlite`, WAL mode) only speeds up listing and searching: a missing or broken index is rebuilt from
the images' own metadata (`Recipe.from_png`), and files added or removed behind its back are found on open.

    history = open_history("outputs")  # or open_history(None): the last 200 in memory
    entry = history.add(png_bytes, recipe, "png")
    history.list(q="fox", limit=20)  # newest first
    history.read(entry["id"]); history.delete(entry["id"])
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

from .recipe import Recipe

log = logging.getLogger("zimage_mlx.history")

INDEX = "history.sqlite"
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
SCHEMA = ("CREATE TABLE IF NOT EXISTS images (id TEXT PRIMARY KEY, created REAL NOT NULL, prompt TEXT NOT NULL, "
          "seed INTEGER, width INTEGER, height INTEGER, recipe TEXT NOT NULL)")


def open_history(folder, keep: int = 200):
    """A `FolderHistory` in `folder` (created if needed), or with None a `MemoryHistory` of the last `keep`."""
    return MemoryHistory(keep) if folder is None else FolderHistory(Path(folder))


def file_name(recipe: Recipe, fmt: str, now: float) -> str:
    """zimage-YYYYmmdd-HHMMSS-mmm-SEED-RAND.ext: sorts by time, names the seed, never collides."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now * 1000) % 1000:03d}"
    return f"zimage-{stamp}-{recipe.seed}-{secrets.token_hex(2)}{EXTENSIONS[fmt]}"


def entry_of(id_: str, created: float, recipe: Recipe) -> dict:
    """An image's entry: its id, when it was made, and the settings (the recipe's JSON form)."""
    return {"id": id_, "created": created, "prompt": recipe.prompt, "seed": recipe.seed, "width": recipe.width,
            "height": recipe.height, "recipe": recipe.to_dict()}


def matches(entry: dict, q: str | None) -> bool:
    return not q or q.lower() in str(entry["prompt"]).lower()


class MemoryHistory:
    """The last `keep` images, in memory (lost on restart)."""

    folder = None

    def __init__(self, keep: int = 200):
        self.keep = keep
        self._items: OrderedDict[str, tuple[dict, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, data: bytes, recipe: Recipe, fmt: str = "png") -> dict:
        now = time.time()
        entry = entry_of(file_name(recipe, fmt, now), now, recipe)
        with self._lock:
            self._items[entry["id"]] = (entry, data)
            while len(self._items) > self.keep:
                self._items.popitem(last=False)
        return entry

    def list(self, q: str | None = None, offset: int = 0, limit: int = 50) -> tuple[list[dict], int]:
        """(entries newest first, from `offset`, at most `limit`; how many match in all)."""
        with self._lock:
            found = [e for e, _ in reversed(self._items.values()) if matches(e, q)]
        return found[offset: offset + limit], len(found)

    def get(self, id_: str) -> dict | None:
        with self._lock:
            item = self._items.get(id_)
        return item[0] if item else None

    def read(self, id_: str) -> tuple[bytes, str] | None:
        """(the image's bytes, its media type), or None."""
        with self._lock:
            item = self._items.get(id_)
        return None if item is None else (item[1], MEDIA_TYPES[Path(id_).suffix])

    def delete(self, id_: str) -> bool:
        with self._lock:
            return self._items.pop(id_, None) is not None

    def close(self) -> None:
        pass


class FolderHistory:
    """Images in `folder`, indexed in `folder/history.sqlite`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = self._connect()
        self.sync()

    def _connect(self) -> sqlite3.Connection:
        """The index, opened in WAL mode; a broken one is moved aside and started afresh (then `sync` fills it)."""
        path = self.folder / INDEX
        for attempt in (0, 1):
            try:
                db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(SCHEMA)
                db.execute("SELECT count(*) FROM images").fetchone()
                return db
            except sqlite3.DatabaseError as e:
                if attempt:
                    raise
                log.warning("the history index %s is unreadable (%s); rebuilding it from the images", path, e)
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def images(self) -> dict[str, Path]:
        """The image files in the folder by name (temporary files left out)."""
        return {p.name: p for p in self.folder.iterdir()
                if p.suffix.lower() in MEDIA_TYPES and not p.name.startswith(".") and p.is_file()}

    def sync(self) -> tuple[int, int]:
        """Make the index match the folder: remove left-over temporary files, index the images it lacks (from
        their metadata), forget the rows whose file is gone. Returns (added, forgotten)."""
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        files = self.images()
        with self._lock:
            known = {row[0] for row in self.db.execute("SELECT id FROM images")}
            gone = known - set(files)
            self.db.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in gone])
        added = sum(self._index_file(files[name]) for name in sorted(set(files) - known))
        if added or gone:
            log.info("history %s: indexed %d images, forgot %d", self.folder, added, len(gone))
        return added, len(gone)

    def rebuild(self) -> int:
        """Forget the index and rebuild it from the images' metadata; returns how many it holds."""
        with self._lock:
            self.db.execute("DELETE FROM images")
        self.sync()
        return self.count()

    def count(self) -> int:
        with self._lock:
            return self.db.execute("SELECT count(*) FROM images").fetchone()[0]

    def _index_file(self, path: Path) -> bool:
        try:
            recipe = Recipe.from_png(path)
        except Exception as e:  # noqa: BLE001 - an image without our metadata is left alone, unlisted
            log.warning("history: %s has no readable recipe (%s); not listed", path.name, e)
            return False
        self._insert(entry_of(path.name, path.stat().st_mtime, recipe))
        return True

    def _insert(self, entry: dict) -> None:
        import json

        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (entry["id"], entry["created"], str(entry["prompt"]), entry["seed"], entry["width"],
                             entry["height"], json.dumps(entry["recipe"])))

    def add(self, data: bytes, recipe: Recipe, fmt: str = "png") -> dict:
        """Write the image (a temporary file, then a rename), then index it."""
        now = time.time()
        name = file_name(recipe, fmt, now)
        path = self.folder / name
        tmp = self.folder / f".{name}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        entry = entry_of(name, now, recipe)
        self._insert(entry)
        return entry

    def list(self, q: str | None = None, offset: int = 0, limit: int = 50) -> tuple[list[dict], int]:
        """(entries newest first, from `offset`, at most `limit`; how many match in all). `q` searches prompts."""
        where, args = "", ()
        if q:
            where, args = " WHERE prompt LIKE ? ESCAPE '\\'", ("%" + re.sub(r"([%_\\])", r"\\\1", q) + "%",)
        with self._lock:
            total = self.db.execute("SELECT count(*) FROM images" + where, args).fetchone()[0]
            rows = self.db.execute("SELECT * FROM images" + where + " ORDER BY created DESC, id DESC LIMIT ? OFFSET ?",
                                   (*args, limit, offset)).fetchall()
        return [self._entry(row) for row in rows], total

    @staticmethod
    def _entry(row) -> dict:
        import json

        id_, created, prompt, seed, width, height, recipe = row
        return {"id": id_, "created": created, "prompt": prompt, "seed": seed, "width": width, "height": height,
                "recipe": json.loads(recipe)}

    def get(self, id_: str) -> dict | None:
        if not ID.match(id_):
            return None
        with self._lock:
            row = self.db.execute("SELECT * FROM images WHERE id = ?", (id_,)).fetchone()
        return None if row is None else self._entry(row)

    def read(self, id_: str) -> tuple[bytes, str] | None:
        """(the image's bytes, its media type), or None."""
        if self.get(id_) is None:
            return None
        try:
            return (self.folder / id_).read_bytes(), MEDIA_TYPES[Path(id_).suffix.lower()]
        except FileNotFoundError:
            return None

    def delete(self, id_: str) -> bool:
        """Remove the image's file and its row; False if there is no such image."""
        if self.get(id_) is None:
            return False
        (self.folder / id_).unlink(missing_ok=True)
        with self._lock:
            self.db.execute("DELETE FROM images WHERE id = ?", (id_,))
        return True

    def close(self) -> None:
        with self._lock:
            self.db.close()
