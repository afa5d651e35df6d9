"""zswarm-keygen: make a CURVE key pair for a broker or a peer.

    zswarm-keygen NAME [--dir DIR]            (installed with the project)
    python -m common.keygen NAME [--dir DIR]  (the same, from a checkout)

writes DIR/NAME.key (public, 0644: hand it to the servers that should accept this node, into their
allow-list folder) and DIR/NAME.key_secret (secret, 0600: stays with the node), refusing to overwrite
either, and prints both paths and the public key. Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common.cli import run_guarded
from common.security import generate_keypair, load_public


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zswarm-keygen",
        description="Make a CURVE key pair: NAME.key (public) and NAME.key_secret (secret, mode 0600).",
    )
    parser.add_argument("name", metavar="NAME", help="key name, e.g. the peer's name")
    parser.add_argument("--dir", default=".", metavar="DIR", help="folder to write to (default: .)")
    args = parser.parse_args(argv)

    def body() -> int:
        public_path, secret_path = generate_keypair(args.dir, args.name)
        print(f"public key file: {public_path}")
        print(f"secret key file: {secret_path}")
        print(f"public key: {load_public(public_path).decode('ascii')}")
        return 0

    return run_guarded(body)


if __name__ == "__main__":
    sys.exit(main())
