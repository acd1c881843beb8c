"""``python -m nodeimage`` (``make image``): write the node image archive and print its name, digest, size."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nodeimage import build, debs, rootfs

DEFAULT_CACHE = Path(os.environ.get("AMBIENT_CNI_IMAGE_CACHE", "/var/cache/ambient-cni-image"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeimage", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=Path("dist/ambient-cni.bundle"))
    parser.add_argument("--out", type=Path, default=Path("dist/ambient-cni-image.tar"))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE / "debs",
                        help="where the Debian packages are kept between builds")
    parser.add_argument("--refresh", action="store_true", help="fetch the current Debian packages again")
    parser.add_argument("--name", default=build.IMAGE_NAME)
    args = parser.parse_args(argv)
    try:
        built = build.build(args.bundle, args.cache, args.refresh, args.name)
    except (debs.DebError, rootfs.RootfsError, OSError) as exc:
        print(f"nodeimage: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_bytes(built.archive)
    os.replace(tmp, args.out)
    print(f"image   {built.name}")
    print(f"digest  {built.digest}")
    print(f"archive {args.out} ({len(built.archive) / 1e6:.1f} MB)")
    print(f"files   base {built.base_files}, app {built.app_files}")
    print("debs    " + " ".join(f"{d.package}={d.version}" for d in built.packages))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
