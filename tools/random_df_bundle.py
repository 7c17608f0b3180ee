"""A random-weight bundle of the research code's Unet3D at a preset's real size, for
`dfserve bench --model BUNDLE` (speed does not depend on the weights; it says nothing about
quality, and is never served as a model):

    .venv/bin/python tools/random_df_bundle.py --config dmlab --out /tmp/dmlab-random
    .venv/bin/dfserve bench --model /tmp/dmlab-random --engine-only
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dfserve.model.bundle import save_bundle
from dfserve.model.importers.df_config import bundle_config, load_df_config
from dfserve.model.unet3d import UNet3D


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="dmlab", help="dmlab, minecraft or a Hydra YAML")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = bundle_config(load_df_config(args.config), f"{args.config}-random")
    assert config.unet is not None
    net = UNet3D(config.network, config.unet)
    params = sum(p.numel() for p in net.parameters())
    save_bundle(args.out, config, net, card=f"# {config.name}\n\nRandom weights ({params:,} "
                "parameters) at the research code's size, for benchmarks only.\n")
    print(f"wrote {args.out}: {params:,} parameters")


if __name__ == "__main__":
    main()
