"""The ``fastmnist`` command: convert, info, verify, synth, bench, demo."""

import argparse
import sys
from pathlib import Path

from .errors import FastMNISTError


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except FastMNISTError as e:
        print(f"fastmnist: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastmnist", description=__doc__)
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="raw IDX files -> validated, pre-normalised shards")
    add_convert_args(c)
    c.set_defaults(func=_convert)

    i = sub.add_parser("info", help="print a converted set's manifest as a table")
    i.add_argument("path", type=Path)
    i.set_defaults(func=_info)

    v = sub.add_parser("verify", help="re-hash every file of a set against its manifest")
    v.add_argument("path", type=Path)
    v.set_defaults(func=_verify)

    s = sub.add_parser("synth", help="write generated MNIST-format raw files (offline demos)")
    s.add_argument("--root", type=Path, required=True, help="torchvision-style root to write")
    s.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist", "kmnist"])
    s.add_argument("--train", type=int, default=60000, help="train samples (default 60000)")
    s.add_argument("--test", type=int, default=10000, help="test samples (default 10000)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_synth)
    return p


def add_convert_args(c: argparse.ArgumentParser) -> None:
    """The ``convert`` options, shared with ``tools/convert.py``."""
    c.add_argument("--root", type=Path, required=True,
                   help="torchvision root: files under ROOT/<Dataset>/raw/, .gz or not")
    c.add_argument("--out", type=Path, required=True, help="directory of the shard set")
    c.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist", "kmnist"])
    c.add_argument("--split", action="append", choices=["train", "test"],
                   help="split to convert (repeatable; default: all present)")
    c.add_argument("--mean", type=float, help="normalisation mean (default: dataset's)")
    c.add_argument("--std", type=float, help="normalisation std (default: dataset's)")
    c.add_argument("--download", action="store_true",
                   help="fetch missing raw files with torchvision's downloader")
    c.add_argument("--force", action="store_true", help="rebuild even if up to date")
    c.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _convert(args) -> int:
    from .convert import convert

    r = convert(args.root, args.out, args.dataset, splits=args.split, mean=args.mean,
                std=args.std, force=args.force, download=args.download, progress=not args.quiet)
    if not args.quiet:
        kind = " (SYNTHETIC data)" if r.manifest.get("synthetic") else ""
        counts = ", ".join(f"{k} {v['count']}" for k, v in r.manifest["splits"].items())
        if r.skipped:
            print(f"{r.out}: up to date{kind} ({counts}); nothing written, --force rebuilds")
        else:
            files = [f for s in r.manifest["splits"].values() for f in s["files"].values()]
            mb = sum(f["size"] for f in files) / 1e6
            print(f"wrote {r.out}{kind}: {counts}; {len(files)} files, {mb:.1f} MB "
                  f"in {r.seconds:.2f}s")
            for key, src in r.manifest["sources"].items():
                canon = {True: "canonical", False: "NOT canonical", None: "md5 unknown"}
                print(f"  {key}: {src['file']} md5 {src['md5']} ({canon[src['canonical']]})")
    return 0


def _info(args) -> int:
    from .store import read_manifest

    m = read_manifest(args.path)
    print(f"{args.path}: {m['dataset']}{' (SYNTHETIC)' if m.get('synthetic') else ''}, "
          f"format {m['format_version']}, {m.get('created_by', '?')}")
    rows = [("split", "array", "dtype", "shape", "bytes", "sha256")]
    for split, info in m["splits"].items():
        for f in info["files"].values():
            rows.append((split, f["file"], f["dtype"], "x".join(map(str, f["shape"])),
                         str(f["size"]), f["sha256"][:16]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for split, info in m["splits"].items():
        print(f"{split}: {info['count']} samples, mean {info['mean']}, std {info['std']}")
    for key, src in m["sources"].items():
        print(f"source {key}: {src['file']} md5 {src['md5']} canonical={src['canonical']}")
    return 0


def _verify(args) -> int:
    from .store import verify_shards

    problems = verify_shards(args.path)
    for p in problems:
        print(f"FAILED {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"{args.path}: all files match the manifest")
    return 0


def _synth(args) -> int:
    from .synth import write_raw

    paths = write_raw(args.root, args.train, args.test, args.dataset, args.seed)
    print(f"wrote SYNTHETIC {args.dataset} raw files ({args.train} train, {args.test} test) "
          f"under {paths[0].parent}; these are generated digits, not real data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
