"""`python -m cbkernels demo|bench|info|audit`."""
import argparse
import sys


def _info(_argv):
    import torch

    import cbkernels
    from cbkernels import _ops

    print(f"cbkernels {cbkernels.__version__}, torch {torch.__version__}")
    print(f"extension: {'loaded' if _ops.extension_loaded() else 'not built (' + str(_ops.extension_error()) + ')'}")
    print(f"backends on cpu: {cbkernels.available_backends('cpu')}")
    if torch.cuda.is_available():
        print(f"backends on cuda: {cbkernels.available_backends('cuda')}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m cbkernels", description=__doc__)
    parser.add_argument("command", choices=["demo", "bench", "info", "audit"])
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "demo":
        from .demo import main as run
    elif args.command == "bench":
        from .bench import main as run
    elif args.command == "audit":
        from .audit import main as run
    else:
        run = _info
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
