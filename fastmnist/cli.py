"""The ``fastmnist`` command: convert, info, verify, push, synth, bench, demo."""

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import FastMNISTError
from .formats.datasets import DATASETS, INPUT_KINDS

EXAMPLES = {  # one example per command, shown in its --help
    "convert": "fastmnist convert --root data --out shards/mnist",
    "info": "fastmnist info shards/mnist",
    "verify": "fastmnist verify http://127.0.0.1:8000/mnist/",
    "push": "fastmnist push shards/mnist s3://bucket/mnist/ -o endpoint_url=http://127.0.0.1:9000",
    "synth": "fastmnist synth --root synthetic-data",
    "holdout": "fastmnist holdout shards/mnist --sizes train=55000,val=5000 --out parts.json",
    "partition": "fastmnist partition shards/mnist --clients 100 --method dirichlet --alpha 0.3 "
                 "--png skew.png",
    "bench": "fastmnist bench --shards shards/mnist --raw data",
    "scale": "fastmnist scale --sizes 60000,600000",
    "demo": "fastmnist demo",
}


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.func is None:  # no command: say what there is
        parser.print_help()
        return 0
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # here, so that a closed pipe is caught below
        return code
    except FastMNISTError as e:
        print(f"fastmnist: error: {_printable(e)}", file=sys.stderr)  # names from files can hold escapes
        return 2
    except BrokenPipeError:  # `fastmnist info X | head -1`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastmnist", description="Convert MNIST-family raw files into "
                                "fast, checked shards; inspect, publish and benchmark them.",
                                epilog="Start with: fastmnist convert --root data --out shards/mnist "
                                "(data/MNIST/raw/ holds torchvision's files). `fastmnist COMMAND --help` "
                                "describes each command.")
    p.add_argument("--version", action="version", version=f"fastmnist {__version__}")
    p.set_defaults(func=None)
    sub = p.add_subparsers(metavar="COMMAND")

    def command(name: str, help: str):
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              epilog=f"Example: {EXAMPLES[name]}", formatter_class=_ShowDefaults)

    c = command("convert", "raw IDX files (or hf, npz, csv, images, wds) -> validated, pre-normalised shards")
    add_convert_args(c)
    c.set_defaults(func=_convert)

    i = command("info", "print a converted set's manifest as a table")
    i.add_argument("path", help="the converted set's directory, or its URL (http(s)://, s3://, ...)")
    _add_storage_options(i)
    i.set_defaults(func=_info)

    v = command("verify", "re-hash every file of a set against its manifest")
    v.add_argument("path", help="the converted set's directory, or its URL (http(s)://, s3://, ...)")
    _add_storage_options(v)
    v.set_defaults(func=_verify)

    h = command("holdout", "split a split's samples into named parts (a validation part of train, ...)")
    h.add_argument("path", help="the converted set's directory")
    h.add_argument("--split", default="train", help="the split to divide")
    h.add_argument("--sizes", required=True, metavar="NAME=SIZE,...",
                   help="the parts: counts that add up to the split's samples, or fractions that add up to 1")
    h.add_argument("--seed", type=int, default=0, help="the same seed makes the same parts")
    h.add_argument("--random", action="store_true", help="a plain random split, not stratified by class")
    h.add_argument("--out", type=Path, help="write {part: [sample indices]} as JSON here, for "
                                            "FastMNISTLoader(..., indices=parts[NAME])")
    h.set_defaults(func=_holdout)

    f = command("partition", "split a split among federated clients; print each one's classes, draw the skew")
    f.add_argument("path", help="the converted set's directory")
    f.add_argument("--split", default="train", help="the split to divide")
    f.add_argument("--clients", type=int, required=True, help="number of clients (partitions)")
    f.add_argument("--method", default="iid", choices=["iid", "dirichlet", "pathological", "shards"],
                   help="how (as Flower Datasets' partitioners)")
    f.add_argument("--alpha", type=float, help="dirichlet: concentration (smaller: more skew)")
    f.add_argument("--min-size", type=int, help="dirichlet: fewest samples a client may hold (Flower: 10)")
    f.add_argument("--classes-per-client", type=int, help="pathological: classes each client holds")
    f.add_argument("--shards-per-client", type=int, help="shards: label-sorted shards each client holds")
    f.add_argument("--seed", type=int, default=42, help="the same seed makes the same clients")
    f.add_argument("--png", type=Path, help="write the clients x classes heat map here")
    f.add_argument("--out", type=Path, help="write the record and every client's sample indices as JSON")
    f.set_defaults(func=_partition)

    u = command("push", "upload a converted set to an fsspec URL (s3://bucket/set/, ...)")
    u.add_argument("path", type=Path, help="the converted set's directory")
    u.add_argument("url", help="where the set goes, e.g. s3://bucket/mnist/")
    _add_storage_options(u)
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    u.set_defaults(func=_push)

    s = command("synth", "write generated MNIST-format raw files (offline demos)")
    s.add_argument("--root", type=Path, required=True, help="torchvision-style root to write")
    s.add_argument("--dataset", default="mnist", choices=list(DATASETS), metavar="NAME",
                   help=f"which dataset's files to imitate: {', '.join(DATASETS)}")
    s.add_argument("--train", type=int, default=60000, help="train samples")
    s.add_argument("--test", type=int, default=10000, help="test samples")
    s.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    s.add_argument("--extracted-only", action="store_true",
                   help="skip the compressed copies (faster for millions of images)")
    s.add_argument("--force", action="store_true",
                   help="replace raw files already there that synth did not write (real data, perhaps)")
    s.set_defaults(func=_synth)

    b = command("bench", "compare FastMNISTLoader with the usual pipelines")
    add_bench_args(b)
    b.add_argument("--shards", type=Path, required=True, help="converted set (train split used)")
    b.add_argument("--raw", type=Path, required=True, help="the raw root it was converted from")
    b.set_defaults(func=_bench)

    g = command("scale", "the cost curve: synth, convert and read N generated images")
    g.add_argument("--work", type=Path, default=Path("scale-work"),
                   help="scratch directory (needs about 10 GB for 6M images; emptied as it goes)")
    g.add_argument("--out", type=Path, default=Path("docs"), help="where scale.json and scale.png go")
    g.add_argument("--sizes", default="60000,600000,6000000", help="comma-separated N")
    g.add_argument("--rounds", type=int, default=3, help="warm epochs timed per size")
    g.set_defaults(func=_scale)

    d = command("demo", "the main job: get data, convert, then benchmark")
    add_bench_args(d)
    d.add_argument("--data", type=Path, default=Path("data"), help="torchvision root of the raw files")
    d.add_argument("--shards", type=Path, default=Path("shards/mnist"), help="where the converted set goes")
    d.set_defaults(func=_demo)
    return p


