"""``python -m vggnorm`` (also what ``torchrun -m vggnorm`` runs)."""

from vggnorm.cli import main

if __name__ == "__main__":
    main()
