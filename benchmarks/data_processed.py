"""Data preparation per sample: raw records through the processor against processed rows.

    python benchmarks/data_processed.py                  # toy VLM, 512 shapes-world records
    python benchmarks/data_processed.py --model llava --rows 256

Reads the shapes world (PNG bytes + chat messages) and encodes every record as training does
(image decode, chat template, the model's processor); then writes the same records in the
processed form with `vlmscope data process`'s code and reads those rows back through the
model's check. Prints samples per second of each path (one process, no workers, no model
forward), the processed files' size, and whether both paths gave identical tensors.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from vlmscope.data import open_dataset
from vlmscope.data.convert import process_dataset
from vlmscope.data.processed import ProcessedSpec
from vlmscope.data.processing import SampleEncoder, SkipCounter, encode_stream
from vlmscope.models.hooked import HookedVLM
from vlmscope.training.config import parse_train_args
from vlmscope.training.sources import open_training_data, resolve_model_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy", help="zoo name, `toy` or a path (default toy)")
    p.add_argument("--rows", type=int, default=512, help="shapes-world records (default 512)")
    p.add_argument("--repeats", type=int, default=3, help="passes per path; the best is kept")
    args = p.parse_args()
    vlm = HookedVLM.from_pretrained(resolve_model_path(args.model), device="cpu",
                                    dtype=torch.float32)  # fmt: skip
    cfg = parse_train_args([args.model, f"shapes:{args.rows}"])
    raw_data = open_training_data(cfg)
    ids = vlm.adapter.image_token_ids()
    raw_enc = SampleEncoder(vlm.processor, cfg.ctx_len, ids)
    proc_enc = SampleEncoder(vlm.processor, cfg.ctx_len, ids, processed=ProcessedSpec(vlm))

    def best(data: object, enc: SampleEncoder) -> tuple[float, list]:  # type: ignore[type-arg]
        times, samples = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            samples = list(encode_stream(data, enc, SkipCounter()))  # type: ignore[arg-type]
            times.append(time.perf_counter() - t)
        return len(samples) / min(times), samples

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        process_dataset(vlm, open_training_data(cfg), folder, name=args.model)
        size = sum(f.stat().st_size for f in folder.glob("*.parquet"))
        raw_rate, raw = best(raw_data, raw_enc)
        proc_rate, proc = best(open_dataset(folder), proc_enc)
    same = len(raw) == len(proc) and all(
        a.tensors.keys() == b.tensors.keys()
        and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        for a, b in zip(raw, proc, strict=True)
    )
    print(f"\n{args.model}, {args.rows} shapes-world records, best of {args.repeats} passes\n")
    print(f"{'path':<34} {'samples/s':>10}")
    print(f"{'raw: decode + template + processor':<34} {raw_rate:>10,.0f}")
    print(f"{'processed: read + check':<34} {proc_rate:>10,.0f}")
    print(f"\nprocessed files: {size / 2**20:.1f} MB; identical tensors: {same}")


if __name__ == "__main__":
    main()
