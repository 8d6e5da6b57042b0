"""``python -m bench.cli``: the ``bench`` command."""

from bench.cli import main

# Guarded: worker processes started with spawn import this module again (as __mp_main__) and must not run it.
if __name__ == "__main__":  # pragma: no cover
    main()
