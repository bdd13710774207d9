import sys

from keyden.cli.serve import serve


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    return 2


if __name__ == "__main__":
    sys.exit(main())
