"""``python -m sid.teachers convert PKL OUTDIR``: an EDM snapshot pickle to a safetensors folder."""

from __future__ import annotations

import argparse

from ..cli import user_errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sid.teachers", description="Teacher file tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="read an EDM snapshot (network-snapshot-*.pkl, edm-*.pkl) without running "
                          "its code and write config.json + safetensors, which load_teacher / --teacher read")
    conv.add_argument("pkl", metavar="PKL")
    conv.add_argument("outdir", metavar="OUTDIR")
    args = parser.parse_args(argv)
    with user_errors():
        from .edm import convert

        denoiser = convert(args.pkl, args.outdir)
        n = sum(p.numel() for p in denoiser.parameters())
        kw = denoiser.init_kwargs
        print(f"{args.outdir}: {type(denoiser).__name__} + {kw['model_type']}, {kw['img_channels']}x"
              f"{kw['img_resolution']}x{kw['img_resolution']}, label_dim {kw['label_dim']}, {n:,} parameters")


if __name__ == "__main__":
    main()
