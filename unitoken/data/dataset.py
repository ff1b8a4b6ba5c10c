"""Training data: pre-tokenised shards -> samples, a task-mixture sampler, packing and padding.

Samples are built from the stored VQ codes and SigLIP tiles, so no JPEG is decoded during
training. The sampler draws tasks in a configured ratio (UniToken stage II: understanding :
generation = 1 : 1) and can be checkpointed and resumed exactly. Packing concatenates samples
into fixed token budgets with positions restarting per sample and no attention across samples
(HF honours this for ``position_ids`` with ``attention_mask=None``); padding is kept for
comparison.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from unitoken.config import config_hash
from unitoken.data.pretokenize import FORMAT_VERSION, tiles_to_pixels
from unitoken.model.sequence import IGNORE, Encoded, ImageInput, SequenceBuilder, pad_batch
from unitoken.model.unitoken import ContinuousImages
from unitoken.model.vision import num_continuous_features


@dataclass
class Sample:
    encoded: Encoded
    images: ContinuousImages | None  # continuous-path inputs of this sample's input images
    task: str
    source: str
    index: int
    num_continuous: int = 0  # placeholder tokens of continuous features among its tokens

    def __len__(self) -> int:
        return len(self.encoded.input_ids)


class ShardDataset:
    """Random access to the records of a pre-tokenised directory."""

    def __init__(self, root: str | Path, builder: SequenceBuilder, sources: list[str] | None = None,
                 splits: list[str] | None = ("train",)) -> None:
        self.root = Path(root)
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.root}: no index.json; run `unitoken data pretokenize` (or let it finish)")
        self.index = json.loads(index_path.read_text())
        self.builder = builder
        cfg = builder.cfg
        if self.index["vq_config"] != config_hash(cfg.vq) or self.index["vision_config"] != config_hash(cfg.vision):
            raise ValueError(f"{self.root} was pre-tokenised for a different VQ/vision config than this model; "
                             "pre-tokenise again with this model")
        version = self.index.get("format_version")
        # Version 1 stretched AnyRes tiles and kept no image sizes; its base-only tiles are the same.
        # Version 2 stored every record's images (no image_slots); they read the same.
        if version not in (FORMAT_VERSION, 2) and (version != 1 or cfg.vision.anyres):
            raise ValueError(f"{self.root} has shard format_version {version}; this unitoken reads "
                             f"{FORMAT_VERSION} and 2 (and 1 without AnyRes): pre-tokenise again")
        self.records: list[tuple[int, int, dict]] = []  # (shard, position in shard, record)
        for s, shard in enumerate(self.index["shards"]):
            with open(self.root / "shards" / shard["name"] / "records.jsonl") as fh:
                for j, line in enumerate(fh):
                    rec = json.loads(line)
                    if (sources is None or rec.get("source") in sources) and \
                            (splits is None or rec.get("split", "train") in splits):
                        self.records.append((s, j, rec))
        self._open: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def tasks(self) -> list[str]:
        return [rec.get("task", "understanding") for _, _, rec in self.records]

    def record_sources(self) -> list[str]:
        return [rec.get("source", "") for _, _, rec in self.records]

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        if s not in self._open:
            path = self.root / "shards" / self.index["shards"][s]["name"] / "images.safetensors"
            with safe_open(str(path), "pt") as f:
                self._open[s] = {k: f.get_tensor(k) for k in f.keys()}
        return self._open[s]

    def __getitem__(self, i: int) -> Sample:
        s, j, rec = self.records[i]
        t = self._shard(s)
        cfg = self.builder.cfg
        lo, hi = int(t["image_offsets"][j]), int(t["image_offsets"][j + 1])
        inputs, tiles, grids, sizes = [], [], [], []
        answer_images = sum(turn["value"].count("<|image|>") for turn in rec["conversations"] if turn["from"] == "gpt")
        slots = t["image_slots"][lo:hi].tolist() if "image_slots" in t else range(lo, hi)  # format 2: one each
        for n, k in enumerate(slots):
            grid = tuple(int(x) for x in t["grids"][k])
            size = tuple(int(x) for x in t["sizes"][k]) if "sizes" in t else (0, 0)  # v1: base-only, unused
            is_output = lo + n >= hi - answer_images  # images in gpt turns are generated, never read
            n_cont = 0 if is_output or cfg.encoder_mode == "discrete" else \
                num_continuous_features(grid, size, cfg.vision)
            inputs.append(ImageInput(codes=t["codes"][k].long(), num_continuous=n_cont))
            if n_cont:
                tiles.append(tiles_to_pixels(t["tiles"][int(t["tile_offsets"][k]): int(t["tile_offsets"][k + 1])]))
                grids.append(grid)
                sizes.append(size)
        encoded = self.builder.conversation(rec["conversations"], inputs)
        images = ContinuousImages(torch.cat(tiles), grids, sizes) if tiles else None
        return Sample(encoded, images, rec.get("task", "understanding"), rec.get("source", ""), i,
                      sum(x.num_continuous for x in inputs))


# --------------------------------------------------------------------------- task mixture


class MixtureSampler:
    """Endless, deterministic stream of dataset indices with tasks drawn in a fixed ratio.

    Each task's indices are reshuffled per epoch of that task. ``state_dict`` /
    ``load_state_dict`` resume the exact stream.
    """

    def __init__(self, tasks: list[str], ratios: dict[str, float], seed: int = 0, kind: str = "tasks") -> None:
        """``tasks``: each index's pool (its task, or its source with ``kind="sources"``);
        ``ratios``: the pools' draw weights."""
        self.ratios = {k: float(v) for k, v in ratios.items() if v > 0}
        self.pools = {k: [i for i, t in enumerate(tasks) if t == k] for k in self.ratios}
        empty = [k for k, pool in self.pools.items() if not pool]
        if empty:
            raise ValueError(f"data mix asks for {kind} {empty} but the data has none "
                             f"({kind} present: {sorted(set(tasks))}); set their weight to 0 or add data")
        self.seed = seed
        self.rng = random.Random(seed)
        self.epoch = {k: 0 for k in self.pools}
        self.pos = {k: 0 for k in self.pools}
        self.order = {k: self._shuffled(k) for k in self.pools}
        self.drawn = {k: 0 for k in self.pools}

    def _shuffled(self, task: str) -> list[int]:
        order = list(self.pools[task])
        random.Random(f"{self.seed}-{task}-{self.epoch[task]}").shuffle(order)
        return order

    def __iter__(self):
        return self

    def __next__(self) -> int:
        names = sorted(self.ratios)
        task = self.rng.choices(names, weights=[self.ratios[k] for k in names])[0]
        if self.pos[task] == len(self.order[task]):
            self.epoch[task] += 1
            self.pos[task] = 0
            self.order[task] = self._shuffled(task)
        idx = self.order[task][self.pos[task]]
        self.pos[task] += 1
        self.drawn[task] += 1
        return idx

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "epoch": dict(self.epoch), "pos": dict(self.pos),
                "drawn": dict(self.drawn)}

    def load_state_dict(self, state: dict) -> None:
        rng_state = state["rng"]
        self.rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))
        self.epoch, self.pos, self.drawn = dict(state["epoch"]), dict(state["pos"]), dict(state["drawn"])
        self.order = {k: self._shuffled(k) for k in self.pools}


