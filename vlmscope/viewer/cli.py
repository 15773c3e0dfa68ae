"""`vlmscope serve [--graphs DIR] [--features DIR]`: the flags and the command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlmscope.viewer.server import ViewerConfig, make_server


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `vlmscope serve` (cli.py calls this on its subparser)."""
    p.add_argument(
        "--graphs",
        default=None,
        metavar="DIR",
        help="folder of graph JSON files (from `vlmscope attribute --graph-dir`)",
    )
    p.add_argument(
        "--features",
        default=None,
        metavar="DIR",
        help="folder written by `vlmscope features` (feature cards)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only; another "
        "address prints a warning: anyone who reaches it can read the graphs)",
    )
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 = any free)")
    p.add_argument(
        "--max-graph-mb",
        type=float,
        default=256.0,
        help="refuse graph files larger than this (default: 256)",
    )
    p.add_argument(
        "--model", default=None, help="model for the intervention panel (loaded on first use)"
    )
    p.add_argument(
        "--dictionaries",
        default=None,
        help="dictionaries for the intervention panel (with --model)",
    )
    p.add_argument("--device", default=None, help="device of the intervention model")


def run_serve_command(args: argparse.Namespace) -> int:
    """Serve until interrupted; 2 for bad arguments."""
    graphs = Path(args.graphs) if args.graphs else None
    features = Path(args.features) if args.features else None
    if graphs is None and features is None:
        print("vlmscope serve: error: give --graphs DIR and/or --features DIR", file=sys.stderr)
        return 2
    if graphs is not None and not graphs.is_dir():
        print(f"vlmscope serve: error: --graphs {graphs} is not a folder", file=sys.stderr)
        return 2
    if (args.model is None) != (args.dictionaries is None):
        print("vlmscope serve: error: --model and --dictionaries go together", file=sys.stderr)
        return 2
    if features is not None and not features.is_dir():
        print(f"warning: --features {features} is not a folder: cards will say features are "
              "unavailable", file=sys.stderr)  # fmt: skip
    cfg = ViewerConfig(graphs=graphs, features=features, host=args.host, port=args.port,
                       max_graph_bytes=int(args.max_graph_mb * 2**20), model=args.model,
                       dictionaries=args.dictionaries, device=args.device)  # fmt: skip
    try:
        server = make_server(cfg)
    except OSError as e:
        print(f"vlmscope serve: error: cannot listen on {args.host}:{args.port}: {e}",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"vlmscope viewer on {server.url}\n(the token in the URL lets this browser save pins "
          "and run interventions; Ctrl-C stops)", flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
