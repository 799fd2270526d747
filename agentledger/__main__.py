"""`python -m agentledger` and the `agentledger` script.

`agentledger hook ...` takes a fast path that skips the typer CLI (see agentledger/hookmain.py);
everything else, including `agentledger hook --help`, is the typer app.
"""

import sys


def run() -> None:
    args = sys.argv[1:]
    if args[:1] == ["hook"] and not {"-h", "--help"} & set(args):
        from agentledger.hookmain import main as hook_main

        sys.exit(hook_main(args[1:]))
    from agentledger.cli import main

    main()


if __name__ == "__main__":
    run()
