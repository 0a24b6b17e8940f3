"""Synthetic captions: the cost per caption of `caption_images` (kd-cache captions' inner loop), by captions per
image and caption length, and the share of it spent encoding the images.

A random-init captioner (default kd-demo-coca) on random images: it rarely samples the end marker, so every
caption runs to `seq_len` tokens, the worst case of a trained one. Variants (num, seq_len) run interleaved on the
same --images images (first round dropped, medians over --repeats); the image tower alone is timed alongside.
Per caption, the image encode is paid once per image (num captions share it) and the decoder once per token.

    python bench/bench_captions.py --images 64 --nums 1 2 5 --seq-lens 16 24 --repeats 3
"""
from __future__ import annotations

import argparse

import torch

import _common as C  # noqa: N812 - also puts the repo on sys.path
from common.captioner import caption_images
from common.families import caption_image_tokens, image_size
from common.models import create_clip


# --tiny: the test captioner, 4 images, two caption counts of one length, one round after the warm-up
TINY = {"captioner": "kd-test-coca", "images": 4, "nums": [1, 2], "seq_lens": [6], "repeats": 1}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captioner", default="kd-demo-coca", help="an open_clip CoCa config")
    p.add_argument("--images", type=int, default=64, help="images per call (kd-cache captions --batch-size)")
    p.add_argument("--nums", type=int, nargs="+", default=[1, 2, 5], help="captions per image")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[16, 24], help="tokens per caption, markers included")
    p.add_argument("--repeats", type=int, default=3)
    C.add_common_args(p)
    return C.parse_args(p, TINY)


def main() -> None:
    args = parse_args()
    header = C.start("synthetic captions: seconds per caption", args)
    captioner = create_clip(args.captioner, device=args.device)
    print(C.model_summary(captioner))
    images = torch.randn(args.images, 3, *image_size(captioner.model), generator=torch.Generator().manual_seed(0))

    def encode():
        with torch.inference_mode():
            caption_image_tokens(captioner.model, images.to(args.device))

    grid = [(num, seq_len) for num in args.nums for seq_len in args.seq_lens]
    variants = {"image tower": encode} | {
        f"num {num}, seq_len {seq_len}": (lambda num=num, seq_len=seq_len:
                                          caption_images(captioner, images, num, seed=0, seq_len=seq_len))
        for num, seq_len in grid}
    times = C.interleaved(variants, args.repeats, args.device, warmup=1)
    encode_s = C.median(times["image tower"])
    rows, results = [], {**header, "images": args.images, "image_tower_s": encode_s, "runs": []}
    for (num, seq_len), name in zip(grid, list(variants)[1:]):
        seconds, captions = C.median(times[name]), args.images * num
        per_caption_ms = 1000 * seconds / captions
        rows.append([num, seq_len, seconds, per_caption_ms, per_caption_ms / (seq_len - 1),
                     100 * encode_s / seconds])
        results["runs"].append({"num": num, "seq_len": seq_len, "seconds": seconds, "times": times[name],
                                "ms_per_caption": per_caption_ms})
    C.print_table(["num", "seq_len", "s / call", "ms / caption", "ms / token", "% image tower"], rows,
                  f"{args.images} images per call; image tower alone {encode_s:.3f} s")
    C.write_json(args.json, results)


if __name__ == "__main__":
    main()
