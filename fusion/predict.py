"""Predictions from run folders for the command line: the submission file, or one new post.

Both go through ``fusion.api.Run``: a ``fit`` run's heads read the cached features (or, for a
new post, the features its encoders compute as extraction did); a ``finetune`` run's whole model
runs on the raw pairs. Several runs (or a K-fold folder, which holds ``fold-*`` runs) predict as
an ensemble: a decision rule (``fusion/decision.py``) turns their class probabilities into one
prediction — the plain average unless ``--decision`` names another or the K-fold folder's
``decision.json`` stores another as its default.

The command writes the submission by streaming (``stream_submission``): a chunk of test rows at a
time is read from the caches, labelled and appended to ``OUT.part``, so memory is bounded by the
chunk rather than the data, and a run killed half-way resumes where it stopped. Under torchrun
each process labels its contiguous slice into a part of its own and rank 0 joins the parts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from extract.dataset import LABELS, read_split
from extract.device import resolve_device
from extract.distributed import Launch, all_gather, join, share_of
from fusion.api import Run
from fusion.decision import DecisionRule, to_dict
from fusion.run import CONFIG_FILE, WEIGHTS_FILE

# Test rows read, labelled and written at a time. A multiple of fusion.train.predict_proba's batch (256):
# the rows then batch exactly as in one pass over the split, so the file is byte for byte the same.
DEFAULT_CHUNK_ROWS = 4096
HEADER = ["guid", "tag"]
HEADER_LINE = b"guid,tag\n"


def write_submission(path: Path, guids: list[str], predictions: np.ndarray) -> None:
    """``guid,tag`` rows in the given order, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows((guid, LABELS[int(p)]) for guid, p in zip(guids, predictions))
    os.replace(tmp, path)


def predict_submission(
    runs: list[Path], data_dir: Path, cache_root: Path, out: Path, decision: str | DecisionRule | None = None
) -> np.ndarray:
    """Label every test row in one pass by the runs' probabilities and ``decision``; returns (N, C).

    ``decision`` (a rule or its name) defaults to the plain mean unless a K-fold folder stores another.
    The features are read a chunk at a time; the rule then sees every row at once, which the ``prior``
    rule (class shares over the rows predicted) needs. Nothing is written before the end.
    """
    return _one_pass(Run.load(runs, decision=decision, data_dir=data_dir), data_dir, cache_root, out)


def _one_pass(run: Run, data_dir: Path, cache_root: Path, out: Path) -> np.ndarray:
    guids = [row.guid for row in read_split(data_dir, "test")]
    members = [run.member_probabilities_cached(data_dir, chunk, cache_root, progress=True, keep=False)
               for chunk in _chunks(guids, DEFAULT_CHUNK_ROWS)]  # each (M, B, C)
    probabilities = run.rule.apply(np.concatenate(members, axis=1))  # (M, N, C) → (N, C)
    write_submission(out, guids, probabilities.argmax(1))
    return probabilities


@dataclass(frozen=True)
class SubmissionSummary:
    """What ``stream_submission`` wrote: the rows, how many an interrupted run had written, rows per class."""

    rows: int
    resumed: int
    counts: list[int]  # in LABELS order


