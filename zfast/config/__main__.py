"""`python -m zfast.config --reference | --fields SECTION`: docs/configuration.md's
generated blocks (zfast/config/reference.py)."""

import sys

from zfast.config.reference import FIELDS, field_table, reference


def main(args: list[str]) -> None:
    if args == ["--reference"]:
        sys.stdout.write(reference())
    elif len(args) == 2 and args[0] == "--fields" and args[1] in FIELDS:
        sys.stdout.write(field_table(args[1]))
    else:
        sys.exit("usage: python -m zfast.config --reference | --fields SECTION")


if __name__ == "__main__":   # imported (not run) by whoever walks the package
    main(sys.argv[1:])
