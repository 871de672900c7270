"""Read an offline wandb run file (run-<id>.wandb) back: the history rows.

The file is a LevelDB-style log: a 7-byte header (':W&B', magic, version),
then 32 KiB blocks of records, each with a 7-byte header (crc32, length,
type: 1 full, 2 first, 3 middle, 4 last) holding protobuf `Record`s.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - (pos % BLOCK)
        if room < 7:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield _parse(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield _parse(pending + chunk)
            pending = b""


def _parse(raw: bytes):
    rec = pb.Record()
    rec.ParseFromString(raw)
    return rec


def history(path: Path) -> list[dict]:
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_id(path: Path) -> str:
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            return rec.run.run_id
    raise AssertionError(f"no run record in {path}")


def artifacts(path: Path) -> list:
    """The ArtifactRecord protos logged in the run file."""
    return [rec.artifact for rec in records(path) if rec.WhichOneof("record_type") == "artifact"]
