"""`python -m zfast.config --reference`: docs/configuration.md's generated block
(zfast/config/reference.py)."""

import sys

from zfast.config.reference import reference


def main(args: list[str]) -> None:
    if args == ["--reference"]:
        sys.stdout.write(reference())
    else:
        sys.exit("usage: python -m zfast.config --reference")


if __name__ == "__main__":   # imported (not run) by whoever walks the package
    main(sys.argv[1:])
