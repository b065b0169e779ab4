"""Build the LSEP training data: ImageNet -> 256/512 px PNGs (`convert`) -> SD-VAE latents (`encode`).

    python preprocessing/dataset_tools.py convert --source ILSVRC/Data/CLS-LOC/train \\
        --dest data/images --resolution 256x256 --transform center-crop-dhariwal
    torchrun --nproc_per_node 8 preprocessing/dataset_tools.py encode \\
        --source data/images --dest data/vae-sd

Then train with `--data-dir data` (dataset.py reads data/images and data/vae-sd, or their .zip).
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from errors import run_cli  # noqa: E402
from flagcheck import AT_LEAST_0, AT_LEAST_1, check_ranges  # noqa: E402
from preprocessing.transforms import TRANSFORMS  # noqa: E402


def parse_resolution(text):
    """'256x256' or '256' -> (width, height)."""
    m = re.fullmatch(r"(\d+)(?:[x,](\d+))?", text.strip())
    if not m or int(m.group(1)) == 0 or (m.group(2) is not None and int(m.group(2)) == 0):
        raise argparse.ArgumentTypeError(f"expected WxH such as 256x256, got {text!r}")
    w = int(m.group(1))
    return w, int(m.group(2) or w)


def build_parser():
    parser = argparse.ArgumentParser(prog="dataset_tools.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="class-folder tree or .zip -> uniform RGB PNGs + dataset.json")
    p.add_argument("--source", required=True, metavar="PATH",
                   help="folder with one subfolder per class (images may be nested), or a .zip of one")
    p.add_argument("--dest", required=True, metavar="PATH", help="new folder, or a .zip file")
    p.add_argument("--resolution", required=True, type=parse_resolution, metavar="WxH", help="e.g. 256x256")
    p.add_argument("--transform", default="center-crop-dhariwal", choices=TRANSFORMS,
                   help="center-crop-dhariwal: ADM's ImageNet rule (square only); center-crop: one LANCZOS resize")
    p.add_argument("--max-images", type=int, default=None, metavar="N", help="first N source images (sorted)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                   help="decoding processes (output does not depend on it; 0 = in this process)")

    p = sub.add_parser("encode", help="convert's PNGs -> VAE posterior moments (.npy) + dataset.json")
    p.add_argument("--source", required=True, metavar="PATH", help="folder or .zip written by convert")
    p.add_argument("--dest", required=True, metavar="DIR", help="output folder (reruns resume in it)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-mse", metavar="NAME|DIR",
                   help="ema, mse, a hub name, or a local save_pretrained folder (any diffusers AutoencoderKL)")
    p.add_argument("--latent-norm", default="scale", choices=("scale", "per-channel"),
                   help="model inputs: scale = (latent - shift_factor) * scaling_factor of the VAE's config "
                        "(SD-VAE: 0.18215, 0); per-channel = (latent - mean_c) / std_c of the encoded data "
                        "(one extra pass over the latents); recorded in dataset.json")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="images per VAE call (keep it fixed across resumes for identical bytes)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="PNG-decoding DataLoader workers per rank (default min(8, cpus / ranks))")
    p.add_argument("--max-images", type=int, default=None, metavar="N", help="first N images only")
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun) if present, else cpu")
    p.add_argument("--zip", action="store_true", help="also pack DIR into DIR.zip at the end")
    return parser


RANGES = {"max_images": AT_LEAST_1, "workers": AT_LEAST_0, "batch_size": AT_LEAST_1}


def main(argv=None):
    """A UserError is printed as one line with exit status 1; anything else keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_ranges(parser, args, RANGES)
    return run_cli(lambda _: run(args), None, prefix=f"dataset_tools.py {args.command}: error: ", exit_code=1,
                   message_in_exit=True)


def run(args):
    """Run the chosen command; returns 0."""
    if args.command == "convert":
        from preprocessing.convert import convert_dataset

        s = convert_dataset(args.source, args.dest, resolution=args.resolution, transform=args.transform,
                            max_images=args.max_images, workers=args.workers)
        print(f"convert: wrote {s.written} images of {len(s.skipped) + s.written} ({s.num_classes} classes) "
              f"to {s.dest}; skipped {len(s.skipped)} unreadable, listed in {s.skipped_log}")
    else:
        from preprocessing.encode import encode_dataset  # torch/diffusers are imported only for encode

        s = encode_dataset(args.source, args.dest, vae=args.vae, batch_size=args.batch_size,
                           workers=args.workers, max_images=args.max_images, device=args.device,
                           zip_dest=args.zip, latent_norm=args.latent_norm)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"encode: {s.total} latents {s.latent_shape} in {s.dest} ({s.written} written now, "
                  f"{s.kept} already complete)" + (f"; packed into {s.zip_path}" if s.zip_path else ""))
    return 0


if __name__ == "__main__":
    main()
