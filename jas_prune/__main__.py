"""``python -m jas_prune`` is the ``jas-prune`` command (so ``torchrun -m jas_prune`` works)."""

from .cli import main

if __name__ == "__main__":
    main()