def _add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for s3:// and other store URLs (repeatable; values as "
                             "JSON where they parse): endpoint_url=http://127.0.0.1:9000, anon=true, ...")


def _storage_options(args) -> dict:
    import json

    options = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FastMNISTError(f"--storage-option {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


class _ShowDefaults(argparse.HelpFormatter):
    """Help that ends each option's text with its default, where it has one."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in action.help:
            return action.help
        return f"{action.help} (default: %(default)s)"


def add_bench_args(b: argparse.ArgumentParser) -> None:
    b.add_argument("--out", type=Path, default=Path("results"),
                   help="where bench.json, bench.md and bench.png go")
    b.add_argument("--full", action="store_true",
                   help="the complete report: batch sizes 64, 256 and 1024, whole epochs (about 15 minutes "
                        "on 2 cores instead of 2)")
    b.add_argument("--batch-sizes", help="comma-separated (default: 64; with --full 64,256,1024)")
    b.add_argument("--rounds", type=int, default=5, help="rounds timed per fast pipeline")
    b.add_argument("--seed-rounds", type=int, default=3,
                   help="rounds timed per slow pipeline (seed, stock webdataset)")
    b.add_argument("--round-seconds", type=float, default=2.0,
                   help="stop a round's epoch after this long (a rate needs no whole epoch); 0: whole "
                        "epochs (the default with --full)")
    b.add_argument("--min-seconds", type=float, default=1.0,
                   help="time each pipeline for at least this long: fast ones get more rounds")
    b.add_argument("--memory-epochs", type=int, default=20,
                   help="epochs over which FastMNISTLoader's resident memory is tracked")
    b.add_argument("--check", type=Path, metavar="REFERENCE",
                   help="fail if a fastmnist ratio falls below this reference by more than the tolerance")
    b.add_argument("--tolerance", type=float, help="fraction, overrides the reference's")
    b.add_argument("--write-reference", type=Path, metavar="REFERENCE",
                   help="save this run's ratios as the gate's reference")


def add_convert_args(c: argparse.ArgumentParser) -> None:
    """The ``convert`` options, shared with ``tools/convert.py``."""
    c.add_argument("path", nargs="?", type=str, metavar="PATH",
                   help="the input: a torchvision root (idx), a .parquet/.arrow file or folder (hf), "
                        "a .npz, a .csv, an image folder, tar shards (a file, folder, {000..009} "
                        "pattern or URL)")
    c.add_argument("--from", dest="kind", choices=INPUT_KINDS,
                   help="what PATH is (default: told from PATH where that is unambiguous)")
    c.add_argument("--root", type=Path,
                   help="torchvision root: files under ROOT/<Dataset>/raw/, compressed or not "
                        "(the same as PATH with --from idx)")
    c.add_argument("--out", type=Path, required=True, help="directory of the shard set")
    c.add_argument("--dataset", metavar="NAME",
                   help=f"idx: the family dataset whose files to read (default: mnist): "
                        f"{', '.join(DATASETS)}; other kinds: the name the manifest records "
                        "(default: the input's)")
    c.add_argument("--split", action="append",
                   help="idx: split to convert (repeatable; without it: train and test, and QMNIST's "
                        "nist, those present; QMNIST also has test10k and test50k); other kinds: the "
                        "split of an input that holds one (default: from its name, else train)")
    c.add_argument("--image-key", help="npz array, hf column, or wds extension of the images "
                                       "(default: detected)")
    c.add_argument("--label-key", help="npz array, csv column (name or number), hf column, or wds "
                                       "extension of the labels (default: detected; wds: cls)")
    c.add_argument("--num-classes", type=int,
                   help="other kinds: the number of classes (default: declared by the input, else the "
                        "largest label + 1)")
    c.add_argument("--grayscale", action="store_true",
                   help="convert colour images to one channel (recorded in the manifest)")
    c.add_argument("--resize", action="store_true",
                   help="scale images of another size to 28x28, bilinear (recorded in the manifest)")
    c.add_argument("--val-fraction", type=float,
                   help="other kinds: hold out this fraction of train as a val split (seeded, recorded)")
    c.add_argument("--seed", type=int, default=0, help="the seed of --val-fraction's draw")
    c.add_argument("--mean", type=float,
                   help="normalisation mean; without it MNIST's 0.1307, or computed from the train split")
    c.add_argument("--std", type=float,
                   help="normalisation std; without it MNIST's 0.3081, or computed from the train split")
    c.add_argument("--no-float32", action="store_true",
                   help="keep only uint8 images (4x less disk); the loader normalises them per batch")
    c.add_argument("--format", default="npy", choices=["npy", "wds", "both"],
                   help="memory-mapped .npy arrays, WebDataset tar shards, or both")
    c.add_argument("--shard-size", type=int, default=10000, help="samples per tar shard")
    c.add_argument("--download", action="store_true",
                   help="idx: fetch missing raw files with torchvision's downloader")
    c.add_argument("--force", action="store_true", help="rebuild even if up to date")
    c.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _convert(args) -> int:
    from .conversion.converter import convert
    from .conversion.inputs import convert_from

    if (args.root is None) == (args.path is None):
        raise FastMNISTError("convert: give the input once, as PATH or as --root")
    common = {"mean": args.mean, "std": args.std, "format": args.format, "shard_size": args.shard_size,
              "float32": not args.no_float32, "force": args.force, "progress": not args.quiet}
    from .formats.foreign import detect

    if args.root is not None or (args.kind or detect(args.path)) == "idx":
        foreign_only = {"--image-key": args.image_key, "--label-key": args.label_key,
                        "--num-classes": args.num_classes, "--grayscale": args.grayscale,
                        "--resize": args.resize, "--val-fraction": args.val_fraction}
        given = [name for name, value in foreign_only.items() if value not in (None, False)]
        if given:
            if given[0] == "--val-fraction":
                raise FastMNISTError("--val-fraction: an IDX set keeps torchvision's splits; hold out a "
                                     "validation part when loading: `fastmnist holdout OUT --sizes "
                                     "train=55000,val=5000 --out parts.json`, or fastmnist.holdout() and "
                                     "FastMNISTLoader(..., indices=parts['val'])")
            raise FastMNISTError(f"{given[0]}: applies to inputs other than idx (an IDX dataset's files "
                                 "fix its splits, classes and image size)")
        r = convert(args.root or args.path, args.out, args.dataset or "mnist", splits=args.split,
                    download=args.download, **common)
    else:
        if args.download:
            raise FastMNISTError("--download: fetches torchvision's IDX files only (--from idx)")
        if args.split and len(args.split) > 1:
            raise FastMNISTError("--split: one split name for an input that holds one")
        r = convert_from(args.path, args.out, args.kind, split=args.split[0] if args.split else None,
                         image_key=args.image_key, label_key=args.label_key, dataset=args.dataset,
                         num_classes=args.num_classes, grayscale=args.grayscale, resize=args.resize,
                         val_fraction=args.val_fraction, seed=args.seed, **common)
    if not args.quiet:
        kind = " (SYNTHETIC data)" if r.manifest.synthetic else ""
        counts = ", ".join(f"{k} {v.count}" for k, v in r.manifest.splits.items())
        if r.skipped:
            print(f"{r.out}: up to date{kind} ({counts}); nothing written, --force rebuilds")
        else:
            files = list(r.manifest.files())
            mb = sum(f.size for f in files) / 1e6
            print(f"wrote {r.out}{kind}: {counts}; {len(files)} files, {mb:.1f} MB "
                  f"in {r.seconds:.2f}s")
            for key, src in r.manifest.inputs.items():
                canon = {True: "canonical", False: "NOT canonical", None: "md5 unknown"}
                print(f"  {key}: {_printable(src.file)} md5 {src.md5} ({canon[src.canonical]})")
    return 0


def _info(args) -> int:
    from .remote.transport import is_url
    from .store import read_manifest, read_remote_manifest

    if is_url(args.path):
        m = read_remote_manifest(args.path, storage_options=_storage_options(args))[1]
    else:
        m = read_manifest(args.path)
    print(f"{_printable(args.path)}: {_printable(m.dataset)}{' (SYNTHETIC)' if m.synthetic else ''}, "
          f"format {m.format_version}, {_printable(m.created_by)}")
    rows = [("split", "array", "dtype", "shape", "bytes", "sha256")]
    for split, info in m.splits.items():
        for f in info.arrays.values():
            rows.append((split, f.file, f.dtype, "x".join(map(str, f.shape)), str(f.size), f.sha256[:16]))
        for f in info.shards:
            rows.append((split, f.file, "tar", f"{f.count} samples", str(f.size), f.sha256[:16]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for split, info in m.splits.items():
        print(f"{split}: {info.count} samples, mean {info.mean}, std {info.std}"
              f"{'' if info.labelled else ', no labels (each -1)'}")
    for key, src in m.inputs.items():
        print(f"source {key}: {_printable(src.file)} md5 {src.md5} canonical={src.canonical}")
    return 0


def _printable(text) -> str:
    """``text`` with every character a terminal would act on (controls, escapes) written as
    Python escapes: strings from a manifest can come from anyone."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _verify(args) -> int:
    from .remote.transport import is_url
    from .store import verify_remote, verify_shards

    if is_url(args.path):
        problems = verify_remote(args.path, storage_options=_storage_options(args))
    else:
        problems = verify_shards(args.path)
    return _report(problems, "FAILED", f"{_printable(args.path)}: all files match the manifest")


def _holdout(args) -> int:
    import json

    import numpy as np

    from .loading.select import holdout
    from .store import open_shards

    sizes = {}
    for item in args.sizes.split(","):
        name, sep, value = item.partition("=")
        try:
            sizes[name.strip()] = float(value) if "." in value else int(value)
        except ValueError:
            raise FastMNISTError(f"--sizes {item!r}: expected NAME=COUNT or NAME=FRACTION") from None
        if not sep or not name.strip():
            raise FastMNISTError(f"--sizes {item!r}: expected NAME=COUNT or NAME=FRACTION")
    labels = np.asarray(open_shards(args.path).split(args.split).array("labels"))
    parts = holdout(labels, sizes, seed=args.seed, stratify=not args.random)
    classes = range(int(labels.max()) + 1 if labels.ndim == 1 and len(labels) else 0)
    rows = [("part", "samples", *map(str, classes))]
    rows += [(name, str(len(idx)), *map(str, np.bincount(labels[idx], minlength=len(classes))))
             for name, idx in parts.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    kind = "random" if args.random else "stratified"
    print(f"{_printable(args.path)} {args.split}: {kind}, seed {args.seed}; samples per class:")
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    if args.out:
        args.out.write_text(json.dumps({"split": args.split, "seed": args.seed, "stratified": not args.random,
                                        "parts": {k: v.tolist() for k, v in parts.items()}}) + "\n")
        print(f"wrote {args.out}: FastMNISTLoader(..., indices=json.load(open({str(args.out)!r}))"
              f"[\"parts\"][{next(iter(parts))!r}])")
    return 0


def _partition(args) -> int:
    import json

    from .partition import heatmap, partition

    given = {"alpha": args.alpha, "min_partition_size": args.min_size,
             "num_classes_per_partition": args.classes_per_client,
             "num_shards_per_partition": args.shards_per_client}
    clients = partition(args.path, args.clients, args.method, args.split, args.seed,
                        **{k: v for k, v in given.items() if v is not None})
    counts = clients.counts
    rows = [("client", "samples", *map(str, range(counts.shape[1])))]
    rows += [(str(i), str(len(c)), *map(str, k))
             for i, (c, k) in enumerate(zip(clients.clients, counts.tolist(), strict=True))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    params = json.dumps(clients.params, sort_keys=True)
    print(f"{_printable(args.path)} {args.split}: {args.method} {params}, digest {clients.digest}; "
          "samples per class:")
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    if args.png:
        heatmap(clients, args.png)
        print(f"wrote {args.png}")
    if args.out:
        everyone = [c.tolist() for c in clients.clients]
        args.out.write_text(json.dumps({**clients.record(), "clients": everyone}) + "\n")
        print(f"wrote {args.out}")
    return 0


def _push(args) -> int:
    from .conversion.push import push

    options = _storage_options(args)
    done = push(args.path, args.url, options, progress=not args.quiet)
    if not done.uploaded:
        print(f"{done.url}: up to date: its manifest and all {len(done.kept)} files match; nothing uploaded")
    else:
        print(f"{done.url}: uploaded {len(done.uploaded)} files ({done.bytes_uploaded / 1e6:.1f} MB), "
              f"kept {len(done.kept)} already there; manifest.json written last and read back")
    return 0


def _synth(args) -> int:
    from .conversion.synth import write_raw

    paths = write_raw(args.root, args.train, args.test, args.dataset, args.seed,
                      compressed=not args.extracted_only, force=args.force)
    print(f"wrote SYNTHETIC {args.dataset} raw files ({args.train} train, {args.test} test) "
          f"under {paths[0].parent}; these are generated digits, not real data")
    return 0


def _require_bench_extra() -> None:
    """The report compares against torchvision and stock webdataset and draws with matplotlib."""
    import importlib

    missing = []
    for module in ("torchvision", "webdataset", "matplotlib"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise FastMNISTError(f"{', '.join(missing)} not installed: the comparison report needs "
                             "the bench extra (pip install 'fastmnist[bench]')")


def _bench(args) -> int:
    import json

    _require_bench_extra()
    from .bench.report import check, extract_for_torchvision, headline, markdown, reference_from, run_report

    extract_for_torchvision(args.raw)
    sizes = args.batch_sizes or ("64,256,1024" if args.full else "64")
    try:
        batch_sizes = [int(b) for b in sizes.split(",")]
    except ValueError:
        raise FastMNISTError(f"--batch-sizes {sizes!r}: expected comma-separated integers") from None
    cut = None if args.full or args.round_seconds <= 0 else args.round_seconds
    result = run_report(args.raw, args.shards, args.out, batch_sizes, args.rounds, args.seed_rounds,
                        args.memory_epochs, min_seconds=args.min_seconds, round_seconds=cut)
    print(markdown(result))
    print(f"wrote {args.out / 'bench.json'}, {args.out / 'bench.md'}, {args.out / 'bench.png'}\n")
    print(headline(result))
    if args.write_reference:
        reference = reference_from(result, args.tolerance or 0.6)
        args.write_reference.write_text(json.dumps(reference, indent=2) + "\n")
        print(f"wrote the gate's reference {args.write_reference}")
    if args.check:
        return _report(check(result, json.loads(args.check.read_text()), args.tolerance),
                       "REGRESSION", f"gate: every fastmnist ratio is within tolerance of {args.check}")
    return 0


def _scale(args) -> int:
    from .bench.scale import markdown, run_scale

    result = run_scale(args.work, args.out, [int(n) for n in args.sizes.split(",")], args.rounds)
    print(markdown(result))
    print(f"wrote {args.out / 'scale.json'}, {args.out / 'scale.png'}")
    return 0


def _report(failures: list[str], label: str, success: str) -> int:
    """Print each failure to stderr after ``label`` and return 1; with none, print
    ``success`` and return 0."""
    for f in failures:
        print(f"{label} {f}", file=sys.stderr)
    if failures:
        return 1
    print(success)
    return 0


def _demo(args) -> int:
    from .conversion.converter import convert
    from .conversion.synth import write_raw

    _require_bench_extra()
    if not list(args.data.glob("MNIST/raw/*")):
        try:
            convert(args.data, args.shards, format="both", download=True, progress=False)
        except FastMNISTError as e:
            print(f"\n{'!' * 78}\n! {e}\n! No MNIST files and no network: generating SYNTHETIC "
                  f"MNIST-format data in {args.data}.\n! Every figure below is measured on "
                  f"generated digits, not on MNIST.\n{'!' * 78}\n", file=sys.stderr)
            write_raw(args.data)
    # the convert command's own defaults, as `fastmnist convert` would take them
    _convert(_parser().parse_args(["convert", "--root", str(args.data), "--out", str(args.shards),
                                   "--format", "both"]))
    args.raw = args.data
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