# --------------------------------------------------------------------------- batching


def pad_samples(samples: list[Sample], pad_id: int) -> dict:
    """Padded batch [b, longest]; the comparison baseline for packing."""
    batch = pad_batch([s.encoded for s in samples], pad_id)
    batch["images"] = ContinuousImages.concat([s.images for s in samples])
    return batch


def sample_loss_weights(labels: torch.Tensor, seq_lens: list[list[int]]) -> torch.Tensor:
    """Per-token loss weights [b, T] that make every sample weigh the same: the supervised
    tokens of each of the n samples share 1/n (a sample without any share nothing).

    Args:
        labels: [b, T] with -100 where unsupervised; seq_lens: per row, its samples' lengths in order.
    """
    weights = torch.zeros(labels.shape, dtype=torch.float32)
    supervised = labels != IGNORE
    spans = [(r, at, at + n) for r, lens in enumerate(seq_lens) for at, n in zip(_starts(lens), lens)]
    counts = [int(supervised[r, a:b].sum()) for r, a, b in spans]
    n_samples = sum(1 for c in counts if c)
    for (r, a, b), c in zip(spans, counts):
        if c:
            weights[r, a:b] = supervised[r, a:b].float() / (c * n_samples)
    return weights


def _starts(lens: list[int]) -> list[int]:
    out, at = [], 0
    for n in lens:
        out.append(at)
        at += n
    return out


def check_fits(samples: list[Sample], max_seq_len: int) -> None:
    """Raise for the first sample longer than ``max_seq_len``, naming it and its token counts.

    Samples are never cut: a truncated sample loses its answer or splits an image block.

    Raises:
        ValueError: a sample does not fit (raise the stage's max_seq_len or drop the record).
    """
    for s in samples:
        if len(s) > max_seq_len:
            grids = s.images.grids if s.images is not None else []
            raise ValueError(
                f"sample {s.index} (source {s.source!r}, task {s.task}) has {len(s)} tokens > max_seq_len "
                f"{max_seq_len}: {s.num_continuous} continuous features of {len(grids)} input images "
                f"(AnyRes grids {grids}) + {len(s) - s.num_continuous} text, discrete-image and marker tokens; "
                f"fix: raise the stage's max_seq_len to >= {len(s)} or drop the record")


def pack_samples(samples: list[Sample], budget: int, pad_id: int) -> dict:
    """Pack samples, in order, into rows of exactly ``budget`` tokens.

    ``position_ids`` restart at 0 for every sample (and for the tail padding), which is what
    isolates samples from each other in attention; ``attention_mask`` must stay None.

    Raises:
        ValueError: a sample longer than ``budget`` (``check_fits``).
    """
    check_fits(samples, budget)
    rows: list[list[Sample]] = [[]]
    used = 0
    for s in samples:
        if used + len(s) > budget:
            rows.append([])
            used = 0
        rows[-1].append(s)
        used += len(s)
    ids = torch.full((len(rows), budget), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), budget), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), budget), dtype=torch.long)
    seq_lens = []
    for r, row in enumerate(rows):
        at = 0
        lens = []
        for s in row:
            n = len(s)
            ids[r, at : at + n] = torch.tensor(s.encoded.input_ids)
            labels[r, at : at + n] = torch.tensor(s.encoded.labels)
            positions[r, at : at + n] = torch.arange(n)
            lens.append(n)
            at += n
        positions[r, at:] = torch.arange(budget - at)
        seq_lens.append(lens)
    ordered = [s.images for row in rows for s in row]  # row-major: the order embed() scatters in
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": None,
            "images": ContinuousImages.concat(ordered), "seq_lens": seq_lens}