def stream_submission(
    runs: list[Path], data_dir: Path, cache_root: Path, out: Path, decision: str | DecisionRule | None = None,
    *, chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: bool = True,
) -> SubmissionSummary | None:
    """Write the submission a chunk of test rows at a time, resumably; under torchrun, a slice per process.

    Each chunk's rows are appended to ``OUT.part`` and flushed; ``OUT.part.json`` beside it records
    what is predicted (the members' weights, the decision rule, the data, the cache and the test
    rows). A rerun of the same prediction keeps the rows written and labels the rest; a part left by
    another prediction is refused. The finished part becomes ``OUT``. Under torchrun (``RANK``,
    ``WORLD_SIZE``) rank k writes its contiguous slice into ``OUT.rank-k.part``, and rank 0 joins
    the parts in input order into ``OUT`` once every rank is done. Returns None on the other ranks.

    The ``prior`` rule matches the class shares of all the rows at once, so a chunk cannot be
    decided alone: it predicts as ``predict_submission`` (one pass, nothing to resume) and is refused
    under torchrun.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: expected at least 1")
    launch = Launch.from_env()
    if launch is not None:  # this rank's GPU (cuda:LOCAL_RANK, the current device) or share of the cores
        join(launch, resolve_device("auto"))
    run = Run.load(runs, decision=decision, data_dir=data_dir)
    if run.rule.name == "prior":
        if launch is not None:
            raise ValueError("the prior decision rule matches class shares over all test rows at once: predict "
                             "without torchrun (one pass), or choose another --decision")
        probabilities = _one_pass(run, data_dir, cache_root, out)
        return SubmissionSummary(len(probabilities), 0, _counts(probabilities.argmax(1)))
    guids = [row.guid for row in read_split(data_dir, "test")]
    identity = _identity(run, data_dir, cache_root, guids, launch)
    share = guids if launch is None else launch.share(guids)
    part = part_path(out, None if launch is None else launch.rank)
    done = _resume(part, identity, share)
    shown = progress and (launch is None or launch.leader)
    with tqdm(total=len(share), initial=done, unit="row", desc="predict", disable=not shown) as bar:
        # From the start of the chunk the run stopped in: its rows batch as in one pass; only the new ones are written.
        for start in range(done - done % chunk_rows, len(share), chunk_rows):
            chunk = share[start : start + chunk_rows]
            members = run.member_probabilities_cached(data_dir, chunk, cache_root, keep=False)  # (M, B, C)
            labels = run.rule.apply(members).argmax(1)  # (B,)
            skip = max(done - start, 0)
            _append(part, identity, chunk[skip:], labels[skip:])
            bar.update(len(chunk) - skip)
    _append(part, identity, [], np.zeros(0))  # a part even for no rows: its header
    if launch is None:
        os.replace(part, out)
        _identity_path(part).unlink()
        return _summary(out, done)
    resumed = sum(all_gather(done))  # also waits for every rank's part
    if not launch.leader:
        return None
    ranks = range(launch.world_size)
    _join_parts(out, [part_path(out, k) for k in ranks], [share_of(guids, k, launch.world_size) for k in ranks])
    return _summary(out, resumed)


def part_path(out: Path, rank: int | None) -> Path:
    """Where the rows of ``out`` grow: ``OUT.part``, or ``OUT.rank-k.part`` for rank k under torchrun."""
    return Path(f"{out}.part") if rank is None else Path(f"{out}.rank-{rank}.part")


def _identity_path(part: Path) -> Path:
    return Path(f"{part}.json")


def _chunks(guids: list[str], size: int) -> Iterator[list[str]]:
    """``guids`` in slices of ``size``; one empty slice for no guids, so the members still give (M, 0, C)."""
    for start in range(0, max(len(guids), 1), size):
        yield guids[start : start + size]


def _identity(run: Run, data_dir: Path, cache_root: Path, guids: list[str], launch: Launch | None) -> dict[str, Any]:
    """What must be the same for rows of an interrupted prediction to be kept, as JSON reads it back."""
    members = []
    for member in run.members:
        digest = hashlib.sha1()
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            with (member.run_dir / name).open("rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha1").digest())
        members.append({"run": str(member.run_dir.resolve()), "sha1": digest.hexdigest()})
    identity = {
        "members": members, "decision": to_dict(run.rule), "data": str(Path(data_dir).resolve()),
        "cache": str(Path(cache_root).resolve()), "rows": hashlib.sha1("\n".join(guids).encode()).hexdigest(),
        "slice": None if launch is None else [launch.rank, launch.world_size],
    }
    return json.loads(json.dumps(identity))


def _resume(part: Path, identity: dict[str, Any], guids: list[str]) -> int:
    """How many of ``guids`` an interrupted run of the same prediction wrote to ``part`` (0 without a part).

    The part is cut back after its last complete row: a row cut short by a kill is labelled again.
    """
    if not part.exists():
        return 0
    side = _identity_path(part)
    found = json.loads(side.read_text()) if side.is_file() else {}
    if found != identity:
        differ = [key for key in identity if found.get(key) != identity[key]]
        raise ValueError(f"{part}: left by another prediction (its {', '.join(differ)} differ); delete it and "
                         f"{side.name} to predict again")
    done = 0
    with part.open("rb") as handle:
        size = len(handle.readline())
        if size != len(HEADER_LINE):  # _append writes the header through a temporary file: never cut
            raise ValueError(f"{part}: not a submission part (no guid,tag header); delete it and {side.name}")
        for line in handle:
            if not line.endswith(b"\n"):
                break
            row = next(csv.reader([line.decode("utf-8", errors="replace")]))
            expected = guids[done] if done < len(guids) else None
            if len(row) != 2 or row[0] != expected or row[1] not in LABELS:
                raise ValueError(f"{part}:{done + 2}: {line.strip()!r} is not the next row of this prediction "
                                 f"(guid {expected}); delete it and {side.name} to predict again")
            done += 1
            size += len(line)
    with part.open("r+b") as handle:
        handle.truncate(size)
    return done


def _append(part: Path, identity: dict[str, Any], guids: list[str], labels: np.ndarray) -> None:
    """Append labelled rows to ``part`` and close it (its rows are on disk); the first call writes its identity
    and, through a temporary file, its header, so that a part on disk always starts with one."""
    if not part.exists():
        part.parent.mkdir(parents=True, exist_ok=True)
        _identity_path(part).write_text(json.dumps(identity, indent=1))
        tmp = Path(f"{part}.tmp")
        tmp.write_text(",".join(HEADER) + "\n", encoding="utf-8")
        os.replace(tmp, part)
    with part.open("a", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows((g, LABELS[int(i)]) for g, i in zip(guids, labels))


def _join_parts(out: Path, parts: list[Path], shares: list[list[str]]) -> None:
    """Rank 0: the ranks' parts, each checked to hold exactly its slice, one after another into ``out``."""
    tmp = Path(f"{out}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as target:
        writer = csv.writer(target, lineterminator="\n")
        writer.writerow(HEADER)
        for part, share in zip(parts, shares):
            if not part.is_file():
                raise FileNotFoundError(f"{part}: missing after every rank finished; on several machines --out must "
                                        "be in a folder they share")
            with part.open(newline="", encoding="utf-8") as source:
                reader = csv.reader(source)
                next(reader)  # the header
                written = 0
                for row in reader:  # a row at a time: memory stays bounded however large the slice
                    if written == len(share) or row[0] != share[written]:
                        written = -1  # a row that is not the next of the slice
                        break
                    writer.writerow(row)
                    written += 1
            if written != len(share):
                raise ValueError(f"{part}: does not hold exactly the {len(share)} rows of its slice in order; delete "
                                 f"the parts and predict again")
    os.replace(tmp, out)
    for part in parts:
        part.unlink()
        _identity_path(part).unlink()


def _counts(labels: np.ndarray) -> list[int]:
    return [int(count) for count in np.bincount(labels.astype(np.int64), minlength=len(LABELS))]


def _summary(out: Path, resumed: int) -> SubmissionSummary:
    """The submission's rows per class, read back from ``out`` (rows of every rank and run are counted)."""
    counts = [0] * len(LABELS)
    with Path(out).open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        next(reader)  # the header
        for _, tag in reader:
            counts[LABELS.index(tag)] += 1
    return SubmissionSummary(sum(counts), resumed, counts)
